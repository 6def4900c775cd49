// C++ tests of the lxt_ext ops through the dispatcher, against explicit ATen formulas of the rules.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <functional>
#include <string>

#include "rules/math.h"

#include "checks.h"

namespace {

at::Tensor stab(const at::Tensor& z, double eps) { return z + eps * ((z == 0).to(z.scalar_type()) + z.sign()); }

at::Tensor lrp_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& r, const at::Tensor& b,
                        const at::Tensor& b1, const at::Tensor& b2, int64_t rule, double gamma, bool explicit_relevance) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lxt_ext::lrp_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               double, double, double, double, bool, bool, bool, at::IntArrayRef,
                                               at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(x, w, r, b, b1, b2, rule, 1e-6, gamma, 2.0, 1.0, explicit_relevance, true, false, {1}, {0}, {1},
                 {0}, 1);
}

void test_stabilizer() {
  using lxt_ext::stabilize;
  check(stabilize(0.0, 0.5) == 0.5 && stabilize(2.0, 0.5) == 2.5 && stabilize(-2.0, 0.5) == -2.5,
        "stabilize: zennit's z + eps * (sign(z) + [z == 0])");
}

void test_linear_rules() {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({3, 6}, opts), w = at::randn({4, 6}, opts), b = at::randn({4}, opts) * 0.3;
  const at::Tensor r = at::randn({3, 4}, opts);
  const at::Tensor y = at::matmul(x, w.t()) + b;

  // epsilon: R_in = x * W^T (R / stab(y))
  const at::Tensor eps_expected = x * at::matmul(r / stab(y, 1e-6), w);
  check(close(lrp_backward(x, w, r, b, b, at::zeros_like(b), 1, 0.25, true), eps_expected, 1e-12),
        "epsilon (explicit) on Linear");
  check(close(x * lrp_backward(x, w, r / y, b, b, at::zeros_like(b), 1, 0.25, false), eps_expected, 1e-10),
        "epsilon (gradient x input) on Linear");

  // gamma with its four modified layers written out
  const double g = 0.25;
  const at::Tensor xp = x.clamp_min(0), xn = x.clamp_max(0), wp = w.clamp_min(0), wn = w.clamp_max(0);
  const at::Tensor wgp = w + g * wp, wgn = w + g * wn;
  const at::Tensor b1 = b + g * b.clamp_min(0), b2 = b + g * b.clamp_max(0);
  const at::Tensor zp = at::matmul(xp, wgp.t()) + b1 + at::matmul(xn, wgn.t());
  const at::Tensor zn = at::matmul(xp, wgn.t()) + b2 + at::matmul(xn, wgp.t());
  const at::Tensor sp = r * (y > 0).to(at::kDouble) / stab(zp, 1e-6), sn = r * (y < 0).to(at::kDouble) / stab(zn, 1e-6);
  const at::Tensor gamma_expected = xp * (at::matmul(sp, wgp) + at::matmul(sn, wgn)) +
                                    xn * (at::matmul(sp, wgn) + at::matmul(sn, wgp));
  check(close(lrp_backward(x, w, r, b, b1, b2, 2, g, true), gamma_expected, 1e-10), "gamma (explicit) on Linear");
  check(close(lrp_backward(x.relu(), w, r, b, b1, b2, 2, g, true),
              [&] {
                const at::Tensor xr = x.relu();
                const at::Tensor zr = at::matmul(xr, wgp.t()) + b1, zrn = at::matmul(xr, wgn.t()) + b2;
                const at::Tensor yr = at::matmul(xr, w.t()) + b;
                return xr * (at::matmul(r * (yr > 0).to(at::kDouble) / stab(zr, 1e-6), wgp) +
                             at::matmul(r * (yr < 0).to(at::kDouble) / stab(zrn, 1e-6), wgn));
              }(),
              1e-10),
        "gamma (explicit) on a non-negative input (stacked products)");

  // alpha2-beta1
  const at::Tensor ap = at::matmul(xp, wp.t()) + b.clamp_min(0) + at::matmul(xn, wn.t());
  const at::Tensor an = at::matmul(xp, wn.t()) + b.clamp_max(0) + at::matmul(xn, wp.t());
  const at::Tensor s1 = r / stab(ap, 1e-6), s2 = r / stab(an, 1e-6);
  const at::Tensor ab_expected = 2.0 * (xp * at::matmul(s1, wp) + xn * at::matmul(s1, wn)) -
                                 1.0 * (xp * at::matmul(s2, wn) + xn * at::matmul(s2, wp));
  check(close(lrp_backward(x, w, r, b, b.clamp_min(0), b.clamp_max(0), 3, g, true), ab_expected, 1e-10),
        "alpha2-beta1 (explicit) on Linear");

  // the gradient rule is the plain input gradient
  check(close(lrp_backward(x, w, r, b, b, b, 0, g, true), at::matmul(r, w), 1e-14), "gradient rule on Linear");
}

void test_identity_rule() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lxt_ext::identity_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  at::manual_seed(1);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::randn({4, 9}, opts);
  x[0][0] = 0.0;
  const at::Tensor h = at::gelu(x), g = at::randn({4, 9}, opts);
  // the identity rule: g_in = g * f(x) / stab(x), so x * g_in = f(x) * g away from x = 0
  check(close(op.call(h, x, g, 1e-6), g * h / stab(x, 1e-6), 1e-14), "identity rule: g h / stab(x)");
  const at::Tensor xt = x.t(), ht = h.t(), gt = g.t();  // non-contiguous
  check(close(op.call(ht, xt, gt, 1e-6), gt * ht / stab(xt, 1e-6), 1e-14), "identity rule on non-contiguous inputs");
}

void test_errors() {
  const at::Tensor x = at::randn({2, 4}), w = at::randn({3, 4}), b = at::zeros({3});
  bool threw = false;
  try {
    lrp_backward(x, w, at::randn({2, 5}), b, b, b, 1, 0.25, true);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("does not match") != std::string::npos;
  }
  check(threw, "relevance of the wrong shape is a clear error");
  threw = false;
  try {
    at::Tensor r = at::ones({2, 3});
    r[0][0] = std::numeric_limits<float>::quiet_NaN();
    lrp_backward(x, w, r, b, b, b, 2, 0.25, true);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("NaN") != std::string::npos;
  }
  check(threw, "NaN relevance is reported");
  threw = false;
  try {
    const at::Device meta(at::kMeta);
    lrp_backward(x.to(meta), w.to(meta), at::ones({2, 3}).to(meta), b.to(meta), b.to(meta), b.to(meta), 1, 0.25, true);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("lxt_ext::output_terms: CPU or CUDA tensors required, got meta") !=
            std::string::npos;
  }
  check(threw, "a device without kernels names the op and the device");
}

}  // namespace

int main() {
  test_stabilizer();
  test_linear_rules();
  test_identity_rule();
  test_errors();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
