// pipetrain._C_cuda: the CUDA backend lives here (runtime issue). For now it only reports
// the device count, so the nvcc build path is exercised and compile-checked in CI.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

namespace {
int device_count() {
  int n = 0;
  // No driver or no device: report 0 rather than raising, so callers can fall back to CPU.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error
    return 0;
  }
  return n;
}
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pipetrain CUDA backend (compiled only when nvcc is present)";
  m.def("device_count", &device_count, "number of visible CUDA devices (0 without a driver)");
}
