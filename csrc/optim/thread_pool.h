// A small persistent thread pool that splits one flat range across cores (pipetrain._C.optim).
//
// The fused optimizer kernels are memory-bound loops over millions of elements; one core
// cannot saturate DRAM, so each call is cut into contiguous chunks run at once. Workers are
// created once (lazily, on the first large call) and sleep on a condition variable between
// calls — never a thread per call, whose start-up would cost more than a small step.
//
// A call is cut into a few more chunks than threads, and every participant, the caller
// included, takes chunks from a shared counter until none is left. A worker that wakes late
// (its core busy: torch's OpenMP threads spin for a while after each parallel op) finds the
// work already done instead of holding the caller up. (A worker that joins and then loses its
// core mid-chunk can still delay the caller by that chunk.) Chunk bounds depend only on n, so
// results do not depend on who ran which chunk.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pipetrain::optim {

class ThreadPool {
 public:
  // The process-wide pool. Default size: PIPETRAIN_NUM_THREADS if set, else all cores.
  static ThreadPool& instance();

  // Total threads used per call, the calling thread included (>= 1). Resizing joins the old
  // workers; it must not race with a running parallel_for (it takes the same lock).
  void set_num_threads(int n);
  int num_threads() const { return num_threads_; }

  // Calls fn(begin, end) on disjoint chunks covering [0, n). Chunk boundaries are multiples
  // of `align` elements (so no two threads share a cache line). Runs inline, on the caller,
  // when n < min_per_thread * 2, when only one thread is configured, in a forked child, or
  // when another thread is already using the pool (concurrent pipeline stages then each
  // run on their own thread instead of queueing). Blocks until every chunk is done.
  void parallel_for(int64_t n, int64_t align, int64_t min_per_thread,
                    const std::function<void(int64_t, int64_t)>& fn);

  ~ThreadPool();

 private:
  ThreadPool();
  void start_workers(int count);
  void stop_workers();
  // `seen`: the generation current when the worker starts; it waits for the next one.
  void worker_loop(uint64_t seen);
  // Runs chunks of the current call until the shared counter passes the last one.
  void run_chunks();

  int num_threads_ = 1;
  long owner_pid_ = 0;  // workers do not survive fork(); a child runs everything inline
  std::mutex call_mutex_;  // one parallel_for at a time uses the workers
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  // The current call (written under mutex_ before generation_ moves on).
  const std::function<void(int64_t, int64_t)>* task_ = nullptr;
  std::vector<int64_t> bounds_;  // chunk i is [bounds_[i], bounds_[i + 1])
  int chunks_ = 0;
  std::atomic<int> next_{0};     // the next chunk to take
  bool open_ = false;            // workers may still join the current call
  int running_ = 0;              // workers inside run_chunks() for the current call
};

}  // namespace pipetrain::optim
