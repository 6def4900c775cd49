// The element-wise halves of every fused rule (see math.h for the math): one pass over the output
// before the transposed product, one pass over the input after it. The plans carry what the
// checks (terms.cpp) settled, so the CPU and CUDA files only hold their loops.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "rules/math.h"

namespace lxt_ext {

// The output side over rows of [outer, channels, inner] (see RowLayout); all contiguous.
struct OutputTermsPlan {
  at::Tensor wx, ax, grad, bias, bias1, bias2;  // ax undefined if stacked into wx; biases in acc type
  at::Tensor s, d;                              // results: d undefined for one-term rules or stacked
  int64_t rows;
  RowLayout layout;
  RuleParams params;

  bool two_terms() const { return params.rule != kEpsilon; }
};

OutputTermsPlan plan_output_terms(const at::Tensor& wx, const c10::optional<at::Tensor>& ax,
                                  const at::Tensor& grad, const at::Tensor& bias,
                                  const at::Tensor& bias1, const at::Tensor& bias2,
                                  int64_t channel_dim, int64_t groups, const RuleParams& params);

struct InputTermsPlan {
  at::Tensor x, t, a;  // contiguous; a undefined for one-term rules
  at::Tensor out;
};

InputTermsPlan plan_input_terms(const at::Tensor& x, const at::Tensor& t,
                                const c10::optional<at::Tensor>& a);

// The identity rule's three same-shaped tensors (output h = f(x), input x, incoming gradient), contiguous.
struct IdentityPlan {
  at::Tensor h, x, g;
  at::Tensor out;
};

IdentityPlan plan_identity_backward(const at::Tensor& output, const at::Tensor& input, const at::Tensor& grad);

// Raised by both backends when a rule produced NaN or Inf.
[[noreturn]] void fail_non_finite(const RuleParams& params);

RuleParams make_params(int64_t rule, double epsilon, double gamma, double alpha, double beta,
                       bool explicit_relevance);

const char* rule_name(int rule);

}  // namespace lxt_ext
