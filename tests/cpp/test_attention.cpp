// C++ tests of lxt_ext's attention ops through the dispatcher, against the AttnLRP / CP-LRP
// equations written out with explicit ATen matrices.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

namespace {

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& mask, double scale, bool causal) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lxt_ext::attention_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&,
                                                                       const c10::optional<at::Tensor>&, double, bool)>();
  return op.call(q, k, v, mask, scale, causal);
}

std::vector<at::Tensor> backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& stats,
                                 double scale, bool causal, int64_t mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lxt_ext::attention_backward", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const c10::optional<at::Tensor>&,
                                                            const at::Tensor&, const at::Tensor&, double, bool,
                                                            int64_t)>();
  return op.call(g, q, k, v, mask, out, stats, scale, causal, mode);
}

struct Dense {
  at::Tensor out, dq, dk, dv_attnlrp, dv_cp;
};

// S = scale Q K^T + M, P = softmax(S), O = P V; AttnLRP: dV = P^T g / 2, dP = g V^T / 2,
// dS = P (dP - rowsum(P dP)), dQ = scale dS K / 2, dK = scale dS^T Q / 2; CP: dV = P^T g.
// Key/value heads are repeated over their query group, and the group's gradients summed.
Dense dense(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor g, const at::Tensor& additive, double scale) {
  q = q.to(at::kDouble), k = k.to(at::kDouble), v = v.to(at::kDouble), g = g.to(at::kDouble);
  const int64_t group = q.size(1) / k.size(1);
  const at::Tensor kr = k.repeat_interleave(group, 1), vr = v.repeat_interleave(group, 1);
  const at::Tensor s = scale * at::matmul(q, kr.transpose(-1, -2)) + additive.to(at::kDouble);
  const at::Tensor p = at::softmax(s, -1);
  const at::Tensor pt = p.transpose(-1, -2);
  const at::Tensor dp = 0.5 * at::matmul(g, vr.transpose(-1, -2));
  const at::Tensor ds = p * (dp - (p * dp).sum(-1, true));
  const auto sum_group = [&](const at::Tensor& t) { return t.unflatten(1, {-1, group}).sum(2); };
  return Dense{at::matmul(p, vr), 0.5 * scale * at::matmul(ds, kr), sum_group(0.5 * scale * at::matmul(ds.transpose(-1, -2), q)),
               sum_group(0.5 * at::matmul(pt, g)), sum_group(at::matmul(pt, g))};
}

void test_against_dense(at::ScalarType dtype, double rtol) {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(dtype);
  const at::Tensor q = at::randn({2, 4, 7, 8}, opts), k = at::randn({2, 2, 9, 8}, opts), v = at::randn({2, 2, 9, 8}, opts);
  const at::Tensor g = at::randn({2, 4, 7, 8}, opts);
  const at::Tensor mask = at::randn({2, 1, 1, 9}, opts);  // broadcast over heads and query rows
  const double scale = 0.3;
  const Dense e = dense(q, k, v, g, mask, scale);
  const auto [out, stats] = forward(q, k, v, mask, scale, false);
  const std::string name = std::string(" (") + c10::toString(dtype) + ")";
  check(close(out, e.out, rtol), "forward output vs softmax(scale QK^T + M) V" + name);
  const auto grads = backward(g, q, k, v, mask, out, stats, scale, false, 0);
  check(grads.size() == 3 && close(grads[0], e.dq, rtol) && close(grads[1], e.dk, rtol) &&
            close(grads[2], e.dv_attnlrp, rtol),
        "AttnLRP dQ, dK, dV (grouped-query heads)" + name);
  const auto cp = backward(g, q, k, v, mask, out, stats, scale, false, 1);
  check(cp.size() == 1 && close(cp[0], e.dv_cp, rtol), "CP-LRP returns dV = P^T g only" + name);
}

void test_causal_and_bool_mask() {
  at::manual_seed(1);
  const at::Tensor q = at::randn({1, 2, 6, 4}), k = at::randn({1, 2, 10, 4}), v = at::randn({1, 2, 10, 4});
  const at::Tensor g = at::randn({1, 2, 6, 4});
  // torch SDPA's is_causal: query i sees keys j <= i (top-left), also when Nq != Nk.
  const at::Tensor allowed = at::ones({6, 10}, at::kBool).tril();
  const at::Tensor additive = at::zeros({6, 10}).masked_fill(allowed.logical_not(), -INFINITY);
  const Dense e = dense(q, k, v, g, additive, 0.5);
  const auto [out, stats] = forward(q, k, v, c10::nullopt, 0.5, true);
  const auto grads = backward(g, q, k, v, c10::nullopt, out, stats, 0.5, true, 0);
  check(close(out, e.out, 1e-5) && close(grads[0], e.dq, 1e-5) && close(grads[1], e.dk, 1e-5) &&
            close(grads[2], e.dv_attnlrp, 1e-5),
        "is_causal is SDPA's top-left mask");
  const auto [bout, bstats] = forward(q, k, v, allowed, 0.5, false);
  check(close(bout, e.out, 1e-5), "bool mask: True attends");

  at::Tensor empty_rows = allowed.clone();
  empty_rows[2].fill_(false);
  const auto [zout, zstats] = forward(q, k, v, empty_rows, 0.5, false);
  const auto zgrads = backward(g, q, k, v, empty_rows, zout, zstats, 0.5, false, 0);
  check(zout.select(2, 2).eq(0).all().item<bool>() && zgrads[0].select(2, 2).eq(0).all().item<bool>() &&
            at::isfinite(zgrads[1]).all().item<bool>(),
        "a row that sees no key: zero output and gradient, no NaN");
}

void test_errors() {
  const at::Tensor q = at::randn({1, 3, 4, 8}), k = at::randn({1, 2, 4, 8});
  const auto message = [&](const std::function<void()>& f) {
    try {
      f();
    } catch (const c10::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  check(message([&] { forward(q, k, k, c10::nullopt, 1.0, false); }).find("lxt_ext::attention_forward") !=
            std::string::npos,
        "query heads not a multiple of key heads: error names the op");
  check(message([&] { forward(q, q, q, at::zeros({2, 4, 4}), 1.0, false); }).find("not broadcastable") !=
            std::string::npos,
        "a mask that does not broadcast is a clear error");
}

}  // namespace

int main() {
  // float64 to 1e-8 of the largest value: the CPU kernel's vectorised exp (and which rows take it, by alignment)
  // leaves up to ~1e-9 between runs of one binary
  test_against_dense(at::kDouble, 1e-8);
  test_against_dense(at::kFloat, 1e-5);
  test_against_dense(at::kBFloat16, 3e-2);
  test_causal_and_bool_mask();
  test_errors();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
