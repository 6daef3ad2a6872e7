// The executor's threads, waits and watchdog (see executor.h).
#include "runtime/executor.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PIPETRAIN_CPU_RELAX() _mm_pause()
#else
#define PIPETRAIN_CPU_RELAX() std::atomic_signal_fence(std::memory_order_seq_cst)
#endif

namespace pipetrain::runtime {

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace {
std::string where(const Plan& plan, int g) {
  return "device " + std::to_string(plan.dev[g]) + " action " + std::to_string(plan.idx[g]) +
         " (" + plan.labels[g] + ")";
}
}  // namespace

std::shared_ptr<Executor> Executor::create(int num_devices, Backend& backend,
                                           std::shared_ptr<HostContext> host,
                                           std::vector<Handle> streams, ExecutorOptions options) {
  return std::shared_ptr<Executor>(
      new Executor(num_devices, backend, std::move(host), std::move(streams), options));
}

Executor::Executor(int num_devices, Backend& backend, std::shared_ptr<HostContext> host,
                   std::vector<Handle> streams, ExecutorOptions options)
    : num_devices_(num_devices), backend_(backend), host_(std::move(host)),
      streams_(std::move(streams)), options_(options) {
  if (num_devices <= 0) throw std::invalid_argument("executor: num_devices must be positive");
  if (!host_) host_ = std::make_shared<HostContext>();
  if (options_.device_ids.empty()) {
    for (int d = 0; d < num_devices; ++d) options_.device_ids.push_back(d);
  }
  if (static_cast<int>(options_.device_ids.size()) != num_devices) {
    throw std::invalid_argument("executor: expected one device id per device (" +
                                std::to_string(num_devices) + "), got " +
                                std::to_string(options_.device_ids.size()));
  }
  if (streams_.empty()) {
    for (int d = 0; d < num_devices; ++d) streams_.push_back(backend_.default_stream(device_id(d)));
  }
  if (static_cast<int>(streams_.size()) != num_devices) {
    throw std::invalid_argument("executor: expected one stream per device (" +
                                std::to_string(num_devices) + "), got " +
                                std::to_string(streams_.size()));
  }
  state_.reset(new DeviceState[num_devices]);
}

// Worker threads hold references, so by now they are gone (joined, or never started).
Executor::~Executor() = default;

bool Executor::cancel(RunError reason, double grace_s) {
  std::lock_guard<std::mutex> lock(job_mutex_);
  if (!run_active_) return false;
  const std::int64_t grace = timeout_ns(grace_s);
  if (grace < grace_ns_.load()) grace_ns_.store(grace);
  fail(std::move(reason));
  return true;
}

bool Executor::shutdown(double grace_s) {
  const std::thread::id self = std::this_thread::get_id();
  std::vector<std::thread> threads;
  bool inside = false, detach = false;
  {
    std::unique_lock<std::mutex> lock(job_mutex_);
    closed_ = true;
    inside = run_active_ && run_thread_ == self;
    for (const std::thread& t : threads_) inside = inside || t.get_id() == self;
    if (run_active_) {
      const std::int64_t grace = timeout_ns(grace_s);
      if (grace < grace_ns_.load()) grace_ns_.store(grace);
      fail({RunError::Kind::kClosed, -1, -1, -1, -1, "the executor was closed during the run"});
      if (!inside) {
        // The watchdog returns within grace (plus a poll slice) even if an action never
        // does; the margin covers a watchdog slow to get scheduled. Past it, leave the
        // threads be (detach) rather than hang the caller.
        const auto bound = timeout_duration(grace_s) + std::chrono::seconds(2);
        if (!idle_cv_.wait_for(lock, bound, [&] { return !run_active_; })) poisoned_ = true;
      }
    }
    stop_ = true;
    threads = std::move(threads_);
    threads_.clear();
    // A thread stuck in an action (poisoned), or the caller's own, cannot be joined: detach.
    // Each keeps its own reference to this object (see run()), so that is safe.
    detach = inside || poisoned_;
  }
  job_cv_.notify_all();
  for (std::thread& t : threads) {
    if (detach) t.detach(); else if (t.joinable()) t.join();
  }
  if (!detach && !backend_.synchronous()) {
    for (int d = 0; d < num_devices_; ++d) {
      for (Handle e : state_[d].events) backend_.destroy_event(e);
      state_[d].events.clear();
    }
  }
  return !inside;
}

void Executor::worker(int device) {
  try {
    backend_.bind_thread(device_id(device));
  } catch (const std::exception& err) {
    state_[device].bind_error = std::string(backend_.name()) + " backend: " + err.what();
  }
  host_->attach(device);
  std::uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(job_mutex_);
      job_cv_.wait(lock, [&] { return stop_ || job_ != seen; });
      if (stop_) break;
      seen = job_;
    }
    run_device(device);
    {
      std::lock_guard<std::mutex> lock(job_mutex_);
      ++finished_;
    }
    finished_cv_.notify_all();
  }
  host_->detach(device);
}

