// AttnLRP's factors on the exact attention gradient, defined once for the CPU and CUDA kernels; Python
// reads them from the extension (_C.attnlrp_factors(): lxt_ext.ops.ATTNLRP_FACTORS).
//
// AttnLRP (Achtibat et al. 2024) applies the uniform rule to products of two relevance-carrying factors:
// each factor gets the share kUniformShare of the product's relevance. In O = P V that gives dV the
// share kUniformShare of the exact gradient; P's share passes the softmax rule (the softmax's own
// gradient in the Gradient x Input convention) to the scores S = scale Q K^T, a product again, whose
// uniform rule halves it once more: dQ and dK get kUniformShare^2. CP-LRP takes dV exact and gives Q
// and K no relevance.
#pragma once

namespace lxt_ext {

inline constexpr double kUniformShare = 0.5;
inline constexpr double kAttnLRPValueFactor = kUniformShare;                     // dV
inline constexpr double kAttnLRPQueryKeyFactor = kUniformShare * kUniformShare;  // dQ, dK

}  // namespace lxt_ext
