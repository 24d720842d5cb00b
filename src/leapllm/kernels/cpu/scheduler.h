// How the threads of a fused step share its work, phase by phase, and the clock its stage marks
// are taken on.
#pragma once

#include <sched.h>
#include <time.h>

#include <atomic>
#include <memory>
#include <utility>
#include <vector>

#include "common.h"

namespace {

// CLOCK_MONOTONIC in nanoseconds: the clock of Python's time.perf_counter_ns on Linux, so stage
// marks taken here line up with the profiler's own.
int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

std::pair<int64_t, int64_t> split_range(int64_t n, int t, int nt) { return {n * t / nt, n * (t + 1) / nt}; }

}  // namespace

// The work items of one step's phases (tiles of 16 output rows, or attention spans), each phase's
// cut in one contiguous range per thread; a thread moves on to the next phase once every item of
// this one is done. Each thread streams its own range of every weight matrix, so its reads are long
// runs through memory, which the hardware prefetchers follow best. Yet nothing waits for a
// particular thread, only for work: the items of a range are claimed one by one from its counter,
// and a thread that has finished its own range claims from the others', so if the OS takes a core
// away (another process, the server's own threads), the remaining threads do its share, where
// fixed shares would stall every phase for a scheduler time slice.
struct PhaseSchedule {
  struct alignas(64) RangeCounter {  // its own cache line: claimed from by one thread most of the time
    std::atomic<int64_t> next{0};    // the range's first unclaimed item
    int64_t end = 0;
  };
  struct alignas(64) PhaseCounter {
    std::atomic<int64_t> finished{0};
  };

  int threads;
  std::vector<int64_t> items;                // per phase
  std::unique_ptr<PhaseCounter[]> finished;  // per phase
  std::unique_ptr<RangeCounter[]> ranges;    // phase p's at p * threads

  PhaseSchedule(int64_t phases, int threads_)
      : threads(threads_), items(phases), finished(new PhaseCounter[phases]),
        ranges(new RangeCounter[phases * threads_]) {}

  // Phase p has n items, cut in one range per thread.
  void set_items(int64_t p, int64_t n) {
    items[p] = n;
    for (int t = 0; t < threads; ++t) {
      const auto [r0, r1] = split_range(n, t, threads);
      ranges[p * threads + t].next.store(r0, std::memory_order_relaxed);
      ranges[p * threads + t].end = r1;
    }
  }

  // Runs phase p's items on thread tid, item_fn(i, prepared) each, and returns once every thread's
  // are done; `prepared`: this thread already ran an item of the phase, so made its input.
  template <class F>
  void run(int64_t p, int tid, F&& item_fn) {
    const int64_t total = items[p];
    bool prepared = false;
    // Its own range first, then the others' leftovers (and the ranges of threads that the team
    // lacks, if it is smaller than asked for), each from its own counter: uncontended while its
    // owner claims alone, and the last items go one by one.
    for (int k = 0; k < threads; ++k) {
      RangeCounter& range = ranges[p * threads + (tid + k) % threads];
      int64_t done = 0;
      for (int64_t item; (item = range.next.fetch_add(1, std::memory_order_relaxed)) < range.end; ++done) {
        item_fn(item, prepared);
        prepared = true;
      }
      if (done) finished[p].finished.fetch_add(done, std::memory_order_release);
    }
    // Wait for the items other threads are still computing; yield now and then, in case the
    // one we wait for shares our core.
    for (int spins = 0; finished[p].finished.load(std::memory_order_acquire) < total; ++spins) {
      if (spins % 256 == 255) sched_yield();
#if defined(__AVX2__) || LEAPLLM_VNNI
      _mm_pause();
#endif
    }
  }
};
