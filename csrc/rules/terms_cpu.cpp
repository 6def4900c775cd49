// CPU loops of the element-wise rule terms, registered under the CPU dispatch key; the checks and
// planning are in terms.cpp, the per-element math in math.h.
#include "rules/terms.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

namespace lxt_ext {
namespace {

constexpr int64_t kGrain = 16384;

template <typename scalar_t>
void output_terms_loop(OutputTermsPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowLayout layout = plan.layout;
  const bool two = plan.two_terms();
  const scalar_t* wx = plan.wx.data_ptr<scalar_t>();
  const scalar_t* ax = !two ? nullptr : layout.stacked ? wx + layout.pair_offset() : plan.ax.data_ptr<scalar_t>();
  const scalar_t* g = plan.grad.data_ptr<scalar_t>();
  const acc_t* b = plan.bias.data_ptr<acc_t>();
  const acc_t* b1 = plan.bias1.data_ptr<acc_t>();
  const acc_t* b2 = plan.bias2.data_ptr<acc_t>();
  scalar_t* s = plan.s.data_ptr<scalar_t>();
  scalar_t* d = !two ? nullptr : layout.stacked ? s + layout.pair_offset() : plan.d.data_ptr<scalar_t>();
  const int64_t inner = layout.inner;
  std::atomic<bool> bad{false};
  dispatch_rule(plan.params.rule, [&](auto rule) {
    // A row of `inner` elements shares one channel and so one set of biases.
    at::parallel_for(0, plan.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)), [&](int64_t begin, int64_t end) {
      const auto p = RuleConstants<acc_t>::of(plan.params);
      int local_bad = 0;  // an int, not a bool: GCC vectorises int reductions, not bool ones
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % layout.channels;
        const acc_t bc = b[c], b1c = b1[c], b2c = b2[c];
        const int64_t off = layout.offset(row), goff = row * inner;
        const scalar_t* wx_row = wx + off;
        const scalar_t* g_row = g + goff;
        scalar_t* s_row = s + off;
        const scalar_t* ax_row = ax ? ax + off : wx_row;  // epsilon reads no second term
        scalar_t* d_row = d ? d + off : nullptr;
        if constexpr (decltype(rule)::value == kEpsilon) {
          for (int64_t j = 0; j < inner; ++j) {
            acc_t si, di;
            output_terms<kEpsilon, acc_t>(p, wx_row[j], acc_t(0), g_row[j], bc, b1c, b2c, &si, &di);
            s_row[j] = si;
          }
        } else {
          for (int64_t j = 0; j < inner; ++j) {
            acc_t si, di;
            output_terms<decltype(rule)::value, acc_t>(p, wx_row[j], ax_row[j], g_row[j], bc, b1c, b2c, &si, &di);
            s_row[j] = si;
            d_row[j] = di;
          }
        }
        // The finite check runs as its own pass over the row (still in cache): fused into the loop
        // above, GCC gives up vectorising gamma's selects. The inputs are checked too, as a
        // rule's masks could otherwise turn a NaN into a silent zero.
        const scalar_t* second = d_row ? d_row : s_row;
        for (int64_t j = 0; j < inner; ++j) {
          local_bad |= !(is_finite(acc_t(s_row[j])) & is_finite(acc_t(second[j])) & is_finite(acc_t(g_row[j])) &
                         is_finite(acc_t(wx_row[j])) & is_finite(acc_t(ax_row[j])));
        }
      }
      if (local_bad) bad = true;
    });
  });
  if (bad) fail_non_finite(plan.params);
}

template <typename scalar_t>
void input_terms_loop(InputTermsPlan& plan, bool explicit_relevance, bool mixed) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = plan.x.data_ptr<scalar_t>();
  const scalar_t* t = plan.t.data_ptr<scalar_t>();
  const scalar_t* a = plan.a.defined() ? plan.a.data_ptr<scalar_t>() : nullptr;
  scalar_t* out = plan.out.data_ptr<scalar_t>();
  at::parallel_for(0, plan.x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = input_terms<acc_t>(explicit_relevance, a != nullptr, mixed, x[i], t[i], a ? acc_t(a[i]) : acc_t(0));
    }
  });
}

template <typename scalar_t>
void identity_backward_loop(IdentityPlan& plan, double stabilizer) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h = plan.h.data_ptr<scalar_t>();
  const scalar_t* x = plan.x.data_ptr<scalar_t>();
  const scalar_t* g = plan.g.data_ptr<scalar_t>();
  scalar_t* out = plan.out.data_ptr<scalar_t>();
  const acc_t eps = static_cast<acc_t>(stabilizer);
  at::parallel_for(0, plan.x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = identity_backward<acc_t>(h[i], x[i], g[i], eps);
    }
  });
}

std::vector<at::Tensor> output_terms_cpu(const at::Tensor& wx, const c10::optional<at::Tensor>& ax,
                                         const at::Tensor& grad, const at::Tensor& bias,
                                         const at::Tensor& bias1, const at::Tensor& bias2,
                                         int64_t channel_dim, int64_t groups, int64_t rule, double epsilon,
                                         double gamma, double alpha, double beta,
                                         bool explicit_relevance) {
  auto plan = plan_output_terms(wx, ax, grad, bias, bias1, bias2, channel_dim, groups,
                                make_params(rule, epsilon, gamma, alpha, beta, explicit_relevance));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.wx.scalar_type(), "lxt_ext::output_terms",
                                  [&] { output_terms_loop<scalar_t>(plan); });
  if (plan.d.defined()) return {plan.s, plan.d};
  return {plan.s};
}

at::Tensor input_terms_cpu(const at::Tensor& x, const at::Tensor& t, const c10::optional<at::Tensor>& a,
                           bool explicit_relevance, bool mixed) {
  auto plan = plan_input_terms(x, t, a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.x.scalar_type(), "lxt_ext::input_terms",
                                  [&] { input_terms_loop<scalar_t>(plan, explicit_relevance, mixed); });
  return plan.out;
}

at::Tensor identity_backward_cpu(const at::Tensor& output, const at::Tensor& input, const at::Tensor& grad,
                                 double stabilizer) {
  auto plan = plan_identity_backward(output, input, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.x.scalar_type(), "lxt_ext::identity_backward",
                                  [&] { identity_backward_loop<scalar_t>(plan, stabilizer); });
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lxt_ext, CPU, m) {
  m.impl("output_terms", &output_terms_cpu);
  m.impl("input_terms", &input_terms_cpu);
  m.impl("identity_backward", &identity_backward_cpu);
}

}  // namespace lxt_ext
