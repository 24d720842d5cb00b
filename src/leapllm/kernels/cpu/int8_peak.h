// The int8 multiply-add rate of this CPU's SIMD units: the instruction the tiles are built on
// (vpdpbusd with AVX-512 VNNI, vpmaddubsw with AVX2) issued back to back from registers by every
// thread, with nothing else. The profiler's roofline holds the int8 tiles' achieved rate against it.
#pragma once

#include <ATen/Parallel.h>

#include <chrono>

#include "common.h"

namespace {

constexpr int PEAK_CHAINS = 10;  // independent accumulators: enough to cover the instruction's latency

// One thread's loop: `iterations` x PEAK_CHAINS instructions; returns the multiply-adds done (the
// lanes' sum is returned too, in `sink`, so that the compiler keeps the loop).
// Not inlined: inside the parallel region's outlined body the compiler kept the chains on the stack.
__attribute__((noinline)) int64_t int8_peak_loop(int64_t iterations, int64_t& sink) {
#if LEAPLLM_VNNI
  __m512i acc[PEAK_CHAINS];
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  for (int c = 0; c < PEAK_CHAINS; ++c) acc[c] = _mm512_set1_epi32(c);
  for (int64_t i = 0; i < iterations; ++i)
    for (int c = 0; c < PEAK_CHAINS; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
  for (int c = 1; c < PEAK_CHAINS; ++c) acc[0] = _mm512_add_epi32(acc[0], acc[c]);
  sink += _mm512_reduce_add_epi32(acc[0]);
  return iterations * PEAK_CHAINS * 64;
#elif LEAPLLM_AVX2
  // The tiles sum maddubs's 16-bit pair sums in 16 bits: one add per maddubs. Each chain feeds its
  // own sum back into the maddubs: with constant operands the compiler computed it once, out of the
  // loop, and this measured the adds alone (at about half the real rate).
  __m256i acc[PEAK_CHAINS];
  const __m256i b = _mm256_set1_epi8(-2);
  for (int c = 0; c < PEAK_CHAINS; ++c) acc[c] = _mm256_set1_epi16((short)c);
  for (int64_t i = 0; i < iterations; ++i)
    for (int c = 0; c < PEAK_CHAINS; ++c) acc[c] = _mm256_add_epi16(acc[c], _mm256_maddubs_epi16(acc[c], b));
  for (int c = 1; c < PEAK_CHAINS; ++c) acc[0] = _mm256_add_epi16(acc[0], acc[c]);
  sink += _mm256_extract_epi16(acc[0], 0);
  return iterations * PEAK_CHAINS * 32;
#else
  (void)iterations;
  (void)sink;
  return 0;
#endif
}

}  // namespace

// Multiply-add operations (2 per int8 product) per second on at::get_num_threads() threads, each
// running `iterations` rounds; 0 where this build has no SIMD tiles.
inline double int8_peak_ops(int64_t iterations) {
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> macs(threads, 0), sinks(threads, 0);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) macs[t] = int8_peak_loop(iterations, sinks[t]);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  int64_t total = 0, sink = 0;
  for (int64_t t = 0; t < threads; ++t) {
    total += macs[t];
    sink += sinks[t];
  }
  volatile int64_t keep = sink;  // the loops' results are used
  (void)keep;
  return seconds > 0 ? 2.0 * (double)total / seconds : 0.0;
}
