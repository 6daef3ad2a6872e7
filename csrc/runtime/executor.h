// The executor: runs a Plan with one issuing thread per device.
//
// Each device's thread walks its action list in order. Before action g it checks g's
// cross-device dependencies: a dependency is complete when its host-side flag holds this
// run's epoch (set right after the producer was issued; on CUDA, also recorded as an event
// on the producer's stream, which the consumer's stream then waits on with stream_wait).
// A missing dependency is waited for by spinning briefly, then yielding, then blocking on a
// condition variable in bounded slices, so cancellation is seen promptly. Every wait is
// recorded in the timeline with what it was for.
//
// Threads are created on the first run and reused. The calling thread is the watchdog: it
// waits for the workers and, when no action has completed for `timeout` seconds, cancels
// the run with an error naming who waited on what. The first failure (an action, a backend
// call, a timeout, an interrupt, cancel(), shutdown()) cancels every thread; the executor
// stays usable unless an action failed to return at all (then it is poisoned, see
// poisoned()). An action cannot be interrupted: after a cancel the watchdog waits for the
// threads to reach their next wait or action boundary, at most min(timeout, grace).
//
// The host context (Python's GIL, via HostContext) is held only while running actions:
// a thread leaves it before every wait and keeps it across consecutive ready actions.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/backend.h"
#include "runtime/graph_launch.h"
#include "runtime/plan.h"

namespace pipetrain::runtime {

// How issuing threads enter the host language. The Python binding implements it with a
// per-thread PyThreadState and the GIL; the default does nothing.
class HostContext {
 public:
  virtual ~HostContext() = default;
  virtual void attach(int device) { (void)device; }  // once, on the thread, when it starts
  virtual void detach(int device) { (void)device; }  // once, on the thread, when it exits
  virtual void enter(int device) { (void)device; }   // before running actions
  virtual void leave(int device) { (void)device; }   // before waiting
  // Called by the watchdog (calling) thread at most every 50 ms (the Python host takes the
  // GIL in it, away from the issuing threads); false interrupts the run.
  virtual bool poll() { return true; }
};

// Runs action `index` of `device`; false means it failed (the callee keeps the error).
// A plain function pointer plus context: no allocation or type erasure per action.
using ActionFn = bool (*)(void* ctx, int device, int index);

// A wait of `index` on `dep`: dep_device -1 is the host context (time to take the GIL).
struct WaitRecord {
  std::int32_t index;
  std::int32_t dep_device;
  std::int32_t dep_index;
  std::int64_t start_ns;
  std::int64_t end_ns;
};

struct RunError {
  // kNone: the run completed. kAction: an action failed. kBackend: a backend call failed.
  // kTimeout: nothing completed for `timeout`. kInterrupted: HostContext::poll said stop
  // (Ctrl-C). kStuck: the executor was already poisoned. kClosed: shutdown() during the run
  // or before it. kCancelled: cancel() during the run.
  enum class Kind { kNone, kAction, kBackend, kTimeout, kInterrupted, kStuck, kClosed, kCancelled };
  Kind kind = Kind::kNone;
  int device = -1, index = -1;          // the action that failed or waited
  int dep_device = -1, dep_index = -1;  // timeouts: what it waited on
  std::string message;
};

struct ExecutorOptions {
  int spin = 0;       // busy-polls of a missing dependency before yielding
  int yields = 64;    // sched_yield rounds before blocking
  bool ranges = false;  // push a profiler range (NVTX "s1/F3") around every action
  // Backend device of each plan device (empty: plan device d is backend device d). Lets
  // several plan devices share one GPU, each with its own stream.
  std::vector<int> device_ids;
};

class Executor : public std::enable_shared_from_this<Executor> {
 public:
  // `streams`: one compute stream per device (empty: the backend's default streams).
  static std::shared_ptr<Executor> create(int num_devices, Backend& backend,
                                          std::shared_ptr<HostContext> host,
                                          std::vector<Handle> streams, ExecutorOptions options);
  ~Executor();

