// CUDA loops of the element-wise rule terms, registered under the CUDA dispatch key; the checks
// and planning (terms.cpp) and the per-element math (math.h) are shared with the CPU loops.
#include "rules/terms.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace lxt_ext {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t max_blocks = 65535LL * 8;
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks));
}

template <int kRule, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) output_terms_kernel(RuleConstants<acc_t> p, RowLayout layout, const scalar_t* __restrict__ wx,
                                    const scalar_t* __restrict__ ax, const scalar_t* __restrict__ g,
                                    const acc_t* __restrict__ b, const acc_t* __restrict__ b1,
                                    const acc_t* __restrict__ b2, scalar_t* __restrict__ s,
                                    scalar_t* __restrict__ d, int64_t numel, int* bad) {
  bool local_bad = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / layout.inner;
    const int64_t c = row % layout.channels;
    const int64_t off = layout.offset(row) + i % layout.inner;
    acc_t si, di;
    output_terms<kRule, acc_t>(p, static_cast<acc_t>(wx[off]), ax ? static_cast<acc_t>(ax[off]) : acc_t(0),
                        static_cast<acc_t>(g[i]), b[c], b1[c], b2[c], &si, &di);
    s[off] = static_cast<scalar_t>(si);
    if (d) d[off] = static_cast<scalar_t>(di);
    local_bad |= !(is_finite(si) & is_finite(di) & is_finite(static_cast<acc_t>(g[i])) &
                   is_finite(static_cast<acc_t>(wx[off])) & (!ax || is_finite(static_cast<acc_t>(ax[off]))));
  }
  if (local_bad) *bad = 1;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) input_terms_kernel(bool explicit_relevance, bool mixed, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ t, const scalar_t* __restrict__ a,
                                   scalar_t* __restrict__ out, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(input_terms<acc_t>(
        explicit_relevance, a != nullptr, mixed, static_cast<acc_t>(x[i]), static_cast<acc_t>(t[i]),
        a ? static_cast<acc_t>(a[i]) : acc_t(0)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) identity_backward_kernel(const scalar_t* __restrict__ h,
                                   const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                   scalar_t* __restrict__ out, acc_t eps, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(identity_backward<acc_t>(static_cast<acc_t>(h[i]), static_cast<acc_t>(x[i]),
                                                            static_cast<acc_t>(g[i]), eps));
  }
}

std::vector<at::Tensor> output_terms_cuda(const at::Tensor& wx, const c10::optional<at::Tensor>& ax,
                                          const at::Tensor& grad, const at::Tensor& bias,
                                          const at::Tensor& bias1, const at::Tensor& bias2,
                                          int64_t channel_dim, int64_t groups, int64_t rule, double epsilon,
                                          double gamma, double alpha, double beta,
                                          bool explicit_relevance) {
  const c10::cuda::CUDAGuard guard(wx.device());
  auto plan = plan_output_terms(wx, ax, grad, bias, bias1, bias2, channel_dim, groups,
                                make_params(rule, epsilon, gamma, alpha, beta, explicit_relevance));
  auto bad = at::zeros({1}, wx.options().dtype(at::kInt));
  const int64_t numel = plan.grad.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.wx.scalar_type(), "lxt_ext::output_terms", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const bool two = plan.two_terms(), stacked = plan.layout.stacked;
      scalar_t* wx = plan.wx.data_ptr<scalar_t>();
      scalar_t* s = plan.s.data_ptr<scalar_t>();
      const int64_t pair = plan.layout.pair_offset();
      dispatch_rule(plan.params.rule, [&](auto rule) {
        output_terms_kernel<decltype(rule)::value, scalar_t, acc_t>
            <<<blocks_for(numel), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                RuleConstants<acc_t>::of(plan.params), plan.layout, wx, !two ? nullptr : stacked ? wx + pair : plan.ax.data_ptr<scalar_t>(),
                plan.grad.data_ptr<scalar_t>(), plan.bias.data_ptr<acc_t>(), plan.bias1.data_ptr<acc_t>(),
                plan.bias2.data_ptr<acc_t>(), s, !two ? nullptr : stacked ? s + pair : plan.d.data_ptr<scalar_t>(),
                numel, bad.data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // One device-to-host read per layer: the price of a clear error instead of NaN heatmaps.
  if (bad.item<int>() != 0) fail_non_finite(plan.params);
  if (plan.d.defined()) return {plan.s, plan.d};
  return {plan.s};
}

at::Tensor input_terms_cuda(const at::Tensor& x, const at::Tensor& t, const c10::optional<at::Tensor>& a,
                            bool explicit_relevance, bool mixed) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto plan = plan_input_terms(x, t, a);
  const int64_t numel = plan.x.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.x.scalar_type(), "lxt_ext::input_terms", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      input_terms_kernel<scalar_t, acc_t><<<blocks_for(numel), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          explicit_relevance, mixed, plan.x.data_ptr<scalar_t>(), plan.t.data_ptr<scalar_t>(),
          plan.a.defined() ? plan.a.data_ptr<scalar_t>() : nullptr, plan.out.data_ptr<scalar_t>(), numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return plan.out;
}

at::Tensor identity_backward_cuda(const at::Tensor& output, const at::Tensor& input, const at::Tensor& grad,
                                  double stabilizer) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto plan = plan_identity_backward(output, input, grad);
  const int64_t numel = plan.x.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.x.scalar_type(), "lxt_ext::identity_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      identity_backward_kernel<scalar_t, acc_t><<<blocks_for(numel), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          plan.h.data_ptr<scalar_t>(), plan.x.data_ptr<scalar_t>(), plan.g.data_ptr<scalar_t>(),
          plan.out.data_ptr<scalar_t>(), static_cast<acc_t>(stabilizer), numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lxt_ext, CUDA, m) {
  m.impl("output_terms", &output_terms_cuda);
  m.impl("input_terms", &input_terms_cuda);
  m.impl("identity_backward", &identity_backward_cuda);
}

}  // namespace lxt_ext