bool Executor::wait_done(int dep, std::uint32_t epoch) {
  std::atomic<std::uint32_t>& flag = done_[dep];
  // The producer is usually microseconds away and a condvar sleep/wake round trip costs
  // tens of microseconds, so poll before blocking. Yielding beats pure spinning when
  // threads outnumber cores (measured: 1F1B p=4 on 2 cores, no-op actions, 0.9 us/action
  // yielding vs 11 us spinning 4000 pauses): sched_yield hands the core to the producer,
  // whereas a spinner takes it away. `spin` stays for hosts with a core per thread.
  for (int k = 0; k < options_.spin; ++k) {
    if (flag.load(std::memory_order_acquire) == epoch) return true;
    if (cancel_.load(std::memory_order_relaxed)) return false;
    PIPETRAIN_CPU_RELAX();
  }
  for (int k = 0; k < options_.yields; ++k) {
    if (flag.load(std::memory_order_acquire) == epoch) return true;
    if (cancel_.load(std::memory_order_relaxed)) return false;
    std::this_thread::yield();
  }
  // Block. Lost wake-ups are impossible: we count ourselves in sleepers_ before re-checking
  // the flag, and the producer stores the flag before reading sleepers_ (both seq_cst), so
  // either we see the flag or the producer sees us and notifies under the mutex.
  std::unique_lock<std::mutex> lock(wake_mutex_);
  sleepers_.fetch_add(1);
  bool ok = true;
  while (flag.load() != epoch) {
    if (cancel_.load()) {
      ok = false;
      break;
    }
    wake_cv_.wait_for(lock, std::chrono::milliseconds(50));  // bounded: a backstop only
  }
  sleepers_.fetch_sub(1);
  return ok;
}

void Executor::fail(RunError error) {
  {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (error_.kind == RunError::Kind::kNone) error_ = std::move(error);
  }
  cancel_.store(true);
  {
    std::lock_guard<std::mutex> lock(wake_mutex_);
  }
  wake_cv_.notify_all();
}

