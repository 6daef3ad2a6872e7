// pipetrain._C_cuda: the CUDA backend, a thin mapping of runtime::Backend onto the CUDA
// runtime. The executor itself lives in pipetrain._C and receives this backend through a
// PyCapsule (backend()), so both backends share one executor.
//
//   stream        cudaStream_t (handles are the raw pointers, so torch streams plug in)
//   event         cudaEvent_t, created with cudaEventDisableTiming (cheapest to record)
//   record/wait   cudaEventRecord / cudaStreamWaitEvent (device side; the host never blocks)
//   copy          same device: cudaMemcpyAsync; peer access possible: cudaMemcpyPeerAsync
//                 with peer access enabled; otherwise staged through a pool of pinned host
//                 buffers (see Stager)
//   host callback cudaLaunchHostFunc
//   ranges        NVTX push/pop in the "pipetrain" domain; cudaProfilerStart/Stop
//
// Nothing here touches the driver until called, so importing the module on a machine
// without a GPU or driver is safe; device_count() then returns 0 and Python never selects
// this backend.
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "runtime/backend.h"

namespace py = pybind11;

namespace pipetrain::cuda {
namespace {

using runtime::Handle;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls are not blamed for it
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

int visible_devices() {
  int n = 0;
  // No driver or no device: report 0 rather than raising, so callers can fall back to CPU.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

// Make `device` current for a scope, restoring the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

cudaStream_t as_stream(Handle h) { return reinterpret_cast<cudaStream_t>(h); }
cudaEvent_t as_event(Handle h) { return reinterpret_cast<cudaEvent_t>(h); }

// Device-to-device copy without peer access, through pinned host memory:
//   for each chunk k (slot k % kSlots):
//     src stream:  wait slot.free            (the H2D that last used this slot is done)
//                  D2H src[k] -> slot.host ; record slot.filled
//     dst stream:  wait slot.filled ; H2D slot.host -> dst[k] ; record slot.free
// The D2H of chunk k+1 overlaps the H2D of chunk k; no host thread ever blocks. Finally the
// caller's stream waits for the last H2D, so work after copy() on it sees the data.
class Stager {
 public:
  static constexpr std::size_t kChunk = std::size_t{4} << 20;
  static constexpr int kSlots = 4;

  Stager(int src_device, int dst_device) : src_(src_device), dst_(dst_device) {
    DeviceGuard dst_guard(dst_device);
    check(cudaStreamCreateWithFlags(&dst_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    for (Slot& slot : slots_) {
      check(cudaEventCreateWithFlags(&slot.free, cudaEventDisableTiming), "cudaEventCreate");
    }
    DeviceGuard src_guard(src_device);
    for (Slot& slot : slots_) {
      check(cudaHostAlloc(&slot.host, kChunk, cudaHostAllocPortable), "cudaHostAlloc");
      check(cudaEventCreateWithFlags(&slot.filled, cudaEventDisableTiming), "cudaEventCreate");
    }
  }
  ~Stager() {
    cudaStreamSynchronize(dst_stream_);  // slots may still be in flight
    for (Slot& slot : slots_) {
      cudaFreeHost(slot.host);
      cudaEventDestroy(slot.filled);
      cudaEventDestroy(slot.free);
    }
    cudaStreamDestroy(dst_stream_);
  }
  Stager(const Stager&) = delete;
  Stager& operator=(const Stager&) = delete;

  void copy(cudaStream_t stream, char* dst, const char* src, std::size_t nbytes) {
    for (std::size_t off = 0; off < nbytes; off += kChunk) {
      const std::size_t n = std::min(kChunk, nbytes - off);
      Slot& slot = slots_[next_++ % kSlots];
      {
        DeviceGuard guard(src_);
        check(cudaStreamWaitEvent(stream, slot.free, 0), "cudaStreamWaitEvent");
        check(cudaMemcpyAsync(slot.host, src + off, n, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync D2H");
        check(cudaEventRecord(slot.filled, stream), "cudaEventRecord");
      }
      DeviceGuard guard(dst_);
      check(cudaStreamWaitEvent(dst_stream_, slot.filled, 0), "cudaStreamWaitEvent");
      check(cudaMemcpyAsync(dst + off, slot.host, n, cudaMemcpyHostToDevice, dst_stream_), "cudaMemcpyAsync H2D");
      check(cudaEventRecord(slot.free, dst_stream_), "cudaEventRecord");
    }
    if (nbytes > 0) {
      DeviceGuard guard(src_);
      // The last H2D recorded `free` on its slot: the caller's stream waits for it.
      check(cudaStreamWaitEvent(stream, slots_[(next_ - 1) % kSlots].free, 0), "cudaStreamWaitEvent");
    }
  }

 private:
  struct Slot {
    void* host = nullptr;
    cudaEvent_t filled = nullptr;  // on the source device
    cudaEvent_t free = nullptr;    // on the destination device
  };
  int src_, dst_;
  cudaStream_t dst_stream_ = nullptr;
  Slot slots_[kSlots];
  unsigned next_ = 0;
};

class CudaBackend final : public runtime::Backend {
 public:
  const char* name() const noexcept override { return "cuda"; }
  bool synchronous() const noexcept override { return false; }
  int device_count() const override { return visible_devices(); }
  void bind_thread(int device) override { check(cudaSetDevice(device), "cudaSetDevice"); }

  // The legacy default stream of the thread's current device; Python passes torch's
  // current streams instead (Executor(streams=...)).
  Handle default_stream(int) override { return 0; }

  Handle create_stream(int device) override {
    DeviceGuard guard(device);
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    return reinterpret_cast<Handle>(s);
  }
  void destroy_stream(Handle stream) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = stagers_.begin(); it != stagers_.end();) {
        it = std::get<0>(it->first) == stream ? stagers_.erase(it) : std::next(it);
      }
    }
    check(cudaStreamDestroy(as_stream(stream)), "cudaStreamDestroy");
  }

  Handle create_event(int device) override {
    DeviceGuard guard(device);
    cudaEvent_t e = nullptr;
    check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return reinterpret_cast<Handle>(e);
  }
  void destroy_event(Handle event) override { check(cudaEventDestroy(as_event(event)), "cudaEventDestroy"); }

  void record(Handle event, Handle stream) override {
    check(cudaEventRecord(as_event(event), as_stream(stream)), "cudaEventRecord");
  }
  void stream_wait(Handle stream, Handle event) override {
    check(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0), "cudaStreamWaitEvent");
  }
  bool query(Handle event) override {
    cudaError_t err = cudaEventQuery(as_event(event));
    if (err == cudaErrorNotReady) {
      cudaGetLastError();
      return false;
    }
    check(err, "cudaEventQuery");
    return true;
  }

  void copy(Handle stream, void* dst, int dst_device, const void* src, int src_device,
            std::size_t nbytes) override {
    cudaStream_t s = as_stream(stream);
    if (src_device == dst_device) {
      DeviceGuard guard(src_device);
      check(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync");
    } else if (peer_enabled(src_device, dst_device)) {
      check(cudaMemcpyPeerAsync(dst, dst_device, src, src_device, nbytes, s), "cudaMemcpyPeerAsync");
    } else {
      stager(stream, src_device, dst_device)
          .copy(s, static_cast<char*>(dst), static_cast<const char*>(src), nbytes);
    }
  }

  void host_callback(Handle stream, void (*fn)(void*), void* arg) override {
    check(cudaLaunchHostFunc(as_stream(stream), fn, arg), "cudaLaunchHostFunc");
  }

  // A graph captured by torch.cuda.CUDAGraph (engine/cuda_graphs.py): the handle is its
  // cudaGraphExec_t (CUDAGraph.raw_cuda_graph_exec()). No host language involved.
  bool launches_graphs() const noexcept override { return true; }
  void launch_graph(Handle graph, Handle stream) override {
    check(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(graph), as_stream(stream)),
          "cudaGraphLaunch");
  }

  bool synchronize(Handle stream, double timeout_s) override {
    // Poll rather than cudaStreamSynchronize, which could not be bounded.
    auto start = std::chrono::steady_clock::now();
    const auto limit = runtime::timeout_duration(timeout_s);  // inf clamps; nan gives 0, not "never"
    std::chrono::microseconds nap(2);
    for (;;) {
      cudaError_t err = cudaStreamQuery(as_stream(stream));
      if (err == cudaSuccess) return true;
      if (err != cudaErrorNotReady) check(err, "cudaStreamQuery");
      cudaGetLastError();
      if (std::chrono::steady_clock::now() - start > limit) return false;
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }

  void range_push(const char* name) override {
    nvtxEventAttributes_t attrs{};
    attrs.version = NVTX_VERSION;
    attrs.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
    attrs.messageType = NVTX_MESSAGE_TYPE_ASCII;
    attrs.message.ascii = name;
    nvtxDomainRangePushEx(domain(), &attrs);
  }
  void range_pop() override { nvtxDomainRangePop(domain()); }
  void profiler_start() override { check(cudaProfilerStart(), "cudaProfilerStart"); }
  void profiler_stop() override { check(cudaProfilerStop(), "cudaProfilerStop"); }

  // Whether copies src -> dst go device to device; enables peer access on first use.
  bool peer_enabled(int src, int dst) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto key = std::make_pair(src, dst);
    auto it = peer_.find(key);
    if (it != peer_.end()) return it->second;
    int can = 0;
    check(cudaDeviceCanAccessPeer(&can, dst, src), "cudaDeviceCanAccessPeer");
    bool ok = can != 0;
    if (ok) {
      DeviceGuard guard(dst);
      cudaError_t err = cudaDeviceEnablePeerAccess(src, 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();
      } else if (err != cudaSuccess) {
        cudaGetLastError();
        ok = false;  // fall back to staging rather than fail
      }
    }
    peer_[key] = ok;
    return ok;
  }

 private:
  static nvtxDomainHandle_t domain() {
    static nvtxDomainHandle_t handle = nvtxDomainCreateA("pipetrain");
    return handle;
  }

  Stager& stager(Handle stream, int src, int dst) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto key = std::make_tuple(stream, src, dst);
    auto it = stagers_.find(key);
    if (it == stagers_.end()) it = stagers_.emplace(key, std::make_unique<Stager>(src, dst)).first;
    return *it->second;
  }

  std::mutex mutex_;
  std::map<std::pair<int, int>, bool> peer_;
  std::map<std::tuple<Handle, int, int>, std::unique_ptr<Stager>> stagers_;
};

CudaBackend& backend() {
  static CudaBackend instance;  // constructing it makes no CUDA call
  return instance;
}

}  // namespace
}  // namespace pipetrain::cuda

PYBIND11_MODULE(_C_cuda, m) {
  using pipetrain::cuda::backend;
  m.doc() = "pipetrain CUDA backend (compiled only when nvcc is present)";
  m.def("device_count", &pipetrain::cuda::visible_devices,
        "number of visible CUDA devices (0 without a driver or device)");
  m.def("backend", [] {
    return py::capsule(static_cast<pipetrain::runtime::Backend*>(&backend()),
                       pipetrain::runtime::kBackendCapsule);
  }, "the backend as a capsule, for pipetrain._C.runtime.Backend.from_capsule");
  m.def("peer_enabled", [](int src, int dst) { return backend().peer_enabled(src, dst); },
        py::arg("src_device"), py::arg("dst_device"),
        "whether copies src -> dst go device to device (enables peer access on first call)");
}
