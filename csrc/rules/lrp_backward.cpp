// The backward of a Linear/Conv layer under an LRP rule: the layer products through ATen
// (cuBLAS/cuDNN/oneDNN) and the element-wise rule terms through lxt_ext's own kernels.
//
// Per layer the rule costs, in layer-sized products, forward pass excluded: epsilon 2 (W x, W^T S);
// gamma 4 (W x, |W||x|, W^T S, |W|^T D); alpha-beta 4 on non-negative inputs, 8 otherwise. On
// non-negative inputs both two-term rules run as 2 stacked products of twice the width.
// zennit's BasicHook re-runs the layer once per modifier and back-propagates through each copy
// (10 for gamma, 8 for alpha-beta). Nothing but the
// layer input is kept from the forward pass, so an in-place activation after the layer is safe.
// Registered once, as CompositeExplicitAutograd: it only calls ops, and the dispatcher picks each
// one's backend.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "rules/terms.h"

namespace lxt_ext {
namespace {

struct Product {
  bool linear;
  bool transposed;
  std::vector<int64_t> stride, padding, dilation, output_padding;
  int64_t groups;

  at::Tensor forward(const at::Tensor& x, const at::Tensor& w) const {
    if (linear) return at::matmul(x, w.t());
    return at::convolution(x, w, c10::nullopt, stride, padding, dilation, transposed, output_padding, groups);
  }

  // W^T s, i.e. the input gradient of the product for output gradient s.
  at::Tensor transpose(const at::Tensor& s, const at::Tensor& x, const at::Tensor& w) const {
    if (linear) return at::matmul(s, w);
    return std::get<0>(at::convolution_backward(s, x, w, c10::nullopt, stride, padding, dilation, transposed,
                                                output_padding, groups, {true, false, false}));
  }

  // One weight of twice the outputs, w1 = f1(w) and w2 = f2(w) side by side within each group, so one
  // product gives both (the stacked layout of RowLayout) and one transposed product gives
  // w1^T s + w2^T d from stacked [s, d]. fill(w1, w2, w) writes both into views of the result: no copy of
  // either is made on the way (a layer4 weight of resnet50 is 9 MB).
  template <typename Fill>
  at::Tensor stack(const at::Tensor& w, const Fill& fill) const {
    const int64_t g = linear ? 1 : groups;
    auto sizes = w.sizes().vec();
    std::vector<int64_t> grouped{g, sizes[0] / g};
    grouped.insert(grouped.end(), sizes.begin() + 1, sizes.end());
    // Output channels are dim 0 of a convolution's weight, dim 1 of a transposed one's.
    const int64_t pair_dim = (transposed ? 1 : 0) + 1;
    auto pair_sizes = grouped;
    pair_sizes.insert(pair_sizes.begin() + pair_dim, 2);
    at::Tensor pair = at::empty(pair_sizes, w.options());
    at::Tensor w1 = pair.select(pair_dim, 0), w2 = pair.select(pair_dim, 1);
    fill(w1, w2, w.reshape(grouped));
    sizes[pair_dim - 1] *= 2;
    return pair.view(sizes);
  }

