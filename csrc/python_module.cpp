// The Python extension module lxt_ext._C: importing it loads the shared library, whose static
// initialisers register the ops (registry.cpp); C++ users link the same sources without Python.
// It also hands Python the op codes of constants.h, so they are defined in one place.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>

#include "attention/math.h"
#include "constants.h"

namespace {

template <typename Code, size_t N>
pybind11::dict as_dict(const lxt_ext::Named<Code> (&table)[N]) {
  pybind11::dict d;
  for (const auto& entry : table) d[entry.name] = static_cast<int>(entry.code);
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_built", [] {
#ifdef LXT_EXT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build carries lxt_ext's CUDA kernels.");
  m.def("kernel_threads", [] {
    // as the CPU kernels split their loops (at::parallel_for); one thread if built without OpenMP
    std::atomic<int> used{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { ++used; });
    return used.load();
  }, "How many threads the CPU kernels' loops run on now (torch.get_num_threads() when built right).");
  m.def("rule_codes", [] { return as_dict(lxt_ext::kRuleNames); },
        "Rule name -> code of lrp_backward's `rule` argument.");
  m.def("attention_modes", [] { return as_dict(lxt_ext::kAttentionModeNames); },
        "Attention mode name -> code of attention_backward's `mode` argument.");
  m.def("attnlrp_factors", [] {
    pybind11::dict d;
    d["uniform_share"] = lxt_ext::kUniformShare;
    d["value"] = lxt_ext::kAttnLRPValueFactor;
    d["query_key"] = lxt_ext::kAttnLRPQueryKeyFactor;
    return d;
  }, "AttnLRP's factors on the exact attention gradient (dV, dQ/dK) and the uniform rule's share.");
}
