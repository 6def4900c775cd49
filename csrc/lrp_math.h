// Per-element math of the fused LRP rules, shared verbatim by the CPU and CUDA kernels.
//
// Notation for one layer y = W x + b (Linear, or any convolution):
//   wx = W x, ax = |W| |x|, and u = W+ x+ + W- x- = (wx + ax) / 2,
//   because |W||x| = W+x+ - W+x- - W-x+ + W-x- and Wx = W+x+ + W+x- + W-x+ + W-x-.
//   stab(z) = z + eps * (sign(z) + [z == 0])   (zennit's stabilizer)
//   R = g (explicit convention: the gradient slot carries relevance) or R = y * g
//   (Gradient x Input convention: g is relevance per unit of y).
//
// The output side of every rule yields two output-sized tensors S and D, and the input side
// combines the transposed products of S and D into relevance (explicit) or gradient (Gradient x
// Input) per input element (derivations with zennit's rules; bias modifiers b1, b2 by the caller):
//   epsilon:   S = R / stab(wx + b1);  R_in = x * W^T S,  g_in = W^T S.
//   gamma:     inputs wx and ax, u = (wx + ax) / 2;
//              s+ = [y>0] R / stab(wx + g u + b1),  s- = [y<0] R / stab(wx + g (wx - u) + b2);
//              Wg+^T s+ + Wg-^T s- = (1 + g/2) W^T(s+ + s-) + g/2 |W|^T (s+ - s-), mirrored for x-,
//              so S = (1 + g/2)(s+ + s-), D = g/2 (s+ - s-), t = W^T S, a = |W|^T D and
//              P = t + a weighs the positive inputs, Q = t - a the negative ones. The |W| products
//              round like zennit's own mixed-sign products, so nothing cancels catastrophically.
//   alphabeta: inputs p = W+ x+ + W- x- and n = W- x+ + W+ x- (each a sum of one sign, computed
//              directly: here a huge R / stab(~0) must meet exact zeros, as in zennit);
//              S = alpha R / stab(p + b1), D = -beta R / stab(n + b2);
//              P = W+^T S + W-^T D, Q = W-^T S + W+^T D  (zplus is alpha = 1, beta = 0).
//   Input side: R_in = x+ P + x- Q (explicit) or g_in = [x>0] P + [x<0] Q (Gradient x Input).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LXT_HD __host__ __device__ __forceinline__
#else
#define LXT_HD inline
#endif

namespace lxt_ext {

enum Rule : int { kGradient = 0, kEpsilon = 1, kGamma = 2, kAlphaBeta = 3 };

struct RuleParams {
  int rule;
  double epsilon;  // the stabilizer's epsilon (for Epsilon: the rule's epsilon)
  double gamma;
  double alpha;
  double beta;
  bool explicit_relevance;
};

// Where the output-side terms of one row (one outer index and channel: `inner` elements) live.
// Plain: wx, ax, s, d are separate tensors of the output's shape. Stacked: one product with the
// two weights stacked per group wrote wx and ax interleaved as [outer, group, {wx, ax}, channel
// in group, inner]; s and d are written in the same layout, ready for one stacked transposed
// product (W1^T s + W2^T d in a single call).
struct RowLayout {
  int64_t channels;
  int64_t inner;
  int64_t groups;
  bool stacked;

  LXT_HD int64_t offset(int64_t row) const {
    if (!stacked) return row * inner;
    const int64_t per_group = channels / groups;
    const int64_t outer = row / channels, c = row % channels;
    return ((outer * groups + c / per_group) * 2 * per_group + c % per_group) * inner;
  }
  // Distance from a row's first term to its second (stacked layout only).
  LXT_HD int64_t pair_offset() const { return (channels / groups) * inner; }
};

template <typename T>
LXT_HD T stabilize(T z, T eps) {
  const T sign = z > T(0) ? T(1) : (z < T(0) ? T(-1) : T(1));
  return z + eps * sign;
}

// Output side at one output element: wx, ax (gamma: |W||x|; alpha-beta: wx holds p, ax holds n),
// the incoming g, and the element's channel biases b (the layer's), b1, b2 (the rule's).
template <typename T>
LXT_HD void output_terms(const RuleParams& p, T wx, T ax, T g, T b, T b1, T b2, T* s, T* d) {
  const T eps = T(p.epsilon);
  if (p.rule == kAlphaBeta) {
    const T r = p.explicit_relevance ? g : (wx + ax + b) * g;
    *s = T(p.alpha) * r / stabilize(wx + b1, eps);
    *d = -T(p.beta) * r / stabilize(ax + b2, eps);
    return;
  }
  const T y = wx + b;
  const T r = p.explicit_relevance ? g : y * g;
  if (p.rule == kEpsilon) {
    *s = r / stabilize(wx + b1, eps);
    *d = T(0);
    return;
  }
  // kGamma
  const T u = T(0.5) * (wx + ax);
  const T gm = T(p.gamma);
  const T sp = y > T(0) ? r / stabilize(wx + gm * u + b1, eps) : T(0);
  const T sn = y < T(0) ? r / stabilize(wx + gm * (wx - u) + b2, eps) : T(0);
  *s = (T(1) + T(0.5) * gm) * (sp + sn);
  *d = T(0.5) * gm * (sp - sn);
}

// Input side at one input element: one-term rules pass t = P = Q; gamma passes t and a
// (mixed: P = t + a, Q = t - a); alpha-beta passes P and Q themselves.
template <typename T>
LXT_HD T input_terms(bool explicit_relevance, bool two_terms, bool mixed, T x, T t, T a) {
  if (!two_terms) return explicit_relevance ? x * t : t;
  const T pos = mixed ? t + a : t;
  const T neg = mixed ? t - a : a;
  if (explicit_relevance) return x > T(0) ? x * pos : x * neg;
  return x > T(0) ? pos : (x < T(0) ? neg : T(0));
}

template <typename T>
LXT_HD bool is_finite(T v) {
  return v == v && v - v == T(0);
}

}  // namespace lxt_ext
