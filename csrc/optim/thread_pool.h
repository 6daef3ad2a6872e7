// A small persistent thread pool that splits one flat range across cores (pipetrain._C.optim).
//
// The fused optimizer kernels are memory-bound loops over millions of elements; one core
// cannot saturate DRAM, so each call is cut into contiguous chunks run at once. Workers are
// created once (lazily, on the first large call) and sleep on a condition variable between
// calls — never a thread per call, whose start-up would cost more than a small step.
#pragma once

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
  void worker_loop(int index, uint64_t seen);

  int num_threads_ = 1;
  long owner_pid_ = 0;  // workers do not survive fork(); a child runs everything inline
  std::mutex call_mutex_;  // one parallel_for at a time uses the workers
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  int pending_ = 0;
  // The current call: chunk i (1-based for workers; the caller runs chunk 0).
  const std::function<void(int64_t, int64_t)>* task_ = nullptr;
  std::vector<int64_t> bounds_;
  int chunks_ = 0;
};

}  // namespace pipetrain::optim
