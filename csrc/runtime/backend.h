// The device interface the executor issues through: streams, events, record, wait, copy,
// host callback. Two implementations: the CPU backend (cpu_backend.cpp, always built) and
// the CUDA backend (csrc/cuda/cuda_backend.cu, built by nvcc into pipetrain._C_cuda, handed
// to the executor as a PyCapsule so the executor itself exists once, in pipetrain._C).
//
// Semantics shared by both (CUDA's, which the CPU backend reproduces on host threads):
//   * a stream is an ordered queue: work enqueued on it runs in enqueue order;
//   * record(event, stream) marks the event complete once everything enqueued on the stream
//     before it has run; query(event) tells whether it is (an event never recorded is complete);
//   * stream_wait(stream, event) makes work enqueued on `stream` after this call wait for the
//     event's most recent record, without blocking the calling thread;
//   * copy and host_callback are enqueued on a stream like any other work.
// Handles are opaque 64-bit values: a cudaStream_t / cudaEvent_t on CUDA (so torch's
// streams, given as integers from Python, can be used directly), pointers on CPU.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace pipetrain::runtime {

using Handle = std::uint64_t;

// The longest wait the runtime represents, ~146 years: inf and any larger timeout clamp to
// it. Seconds times 1e9 would overflow int64 from ~9.2e9 s on (and converting inf to an
// integer is undefined), and steady_clock::now() + 2^62 ns cannot overflow either.
inline constexpr std::int64_t kNoTimeoutNs = std::int64_t{1} << 62;

// `timeout_s` in nanoseconds, clamped to [0, kNoTimeoutNs]; nan and non-positive give 0
// (callers that must reject them check first).
inline std::int64_t timeout_ns(double timeout_s) {
  if (!(timeout_s > 0)) return 0;
  if (timeout_s * 1e9 >= static_cast<double>(kNoTimeoutNs)) return kNoTimeoutNs;
  return static_cast<std::int64_t>(timeout_s * 1e9);
}

inline std::chrono::steady_clock::duration timeout_duration(double timeout_s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::nanoseconds(timeout_ns(timeout_s)));
}

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const noexcept = 0;
  // True when work issued by a thread is complete when the issuing call returns (CPU): the
  // executor's host-side completion flags are then the events, and it skips record/wait.
  virtual bool synchronous() const noexcept = 0;
  virtual int device_count() const = 0;
  // Called once on each issuing thread before it issues for `device` (CUDA: cudaSetDevice).
  virtual void bind_thread(int device) = 0;
  // The stream an issuing thread uses when the caller names none (CPU: the immediate
  // stream 0, which runs everything inline on the calling thread).
  virtual Handle default_stream(int device) = 0;
  virtual Handle create_stream(int device) = 0;
  virtual void destroy_stream(Handle stream) = 0;
  virtual Handle create_event(int device) = 0;
  virtual void destroy_event(Handle event) = 0;
  virtual void record(Handle event, Handle stream) = 0;
  virtual void stream_wait(Handle stream, Handle event) = 0;
  virtual bool query(Handle event) = 0;
  // Enqueue a copy of nbytes from src (on src_device) to dst (on dst_device) on `stream`.
  virtual void copy(Handle stream, void* dst, int dst_device, const void* src, int src_device,
                    std::size_t nbytes) = 0;
  // Enqueue fn(arg) on `stream`; it runs on a backend thread once earlier work is done.
  virtual void host_callback(Handle stream, void (*fn)(void*), void* arg) = 0;
  // Block until everything enqueued on `stream` has run, at most timeout_s seconds;
  // returns false on timeout.
  virtual bool synchronize(Handle stream, double timeout_s) = 0;
  // Captured graphs (engine/cuda_graphs.py, runtime/graph_launch.h): whether launch_graph
  // runs one, and enqueue `graph` on `stream` (CUDA: cudaGraphLaunch of a cudaGraphExec_t;
  // CPU: a HostGraph run inline). The executor launches an action's graph instead of
  // calling into the host language for it.
  virtual bool launches_graphs() const noexcept { return false; }
  virtual void launch_graph(Handle graph, Handle stream);
  // Profiler annotations (CUDA: NVTX ranges in the "pipetrain" domain, cudaProfilerStart/Stop).
  virtual void range_push(const char* name) { (void)name; }
  virtual void range_pop() {}
  virtual void profiler_start() {}
  virtual void profiler_stop() {}
};

// The process-wide CPU backend (cpu_backend.cpp).
Backend& cpu_backend();

// Block the calling thread until `event` completes, polling with a bounded back-off;
// false after timeout_s seconds or once *cancel becomes true (cancel may be null).
bool host_wait(Backend& backend, Handle event, double timeout_s, const std::atomic<bool>* cancel = nullptr);

// Name under which the CUDA backend's capsule is exported by pipetrain._C_cuda.backend().
inline constexpr const char* kBackendCapsule = "pipetrain.runtime.Backend";

}  // namespace pipetrain::runtime
