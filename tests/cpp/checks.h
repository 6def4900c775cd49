// What the C++ tests share: a check that prints and counts, and a relative closeness test.
#pragma once
#include <ATen/ATen.h>

#include <cstdio>
#include <string>

inline int failures = 0;

inline void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// max |got - expected| <= rtol * max |expected| (rtol absolute where expected is all zero), same
// shape, all finite.
inline bool close(const at::Tensor& got, const at::Tensor& expected, double rtol) {
  if (got.sizes() != expected.sizes() || !at::isfinite(got).all().item<bool>()) return false;
  const double scale = expected.abs().max().item<double>();
  const double err = (got.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
  return err <= rtol * (scale > 0 ? scale : 1.0);
}