void Executor::run_device(int d) {
  const Plan& plan = *plan_;
  DeviceState& st = state_[d];
  const std::uint32_t epoch = epoch_;
  const int begin = plan.offset[d], end = plan.offset[d + 1];
  const Handle stream = streams_[d];
  const bool async = !backend_.synchronous();
  const ActionFn fn = fn_;
  const GraphTable* const graphs = graphs_.get();
  void* const ctx = ctx_.get();
  bool entered = false;
  int g = begin;
  if (!st.bind_error.empty()) {
    fail({RunError::Kind::kBackend, d, -1, -1, -1,
          "device " + std::to_string(d) + ": " + st.bind_error});
    return;
  }
  st.active.store(true);
  try {
    for (; g < end; ++g) {
      st.current.store(g, std::memory_order_relaxed);
      for (int k = plan.dep_begin[g]; k < plan.dep_begin[g + 1]; ++k) {
        const int dep = plan.dep_ids[k];
        if (done_[dep].load(std::memory_order_acquire) != epoch) {
          if (entered) {
            host_->leave(d);
            entered = false;
          }
          const std::int64_t t0 = now_ns();
          st.waiting_on.store(dep, std::memory_order_relaxed);
          const bool ok = wait_done(dep, epoch);
          st.waiting_on.store(-1, std::memory_order_relaxed);
          st.waits[st.nwaits++] = {g - begin, plan.dev[dep], plan.idx[dep], t0 - base_ns_,
                                   now_ns() - base_ns_};
          if (!ok) {  // cancelled: whoever cancelled recorded why
            st.active.store(false);
            return;
          }
        }
        // CUDA: the producer was issued; make this device's stream wait for its event.
        if (async) backend_.stream_wait(stream, state_[plan.dev[dep]].events[plan.idx[dep]]);
      }
      if (cancel_.load(std::memory_order_relaxed)) break;
      // --- captured graphs (graph_launch.h): launched here, outside the host context ---
      const Handle graph = graphs != nullptr ? (*graphs)[g] : 0;
      if (graph != 0 && entered) {
        host_->leave(d);
        entered = false;
      }
      // --- end captured graphs ---
      if (!entered && graph == 0) {
        const std::int64_t t0 = now_ns();
        host_->enter(d);
        entered = true;
        const std::int64_t t1 = now_ns();
        // Time to take the GIL: recorded when it is more than noise, so busy + waits
        // accounts for the wall time even when threads contend for the interpreter.
        if (t1 - t0 > 2000) st.waits[st.nwaits++] = {g - begin, -1, -1, t0 - base_ns_, t1 - base_ns_};
      }
      if (options_.ranges) backend_.range_push(plan.range_names[g].c_str());
      start_[g] = now_ns() - base_ns_;
      bool ok = true;
      if (graph != 0) {
        backend_.launch_graph(graph, stream);
      } else {
        ok = fn(ctx, d, g - begin);
      }
      const std::int64_t t_end = now_ns();
      end_[g] = t_end - base_ns_;
      if (options_.ranges) backend_.range_pop();
      if (!ok) {
        fail({RunError::Kind::kAction, d, g - begin, -1, -1, where(plan, g) + " raised"});
        break;
      }
      if (async) backend_.record(st.events[g - begin], stream);
      done_[g].store(epoch);  // seq_cst: pairs with sleepers_ in wait_done
      last_progress_.store(t_end, std::memory_order_relaxed);
      if (sleepers_.load() > 0) {
        { std::lock_guard<std::mutex> lock(wake_mutex_); }
        wake_cv_.notify_all();
      }
    }
  } catch (const std::exception& err) {
    fail({RunError::Kind::kBackend, d, g - begin, -1, -1,
          where(plan, std::min(g, end - 1)) + ": " + backend_.name() + " backend: " + err.what()});
  }
  if (entered) host_->leave(d);
  st.active.store(false);
}

std::string Executor::describe_stall() const {
  const Plan& plan = *plan_;
  std::string out;
  for (int d = 0; d < num_devices_; ++d) {
    const int cur = state_[d].current.load();
    const int dep = state_[d].waiting_on.load();
    if (cur < 0 || !state_[d].active.load()) continue;
    if (!out.empty()) out += "; ";
    if (dep >= 0) {
      out += where(plan, cur) + " waits on " + where(plan, dep);
    } else {
      out += where(plan, cur) + " is running or about to run";
    }
  }
  return out;
}

