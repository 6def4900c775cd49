// The checks of attention_forward and attention_backward, run once by either backend's entry point
// before its kernels, and the ops' kernel for devices this build has none for (backends.h).
#include "attention/attention.h"

#include <torch/library.h>

#include <tuple>
#include <vector>

#include "backends.h"

namespace lxt_ext {
namespace {

Shapes check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": query, key and value must be 4-D (batch, heads, tokens, head_dim), got shapes ", q.sizes(), ", ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op,
              ": floating query required (float32, float64, float16 or bfloat16), got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op, ": query (",
              q.scalar_type(), "), key (", k.scalar_type(), ") and value (", v.scalar_type(),
              ") must share one dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": query (", q.device(), "), key (",
              k.device(), ") and value (", v.device(), ") must be on one device");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": batch sizes differ: query ", q.sizes(),
              ", key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), op, ": key ", k.sizes(), " and value ", v.sizes(),
              " must have the same heads and tokens");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": the ", q.size(1),
              " query heads must be a multiple of the ", k.size(1), " key/value heads (grouped-query attention)");
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3), op,
              ": query, key and value must share the head dimension, got ", q.size(3), ", ", k.size(3), " and ",
              v.size(3));
  return Shapes{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
}

at::Tensor expand_mask(const char* op, const c10::optional<at::Tensor>& mask, const Shapes& s, const at::Tensor& q) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
              ": attn_mask must be bool (True = attend) or floating (added to the scores), got ", m.scalar_type());
  TORCH_CHECK(m.device() == q.device(), op, ": attn_mask is on ", m.device(), ", the query on ", q.device());
  const std::vector<int64_t> target{s.B, s.Hq, s.Nq, s.Nk};
  bool ok = m.dim() <= 4;
  for (int64_t i = 1; ok && i <= m.dim(); ++i) {
    const int64_t size = m.size(-i);
    ok = size == 1 || size == target[4 - i];
  }
  TORCH_CHECK(ok, op, ": attn_mask of shape ", m.sizes(), " is not broadcastable to (batch, query heads, ",
              "query tokens, key tokens) = ", at::IntArrayRef(target));
  // A float mask stays in its dtype when that is the query's or the accumulation dtype (a float32 mask
  // of a bfloat16 query keeps finfo(float32).min, which bfloat16 would round to -inf); other float
  // masks become the accumulation dtype, converted at their own (unbroadcast) size.
  const at::ScalarType kind = m.scalar_type();
  const bool kept = kind == at::kBool || kind == q.scalar_type() || kind == acc_type(q);
  const at::Tensor typed = kept ? m : m.to(acc_type(q));
  return typed.expand(target);
}

}  // namespace

AttentionArgs check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& attn_mask) {
  const Shapes s = check_inputs(kForwardOp, q, k, v);
  return {s, expand_mask(kForwardOp, attn_mask, s, q)};
}

AttentionArgs check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const c10::optional<at::Tensor>& attn_mask, const at::Tensor& out,
                             const at::Tensor& stats, int64_t mode) {
  const char* op = kBackwardOp;
  const Shapes s = check_inputs(op, q, k, v);
  TORCH_CHECK(mode == kAttnLRP || mode == kCP, op, ": mode must be ", int{kAttnLRP}, " (AttnLRP) or ", int{kCP},
              " (CP-LRP), got ", mode);
  const std::vector<int64_t> o_shape{s.B, s.Hq, s.Nq, s.D}, st_shape{s.B, s.Hq, s.Nq, 2};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(o_shape) && out.sizes() == at::IntArrayRef(o_shape), op,
              ": grad_out ", grad_out.sizes(), " and out ", out.sizes(), " must have shape ", at::IntArrayRef(o_shape));
  TORCH_CHECK(stats.sizes() == at::IntArrayRef(st_shape) && stats.scalar_type() == acc_type(q) && stats.is_contiguous(),
              op, ": stats must be the contiguous ", acc_type(q), " tensor of shape ", at::IntArrayRef(st_shape),
              " that attention_forward returned, got ", stats.scalar_type(), " ", stats.sizes());
  for (const at::Tensor* t : {&grad_out, &out, &stats}) {
    TORCH_CHECK(t->device() == q.device(), op, ": grad_out, out and stats must be on the query's device ", q.device(),
                ", got ", t->device());
  }
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out (", grad_out.scalar_type(), ") and out (", out.scalar_type(), ") must have the query's dtype ",
              q.scalar_type());
  return {s, expand_mask(op, attn_mask, s, q)};
}

namespace {

// The checks first, so that a malformed call fails alike on every device.
std::tuple<at::Tensor, at::Tensor> forward_unsupported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const c10::optional<at::Tensor>& attn_mask, double, bool) {
  check_forward(q, k, v, attn_mask);
  unsupported_device(kForwardOp, q.device());
}

std::vector<at::Tensor> backward_unsupported(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const c10::optional<at::Tensor>& attn_mask,
                                             const at::Tensor& out, const at::Tensor& stats, double, bool,
                                             int64_t mode) {
  check_backward(grad_out, q, k, v, attn_mask, out, stats, mode);
  unsupported_device(kBackwardOp, q.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(lxt_ext, CompositeExplicitAutograd, m) {
  m.impl("attention_forward", &forward_unsupported);
  m.impl("attention_backward", &backward_unsupported);
}

}  // namespace lxt_ext
