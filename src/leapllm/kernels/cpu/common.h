// What every part of the kernels shares: which instruction sets this build uses, the packed layout's
// tile and block sizes, activation quantization, and a few vector helpers.
//
// Packed layout (built by leapllm/kernels/packing.py): output rows in tiles of 16, input features in
// blocks of 32. A 64-byte vector holds 4 consecutive input features ("a quad") of each of a tile's 16
// rows -- byte 4L + j is row L, feature 4q + j -- so one vpdpbusd with the quad's 4 activation bytes
// broadcast adds 4 products to each row's own int32 lane: the 16 lanes are 16 outputs and no
// horizontal sums are ever needed. Scales are stored per (tile, block) as 16 values, one per row.
//   int4: weight (N, K/2) uint8: per (tile, block) 4 vectors, vector c holding quad c in its low
//         nibbles and quad c + 4 in its high nibbles; scales and mins (N, K/32) float16 (or float32,
//         for GGUF's Q4_K, whose sub-block scales float16 cannot hold) as (tile, block, row):
//         w = d * q + m, q in [0, 15].
//   int8: weight (N, K) uint8 = q + 128: per (tile, block) 8 vectors, one per quad; scales either
//         (N,) float32, one per row, or (N, K/32) float16 as (tile, block, row), one per block
//         (GGUF's Q8_0 blocks, kept exact): w = d * q.
//   int8 sub-blocks (GGUF's K-quants, kept exact): weight (N, K) uint8 values u as stored (not
//         shifted), in the int8 order; scales and mins (N, K/16) float32 as (tile, half block, row):
//         w = d * u + m per 16 features.
//
// Like every header here, included only by bindings.cpp: the kernels are one translation unit, so
// what the unnamed namespaces hold is local to it, and the compiler free to inline it anywhere.
#pragma once

#include <torch/extension.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LEAPLLM_VNNI 1
#else
#define LEAPLLM_VNNI 0
#endif
#if !LEAPLLM_VNNI && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LEAPLLM_AVX2 1
#else
#define LEAPLLM_AVX2 0
#endif
#if LEAPLLM_VNNI || defined(__AVX2__)
#include <immintrin.h>
#endif
#if LEAPLLM_VNNI || LEAPLLM_AVX2
// How far ahead of the block being summed the SIMD tiles ask for weights (about 12 int4 or 8 int8
// blocks). Decode reads every weight once, from DRAM, and the hardware prefetcher alone does not
// keep a core's stream busy.
constexpr int64_t PREFETCH_Q4 = 3072, PREFETCH_Q8 = 4096;

inline void prefetch_lines(const uint8_t* p, int lines) {
  for (int c = 0; c < lines; ++c) _mm_prefetch((const char*)(p + 64 * c), _MM_HINT_T0);
}
#endif
// Fully unrolls the loop that follows: register arrays indexed by its counter then stay registers.
#if defined(__clang__)
#define LEAPLLM_UNROLL _Pragma("unroll")
#else
#define LEAPLLM_UNROLL _Pragma("GCC unroll 16")
#endif

// Which tiles this build has, for `python -m leapllm.kernels` and PackedLinear.kernel.
bool vnni_compiled() { return LEAPLLM_VNNI; }
bool avx2_compiled() { return LEAPLLM_AVX2; }

constexpr int64_t TILE = 16;   // output rows per tile: one int32 lane each
constexpr int64_t BLOCK = 32;  // input features per quantization block
constexpr int MAX_ROWS = 8;    // activation rows computed against one read of a tile
constexpr int NARROW_BASE = 112;  // int8 bytes in [112, 175] are "narrow": see tiles_avx2.h

namespace {

// One activation row quantized to int8 per block of 32 values.
struct QuantizedRow {
  std::vector<int8_t> q;          // (K,)
  std::vector<float> scale;       // (K/32,): x ~ scale * q
  std::vector<float> block_sum;   // (K/32,): scale * sum(q), the block's sum as quantized
  std::vector<float> half_sum;    // (K/16,): the same for each half block (features 0..15, 16..31)
  std::vector<int32_t> isum;      // (K/32,): sum(q) per block, the integer
  float total = 0.f;              // sum of block_sum
};

void quantize_row(const float* x, int64_t k, QuantizedRow& a) {
  if ((int64_t)a.q.size() < k) {
    a.q.resize(k);
    a.scale.resize(k / BLOCK);
    a.block_sum.resize(k / BLOCK);
    a.half_sum.resize(2 * (k / BLOCK));
    a.isum.resize(k / BLOCK);
  }
  float total = 0.f;
#if defined(__AVX2__)
  // The same values as the scalar loop below (max, products and round-to-nearest-even are exact
  // lane by lane, integer sums in any order): a decode step quantizes 4 rows per layer on each thread
  // before its first tile, so this is on the critical path.
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < k / BLOCK; ++b) {
    const float* xb = x + b * BLOCK;
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.f;
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // int32 -> int8, back in order (packs interleave the 128-bit lanes)
    const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)(a.q.data() + b * BLOCK), q8);
    int halves[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i s = _mm256_add_epi32(q[2 * h], q[2 * h + 1]);
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      halves[h] = _mm_cvtsi128_si32(s4);
    }
    const int sum = halves[0] + halves[1];
    a.isum[b] = sum;
    a.scale[b] = d;
    a.half_sum[2 * b] = d * (float)halves[0];
    a.half_sum[2 * b + 1] = d * (float)halves[1];
    a.block_sum[b] = d * (float)sum;
    total += a.block_sum[b];
  }
#else
  for (int64_t b = 0; b < k / BLOCK; ++b) {
    const float* xb = x + b * BLOCK;
    float amax = 0.f;
    for (int i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int halves[2] = {0, 0};
    for (int i = 0; i < BLOCK; ++i) {
      const int v = (int)std::nearbyint(xb[i] * inv);
      a.q[b * BLOCK + i] = (int8_t)v;
      halves[i / 16] += v;
    }
    const int sum = halves[0] + halves[1];
    a.isum[b] = sum;
    a.scale[b] = d;
    a.half_sum[2 * b] = d * (float)halves[0];
    a.half_sum[2 * b + 1] = d * (float)halves[1];
    a.block_sum[b] = d * (float)sum;
    total += a.block_sum[b];
  }
#endif
  a.total = total;
}

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// A block scale or minimum stored as float16 (uint16_t bits) or float32, as a float.
inline float scale_value(uint16_t h) { return half_to_float(h); }
inline float scale_value(float f) { return f; }

}  // namespace

// Vector helpers of attention, RMSNorm and SiLU.
#if defined(__AVX2__) && defined(__FMA__)
// exp(x) for a vector (Cephes' single-precision exp: a polynomial on x - n ln 2, times 2^n), within
// 2 ulp of std::exp; 0 below -87.3 (where exp leaves the normal floats).
inline __m256 exp_ps(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3365478515625f);
  const __m256 in_range = _mm256_cmp_ps(x, low, _CMP_GE_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)), in_range);
}

// The 8 lane sums of v[0..7], as one vector (lane p: v[p]'s sum, always in the same order).
inline __m256 lane_sums8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The sum of v's 8 lanes, always in the same order.
inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#endif