RunError Executor::run(std::shared_ptr<const Plan> plan, ActionFn fn, std::shared_ptr<void> ctx,
                       double timeout_s, std::shared_ptr<const GraphTable> graphs) {
  if (plan->num_devices() != num_devices_) {
    throw std::invalid_argument("executor has " + std::to_string(num_devices_) +
                                " devices, the plan has " + std::to_string(plan->num_devices()));
  }
  if (graphs != nullptr && static_cast<int>(graphs->size()) != plan->size()) {
    throw std::invalid_argument("graph table has " + std::to_string(graphs->size()) +
                                " entries, the plan " + std::to_string(plan->size()) + " actions");
  }
  if (graphs != nullptr && !backend_.launches_graphs()) {
    throw std::invalid_argument(std::string("the ") + backend_.name() +
                                " backend cannot launch captured graphs");
  }
  // !(x > 0) also rejects nan, which every comparison below would treat as "never".
  if (!(timeout_s > 0)) throw std::invalid_argument("timeout must be positive (inf: no timeout)");
  {
    // From here until return, the run is active: cancel() and shutdown() see it. The error
    // is reset here, not later, so a cancel that arrives while we prepare is not lost.
    std::lock_guard<std::mutex> lock(job_mutex_);
    if (closed_) return {RunError::Kind::kClosed, -1, -1, -1, -1, "executor is closed"};
    if (run_active_) throw std::logic_error("executor: run() is already running (one at a time)");
    if (poisoned_) {
      return {RunError::Kind::kStuck, -1, -1, -1, -1,
              "executor is unusable: an earlier run left a thread stuck in an action"};
    }
    run_active_ = true;
    run_thread_ = std::this_thread::get_id();
    grace_ns_.store(kNoTimeoutNs);
    std::lock_guard<std::mutex> elock(error_mutex_);
    error_ = RunError{};
    cancel_.store(false);
  }
  struct EndRun {  // on every return path: the run is over; wake shutdown() waiting for it
    Executor& ex;
    ~EndRun() {
      {
        std::lock_guard<std::mutex> lock(ex.job_mutex_);
        ex.run_active_ = false;
      }
      ex.idle_cv_.notify_all();
    }
  } end_run{*this};
  const int total = plan->size();

  // Preallocate everything the hot loop touches; reused across runs of similar size.
  if (static_cast<std::size_t>(total) > done_capacity_) {
    done_capacity_ = std::max<std::size_t>(total, 2 * done_capacity_);
    done_.reset(new std::atomic<std::uint32_t>[done_capacity_]);
    for (std::size_t i = 0; i < done_capacity_; ++i) done_[i].store(0);
  }
  start_.assign(total, -1);
  end_.assign(total, -1);
  for (int d = 0; d < num_devices_; ++d) {
    DeviceState& st = state_[d];
    const int n = plan->count(d);
    const int ndeps = plan->dep_begin[plan->offset[d + 1]] - plan->dep_begin[plan->offset[d]];
    if (st.waits.size() < static_cast<std::size_t>(n + ndeps)) st.waits.resize(n + ndeps);
    st.nwaits = 0;
    st.current.store(-1);
    st.waiting_on.store(-1);
    if (!backend_.synchronous()) {
      try {
        while (static_cast<int>(st.events.size()) < n) {
          st.events.push_back(backend_.create_event(device_id(d)));
        }
      } catch (const std::exception& err) {
        return {RunError::Kind::kBackend, d, -1, -1, -1,
                std::string("device ") + std::to_string(d) + ": " + backend_.name() +
                    " backend: creating events: " + err.what()};
      }
    }
  }
  plan_ = std::move(plan);
  fn_ = fn;
  ctx_ = std::move(ctx);
  graphs_ = std::move(graphs);
  ++epoch_;
  if (epoch_ == 0) {  // wrapped: clear the flags so no stale flag matches
    for (std::size_t i = 0; i < done_capacity_; ++i) done_[i].store(0);
    epoch_ = 1;
  }

  if (threads_.empty()) {
    stop_ = false;
    // Each thread holds a reference: one stuck in an action (poisoned) keeps this alive.
    for (int d = 0; d < num_devices_; ++d) {
      threads_.emplace_back([self = shared_from_this(), d] { self->worker(d); });
    }
  }
  base_ns_ = now_ns();
  last_progress_.store(base_ns_);
  const std::int64_t limit_ns = timeout_ns(timeout_s);  // clamped: inf is "never"
  const auto slice = std::chrono::microseconds(
      std::clamp<std::int64_t>(limit_ns / 8000, 1000, 20000));
  std::int64_t cancelled_at = -1;
  // Polling the host takes the GIL, which the issuing thread holds across its consecutive
  // actions: each poll makes it hand the interpreter over and take it back (a forced switch
  // after Python's switch interval, and two thread wake-ups). So poll at most every
  // kPollNs -- Ctrl-C is still seen within ~0.1 s -- not at every watchdog slice.
  constexpr std::int64_t kPollNs = 50'000'000;
  std::int64_t polled_at = base_ns_;
  {
    std::unique_lock<std::mutex> lock(job_mutex_);
    finished_ = 0;
    ++job_;
    job_cv_.notify_all();
    while (finished_ < num_devices_) {
      if (finished_cv_.wait_for(lock, slice, [&] { return finished_ == num_devices_; })) break;
      lock.unlock();
      const std::int64_t now = now_ns();
      const bool poll_now = now - polled_at >= kPollNs || cancel_.load();
      if (poll_now) polled_at = now;
      if (poll_now && !host_->poll()) {
        // A second interrupt while threads finish their actions: stop waiting for them.
        if (cancel_.load()) grace_ns_.store(0);
        fail({RunError::Kind::kInterrupted, -1, -1, -1, -1, "interrupted"});
      } else if (!cancel_.load() && now - last_progress_.load() > limit_ns) {
        RunError err{RunError::Kind::kTimeout, -1, -1, -1, -1, ""};
        for (int d = 0; d < num_devices_ && err.device < 0; ++d) {
          const int dep = state_[d].waiting_on.load();
          const int cur = state_[d].current.load();
          if (dep >= 0 && cur >= 0) {
            err.device = d;
            err.index = plan_->idx[cur];
            err.dep_device = plan_->dev[dep];
            err.dep_index = plan_->idx[dep];
          }
        }
        for (int d = 0; d < num_devices_ && err.device < 0; ++d) {
          const int cur = state_[d].current.load();  // nobody waits: blame the one running
          if (cur >= 0 && state_[d].active.load()) {
            err.device = d;
            err.index = plan_->idx[cur];
          }
        }
        err.message = "no action completed for " + std::to_string(timeout_s) + " s: " +
                      describe_stall();
        fail(std::move(err));
      }
      if (cancel_.load() && cancelled_at < 0) cancelled_at = now;
      // After a cancel, threads stop at their next wait or action boundary; one that does
      // not within another `timeout` (or the grace a cancel/close gave) is stuck inside an
      // action, which cannot be interrupted.
      if (cancelled_at >= 0 && now - cancelled_at > std::min(limit_ns, grace_ns_.load())) {
        lock.lock();
        if (finished_ < num_devices_) {
          poisoned_ = true;
          lock.unlock();
          RunError err;
          {
            std::lock_guard<std::mutex> elock(error_mutex_);
            err = error_;
          }
          err.message += " (and a thread did not stop within the timeout: " + describe_stall() +
                         "; this executor is now unusable)";
          wall_ns_ = now_ns() - base_ns_;
          return err;
        }
        break;
      }
      lock.lock();
    }
  }
  wall_ns_ = now_ns() - base_ns_;
  // Every worker has finished, so nothing uses the caller's callable any more: drop it. Kept,
  // it would keep alive whatever it references (a Pipeline and, through it, this executor's
  // threads) until the next run. A poisoned run (above) keeps it: a stuck thread may use it.
  fn_ = nullptr;
  ctx_.reset();
  graphs_.reset();
  cancel_.store(false);  // the run is over: waits outside runs must not see it cancelled
  std::lock_guard<std::mutex> lock(error_mutex_);
  return error_;
}

std::vector<WaitRecord> Executor::waits(int device) const {
  const DeviceState& st = state_[device];
  return std::vector<WaitRecord>(st.waits.begin(), st.waits.begin() + st.nwaits);
}

}  // namespace pipetrain::runtime
