// A small thread pool for the kernels, in which the calling thread never waits for a helper that has
// not started.
//
// Why not OpenMP / at::parallel_for. A fork-join region needs every thread of the team to arrive
// before it can end. On a busy machine (more runnable processes than cores) a helper thread that is
// not scheduled holds the region until the scheduler gives it a time slice, milliseconds later: we
// measured 1.2 s instead of 10 ms for the 151 linears of a SmolLM2 decode step with 2 OpenMP threads
// at load average 3.5 on 2 cores (torch's own fp32 F.linear degrades the same way). Here the work is
// cut into chunks that threads claim from an atomic counter; the caller claims chunks too and, once
// none is left, waits only for the chunks that helpers have already claimed (microseconds). A helper
// that wakes up late finds nothing to do. So the worst case is the single-thread speed, not a time
// slice per call.
//
// Results do not depend on which thread runs a chunk: a chunk is a range of output rows, and every row
// is computed by the same code whatever thread, range or position (kernels_avx512.cpp).
//
// Helpers spin for a short while after each job (the next linear of a forward comes within tens of
// microseconds), then sleep on a condition variable; the caller only pays for a wake-up when one
// sleeps. The pool is created on first use, grows to the number of threads asked for, and is never
// destroyed (helpers are detached, so process exit does not wait for them). A second thread calling in
// while a job runs just does its own job alone.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <pthread.h>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPECQD_PAUSE() _mm_pause()
#else
#define SPECQD_PAUSE() std::this_thread::yield()
#endif

namespace specqd_cpu {

class ThreadPool {
 public:
  using ChunkFn = void (*)(void* ctx, int64_t chunk);

  static ThreadPool& instance() {
    // Leaked on purpose: helpers may outlive static destructors. A forked child starts a fresh pool
    // (it has none of the parent's threads, and a mutex may have been copied locked).
    static std::once_flag once;
    std::call_once(once, [] {
      current() = new ThreadPool();
      pthread_atfork(nullptr, nullptr, [] { current() = new ThreadPool(); });
    });
    return *current();
  }

  // Runs fn(ctx, i) for every i in [0, chunks), on the calling thread and up to threads - 1 helpers.
  void run(int64_t chunks, int threads, ChunkFn fn, void* ctx) {
    std::unique_lock<std::mutex> caller(caller_mutex_, std::try_to_lock);
    if (threads <= 1 || chunks <= 1 || !caller.owns_lock()) {
      for (int64_t i = 0; i < chunks; ++i) fn(ctx, i);
      return;
    }
    ensure_helpers(threads - 1);
    // Publish the job, then open it (odd generation). Helpers read the fields only after seeing the
    // odd generation (acquire), which orders them after these stores (release).
    fn_ = fn;
    ctx_ = ctx;
    chunks_ = chunks;
    max_joiners_ = threads - 1;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    joiners_.store(0, std::memory_order_relaxed);
    // seq_cst here and on the helper's side of each pair below (open / sleepers, close / inside): each
    // side writes one variable and then reads the other, and one of them must see the other's write.
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    // Work like any helper.
    work();
    // All chunks are claimed: wait for the ones still running elsewhere, then close the job and wait
    // until no helper is inside it (one may be between claiming nothing and leaving).
    for (int n = 0; done_.load(std::memory_order_acquire) < chunks; n += n < 64) backoff(n);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    for (int n = 0; inside_.load(std::memory_order_seq_cst) > 0; n += n < 64) backoff(n);
  }

 private:
  ThreadPool() = default;

  static ThreadPool*& current() {
    static ThreadPool* pool = nullptr;
    return pool;
  }

  void ensure_helpers(int n) {
    while (static_cast<int>(helpers_.size()) < n) {
      helpers_.emplace_back(&ThreadPool::helper_loop, this);
      helpers_.back().detach();
    }
  }

  // Waiting for another thread: spin briefly, then yield the core. Yielding matters when the machine
  // has more runnable threads than cores: the thread we wait for may be queued behind us on our core.
  static void backoff(int n) {
    if (n < 64)
      SPECQD_PAUSE();
    else
      std::this_thread::yield();
  }

  // Claims and runs chunks until none is left.
  void work() {
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= chunks_) return;
      fn_(ctx_, i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void helper_loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t g = wait_for_job(seen);
      seen = g;
      // Enter, then check the job is still the open one: the caller closes it (generation + 1) before
      // waiting for inside_ == 0, so a helper that entered after the close backs out untouched.
      inside_.fetch_add(1, std::memory_order_seq_cst);
      if (generation_.load(std::memory_order_seq_cst) == g &&
          joiners_.fetch_add(1, std::memory_order_relaxed) < max_joiners_)
        work();
      inside_.fetch_sub(1, std::memory_order_release);
    }
  }

  // Returns the generation of an open job newer than `seen`: spin a little, then sleep.
  uint64_t wait_for_job(uint64_t seen) {
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    for (int n = 0;; ++n) {
      const uint64_t g = generation_.load(std::memory_order_acquire);
      if (g != seen && (g & 1)) return g;
      if (g != seen) seen = g;  // a job opened and closed while we looked away: not ours
      if ((n & 63) == 63 && std::chrono::steady_clock::now() > spin_until) break;
      backoff(n);
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t g;
    wake_.wait(lock, [&] {
      g = generation_.load(std::memory_order_seq_cst);
      return g != seen && (g & 1);
    });
    sleepers_.fetch_sub(1, std::memory_order_acq_rel);
    return g;
  }

  static constexpr int kSpinMicros = 200;

  std::mutex caller_mutex_;                // one job at a time
  std::atomic<uint64_t> generation_{0};    // odd while a job is open
  std::atomic<int64_t> next_{0};           // next chunk to claim
  std::atomic<int64_t> done_{0};           // chunks finished
  std::atomic<int> inside_{0};             // helpers inside the current job
  std::atomic<int> joiners_{0};            // helpers that joined it (at most max_joiners_ work)
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t chunks_ = 0;
  int max_joiners_ = 0;
  std::vector<std::thread> helpers_;
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

}  // namespace specqd_cpu
