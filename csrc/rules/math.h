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
#include <type_traits>

#include "constants.h"

#if defined(__CUDACC__)
#define LXT_HD __host__ __device__ __forceinline__
#else
#define LXT_HD inline
#endif

namespace lxt_ext {

struct RuleParams {
  int rule;
  double epsilon;  // the stabilizer's epsilon (for Epsilon: the rule's epsilon)
  double gamma;
  double alpha;
  double beta;
  bool explicit_relevance;
};

// RuleParams in the kernels' arithmetic type, made once per kernel: a loop then holds them in
// registers instead of re-reading (and converting) them per element.
template <typename T>
struct RuleConstants {
  T epsilon, gamma, alpha, beta;
  bool explicit_relevance;

  LXT_HD static RuleConstants of(const RuleParams& p) {
    return RuleConstants{T(p.epsilon), T(p.gamma), T(p.alpha), T(p.beta), p.explicit_relevance};
  }
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
  return z < T(0) ? z - eps : z + eps;  // sign(z) + [z == 0] is -1 below zero, +1 otherwise
}

// Output side at one output element: wx, ax (gamma: |W||x|; alpha-beta: wx holds p, ax holds n),
// the incoming g, and the element's channel biases b (the layer's), b1, b2 (the rule's). The rule
// is a template argument so each loop compiles to straight-line, vectorisable code.
template <int kRule, typename T>
LXT_HD void output_terms(const RuleConstants<T> p, T wx, T ax, T g, T b, T b1, T b2, T* s, T* d) {
  const T eps = p.epsilon;
  if constexpr (kRule == kAlphaBeta) {
    const T r = p.explicit_relevance ? g : (wx + ax + b) * g;
    *s = p.alpha * r / stabilize(wx + b1, eps);
    *d = -p.beta * r / stabilize(ax + b2, eps);
  } else if constexpr (kRule == kEpsilon) {
    const T r = p.explicit_relevance ? g : (wx + b) * g;
    *s = r / stabilize(wx + b1, eps);
    *d = T(0);
  } else {
    static_assert(kRule == kGamma, "output_terms: epsilon, gamma or alpha-beta");
    const T y = wx + b;
    const T r = p.explicit_relevance ? g : y * g;
    const T u = T(0.5) * (wx + ax);
    const T gm = p.gamma;
    // Both quotients unconditionally, then a select: the loop stays branch-free (vectorisable).
    const T qp = r / stabilize(wx + gm * u + b1, eps);
    const T qn = r / stabilize(wx + gm * (wx - u) + b2, eps);
    const T sp = y > T(0) ? qp : T(0);
    const T sn = y < T(0) ? qn : T(0);
    *s = (T(1) + T(0.5) * gm) * (sp + sn);
    *d = T(0.5) * gm * (sp - sn);
  }
}

// Calls f(std::integral_constant<int, rule>{}) for the rules that have output terms.
template <typename F>
inline void dispatch_rule(int rule, F&& f) {
  switch (rule) {
    case kEpsilon: return f(std::integral_constant<int, kEpsilon>{});
    case kGamma: return f(std::integral_constant<int, kGamma>{});
    default: return f(std::integral_constant<int, kAlphaBeta>{});
  }
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

// Identity rule of an element-wise h = f(x), Gradient x Input: g_in = g * h / stab(x), so that
// x * g_in = h * g (the relevance of each output goes to its input).
template <typename T>
LXT_HD T identity_backward(T h, T x, T g, T eps) {
  return g * h / stabilize(x, eps);
}

template <typename T>
LXT_HD bool is_finite(T v) {
  return (v == v) & (v - v == T(0));
}

}  // namespace lxt_ext
