// Checks and planning of the element-wise rule terms, shared by both backends: each backend's
// entry point (terms_cpu.cpp, terms_cuda.cu, one per dispatch key) checks and allocates through
// the plans here, so those files hold only their loops.
#include "rules/terms.h"

#include <torch/library.h>

#include "backends.h"

namespace lxt_ext {

const char* rule_name(int rule) {
  switch (rule) {
    case kGradient: return "gradient";
    case kEpsilon: return "epsilon";
    case kGamma: return "gamma";
    case kAlphaBeta: return "alpha-beta";
    default: return "unknown";
  }
}

RuleParams make_params(int64_t rule, double epsilon, double gamma, double alpha, double beta,
                       bool explicit_relevance) {
  TORCH_CHECK(rule >= kGradient && rule <= kAlphaBeta, "lxt_ext: unknown rule code ", rule);
  return RuleParams{static_cast<int>(rule), epsilon, gamma, alpha, beta, explicit_relevance};
}

void fail_non_finite(const RuleParams& params) {
  TORCH_CHECK(false, "lxt_ext: the ", rule_name(params.rule),
              " rule produced NaN or Inf relevance; the layer input or the incoming relevance "
              "holds NaN/Inf, or the stabilizer epsilon (", params.epsilon, ") is too small");
}

static void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "lxt_ext: ", name,
              " must be a floating tensor (float32, float64, float16 or bfloat16), got ",
              t.scalar_type());
}

OutputTermsPlan plan_output_terms(const at::Tensor& wx, const c10::optional<at::Tensor>& ax,
                                  const at::Tensor& grad, const at::Tensor& bias,
                                  const at::Tensor& bias1, const at::Tensor& bias2,
                                  int64_t channel_dim, int64_t groups, const RuleParams& params) {
  TORCH_CHECK(params.rule != kGradient, "lxt_ext::output_terms: the gradient rule has no terms");
  check_float(wx, "the layer output");
  TORCH_CHECK(grad.scalar_type() == wx.scalar_type() && grad.device() == wx.device(),
              "lxt_ext::output_terms: relevance (", grad.scalar_type(), ", ", grad.device(),
              ") and layer output (", wx.scalar_type(), ", ", wx.device(), ") differ");
  TORCH_CHECK(grad.dim() >= 1 && grad.dim() == wx.dim(), "lxt_ext::output_terms: relevance of shape ",
              grad.sizes(), " does not match the layer output of shape ", wx.sizes());
  const int64_t cd = at::maybe_wrap_dim(channel_dim, grad.dim());
  OutputTermsPlan plan;
  plan.params = params;
  const bool stacked = plan.two_terms() && !ax.has_value();
  auto expected = grad.sizes().vec();
  if (stacked) expected[cd] *= 2;
  TORCH_CHECK(wx.sizes() == at::IntArrayRef(expected), "lxt_ext::output_terms: relevance of shape ", grad.sizes(),
              " does not match the layer output of shape ", wx.sizes(), stacked ? " (stacked pair)" : "");
  TORCH_CHECK(!ax.has_value() || ax->sizes() == wx.sizes(), "lxt_ext::output_terms: the second product (shape ",
              ax.has_value() ? ax->sizes() : at::IntArrayRef{}, ") must match the layer output ", wx.sizes());
  const int64_t channels = grad.size(cd);
  TORCH_CHECK(groups >= 1 && channels % groups == 0, "lxt_ext::output_terms: ", channels,
              " channels do not split into ", groups, " groups");
  int64_t inner = 1;
  for (int64_t i = cd + 1; i < grad.dim(); ++i) inner *= grad.size(i);
  plan.layout = RowLayout{channels, inner, groups, stacked};
  plan.rows = inner > 0 ? grad.numel() / inner : 0;
  const auto acc = wx.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* b : {&bias, &bias1, &bias2}) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == channels, "lxt_ext::output_terms: biases must have ",
                channels, " entries, got shape ", b->sizes());
  }
  const auto opts = wx.options().dtype(acc);
  plan.bias = bias.to(opts).contiguous();
  plan.bias1 = bias1.to(opts).contiguous();
  plan.bias2 = bias2.to(opts).contiguous();
  plan.wx = wx.contiguous();
  plan.grad = grad.contiguous();
  if (ax.has_value()) plan.ax = ax->to(wx.scalar_type()).contiguous();
  plan.s = at::empty_like(plan.wx);
  if (plan.ax.defined()) plan.d = at::empty_like(plan.wx);
  return plan;
}

InputTermsPlan plan_input_terms(const at::Tensor& x, const at::Tensor& t,
                                const c10::optional<at::Tensor>& a) {
  check_float(x, "the layer input");
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "lxt_ext::input_terms: W^T S (", t.sizes(), ", ", t.scalar_type(),
              ") must match the layer input (", x.sizes(), ", ", x.scalar_type(), ")");
  InputTermsPlan plan;
  plan.x = x.contiguous();
  plan.t = t.contiguous();
  if (a.has_value()) {
    TORCH_CHECK(a->sizes() == x.sizes(), "lxt_ext::input_terms: |W|^T D must match the layer input");
    plan.a = a->to(x.scalar_type()).contiguous();
  }
  plan.out = at::empty_like(plan.x);
  return plan;
}

IdentityPlan plan_identity_backward(const at::Tensor& output, const at::Tensor& input, const at::Tensor& grad) {
  check_float(input, "the activation input");
  const auto check_like_input = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == input.sizes() && t.scalar_type() == input.scalar_type() && t.device() == input.device(),
                "lxt_ext::identity_backward: the ", name, " (", t.sizes(), ", ", t.scalar_type(), ", ", t.device(),
                ") must match the activation input (", input.sizes(), ", ", input.scalar_type(), ", ",
                input.device(), ")");
  };
  check_like_input(output, "activation output");
  check_like_input(grad, "incoming gradient");
  IdentityPlan plan;
  plan.h = output.contiguous();
  plan.x = input.contiguous();
  plan.g = grad.contiguous();
  plan.out = at::empty_like(plan.x);
  return plan;
}

namespace {

// Stands in for output_terms, input_terms and identity_backward where this build has no kernels (backends.h). The
// device that chose this kernel is that of the first tensor not on the CPU.
void terms_unsupported(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::Device device = c10::kCPU;
  for (const c10::IValue& v : *stack) {
    if (v.isTensor() && !v.toTensor().is_cpu()) {
      device = v.toTensor().device();
      break;
    }
  }
  unsupported_device(op.schema().name().c_str(), device);
}

}  // namespace

TORCH_LIBRARY_IMPL(lxt_ext, CompositeExplicitAutograd, m) {
  m.impl("output_terms", torch::CppFunction::makeFromBoxedFunction<&terms_unsupported>());
  m.impl("input_terms", torch::CppFunction::makeFromBoxedFunction<&terms_unsupported>());
  m.impl("identity_backward", torch::CppFunction::makeFromBoxedFunction<&terms_unsupported>());
}

}  // namespace lxt_ext
