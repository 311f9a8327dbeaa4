// A small thread pool for the kernels, in which the calling thread never waits for a helper that has
// not started.
//
// Why not OpenMP / at::parallel_for. A fork-join region needs every thread of the team to arrive
// before it can end. On a busy machine (more runnable processes than cores) a helper thread that is
// not scheduled holds the region until the scheduler gives it a time slice, milliseconds later: we
// measured 1.2 s instead of 10 ms for the 151 linears of a SmolLM2 decode step with 2 OpenMP threads
// at load average 3.5 on 2 cores (torch's own fp32 F.linear degrades the same way). Here the work is
// cut into chunks that threads claim with atomic counters; the caller claims chunks too and, once
// none is left, waits only for the chunks that helpers have already claimed (microseconds). A helper
// that wakes up late finds nothing to do. So the worst case is the single-thread speed, not a time
// slice per call.
//
// A job is a number of units (a linear's 16-row stripes) and a chunk `per` units; a chunk is a range
// of units [begin, end). Near the end of a run the chunks shrink: once fewer than 2 * per units are
// left, a claim takes half of what is left (at least one unit). With whole chunks to the end, the
// thread that finished first waited for the other's last chunk, ~2 us a linear on average: 0.34 ms of
// an int8 MXFP4 draft step of SmolLM2 on a 2-core Xeon (151 linears), where halving cut it to 0.05.
//
// Results do not depend on which thread runs a chunk: a chunk is a range of output rows, and every row
// is computed by the same code whatever thread, range or position (kernels_avx512.cpp).
//
// Which chunks a thread claims. The units are cut into one run of consecutive units per thread (the
// caller the first, helper i the run i + 1); each thread claims the next chunk of its own run and,
// once that is used up, the next chunk of the other runs in turn. So each thread reads one sequential
// stream of weights, which the prefetchers (and the kernels' own software prefetch, which runs on past
// a chunk's end) keep ahead of the reads. Claiming every chunk from one shared counter handed the
// threads alternate chunks instead, a new stream every ~48 KB: the int8 MXFP4 linears of a SmolLM2
// step then read ~15% slower on a 2-core Xeon.
//
// Prefetch while idle. Between two linears the caller does the work that is not a matrix (norms,
// attention, the Python of a step: ~20% of a 4-bit draft step) and the helpers have nothing to do. So
// the caller may name, per helper, the memory of the rows that helper will compute first in the next
// linear (set_prefetch; ops.cpp's prefetch_linear works them out), and a helper with no job pulls
// them into its cache a slice at a time, checking for a new job between slices, and goes on where it
// stopped after a job. The next linear then reads part of the helper's run from its cache instead of
// memory: the memory works through the caller's single-threaded stretches.
//
// Helpers spin for a short while after each job (the next linear of a forward comes within tens of
// microseconds), then sleep on a condition variable; the caller only pays for a wake-up when one
// sleeps. The pool is created on first use, grows to the number of threads asked for, and is never
// destroyed (helpers are detached, so process exit does not wait for them). A second thread calling in
// while a job runs just does its own job alone.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
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
  using ChunkFn = void (*)(void* ctx, int64_t begin, int64_t end);  // units [begin, end)

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

  // Up to this many helpers take prefetch work (set_prefetch); any further ones do not prefetch.
  static constexpr int kPrefetchHelpers = 64;

  // Memory for helper `helper` to pull into its cache when it has no job: [p, p + n) for each of the
  // (up to) two ranges, in order. Replaces what was pending for it. Safe to call at any time: a helper
  // reads these with atomics, and a prefetch never faults: an address it should not have (a range being
  // replaced, a tensor freed since) costs time, not correctness.
  void set_prefetch(int helper, const void* p0, size_t n0, const void* p1, size_t n1) {
    if (helper < 0 || helper >= kPrefetchHelpers) return;
    Prefetch& f = prefetch_[helper];
    const void* p[2] = {p0, p1};
    const size_t n[2] = {n0, n1};
    for (int r = 0; r < 2; ++r) {
      const uintptr_t begin = reinterpret_cast<uintptr_t>(p[r]) & ~uintptr_t{63};
      f.end[r].store(0, std::memory_order_relaxed);
      f.next[r].store(begin, std::memory_order_relaxed);
      f.end[r].store(n[r] ? reinterpret_cast<uintptr_t>(p[r]) + n[r] : 0, std::memory_order_release);
    }
  }

  // Runs fn(ctx, begin, end) over ranges that together cover [0, units) once, on the calling thread
  // and up to threads - 1 helpers; per: the units of a chunk (before the runs' ends shrink it).
  void run(int64_t units, int64_t per, int threads, ChunkFn fn, void* ctx) {
    std::unique_lock<std::mutex> caller(caller_mutex_, std::try_to_lock);
    per = std::max<int64_t>(1, per);
    if (threads <= 1 || units <= per || !caller.owns_lock()) {
      if (units > 0) fn(ctx, 0, units);
      return;
    }
    ensure_helpers(threads - 1);
    // Publish the job, then open it (odd generation). Helpers read the fields only after seeing the
    // odd generation (acquire), which orders them after these stores (release).
    fn_ = fn;
    ctx_ = ctx;
    max_joiners_ = threads - 1;
    runs_ = threads;
    per_ = per;
    for (int r = 0; r < runs_; ++r) {
      run_[r].next.store(units * r / runs_, std::memory_order_relaxed);
      run_[r].end = units * (r + 1) / runs_;
    }
    done_.store(0, std::memory_order_relaxed);
    // seq_cst here and on the helper's side of each pair below (open / sleepers, close / inside): each
    // side writes one variable and then reads the other, and one of them must see the other's write.
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    // Work like any helper, from the first run.
    work(0);
    // All chunks are claimed: wait for the ones still running elsewhere, then close the job and wait
    // until no helper is inside it (one may be between claiming nothing and leaving).
    for (int n = 0; done_.load(std::memory_order_acquire) < units; n += n < 64) backoff(n);
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
    if (n + 1 > runs_capacity_) {  // no helper is inside a job here (run() waits for them to leave)
      run_.reset(new Run[n + 1]);
      runs_capacity_ = n + 1;
    }
    while (static_cast<int>(helpers_.size()) < n) {
      helpers_.emplace_back(&ThreadPool::helper_loop, this, static_cast<int>(helpers_.size()));
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

  // Claims and runs chunks until none is left: run `own` first, then the others in turn.
  void work(int own) {
    for (int k = 0; k < runs_; ++k) {
      Run& r = run_[(own + k) % runs_];
      int64_t begin = r.next.load(std::memory_order_relaxed);
      while (begin < r.end) {
        const int64_t left = r.end - begin;
        const int64_t take = left >= 2 * per_ ? per_ : std::max<int64_t>(1, left / 2);
        // Another thread may have claimed from this run since we looked: then `begin` is reloaded.
        if (!r.next.compare_exchange_weak(begin, begin + take, std::memory_order_relaxed)) continue;
        fn_(ctx_, begin, begin + take);
        done_.fetch_add(take, std::memory_order_release);
        begin = r.next.load(std::memory_order_relaxed);
      }
    }
  }

  void helper_loop(int me) {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t g = wait_for_job(seen, me);
      seen = g;
      // Enter, then check the job is still the open one: the caller closes it (generation + 1) before
      // waiting for inside_ == 0, so a helper that entered after the close backs out untouched.
      inside_.fetch_add(1, std::memory_order_seq_cst);
      if (generation_.load(std::memory_order_seq_cst) == g && me < max_joiners_) work(me + 1);
      inside_.fetch_sub(1, std::memory_order_release);
    }
  }

  // Prefetches one slice of helper me's pending memory; false if none is pending.
  bool prefetch_slice(int me) {
    if (me >= kPrefetchHelpers) return false;
    Prefetch& f = prefetch_[me];
    for (int r = 0; r < 2; ++r) {
      uintptr_t c = f.next[r].load(std::memory_order_relaxed);
      const uintptr_t e = f.end[r].load(std::memory_order_acquire);
      if (c >= e) continue;
      const uintptr_t stop = std::min(e, c + kPrefetchSlice);
      for (uintptr_t q = c; q < stop; q += 64) __builtin_prefetch(reinterpret_cast<const void*>(q), 0, 3);
      f.next[r].compare_exchange_strong(c, stop, std::memory_order_relaxed);  // lost to set_prefetch: fine
      return true;
    }
    return false;
  }

  // Returns the generation of an open job newer than `seen`: spin a little (prefetching, if there is
  // something to prefetch), then sleep.
  uint64_t wait_for_job(uint64_t seen, int me) {
    auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    bool prefetching = false;
    for (int n = 0;; ++n) {
      const uint64_t g = generation_.load(std::memory_order_acquire);
      if (g != seen && (g & 1)) return g;
      if (g != seen) seen = g;  // a job opened and closed while we looked away: not ours
      if (prefetch_slice(me)) {
        prefetching = true;
        n = 0;
        continue;
      }
      if (prefetching) {  // the spell of spinning starts when the prefetching ends
        prefetching = false;
        spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      }
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
  static constexpr uintptr_t kPrefetchSlice = 1024;  // ~0.1 us of memory between two looks for a job

  struct alignas(64) Prefetch {
    std::atomic<uintptr_t> next[2]{}, end[2]{};
  };
  Prefetch prefetch_[kPrefetchHelpers];

  std::mutex caller_mutex_;                // one job at a time
  std::atomic<uint64_t> generation_{0};    // odd while a job is open
  // A thread's run of units: the next one to claim (`end` once claimed out), on its own cache line.
  struct alignas(64) Run {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::unique_ptr<Run[]> run_;             // runs_ of them in the open job
  int runs_capacity_ = 0;
  int runs_ = 0;
  std::atomic<int64_t> done_{0};           // units finished
  int64_t per_ = 1;                        // units a chunk, in the open job
  std::atomic<int> inside_{0};             // helpers inside the current job
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int max_joiners_ = 0;                    // helpers 0 .. max_joiners_ - 1 take part in the open job
  std::vector<std::thread> helpers_;
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

}  // namespace specqd_cpu
