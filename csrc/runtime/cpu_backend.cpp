// The CPU backend: CUDA's stream/event semantics on host threads.
//
// Stream 0 is the immediate stream: every operation on it runs inline on the calling thread
// (an issuing thread running a torch CPU op *is* its device's stream). A created stream is an
// ordered queue served by its own thread, so copies and callbacks overlap the issuing threads.
// An event is a pair of counters: record() bumps `recorded`, and the stream sets `completed`
// to that value when it reaches the record; complete means completed >= recorded.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "runtime/backend.h"
#include "runtime/graph_launch.h"

namespace pipetrain::runtime {
namespace {

using Clock = std::chrono::steady_clock;

// One mutex/condvar for every CPU event: completions are rare (copies, callbacks), waiters
// few, so a shared wake-up is simpler than per-event condvars and costs nothing measurable.
std::mutex g_event_mutex;
std::condition_variable g_event_cv;

struct CpuEvent {
  std::atomic<std::uint64_t> recorded{0};
  std::atomic<std::uint64_t> completed{0};

  void complete(std::uint64_t generation) {
    {
      std::lock_guard<std::mutex> lock(g_event_mutex);
      std::uint64_t cur = completed.load();
      if (generation > cur) completed.store(generation);
    }
    g_event_cv.notify_all();
  }
  bool reached(std::uint64_t generation) const { return completed.load() >= generation; }
};

// Wait until `event` reaches `generation`, at most timeout_s; false on timeout.
bool wait_generation(const CpuEvent& event, std::uint64_t generation, double timeout_s) {
  auto deadline = Clock::now() + timeout_duration(timeout_s);
  std::unique_lock<std::mutex> lock(g_event_mutex);
  return g_event_cv.wait_until(lock, deadline, [&] { return event.reached(generation); });
}

// A stream-side wait is bounded too: a stream whose event never completes gives up after
// this long and reports the failure at the next synchronize() (no thread hangs forever).
constexpr double kStreamWaitLimitS = 300.0;

class CpuStream {
 public:
  CpuStream() : thread_([this] { serve(); }) {}
  ~CpuStream() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  void enqueue(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(task));
      ++enqueued_;
    }
    cv_.notify_all();
  }

  bool synchronize(double timeout_s) {
    std::unique_lock<std::mutex> lock(mutex_);
    std::uint64_t target = enqueued_;
    auto deadline = Clock::now() + timeout_duration(timeout_s);
    bool done = idle_cv_.wait_until(lock, deadline, [&] { return finished_ >= target; });
    if (!error_.empty()) {
      std::string message = std::move(error_);
      error_.clear();
      throw std::runtime_error(message);
    }
    return done;
  }

  void fail(std::string message) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_.empty()) error_ = std::move(message);
  }

 private:
  void serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      try {
        task();
      } catch (const std::exception& err) {
        fail(err.what());
      }
      lock.lock();
      ++finished_;
      idle_cv_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_, idle_cv_;
  std::deque<std::function<void()>> queue_;
  std::uint64_t enqueued_ = 0, finished_ = 0;
  bool stop_ = false;
  std::string error_;
  std::thread thread_;  // last: starts after the members it uses exist
};

class CpuBackend final : public Backend {
 public:
  const char* name() const noexcept override { return "cpu"; }
  bool synchronous() const noexcept override { return true; }
  // A HostGraph (runtime/graph_launch.h) runs inline: work issued by a thread is done when
  // the call returns, as everything on this backend.
  bool launches_graphs() const noexcept override { return true; }
  void launch_graph(Handle graph, Handle) override { run_host_graph(graph); }
  int device_count() const override { return 1 << 20; }  // host threads: as many as asked
  void bind_thread(int) override {}
  Handle default_stream(int) override { return 0; }
  Handle create_stream(int) override { return reinterpret_cast<Handle>(new CpuStream()); }
  void destroy_stream(Handle stream) override { delete as_stream(stream); }
  Handle create_event(int) override { return reinterpret_cast<Handle>(new CpuEvent()); }
  void destroy_event(Handle event) override { delete as_event(event); }

  void record(Handle event, Handle stream) override {
    CpuEvent* ev = as_event(event);
    std::uint64_t generation = ev->recorded.fetch_add(1) + 1;
    if (CpuStream* s = as_stream(stream)) {
      s->enqueue([ev, generation] { ev->complete(generation); });
    } else {
      ev->complete(generation);
    }
  }

  void stream_wait(Handle stream, Handle event) override {
    CpuEvent* ev = as_event(event);
    std::uint64_t generation = ev->recorded.load();
    if (CpuStream* s = as_stream(stream)) {
      s->enqueue([ev, generation, s] {
        if (!wait_generation(*ev, generation, kStreamWaitLimitS))
          s->fail("cpu stream: an event it waited on was not completed within 300 s");
      });
    } else if (!wait_generation(*ev, generation, kStreamWaitLimitS)) {
      throw std::runtime_error("cpu backend: event not completed within 300 s");
    }
  }

  bool query(Handle event) override {
    CpuEvent* ev = as_event(event);
    return ev->reached(ev->recorded.load());
  }

  void copy(Handle stream, void* dst, int, const void* src, int, std::size_t nbytes) override {
    // One address space: a copy is a memcpy, run in stream order.
    if (CpuStream* s = as_stream(stream)) {
      s->enqueue([dst, src, nbytes] { std::memcpy(dst, src, nbytes); });
    } else {
      std::memcpy(dst, src, nbytes);
    }
  }

  void host_callback(Handle stream, void (*fn)(void*), void* arg) override {
    if (CpuStream* s = as_stream(stream)) {
      s->enqueue([fn, arg] { fn(arg); });
    } else {
      fn(arg);
    }
  }

  bool synchronize(Handle stream, double timeout_s) override {
    CpuStream* s = as_stream(stream);
    return s ? s->synchronize(timeout_s) : true;
  }

 private:
  static CpuStream* as_stream(Handle h) { return reinterpret_cast<CpuStream*>(h); }
  static CpuEvent* as_event(Handle h) {
    if (h == 0) throw std::invalid_argument("cpu backend: null event");
    return reinterpret_cast<CpuEvent*>(h);
  }
};

}  // namespace

Backend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

bool host_wait(Backend& backend, Handle event, double timeout_s, const std::atomic<bool>* cancel) {
  // Poll with a back-off from a few microseconds to 1 ms: the same code serves CUDA events,
  // for which a blocking cudaEventSynchronize could not be bounded or cancelled.
  auto start = Clock::now();
  const auto limit = timeout_duration(timeout_s);
  std::chrono::microseconds nap(2);
  while (!backend.query(event)) {
    if ((cancel && cancel->load()) || Clock::now() - start > limit) return false;
    std::this_thread::sleep_for(nap);
    nap = std::min(nap * 2, std::chrono::microseconds(1000));
  }
  return true;
}

}  // namespace pipetrain::runtime
