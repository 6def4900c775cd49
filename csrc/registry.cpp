// The one op registry of lxt_ext. Backends register their kernels with TORCH_LIBRARY_IMPL in the
// file of each kernel family; Python reaches every op as torch.ops.lxt_ext.<name>.
#include <torch/library.h>

TORCH_LIBRARY(lxt_ext, m) {
  // Element-wise output side of a rule: [S] (epsilon), [S, D] (gamma, alpha-beta), or, when a
  // two-term rule gets no ax, wx is the stacked pair of products and the result is [S D stacked]
  // in the same layout (RowLayout in rules/math.h).
  m.def("output_terms(Tensor wx, Tensor? ax, Tensor grad, Tensor bias, Tensor bias1, Tensor bias2, "
        "int channel_dim, int groups, int rule, float epsilon, float gamma, float alpha, float beta, "
        "bool explicit_relevance) -> Tensor[]");
  // Element-wise input side: relevance (explicit) or gradient (Gradient x Input) from the
  // transposed products (mixed: t = W^T S, a = |W|^T D; else the positive/negative weights P, Q).
  m.def("input_terms(Tensor x, Tensor t, Tensor? a, bool explicit_relevance, bool mixed) -> Tensor");
  // Identity rule of an element-wise activation h = f(x) in the Gradient x Input convention: the gradient
  // grad * h / stab(x) in one pass (h = f(x), recomputed by the caller).
  m.def("identity_backward(Tensor output, Tensor input, Tensor grad, float stabilizer) -> Tensor");
  // Whole rule backward of a Linear (linear=True) or convolution layer.
  m.def("lrp_backward(Tensor x, Tensor weight, Tensor grad, Tensor bias, Tensor bias1, Tensor bias2, int rule, "
        "float epsilon, float gamma, float alpha, float beta, bool explicit_relevance, bool linear, "
        "bool transposed, int[] stride, int[] padding, int[] dilation, int[] output_padding, int groups) -> Tensor");
  // Attention O = softmax(scale Q K^T + M) V whose backward is an LRP rule (attention/attention.h):
  // forward returns (O, per-row softmax statistics [row max, log row sum]); backward returns
  // [dQ, dK, dV] (mode 0, AttnLRP) or [dV] (mode 1, CP-LRP).
  m.def("attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, "
        "bool is_causal) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
        "Tensor out, Tensor stats, float scale, bool is_causal, int mode) -> Tensor[]");
}
