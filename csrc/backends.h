// What an op says on a device this build has no kernels for. Each kernel family registers it under
// CompositeExplicitAutograd, which the dispatcher reaches only where no CPU or CUDA kernel is
// registered: CUDA tensors in a build without the CUDA kernels, or any other device (meta included,
// until a fake kernel is registered for it).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace lxt_ext {

[[noreturn]] inline void unsupported_device(const char* op, c10::Device device) {
  TORCH_CHECK(!device.is_cuda(), op, " got CUDA tensors, but this lxt_ext was built without its CUDA kernels. "
              "Rebuild it where nvcc and a CUDA build of torch are present: "
              "pip install --no-build-isolation --force-reinstall --no-deps .");
  TORCH_CHECK(false, op, ": CPU or CUDA tensors required, got ", device);
}

}  // namespace lxt_ext
