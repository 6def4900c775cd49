// The Python extension module lxt_ext._C: importing it loads the shared library, whose static
// initialisers register the ops (registry.cpp); C++ users link the same sources without Python.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_built", [] {
#ifdef LXT_EXT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build carries lxt_ext's CUDA kernels.");
}
