// The persistent thread pool behind the fused CPU optimizer kernels (see thread_pool.h).
#include "optim/thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace pipetrain::optim {

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose: joining threads from a static destructor at interpreter exit can
  // deadlock; the OS reclaims them.
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

ThreadPool::ThreadPool() {
  int n = static_cast<int>(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("PIPETRAIN_NUM_THREADS")) {
    int parsed = std::atoi(env);
    if (parsed > 0) n = parsed;
  }
  num_threads_ = std::max(1, n);
  owner_pid_ = static_cast<long>(getpid());
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::set_num_threads(int n) {
  std::lock_guard<std::mutex> call(call_mutex_);
  n = std::max(1, n);
  if (n == num_threads_) return;
  stop_workers();
  num_threads_ = n;  // workers restart lazily at the next large call
}

void ThreadPool::start_workers(int count) {
  // No worker runs here (we hold call_mutex_ and stop_workers joined them all), so
  // generation_ is stable. A new worker must wait for the NEXT generation: starting from 0
  // it would wake at once on a stale generation and run a task that is not published yet
  // (task_ is null between calls) -- a crash seen after set_num_threads restarted the pool.
  stopping_ = false;
  const uint64_t current = generation_;
  for (int i = 0; i < count; ++i) workers_.emplace_back(&ThreadPool::worker_loop, this, current);
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::run_chunks() {
  for (int i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < chunks_;) {
    (*task_)(bounds_[i], bounds_[i + 1]);
  }
}

void ThreadPool::worker_loop(uint64_t seen) {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      if (!open_) continue;  // woke after the call finished: nothing left to join
      ++running_;
    }
    run_chunks();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--running_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t align, int64_t min_per_thread,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  align = std::max<int64_t>(1, align);
  int64_t by_size = n / std::max<int64_t>(1, min_per_thread);
  if (std::min<int64_t>(num_threads_, by_size) < 2 || static_cast<long>(getpid()) != owner_pid_) {
    fn(0, n);
    return;
  }
  std::unique_lock<std::mutex> call(call_mutex_, std::try_to_lock);
  if (!call.owns_lock()) {  // another stage's optimizer is using the pool: do not queue
    fn(0, n);
    return;
  }
  if (static_cast<int>(workers_.size()) != num_threads_ - 1) {
    stop_workers();
    start_workers(num_threads_ - 1);
  }
  // A few chunks per thread, so a late worker leaves its share to the others.
  const int chunks = static_cast<int>(std::min<int64_t>(4 * int64_t(num_threads_), by_size));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    bounds_.assign(chunks + 1, n);
    bounds_[0] = 0;
    int64_t per = (n + chunks - 1) / chunks;
    per = (per + align - 1) / align * align;
    for (int i = 1; i < chunks; ++i) bounds_[i] = std::min<int64_t>(n, per * i);
    task_ = &fn;
    chunks_ = chunks;
    next_.store(0, std::memory_order_relaxed);
    running_ = 0;
    open_ = true;
    ++generation_;
  }
  wake_.notify_all();
  run_chunks();  // the caller works too, and takes whatever the workers have not
  std::unique_lock<std::mutex> lock(mutex_);
  open_ = false;  // from here no worker joins; wait for those that did
  done_.wait(lock, [&] { return running_ == 0; });
  task_ = nullptr;
}

}  // namespace pipetrain::optim
