// Fused attention whose backward is AttnLRP or CP-LRP: what both backends share. Each backend
// registers its own attention_forward and attention_backward (attention_cpu.cpp under CPU,
// attention_cuda.cu under CUDA); both start with the checks declared here (attention.cpp).
//
// Forward:  S = scale Q K^T + M,  P = softmax(S) (rows),  O = P V.
// Saved:    O and, per query row, the softmax statistics (row max m, log l of the row sum of
//           exp(S - m)), i.e. the log-sum-exp m + log l kept as two numbers: with HF's masks of
//           torch.finfo.min, m is about -3.4e38 and m + log l would round back to m.
// Backward, for the incoming g = dO (Gradient x Input convention, the gradient slot carries
// relevance per unit of the tensor):
//   AttnLRP: dV = 1/2 P^T dO;  dS = P * (dO V^T - rowsum(dO * O));  dQ = scale/4 dS K;  dK = scale/4 dS^T Q
//            (the exact attention gradient with dV scaled by 1/2 and dQ, dK by 1/4).
//   CP-LRP:  dV = P^T dO; dQ and dK are not computed (the op returns dV only).
// With grouped-query attention (Hq = G Hkv) query head h reads key/value head h / G, and dK, dV sum
// over the G query heads of a group. Causal masking is torch SDPA's: query i sees keys j <= i.
// A row that sees no key (every entry masked by False or -inf) gives O = 0 and zero gradients.
#pragma once

#include <ATen/ATen.h>

#include "constants.h"

namespace lxt_ext {

inline constexpr const char* kForwardOp = "lxt_ext::attention_forward";
inline constexpr const char* kBackwardOp = "lxt_ext::attention_backward";

struct Shapes {
  int64_t B, Hq, Hkv, Nq, Nk, D;
  int64_t group() const { return Hq / Hkv; }
};

// What the checks settle for a backend: the shapes, and the mask as a (B, Hq, Nq, Nk) view
// (broadcast dimensions get stride 0, nothing is materialised; undefined without a mask). A float
// mask is in the query's dtype or the accumulation dtype (acc_type), others are converted to the
// latter at their own (unbroadcast) size.
struct AttentionArgs {
  Shapes s;
  at::Tensor mask;
};

AttentionArgs check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& attn_mask);

AttentionArgs check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const c10::optional<at::Tensor>& attn_mask, const at::Tensor& out,
                             const at::Tensor& stats, int64_t mode);

// The dtype of the statistics and of every accumulation.
inline at::ScalarType acc_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace lxt_ext