  int64_t channel_dim() const { return linear ? -1 : 1; }
  int64_t output_groups() const { return linear ? 1 : groups; }
};

at::Tensor lrp_backward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& grad,
                        const at::Tensor& bias, const at::Tensor& bias1, const at::Tensor& bias2, int64_t rule,
                        double epsilon, double gamma, double alpha, double beta, bool explicit_relevance,
                        bool linear, bool transposed, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, at::IntArrayRef output_padding, int64_t groups) {
  TORCH_CHECK(weight.device() == x.device() && grad.device() == x.device(),
              "lxt_ext::lrp_backward: input (", x.device(), "), weight (", weight.device(),
              ") and relevance (", grad.device(), ") must be on one device");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && grad.scalar_type() == x.scalar_type(),
              "lxt_ext::lrp_backward: input (", x.scalar_type(), "), weight (", weight.scalar_type(),
              ") and relevance (", grad.scalar_type(), ") must share one floating dtype");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lxt_ext::lrp_backward: floating input required, got ",
              x.scalar_type());
  const RuleParams params = make_params(rule, epsilon, gamma, alpha, beta, explicit_relevance);
  const Product product{linear, transposed, stride.vec(), padding.vec(), dilation.vec(), output_padding.vec(), groups};
  if (params.rule == kGradient) return product.transpose(grad, x, weight);

  const auto output_terms = [&](const at::Tensor& wx, const c10::optional<at::Tensor>& ax) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lxt_ext::output_terms", "")
                               .typed<std::vector<at::Tensor>(
                                   const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                   int64_t, double, double, double, double, bool)>();
    return op.call(wx, ax, grad, bias, bias1, bias2, product.channel_dim(), product.output_groups(), rule, epsilon,
                   gamma, alpha, beta, explicit_relevance);
  };
  const auto input_terms = [&](const at::Tensor& t, const c10::optional<at::Tensor>& a, bool mixed) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lxt_ext::input_terms", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                 const c10::optional<at::Tensor>&, bool, bool)>();
    return op.call(x, t, a, explicit_relevance, mixed);
  };

  if (params.rule == kEpsilon) {
    at::Tensor t = product.transpose(output_terms(product.forward(x, weight), c10::nullopt)[0], x, weight);
    return explicit_relevance ? input_terms(t, c10::nullopt, false) : t;
  }

  // Two-term rules need a pair of products per side. After a ReLU the input has no negative
  // part: then both products share the input and run as one stacked product, and only the
  // weights of positive inputs (P) are needed, again one stacked transposed product.
  const bool nonnegative = x.numel() == 0 || x.min().item<double>() >= 0;
  const bool gamma_rule = params.rule == kGamma;
  if (nonnegative) {  // gamma: [W, |W|]; alpha-beta: [W+, W-]
    const at::Tensor stacked = product.stack(weight, [&](at::Tensor& w1, at::Tensor& w2, const at::Tensor& w) {
      if (gamma_rule) {
        w1.copy_(w);
        at::abs_out(w2, w);
      } else {
        at::clamp_min_out(w1, w, 0);
        at::clamp_max_out(w2, w, 0);
      }
    });
    at::Tensor pos = product.transpose(output_terms(product.forward(x, stacked), c10::nullopt)[0], x, stacked);
    return input_terms(pos, pos, false);
  }
  const at::Tensor w1 = gamma_rule ? weight : weight.clamp_min(0);
  const at::Tensor w2 = gamma_rule ? weight.abs() : weight.clamp_max(0);

  if (gamma_rule) {  // w1 = W, w2 = |W|: t = W^T S, a = |W|^T D, P = t + a, Q = t - a
    auto terms = output_terms(product.forward(x, w1), product.forward(x.abs(), w2));
    at::Tensor t = product.transpose(terms[0], x, w1);
    terms[0].reset();
    at::Tensor a = product.transpose(terms[1], x, w2);
    terms[1].reset();
    return input_terms(t, a, true);
  }

  // alpha-beta, w1 = W+, w2 = W-: p, n, P and Q as sums of one sign each (see math.h).
  const at::Tensor x_pos = x.clamp_min(0), x_neg = x.clamp_max(0);
  auto terms = output_terms(product.forward(x_pos, w1).add_(product.forward(x_neg, w2)),
                            product.forward(x_pos, w2).add_(product.forward(x_neg, w1)));
  at::Tensor pos = product.transpose(terms[0], x, w1).add_(product.transpose(terms[1], x, w2));
  at::Tensor neg = product.transpose(terms[0], x, w2).add_(product.transpose(terms[1], x, w1));
  return input_terms(pos, neg, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(lxt_ext, CompositeExplicitAutograd, m) {
  m.impl("lrp_backward", &lrp_backward);
}

}  // namespace lxt_ext