  // Runs the plan; call from one thread at a time (a concurrent call throws logic_error).
  // `timeout_s` > 0 (nan and non-positive throw invalid_argument); inf, or anything beyond
  // kNoTimeoutNs, means no timeout. Results stay readable until the next run.
  // `graphs` (optional, one entry per plan action): actions with a nonzero handle are
  // launched as captured graphs instead of calling `fn` (graph_launch.h).
  RunError run(std::shared_ptr<const Plan> plan, ActionFn fn, std::shared_ptr<void> ctx,
               double timeout_s, std::shared_ptr<const GraphTable> graphs = nullptr);
  // Cancels the run in progress, if any, with `reason` (its kind is what run() returns,
  // unless the run already failed) and waits at most `grace_s` more for threads inside
  // actions. Callable from any thread; returns whether a run was in progress.
  bool cancel(RunError reason, double grace_s);
  // Closes the executor for good: cancels a run in progress (it returns kClosed), waits for
  // that run() call to return (its watchdog gives up on threads stuck in actions after
  // `grace_s`, poisoning the executor), then joins the worker threads, or detaches them when
  // one is stuck. Every later run() returns kClosed. Idempotent. Called from one of this
  // executor's own threads (an action, or the watchdog's poll), it cannot wait for itself:
  // it cancels, detaches the threads (they exit once their actions return) and returns
  // false; otherwise true.
  bool shutdown(double grace_s);

  int num_devices() const { return num_devices_; }
  Backend& backend() { return backend_; }
  Handle stream(int device) const { return streams_[device]; }
  int device_id(int device) const { return options_.device_ids[device]; }
  bool poisoned() const { return poisoned_; }
  // True from the moment the run in progress is cancelled (any failure, cancel(), shutdown())
  // until it returns (for good once poisoned): for waits inside actions, such as
  // host_wait(..., cancel_flag()), so a cancelled run does not wait for them to time out.
  const std::atomic<bool>* cancel_flag() const { return &cancel_; }

  // Timeline of the last run, in ns since its start (steady clock), by global action id.
  const std::vector<std::int64_t>& start_ns() const { return start_; }
  const std::vector<std::int64_t>& end_ns() const { return end_; }
  std::vector<WaitRecord> waits(int device) const;
  std::int64_t wall_ns() const { return wall_ns_; }
  const Plan* plan() const { return plan_.get(); }

 private:
  Executor(int num_devices, Backend& backend, std::shared_ptr<HostContext> host,
           std::vector<Handle> streams, ExecutorOptions options);

  struct alignas(64) DeviceState {
    std::atomic<std::int32_t> current{-1};     // global id of the action being handled
    std::atomic<std::int32_t> waiting_on{-1};  // global id it waits on, -1 if none
    std::atomic<bool> active{false};           // inside run_device
    std::vector<WaitRecord> waits;             // preallocated; nwaits used
    std::int32_t nwaits = 0;
    std::vector<Handle> events;                // CUDA: one event per action index, reused
    std::string bind_error;                    // bind_thread failed: every run fails on it
  };

  void worker(int device);
  void run_device(int device);
  bool wait_done(int dep, std::uint32_t epoch);
  void fail(RunError error);
  std::string describe_stall() const;

  const int num_devices_;
  Backend& backend_;
  std::shared_ptr<HostContext> host_;
  std::vector<Handle> streams_;
  ExecutorOptions options_;

  // Current run (written by run() before the workers start, read-only while they run).
  std::shared_ptr<const Plan> plan_;
  ActionFn fn_ = nullptr;
  std::shared_ptr<void> ctx_;
  std::shared_ptr<const GraphTable> graphs_;  // captured graphs of this run, or null
  std::uint32_t epoch_ = 0;
  std::int64_t base_ns_ = 0;
  std::int64_t wall_ns_ = 0;

  std::unique_ptr<std::atomic<std::uint32_t>[]> done_;  // done_[g] == epoch_: g was issued
  std::size_t done_capacity_ = 0;
  std::vector<std::int64_t> start_, end_;
  std::unique_ptr<DeviceState[]> state_;

  std::atomic<bool> cancel_{false};
  // After a cancel, how long the watchdog still waits for threads inside actions (besides
  // `timeout`); cancel() and shutdown() shorten it, a second interrupt makes it 0.
  std::atomic<std::int64_t> grace_ns_{kNoTimeoutNs};
  std::atomic<std::int64_t> last_progress_{0};
  std::atomic<int> sleepers_{0};
  std::mutex wake_mutex_;
  std::condition_variable wake_cv_;

  std::mutex error_mutex_;
  RunError error_;

  // Worker dispatch: run() bumps job_; workers run it and count themselves in finished_.
  std::mutex job_mutex_;
  std::condition_variable job_cv_, finished_cv_;
  std::uint64_t job_ = 0;
  int finished_ = 0;
  bool stop_ = false;
  bool poisoned_ = false;
  bool closed_ = false;      // shutdown() was called: no more runs
  bool run_active_ = false;  // a run() call is between its start and its return
  std::thread::id run_thread_;  // the thread in run(), while run_active_
  std::condition_variable idle_cv_;  // run_active_ became false
  std::vector<std::thread> threads_;
};

std::int64_t now_ns();

}  // namespace pipetrain::runtime
