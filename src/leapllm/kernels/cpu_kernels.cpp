// leapllm's CPU kernels: int4 / int8 weight matmuls on int8-quantized activations, and a fused
// batch-1 decoder layer.
//
// Why: a batch-1 decode step reads every weight once, so it is bound by memory bandwidth, and at
// SmolLM2-135M's size the ~15 small PyTorch ops per layer cost as much as the matmuls. Here the
// activations are quantized to int8 per block of 32 values (a scale each, as llama.cpp's Q8 blocks),
// so 4-bit or 8-bit weights times activations are VNNI instructions (vpdpbusd: 64 u8 x s8 products
// summed in fours into 16 int32 lanes), and a whole Llama block runs in one call with one OpenMP
// region and four barriers.
//
// Packed layout (built by leapllm/kernels/packing.py): output rows in tiles of 16, input features in
// blocks of 32. A 64-byte vector holds 4 consecutive input features ("a quad") of each of a tile's 16
// rows -- byte 4L + j is row L, feature 4q + j -- so one vpdpbusd with the quad's 4 activation bytes
// broadcast adds 4 products to each row's own int32 lane: the 16 lanes are 16 outputs and no
// horizontal sums are ever needed. Scales are stored per (tile, block) as 16 values, one per row.
//   int4: weight (N, K/2) uint8: per (tile, block) 4 vectors, vector c holding quad c in its low
//         nibbles and quad c + 4 in its high nibbles; scales and mins (N, K/32) float16 as
//         (tile, block, row): w = d * q + m, q in [0, 15].
//   int8: weight (N, K) uint8 = q + 128: per (tile, block) 8 vectors, one per quad; scales (N,)
//         float32, one per row: w = d * q.
// Without VNNI, the AVX2 tiles compute the same integer sums with maddubs on unpacked nibbles (and
// then the same float operations, so they give the VNNI tiles' bits); the portable tiles, the
// reference both are tested against, do the sums with AVX2 where it exists and the rest in scalar code.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <omp.h>
#include <time.h>

#include <sched.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
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

namespace {

constexpr int64_t TILE = 16;   // output rows per tile: one int32 lane each
constexpr int64_t BLOCK = 32;  // input features per quantization block
constexpr int MAX_ROWS = 8;    // activation rows computed against one read of a tile

// One activation row quantized to int8 per block of 32 values.
struct QuantizedRow {
  std::vector<int8_t> q;          // (K,)
  std::vector<float> scale;       // (K/32,): x ~ scale * q
  std::vector<float> block_sum;   // (K/32,): scale * sum(q), the block's sum as quantized
  float total = 0.f;              // sum of block_sum
};

void quantize_row(const float* x, int64_t k, QuantizedRow& a) {
  if ((int64_t)a.q.size() < k) {
    a.q.resize(k);
    a.scale.resize(k / BLOCK);
    a.block_sum.resize(k / BLOCK);
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
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    const int sum = _mm_cvtsi128_si32(s4);
    a.scale[b] = d;
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
    int sum = 0;
    for (int i = 0; i < BLOCK; ++i) {
      const int v = (int)std::nearbyint(xb[i] * inv);
      a.q[b * BLOCK + i] = (int8_t)v;
      sum += v;
    }
    a.scale[b] = d;
    a.block_sum[b] = d * (float)sum;
    total += a.block_sum[b];
  }
#endif
  a.total = total;
}

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// ---- the portable tiles (no VNNI) ----
// Integer sums of one block, s[m][L] = tile row L . activation row m over the block's 32 features:
// exact in any order. With AVX2 the 16 rows are vector lanes (maddubs, llama.cpp's AVX2 trick) and a
// block's unpacked weights serve every activation row; else scalar loops.

#if defined(__AVX2__)
// 16-bit lanes of maddubs(nibbles, activations) hold two products of at most 15 * 127; eight of
// them summed stay below 2^15, so a block is summed in 16 bits and widened once.
inline void nibble_block_sums(const __m256i (*nib)[2], const QuantizedRow* const* a, int rows,
                              int64_t b, int32_t (*s)[TILE]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int m = 0; m < rows; ++m) {
    const int8_t* x = a[m]->q.data() + b * BLOCK;
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();  // rows 0..7, 8..15
    for (int c = 0; c < 8; ++c) {  // nibble vector c: feature quad c
      int32_t quad;
      std::memcpy(&quad, x + 4 * c, 4);
      const __m256i xq = _mm256_set1_epi32(quad);
      acc0 = _mm256_add_epi16(acc0, _mm256_maddubs_epi16(nib[c][0], xq));
      acc1 = _mm256_add_epi16(acc1, _mm256_maddubs_epi16(nib[c][1], xq));
    }
    _mm256_storeu_si256((__m256i*)s[m], _mm256_madd_epi16(acc0, ones));
    _mm256_storeu_si256((__m256i*)(s[m] + 8), _mm256_madd_epi16(acc1, ones));
  }
}
#endif

// int4: nibble vector c < 4 is quad c (low nibbles), c >= 4 quad c (high nibbles of vector c - 4).
void block_sums_q4(const uint8_t* wb, const QuantizedRow* const* a, int rows, int64_t b, int32_t (*s)[TILE]) {
#if defined(__AVX2__)
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256i nib[8][2];
  for (int c = 0; c < 4; ++c) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + c * 64 + h * 32));
      nib[c][h] = _mm256_and_si256(v, low4);
      nib[c + 4][h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
  }
  nibble_block_sums(nib, a, rows, b, s);
#else
  for (int m = 0; m < rows; ++m) {
    const int8_t* x = a[m]->q.data() + b * BLOCK;
    for (int L = 0; L < TILE; ++L) {
      int sum = 0;
      for (int c = 0; c < 4; ++c) {
        for (int j = 0; j < 4; ++j) {
          const uint8_t byte = wb[c * 64 + 4 * L + j];
          sum += (byte & 15) * x[4 * c + j] + (byte >> 4) * x[4 * (c + 4) + j];
        }
      }
      s[m][L] = sum;
    }
  }
#endif
}

// int8 (q + 128, 0..255): summed as its low and high nibbles, 16 * high + low, to stay in 16 bits.
void block_sums_q8(const uint8_t* wb, const QuantizedRow* const* a, int rows, int64_t b, int32_t (*s)[TILE]) {
#if defined(__AVX2__)
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256i lo[8][2], hi[8][2];
  for (int qd = 0; qd < 8; ++qd) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + qd * 64 + h * 32));
      lo[qd][h] = _mm256_and_si256(v, low4);
      hi[qd][h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
  }
  int32_t s_hi[MAX_ROWS][TILE];
  nibble_block_sums(lo, a, rows, b, s);
  nibble_block_sums(hi, a, rows, b, s_hi);
  for (int m = 0; m < rows; ++m)
    for (int L = 0; L < TILE; ++L) s[m][L] += 16 * s_hi[m][L];
#else
  for (int m = 0; m < rows; ++m) {
    const int8_t* x = a[m]->q.data() + b * BLOCK;
    for (int L = 0; L < TILE; ++L) {
      int sum = 0;
      for (int qd = 0; qd < 8; ++qd)
        for (int j = 0; j < 4; ++j) sum += (int)wb[qd * 64 + 4 * L + j] * x[4 * qd + j];
      s[m][L] = sum;
    }
  }
#endif
}

// ---- one tile of 16 weight rows against up to MAX_ROWS activation rows: out[m * ldo + L] ----
// Block by block, so each block's weights are unpacked once for all the rows; each output adds its
// blocks in order, so a row's result does not depend on how many rows share the tile.

void tile_q4_portable(const uint8_t* w, const uint16_t* d, const uint16_t* mins, const QuantizedRow* const* a,
                      int rows, int64_t blocks, float* out, int64_t ldo) {
  float y[MAX_ROWS][TILE] = {};
  int32_t s[MAX_ROWS][TILE];
  float dv[TILE], mv[TILE];
  for (int64_t b = 0; b < blocks; ++b) {
    block_sums_q4(w + b * 256, a, rows, b, s);
    for (int L = 0; L < TILE; ++L) {
      dv[L] = half_to_float(d[b * TILE + L]);
      mv[L] = half_to_float(mins[b * TILE + L]);
    }
    for (int m = 0; m < rows; ++m) {
      const float scale = a[m]->scale[b], block_sum = a[m]->block_sum[b];
      for (int L = 0; L < TILE; ++L) y[m][L] += (float)s[m][L] * dv[L] * scale + mv[L] * block_sum;
    }
  }
  for (int m = 0; m < rows; ++m)
    for (int L = 0; L < TILE; ++L) out[m * ldo + L] = y[m][L];
}

void tile_q8_portable(const uint8_t* w, const float* d, const QuantizedRow* const* a, int rows, int64_t blocks,
                      float* out, int64_t ldo) {
  float y[MAX_ROWS][TILE] = {};
  int32_t s[MAX_ROWS][TILE];
  for (int64_t b = 0; b < blocks; ++b) {
    block_sums_q8(w + b * 512, a, rows, b, s);
    for (int m = 0; m < rows; ++m) {
      const float scale = a[m]->scale[b];
      for (int L = 0; L < TILE; ++L) y[m][L] += (float)s[m][L] * scale;
    }
  }
  for (int m = 0; m < rows; ++m)
    for (int L = 0; L < TILE; ++L) out[m * ldo + L] = d[L] * (y[m][L] - 128.f * a[m]->total);  // stored: q + 128
}

#if LEAPLLM_AVX2
// ---- the SIMD tiles with AVX2 (no VNNI): as the VNNI ones, on half a tile at a time ----
// A 256-bit vector holds one quad of 8 rows, so rows 8h .. 8h + 7 are the h-th 32 bytes of every
// 64-byte vector of the layout; the tile's bytes stay in L1 between the two halves. Each row's
// integer block sum is exact (the 16-bit partial sums cannot overflow, see nibble_block_sums), and the
// float steps are the VNNI tiles' own, lane for lane.
inline __m256i broadcast_quad8(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// sum over the 8 quads of maddubs(nib[c], x's quad c), in 16 bits: 8 x 2 x 15 x 127 < 2^15.
inline __m256i nibble_dot16(const __m256i* nib, const int8_t* x) {
  __m256i s0 = _mm256_maddubs_epi16(nib[0], broadcast_quad8(x));
  __m256i s1 = _mm256_maddubs_epi16(nib[4], broadcast_quad8(x + 16));
  for (int c = 1; c < 4; ++c) {  // two chains: half the latency
    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(nib[c], broadcast_quad8(x + 4 * c)));
    s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(nib[c + 4], broadcast_quad8(x + 4 * (c + 4))));
  }
  return _mm256_add_epi16(s0, s1);
}

// How far ahead of the block being summed the tiles ask for weights (about 12 int4 or 8 int8
// blocks). Decode reads every weight once, from DRAM: without it the hardware prefetcher alone left
// a thread at ~13 of the ~18 GB/s one core streams.
constexpr int64_t PREFETCH_Q4 = 3072, PREFETCH_Q8 = 4096;

inline void prefetch_lines(const uint8_t* p, int lines) {
  for (int c = 0; c < lines; ++c) _mm_prefetch((const char*)(p + 64 * c), _MM_HINT_T0);
}

// The 64-byte vector at p (both halves of a tile): lo_h += maddubs(its low nibbles in half h, xl),
// hi_h += maddubs(its high nibbles in half h, xh).
inline void add_nibble_products(const uint8_t* p, __m256i xl, __m256i xh, __m256i& lo0, __m256i& hi0,
                                __m256i& lo1, __m256i& hi1) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i v0 = _mm256_loadu_si256((const __m256i*)p), v1 = _mm256_loadu_si256((const __m256i*)(p + 32));
  lo0 = _mm256_add_epi16(lo0, _mm256_maddubs_epi16(_mm256_and_si256(v0, low4), xl));
  hi0 = _mm256_add_epi16(hi0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low4), xh));
  lo1 = _mm256_add_epi16(lo1, _mm256_maddubs_epi16(_mm256_and_si256(v1, low4), xl));
  hi1 = _mm256_add_epi16(hi1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low4), xh));
}

// One activation row (a decode step): both halves in one pass over the blocks, each activation quad
// broadcast once for both, and the nibbles unpacked as they are used rather than kept in registers.
inline void tile_q4_one_row(const uint8_t* w, const uint16_t* d, const uint16_t* mins, const QuantizedRow& r,
                            int64_t blocks, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // rows 0..7, 8..15
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 256;
    prefetch_lines(wb + PREFETCH_Q4, 4);
    const int8_t* x = r.q.data() + b * BLOCK;
    // 16-bit sums of half 0 / 1 over the low nibbles (quads 0..3) and the high ones (quads 4..7)
    __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    for (int c = 0; c < 4; ++c)
      add_nibble_products(wb + c * 64, broadcast_quad8(x + 4 * c), broadcast_quad8(x + 4 * (c + 4)), lo0, hi0, lo1, hi1);
    const __m256 scale = _mm256_set1_ps(r.scale[b]), block_sum = _mm256_set1_ps(r.block_sum[b]);
    const __m256 db0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + b * TILE)));
    const __m256 db1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + b * TILE + 8)));
    const __m256 mb0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mins + b * TILE)));
    const __m256 mb1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mins + b * TILE + 8)));
    const __m256i s0 = _mm256_madd_epi16(_mm256_add_epi16(lo0, hi0), ones);
    const __m256i s1 = _mm256_madd_epi16(_mm256_add_epi16(lo1, hi1), ones);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(db0, scale), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(db1, scale), acc1);
    acc0 = _mm256_fmadd_ps(mb0, block_sum, acc0);
    acc1 = _mm256_fmadd_ps(mb1, block_sum, acc1);
  }
  _mm256_storeu_ps(out, acc0);
  _mm256_storeu_ps(out + 8, acc1);
}

template <int MT>
void tile_q4_simd(const uint8_t* w, const uint16_t* d, const uint16_t* mins, const QuantizedRow* const* a,
                  int64_t blocks, float* out, int64_t ldo) {
  if constexpr (MT == 1) {
    tile_q4_one_row(w, d, mins, *a[0], blocks, out);
    return;
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* wb = w + b * 256 + h * 32;
      if (h == 0) prefetch_lines(wb + PREFETCH_Q4, 4);
      __m256i nib[8];  // nib[c]: quad c of the 8 rows, c < 4 the low nibbles, c >= 4 the high ones
      for (int c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + c * 64));
        nib[c] = _mm256_and_si256(v, low4);
        nib[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
      const __m256 db = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + b * TILE + h * 8)));
      const __m256 mb = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mins + b * TILE + h * 8)));
      for (int m = 0; m < MT; ++m) {
        const __m256i s = _mm256_madd_epi16(nibble_dot16(nib, a[m]->q.data() + b * BLOCK), ones);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(db, _mm256_set1_ps(a[m]->scale[b])), acc[m]);
        acc[m] = _mm256_fmadd_ps(mb, _mm256_set1_ps(a[m]->block_sum[b]), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(out + m * ldo + h * 8, acc[m]);
  }
}

// int8 (q + 128): the sum is low nibbles + 16 x high nibbles, each half in 16 bits.
inline void tile_q8_one_row(const uint8_t* w, const float* d, const QuantizedRow& r, int64_t blocks, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 512;
    prefetch_lines(wb + PREFETCH_Q8, 8);
    const int8_t* x = r.q.data() + b * BLOCK;
    __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    for (int qd = 0; qd < 8; ++qd) {
      const __m256i xq = broadcast_quad8(x + 4 * qd);
      add_nibble_products(wb + qd * 64, xq, xq, lo0, hi0, lo1, hi1);
    }
    const __m256 scale = _mm256_set1_ps(r.scale[b]);
    const __m256i s0 = _mm256_add_epi32(_mm256_madd_epi16(lo0, ones), _mm256_slli_epi32(_mm256_madd_epi16(hi0, ones), 4));
    const __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(lo1, ones), _mm256_slli_epi32(_mm256_madd_epi16(hi1, ones), 4));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), scale, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), scale, acc1);
  }
  const __m256 offset = _mm256_set1_ps(128.f * r.total);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_loadu_ps(d), _mm256_sub_ps(acc0, offset)));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_loadu_ps(d + 8), _mm256_sub_ps(acc1, offset)));
}

template <int MT>
void tile_q8_simd(const uint8_t* w, const float* d, const QuantizedRow* const* a, int64_t blocks, float* out,
                  int64_t ldo) {
  if constexpr (MT == 1) {
    tile_q8_one_row(w, d, *a[0], blocks, out);
    return;
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* wb = w + b * 512 + h * 32;
      if (h == 0) prefetch_lines(wb + PREFETCH_Q8, 8);
      __m256i lo[8], hi[8];  // quad qd's low and high nibbles, in nibble_dot16's order
      for (int qd = 0; qd < 8; ++qd) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + qd * 64));
        lo[qd] = _mm256_and_si256(v, low4);
        hi[qd] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
      for (int m = 0; m < MT; ++m) {
        const int8_t* x = a[m]->q.data() + b * BLOCK;
        const __m256i s_lo = _mm256_madd_epi16(nibble_dot16(lo, x), ones);
        const __m256i s_hi = _mm256_madd_epi16(nibble_dot16(hi, x), ones);
        const __m256i s = _mm256_add_epi32(s_lo, _mm256_slli_epi32(s_hi, 4));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(a[m]->scale[b]), acc[m]);
      }
    }
    const __m256 dv = _mm256_loadu_ps(d + h * 8);
    for (int m = 0; m < MT; ++m) {
      const __m256 y = _mm256_sub_ps(acc[m], _mm256_set1_ps(128.f * a[m]->total));
      _mm256_storeu_ps(out + m * ldo + h * 8, _mm256_mul_ps(dv, y));
    }
  }
}
#endif

#if LEAPLLM_VNNI
inline __m512i broadcast_quad(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

template <int MT>
void tile_q4_simd(const uint8_t* w, const uint16_t* d, const uint16_t* mins, const QuantizedRow* const* a,
                  int64_t blocks, float* out, int64_t ldo) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 256;
    __m512i wq[8];
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512((const void*)(wb + c * 64));
      wq[c] = _mm512_and_si512(v, low4);
      wq[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const __m512 db = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(d + b * TILE)));
    const __m512 mb = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mins + b * TILE)));
    for (int m = 0; m < MT; ++m) {
      const int8_t* x = a[m]->q.data() + b * BLOCK;
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();  // two chains: half the latency
      for (int c = 0; c < 4; ++c) {
        s0 = _mm512_dpbusd_epi32(s0, wq[c], broadcast_quad(x + 4 * c));
        s1 = _mm512_dpbusd_epi32(s1, wq[c + 4], broadcast_quad(x + 4 * (c + 4)));
      }
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(db, _mm512_set1_ps(a[m]->scale[b])), acc[m]);
      acc[m] = _mm512_fmadd_ps(mb, _mm512_set1_ps(a[m]->block_sum[b]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

template <int MT>
void tile_q8_simd(const uint8_t* w, const float* d, const QuantizedRow* const* a, int64_t blocks, float* out,
                  int64_t ldo) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 512;
    __m512i wq[8];
    for (int qd = 0; qd < 8; ++qd) wq[qd] = _mm512_loadu_si512((const void*)(wb + qd * 64));
    for (int m = 0; m < MT; ++m) {
      const int8_t* x = a[m]->q.data() + b * BLOCK;
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int qd = 0; qd < 4; ++qd) {
        s0 = _mm512_dpbusd_epi32(s0, wq[qd], broadcast_quad(x + 4 * qd));
        s1 = _mm512_dpbusd_epi32(s1, wq[qd + 4], broadcast_quad(x + 4 * (qd + 4)));
      }
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_set1_ps(a[m]->scale[b]), acc[m]);
    }
  }
  const __m512 dv = _mm512_loadu_ps(d);
  for (int m = 0; m < MT; ++m) {
    const __m512 y = _mm512_sub_ps(acc[m], _mm512_set1_ps(128.f * a[m]->total));
    _mm512_storeu_ps(out + m * ldo, _mm512_mul_ps(dv, y));
  }
}
#endif

// f(std::integral_constant<int, mt>()) for mt = 1 .. MAX_ROWS: the SIMD tiles are templates on their
// row count, so that their accumulators are registers.
template <class F>
void with_rows(int mt, F&& f) {
  switch (mt) {
    case 8: return f(std::integral_constant<int, 8>());
    case 7: return f(std::integral_constant<int, 7>());
    case 6: return f(std::integral_constant<int, 6>());
    case 5: return f(std::integral_constant<int, 5>());
    case 4: return f(std::integral_constant<int, 4>());
    case 3: return f(std::integral_constant<int, 3>());
    case 2: return f(std::integral_constant<int, 2>());
    default: return f(std::integral_constant<int, 1>());
  }
}

// CLOCK_MONOTONIC in nanoseconds: the clock of Python's time.perf_counter_ns on Linux, so stage
// marks taken here line up with the profiler's own.
int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// Thread t's share of n rows, in whole tiles.
std::pair<int64_t, int64_t> split_tiles(int64_t n, int t, int nt) {
  const int64_t tiles = n / TILE;
  return {tiles * t / nt * TILE, tiles * (t + 1) / nt * TILE};
}

std::pair<int64_t, int64_t> split_range(int64_t n, int t, int nt) { return {n * t / nt, n * (t + 1) / nt}; }

}  // namespace

// Copies of `tensors`, one after another (64-byte aligned) in one block of memory that Linux backs
// with 2 MiB pages where it can (transparent huge pages, asked for with madvise). A decode step
// streams ~100 MB of packed weights: on 4 KiB pages that is a TLB miss, and a page walk, every 4 KiB
// of every stream, which the kernels' prefetches stall on (measured: a decode step x0.93-0.94 of
// the time on 2 MiB pages). Elsewhere the copies are plain.
std::vector<at::Tensor> copy_into_huge_pages(const std::vector<at::Tensor>& tensors) {
  constexpr size_t ALIGN = 64, PAGE = 2 << 20;
  size_t total = 0;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "copy_into_huge_pages takes CPU tensors");
    total += (t.nbytes() + ALIGN - 1) / ALIGN * ALIGN;
  }
  std::shared_ptr<char> block;
  char* base = nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t size = std::max<size_t>(PAGE, (total + PAGE - 1) / PAGE * PAGE) + PAGE;  // + PAGE: room to align
  void* raw = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw != MAP_FAILED) {
    block = std::shared_ptr<char>(static_cast<char*>(raw), [size](char* p) { munmap(p, size); });
    base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + PAGE - 1) / PAGE * PAGE);
    madvise(base, size - PAGE, MADV_HUGEPAGE);  // before the pages are first touched; a no-op where THP is off
  }
#endif
  if (!base) {
    block = std::shared_ptr<char>(static_cast<char*>(std::aligned_alloc(ALIGN, std::max<size_t>(ALIGN, total))),
                                  [](char* p) { std::free(p); });
    TORCH_CHECK(block, "out of memory");
    base = block.get();
  }
  std::vector<at::Tensor> out;
  size_t offset = 0;
  for (const auto& t : tensors) {
    const at::Tensor c = t.contiguous();
    std::memcpy(base + offset, c.data_ptr(), c.nbytes());
    // every copy keeps the whole block alive
    out.push_back(at::from_blob(base + offset, c.sizes(), [block](void*) {}, c.options()));
    offset += (c.nbytes() + ALIGN - 1) / ALIGN * ALIGN;
  }
  return out;
}

bool vnni_compiled() { return LEAPLLM_VNNI; }
bool avx2_compiled() { return LEAPLLM_AVX2; }

// A linear layer with packed int4 or int8 weights: y = x W^T (+ bias).
struct PackedLinear {
  int64_t out_features, in_features, bits;
  bool simd;  // the VNNI or AVX2 tiles (whichever this build has); else the portable ones
  at::Tensor weight, scales, mins, bias;
  // Their data, read once here: the tiles are called ~10^4 times a step, and a checked data_ptr<T>()
  // per call cost ~5% of it. scale16 (int4: float16 scales, mins16 their minimums) or scale32 (int8).
  const uint8_t* weight_data = nullptr;
  const uint16_t *scale16 = nullptr, *mins16 = nullptr;
  const float *scale32 = nullptr, *bias_data = nullptr;

  std::string kernel() const { return !simd ? "portable" : LEAPLLM_VNNI ? "VNNI" : "AVX2"; }

  PackedLinear(at::Tensor weight_, at::Tensor scales_, c10::optional<at::Tensor> mins_, c10::optional<at::Tensor> bias_,
               int64_t bits_, bool simd_)
      : bits(bits_), simd(simd_ && (LEAPLLM_VNNI || LEAPLLM_AVX2)), weight(weight_.contiguous()),
        scales(scales_.contiguous()) {
    TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
    TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2, "packed weight must be a 2-D uint8 tensor");
    out_features = weight.size(0);
    in_features = bits == 4 ? weight.size(1) * 2 : weight.size(1);
    TORCH_CHECK(in_features % BLOCK == 0, "in_features must be a multiple of 32");
    TORCH_CHECK(out_features % TILE == 0, "out_features must be a multiple of 16");
    if (bits == 4) {
      TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.numel() == out_features * (in_features / BLOCK),
                  "int4 scales must be float16 (N, K/32)");
      TORCH_CHECK(mins_.has_value() && mins_->scalar_type() == at::kHalf && mins_->numel() == scales.numel(),
                  "int4 needs float16 minimums (N, K/32)");
      mins = mins_->contiguous();
    } else {
      TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == out_features, "int8 scales must be float32 (N,)");
    }
    if (bias_.has_value() && bias_->defined()) {
      bias = bias_->to(at::kFloat).contiguous();
      TORCH_CHECK(bias.numel() == out_features, "bias must have out_features values");
      bias_data = bias.data_ptr<float>();
    }
    weight_data = weight.data_ptr<uint8_t>();
    if (bits == 4) {
      scale16 = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
      mins16 = reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>());
    } else {
      scale32 = scales.data_ptr<float>();
    }
  }

  // out[m * ldo + n] = row n . a[m] (+ bias) for n in [n0, n1) (multiples of 16), every m < rows.
  void compute_rows(const QuantizedRow* const* a, int64_t rows, int64_t n0, int64_t n1, float* out,
                    int64_t ldo) const {
    const int64_t blocks = in_features / BLOCK;
    const uint8_t* w = weight_data;
    const int64_t tile_bytes = TILE * in_features * bits / 8;
    // The AVX2 tiles have 16 registers for their unpacked weights and accumulators: 4 rows at a time,
    // the tile read again (from L1) for the next 4. A row's result is the same in any group.
    const int64_t group = simd && LEAPLLM_AVX2 ? 4 : MAX_ROWS;
    for (int64_t n = n0; n < n1; n += TILE) {
      const uint8_t* wt = w + n / TILE * tile_bytes;
      for (int64_t m0 = 0; m0 < rows; m0 += group) {
        const int mt = (int)std::min<int64_t>(group, rows - m0);
        tile(wt, n, a + m0, mt, blocks, out + m0 * ldo + n, ldo);
      }
      if (bias_data) {
        const float* b = bias_data + n;
        for (int64_t m = 0; m < rows; ++m)
          for (int L = 0; L < TILE; ++L) out[m * ldo + n + L] += b[L];
      }
    }
  }

  void tile(const uint8_t* wt, int64_t n, const QuantizedRow* const* a, int mt, int64_t blocks, float* out,
            int64_t ldo) const {
    if (bits == 4) {
      const uint16_t* d = scale16 + n * blocks;
      const uint16_t* mn = mins16 + n * blocks;
#if LEAPLLM_VNNI || LEAPLLM_AVX2
      if (simd)
        return with_rows(mt, [&](auto r) { tile_q4_simd<decltype(r)::value>(wt, d, mn, a, blocks, out, ldo); });
#endif
      tile_q4_portable(wt, d, mn, a, mt, blocks, out, ldo);
    } else {
      const float* d = scale32 + n;
#if LEAPLLM_VNNI || LEAPLLM_AVX2
      if (simd) return with_rows(mt, [&](auto r) { tile_q8_simd<decltype(r)::value>(wt, d, a, blocks, out, ldo); });
#endif
      tile_q8_portable(wt, d, a, mt, blocks, out, ldo);
    }
  }

  // The weights as a dense (N, K) float32 or bfloat16 matrix: for many activation rows (prefill) a
  // GEMM on it beats the dot-product tiles.
  at::Tensor dequantize(at::ScalarType dtype) const {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize to float32 or bfloat16");
    auto out = at::empty({out_features, in_features}, at::TensorOptions().dtype(dtype));
    const int64_t blocks = in_features / BLOCK, tile_bytes = TILE * in_features * bits / 8;
    const uint8_t* w = weight.data_ptr<uint8_t>();
    at::parallel_for(0, out_features / TILE, 4, [&](int64_t t0, int64_t t1) {
      std::vector<float> rows(TILE * in_features);
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* wt = w + t * tile_bytes;
        for (int64_t b = 0; b < blocks; ++b) {
          for (int L = 0; L < TILE; ++L) {
            float* r = rows.data() + L * in_features + b * BLOCK;
            if (bits == 4) {
              const int64_t at = (t * TILE) * blocks + b * TILE + L;  // (tile, block, row)
              const float dv = half_to_float(reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>())[at]);
              const float mv = half_to_float(reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>())[at]);
              for (int c = 0; c < 4; ++c) {
                for (int j = 0; j < 4; ++j) {
                  const uint8_t byte = wt[b * 256 + c * 64 + 4 * L + j];
                  r[4 * c + j] = (float)(byte & 15) * dv + mv;
                  r[4 * (c + 4) + j] = (float)(byte >> 4) * dv + mv;
                }
              }
            } else {
              const float dv = scales.data_ptr<float>()[t * TILE + L];
              for (int qd = 0; qd < 8; ++qd)
                for (int j = 0; j < 4; ++j) r[4 * qd + j] = (float)((int)wt[b * 512 + qd * 64 + 4 * L + j] - 128) * dv;
            }
          }
        }
        if (dtype == at::kFloat) {
          std::memcpy(out.data_ptr<float>() + t * TILE * in_features, rows.data(), rows.size() * sizeof(float));
        } else {
          at::BFloat16* o = out.data_ptr<at::BFloat16>() + t * TILE * in_features;
          for (size_t i = 0; i < rows.size(); ++i) o[i] = at::BFloat16(rows[i]);
        }
      }
    });
    return out;
  }

  // x (..., K) float32 -> (..., N) float32.
  at::Tensor forward(at::Tensor x) const {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "PackedLinear takes float32 activations");
    TORCH_CHECK(x.size(-1) == in_features, "expected ", in_features, " input features, got ", x.size(-1));
    auto x2 = x.reshape({-1, in_features}).contiguous();
    const int64_t rows = x2.size(0);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = out_features;
    auto out = at::empty({rows, out_features}, x.options());
    std::vector<QuantizedRow> acts(rows);
    std::vector<const QuantizedRow*> ptrs(rows);
    const float* xp = x2.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) quantize_row(xp + r * in_features, in_features, acts[r]);
    });
    for (int64_t r = 0; r < rows; ++r) ptrs[r] = &acts[r];
    float* op = out.data_ptr<float>();
    at::parallel_for(0, out_features / TILE, 1, [&](int64_t t0, int64_t t1) {
      compute_rows(ptrs.data(), rows, t0 * TILE, t1 * TILE, op, out_features);
    });
    return out.view(shape);
  }
};

// ---- attention of one query token over n positions ----
// The fused decode step (a contiguous cache, cut in spans) and paged_decode_attention (rows scattered
// in a pool) share these three steps; key(s) and value(s) give position s's row of hd floats. Each
// position's score and each output lane are computed by the same instructions wherever the position
// falls in the loop, so a token's attention has the same bits in a one-token step and in a
// multi-token verification (speculative decoding relies on it).
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

inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// out[0 .. 8 NV) = sum over s of p[s] * row(s)[0 .. 8 NV), NV vectors kept in registers.
template <int NV, class Row>
void weighted_rows(const float* p, int64_t n, Row row, int64_t offset, float* out) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    const float* r = row(s) + offset;
    const __m256 ps = _mm256_set1_ps(p[s]);
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(r + 8 * v), acc[v]);
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}
#endif

// scores[j * n + s] = scale * (q_j . key(s)) for the group's query rows q (group, hd), s < n.
template <class Row>
void attention_scores(const float* q, int64_t group, int64_t hd, int64_t n, Row key, float scale, float* scores) {
#if defined(__AVX2__) && defined(__FMA__)
  if (hd % 8 == 0) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (int64_t s0 = 0; s0 < n; s0 += 8) {  // 8 positions at a time: their 8 dot products reduce together
      const int64_t count = std::min<int64_t>(8, n - s0);
      const float* k[8];
      for (int64_t p = 0; p < 8; ++p) k[p] = key(s0 + std::min<int64_t>(p, count - 1));  // a short block repeats its last row
      for (int64_t j = 0; j < group; ++j) {
        const float* qj = q + j * hd;
        // 8 accumulators in registers: every block computes 8 dot products (the fixed trip count
        // keeps them out of memory); a short block's extra ones are dropped below
        __m256 acc[8];
        for (int p = 0; p < 8; ++p) acc[p] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
          const __m256 qv = _mm256_loadu_ps(qj + i);
          for (int p = 0; p < 8; ++p) acc[p] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[p] + i), acc[p]);
        }
        const __m256 dots = _mm256_mul_ps(lane_sums8(acc), sv);
        if (count == 8) {
          _mm256_storeu_ps(scores + j * n + s0, dots);
        } else {
          alignas(32) float tail[8];
          _mm256_store_ps(tail, dots);
          std::memcpy(scores + j * n + s0, tail, count * sizeof(float));
        }
      }
    }
    return;
  }
#endif
  for (int64_t s = 0; s < n; ++s) {  // each key read once for all the group's queries
    const float* k = key(s);
    for (int64_t j = 0; j < group; ++j) {
      const float* qj = q + j * hd;
      float dot = 0.f;
      for (int64_t i = 0; i < hd; ++i) dot += qj[i] * k[i];
      scores[j * n + s] = dot * scale;
    }
  }
}

// sc[0 .. n) -> exp(sc - max); returns (max, sum of the exps).
std::pair<float, float> exp_shifted(float* sc, int64_t n) {
  float best = -INFINITY;
  for (int64_t s = 0; s < n; ++s) best = std::max(best, sc[s]);
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 bv = _mm256_set1_ps(best);
  __m256 sum = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + s), bv));
    _mm256_storeu_ps(sc + s, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (s < n) {  // the tail through the same vector code, its unused lanes left out of the sum
    alignas(32) float tail[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    std::memcpy(tail, sc + s, (n - s) * sizeof(float));
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_load_ps(tail), bv));
    _mm256_store_ps(tail, e);
    std::memcpy(sc + s, tail, (n - s) * sizeof(float));
    const __m256 used = _mm256_cmp_ps(_mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f),
                                      _mm256_set1_ps((float)(n - s)), _CMP_LT_OQ);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, used));
  }
  return {best, lane_sum(sum)};
#else
  float sum = 0.f;
  for (int64_t s = 0; s < n; ++s) {
    sc[s] = std::exp(sc[s] - best);
    sum += sc[s];
  }
  return {best, sum};
#endif
}

// out[0 .. hd) = sum over s < n of p[s] * value(s): the widest register blocks first (64, 32, 8
// lanes: one pass over the positions each), the last hd % 8 lanes in scalar code.
template <class Row>
void weighted_value_sum(const float* p, int64_t n, Row value, int64_t hd, float* out) {
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; c + 64 <= hd; c += 64) weighted_rows<8>(p, n, value, c, out + c);
  for (; c + 32 <= hd; c += 32) weighted_rows<4>(p, n, value, c, out + c);
  for (; c + 8 <= hd; c += 8) weighted_rows<1>(p, n, value, c, out + c);
#endif
  if (c == hd) return;
  std::fill(out + c, out + hd, 0.f);
  for (int64_t s = 0; s < n; ++s) {
    const float* v = value(s);
    for (int64_t i = c; i < hd; ++i) out[i] += p[s] * v[i];
  }
}

// out[r] = SiLU(gate[r]) * gate[inter + r] for the TILE channels of one tile (gate: its gate rows;
// the up rows are inter further on).
inline void silu_times(const float* gate, int64_t inter, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.f);
  for (int r = 0; r < TILE; r += 8) {
    const __m256 g = _mm256_loadu_ps(gate + r);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + r, _mm256_mul_ps(silu, _mm256_loadu_ps(gate + inter + r)));
  }
#else
  for (int r = 0; r < TILE; ++r) out[r] = gate[r] / (1.f + std::exp(-gate[r])) * gate[inter + r];
#endif
}

// One Llama block's weights and shapes (RMSNorm, fused QKV, rotary, grouped-query attention over a
// contiguous float32 KV cache, output projection, RMSNorm, fused gate/up, SiLU * up, down
// projection, residuals); DecoderStack runs a batch-1 decode step through all of them.
struct DecoderLayer {
  std::shared_ptr<PackedLinear> qkv, o, gate_up, down;
  at::Tensor attn_norm, mlp_norm, inv_freq;
  double eps;
  int64_t heads, kv_heads, head_dim, hidden, intermediate;

  DecoderLayer(std::shared_ptr<PackedLinear> qkv_, std::shared_ptr<PackedLinear> o_,
               std::shared_ptr<PackedLinear> gate_up_, std::shared_ptr<PackedLinear> down_, at::Tensor attn_norm_,
               at::Tensor mlp_norm_, at::Tensor inv_freq_, double eps_, int64_t heads_, int64_t kv_heads_,
               int64_t head_dim_)
      : qkv(qkv_), o(o_), gate_up(gate_up_), down(down_), attn_norm(attn_norm_.to(at::kFloat).contiguous()),
        mlp_norm(mlp_norm_.to(at::kFloat).contiguous()), inv_freq(inv_freq_.to(at::kFloat).contiguous()), eps(eps_),
        heads(heads_), kv_heads(kv_heads_), head_dim(head_dim_) {
    hidden = attn_norm.numel();
    intermediate = gate_up->out_features / 2;
    TORCH_CHECK(head_dim % 2 == 0 && inv_freq.numel() == head_dim / 2, "inv_freq must have head_dim / 2 values");
    TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
    TORCH_CHECK(qkv->in_features == hidden && qkv->out_features == (heads + 2 * kv_heads) * head_dim, "qkv shape");
    TORCH_CHECK(o->in_features == heads * head_dim && o->out_features == hidden, "o_proj shape");
    TORCH_CHECK(gate_up->in_features == hidden && gate_up->out_features % 2 == 0, "gate_up shape");
    TORCH_CHECK(down->in_features == intermediate && down->out_features == hidden, "down_proj shape");
    TORCH_CHECK(intermediate % TILE == 0, "the MLP width must be a multiple of 16");
  }

  static void rms_norm(const float* x, const float* w, int64_t n, double eps, float* out) {
    float ss = 0.f;
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    // the squares summed in 8 lanes (each thread runs every norm before its first tile)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    ss = lane_sum(acc);
#endif
    for (; i < n; ++i) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / (float)n + (float)eps);
    for (i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
  }

  // cos and sin of position pos's rotary angles (head_dim / 2 each), as model/llama.py computes them
  void rotary_table(int64_t pos, float* cos_out, float* sin_out) const {
    const float* f = inv_freq.data_ptr<float>();
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const float angle = (float)pos * f[i];
      cos_out[i] = std::cos(angle);
      sin_out[i] = std::sin(angle);
    }
  }

  // rotate-half rotary embedding of one head, as model/llama.py's RotaryEmbedding
  void rotate(const float* in, float* out, const float* c, const float* s) const {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
      out[i] = in[i] * c[i] - in[i + half] * s[i];
      out[i + half] = in[i + half] * c[i] + in[i] * s[i];
    }
  }
};

// A batch-1 decode step through every layer, in one OpenMP region: one token, or up to MAX_ROWS
// tokens at consecutive positions of the same sequence (speculative decoding verifies a few draft
// tokens at once). The T tokens share every read of the weights: each tile is computed against all
// T activation rows (compute_rows), so T tokens cost far less than T steps.
//
// Each layer is five phases: QKV, attention, output projection (+ residual), gate/up (+ SiLU * up),
// down projection (+ residual). A phase is a list of work items (tiles of 16 output rows, or
// attention heads), cut in one contiguous range per thread; a thread moves on to the next phase
// once every item of this one is done. Each thread streams its own range of every weight matrix, so
// its reads are long runs through memory (what the hardware prefetchers are good at; measured: a
// step x0.94 of the time of claiming chunks from one shared counter). Yet nothing waits for a particular
// thread, only for work: the items of a range are claimed one by one from its counter, and a thread
// that has finished its own range claims from the others', so if the OS takes a core away (another
// process, the server's own threads), the remaining threads do its share, where fixed shares would
// stall every phase for a scheduler time slice.
struct alignas(64) RangeCounter {
  std::atomic<int64_t> next{0};  // the range's first unclaimed item
  int64_t end = 0;
};
struct alignas(64) PhaseCounter {
  std::atomic<int64_t> finished{0};
};

struct DecoderStack {
  static constexpr int PHASES = 5;
  std::vector<std::shared_ptr<DecoderLayer>> layers;
  int64_t max_hidden = 0, max_qkv = 0, max_q = 0, max_inter = 0, max_head_dim = 0;
  // Shared between the threads of one step, one row per token: row t of qkv_out at t * max_qkv, of
  // gate_up_out at t * 2 * max_inter, of act at t * max_inter.
  std::vector<float> qkv_out, partials, gate_up_out, act;
  // Attention of this step: token t's positions are split in token_spans[t] spans per kv head, the
  // number a one-token step at that position would use, so that verifying several tokens at once
  // sums every token's attention in the same order, and gives the same bits, as decoding them one
  // by one (speculative decoding's output must be the plain one). Its spans are items
  // span_offset[t] .. span_offset[t + 1] - 1 of each kv head; partials hold max_spans per head.
  std::vector<int64_t> token_spans, span_offset;
  int64_t max_spans = 1;
  int64_t max_group = 1;
  // The model's final RMSNorm and output head, when set_output_head gave them: then forward can also
  // compute the logits, as one more phase of the same parallel region (work items: tiles of the
  // vocabulary), instead of a second parallel region and the small PyTorch ops of the norm.
  at::Tensor final_norm;
  double final_eps = 0.;
  std::shared_ptr<PackedLinear> head;

  explicit DecoderStack(std::vector<std::shared_ptr<DecoderLayer>> layers_) : layers(std::move(layers_)) {
    TORCH_CHECK(!layers.empty(), "no layers");
    for (auto& l : layers) {
      TORCH_CHECK(l->hidden == layers[0]->hidden, "every layer must have the same hidden size");
      TORCH_CHECK(l->head_dim == layers[0]->head_dim && at::equal(l->inv_freq, layers[0]->inv_freq),
                  "every layer must have the same rotary frequencies");
      max_hidden = std::max(max_hidden, l->hidden);
      max_qkv = std::max(max_qkv, l->qkv->out_features);
      max_q = std::max(max_q, l->heads * l->head_dim);
      max_inter = std::max(max_inter, l->intermediate);
      max_head_dim = std::max(max_head_dim, l->head_dim);
      max_group = std::max(max_group, l->heads / l->kv_heads);
    }
    qkv_out.resize(MAX_ROWS * max_qkv);
    gate_up_out.resize(MAX_ROWS * 2 * max_inter);
    act.resize(MAX_ROWS * max_inter);
  }

  void set_output_head(at::Tensor norm_weight, double eps, std::shared_ptr<PackedLinear> head_) {
    TORCH_CHECK(norm_weight.numel() == max_hidden, "the final norm must have hidden values");
    TORCH_CHECK(head_->in_features == max_hidden && !head_->bias.defined(), "the output head takes hidden features, no bias");
    final_norm = norm_weight.to(at::kFloat).contiguous();
    final_eps = eps;
    head = std::move(head_);
  }

  int64_t items(const DecoderLayer& l, int phase, int64_t rows) const {
    switch (phase) {
      case 0: return l.qkv->out_features / TILE;
      case 1: return l.kv_heads * span_offset[rows];
      case 2: return l.hidden / TILE;
      case 3: return l.intermediate / TILE;
      default: return l.hidden / TILE;
    }
  }

  // What every work item of one step reads: the tokens, the caches, the rotary tables.
  struct Step {
    float* x;                 // (rows, hidden): the residual stream, updated in place
    float* const* kc;         // per layer (kv_heads, max_seq, head_dim)
    float* const* vc;
    int64_t max_seq, pos, rows;
    const float* rot_cos;     // (rows, head_dim / 2): token t's rotary angles at t * head_dim / 2
    const float* rot_sin;
  };

  // Per-thread scratch of a step, one row per token.
  struct ThreadWork {
    std::vector<QuantizedRow> a;       // the phase's input, quantized
    const QuantizedRow* ap[MAX_ROWS];  // &a[t], as compute_rows takes them
    std::vector<float> normed, k_rot, q_rot, scores, attn;
  };

  // A phase's input on this thread: the RMSNorm (weight, eps) of `rows` rows of x (the residual
  // stream's row stride) into w.normed, each row then quantized into w.a.
  void norm_and_quantize(const float* x, int64_t rows, const float* weight, int64_t n, double eps,
                         ThreadWork& w) const {
    for (int64_t t = 0; t < rows; ++t) {
      DecoderLayer::rms_norm(x + t * max_hidden, weight, n, eps, w.normed.data() + t * max_hidden);
      quantize_row(w.normed.data() + t * max_hidden, n, w.a[t]);
    }
  }

  // One work item of one phase of layer li; `prepared`: this thread already made the phase's input.
  void run_item(int64_t li, int phase, int64_t item, bool prepared, ThreadWork& w, const Step& st) {
    const DecoderLayer& l = *layers[li];
    const int64_t q_size = l.heads * l.head_dim, kv_size = l.kv_heads * l.head_dim;
    const int64_t group = l.heads / l.kv_heads, hd = l.head_dim, inter = l.intermediate;
    const int64_t hidden = max_hidden, rows = st.rows, pos = st.pos;  // x's row stride: every layer's width
    float* xp = st.x;
    std::vector<QuantizedRow>& a = w.a;
    std::vector<float>& normed = w.normed;
    std::vector<float>& k_rot = w.k_rot;
    std::vector<float>& q_rot = w.q_rot;
    std::vector<float>& scores = w.scores;
    const int64_t n = item * TILE;
    switch (phase) {
      case 0:  // QKV
        if (!prepared) {
          norm_and_quantize(xp, rows, l.attn_norm.data_ptr<float>(), l.hidden, l.eps, w);
        }
        l.qkv->compute_rows(w.ap, rows, n, n + TILE, qkv_out.data(), max_qkv);
        break;
      case 1: {  // attention: one kv head's query heads, for one token, over one span of its positions
        const int64_t per_head = span_offset[rows], g = item / per_head, r = item % per_head;
        int64_t t = 0;
        while (r >= span_offset[t + 1]) ++t;
        const int64_t span = r - span_offset[t], spans = token_spans[t];
        const int64_t len = pos + t + 1;  // token t sees positions 0 .. pos + t
        const int64_t s0 = len * span / spans, s1 = len * (span + 1) / spans;
        const int64_t half = hd / 2;
        // Keys and values of this call's tokens (positions pos ..) come from qkv_out, never from the
        // cache: the item that writes one into the cache may be running right now. This item rotates
        // the new keys its span covers itself, each with its own position's angles.
        const float* k_cache = st.kc[li] + g * st.max_seq * hd;
        const float* v_cache = st.vc[li] + g * st.max_seq * hd;
        auto new_key = [&](int64_t s) { return qkv_out.data() + (s - pos) * max_qkv + q_size + g * hd; };
        auto new_value = [&](int64_t s) { return qkv_out.data() + (s - pos) * max_qkv + q_size + kv_size + g * hd; };
        for (int64_t s = std::max(s0, pos); s < s1; ++s)
          l.rotate(new_key(s), k_rot.data() + (s - pos) * hd, st.rot_cos + (s - pos) * half,
                   st.rot_sin + (s - pos) * half);
        if (s1 == len) {  // the last span of token t writes its key and value (one item per new position)
          std::memcpy(st.kc[li] + (g * st.max_seq + pos + t) * hd, k_rot.data() + t * hd, hd * sizeof(float));
          std::memcpy(st.vc[li] + (g * st.max_seq + pos + t) * hd, new_value(pos + t), hd * sizeof(float));
        }
        const float softmax_scale = 1.f / std::sqrt((float)hd);
        const float* q_row = qkv_out.data() + t * max_qkv;
        for (int64_t j = 0; j < group; ++j)  // the group's queries, rotated
          l.rotate(q_row + (g * group + j) * hd, q_rot.data() + j * hd, st.rot_cos + t * half, st.rot_sin + t * half);
        const int64_t span_len = s1 - s0;
        // Positions s0 .. split - 1 are cached, split .. s1 - 1 this call's own.
        const int64_t split = std::min(std::max(s0, pos), s1);
        auto key = [&](int64_t i) {
          const int64_t s = s0 + i;
          return s < split ? k_cache + s * hd : k_rot.data() + (s - pos) * hd;
        };
        auto value = [&](int64_t i) {
          const int64_t s = s0 + i;
          return s < split ? v_cache + s * hd : new_value(s);
        };
        attention_scores(q_rot.data(), group, hd, span_len, key, softmax_scale, scores.data());
        // token t's partial softmaxes, (rows, heads, max_spans, hd + 2)
        float* token_partials = partials.data() + t * l.heads * max_spans * (hd + 2);
        for (int64_t j = 0; j < group; ++j) {
          // this span's partial softmax: its max, sum of exp, and unnormalized output (merged in phase 2)
          float* part = token_partials + ((g * group + j) * max_spans + span) * (hd + 2);
          float* sc = scores.data() + j * span_len;
          const auto [best, sum] = exp_shifted(sc, span_len);
          part[0] = best;
          part[1] = sum;
          weighted_value_sum(sc, span_len, value, hd, part + 2);
        }
        break;
      }
      case 2:  // output projection, added to the residual stream (each tile its own columns of x)
        if (!prepared) {  // merge the spans' partial softmaxes into this thread's copy of the attention output
          for (int64_t t = 0; t < rows; ++t) {
            const int64_t spans = token_spans[t];
            for (int64_t h = 0; h < l.heads; ++h) {
              const float* part = partials.data() + (t * l.heads + h) * max_spans * (hd + 2);
              float best = -INFINITY, sum = 0.f;
              for (int64_t c = 0; c < spans; ++c) best = std::max(best, part[c * (hd + 2)]);
              float* out = w.attn.data() + t * max_q + h * hd;
              std::fill(out, out + hd, 0.f);
              for (int64_t c = 0; c < spans; ++c) {
                const float* pc = part + c * (hd + 2);
                const float weight = std::exp(pc[0] - best);
                sum += weight * pc[1];
                for (int64_t i = 0; i < hd; ++i) out[i] += weight * pc[2 + i];
              }
              for (int64_t i = 0; i < hd; ++i) out[i] /= sum;
            }
            quantize_row(w.attn.data() + t * max_q, q_size, a[t]);
          }
        }
        l.o->compute_rows(w.ap, rows, n, n + TILE, normed.data(), hidden);
        for (int64_t t = 0; t < rows; ++t)
          for (int64_t r = n; r < n + TILE; ++r) xp[t * hidden + r] += normed[t * hidden + r];
        break;
      case 3:  // gate and up rows of the same channels, then SiLU(gate) * up
        if (!prepared) {
          norm_and_quantize(xp, rows, l.mlp_norm.data_ptr<float>(), l.hidden, l.eps, w);
        }
        l.gate_up->compute_rows(w.ap, rows, n, n + TILE, gate_up_out.data(), 2 * max_inter);
        l.gate_up->compute_rows(w.ap, rows, inter + n, inter + n + TILE, gate_up_out.data(), 2 * max_inter);
        for (int64_t t = 0; t < rows; ++t) silu_times(gate_up_out.data() + t * 2 * max_inter + n, inter,
                                                      act.data() + t * max_inter + n);
        break;
      default:  // down projection, added to the residual stream
        if (!prepared)
          for (int64_t t = 0; t < rows; ++t) quantize_row(act.data() + t * max_inter, inter, a[t]);
        l.down->compute_rows(w.ap, rows, n, n + TILE, normed.data(), hidden);
        for (int64_t t = 0; t < rows; ++t)
          for (int64_t r = n; r < n + TILE; ++r) xp[t * hidden + r] += normed[t * hidden + r];
    }
  }

  // One tile of the output head for the last `out_rows` of the step's tokens, after the final norm.
  void run_head_item(int64_t item, bool prepared, int64_t out_rows, ThreadWork& w, const Step& st, float* logits) {
    const int64_t hidden = max_hidden, first = st.rows - out_rows, n = item * TILE;
    if (!prepared) norm_and_quantize(st.x + first * hidden, out_rows, final_norm.data_ptr<float>(), hidden, final_eps, w);
    head->compute_rows(w.ap, out_rows, n, n + TILE, logits, head->out_features);
  }

  // x: (T, hidden) float32, T in 1 .. MAX_ROWS (or (hidden,) for one token), the embedded tokens at
  // positions pos .. pos + T - 1; updated in place to the last block's output. The keys and values
  // of those positions are written into the caches; token t attends to positions 0 .. pos + t.
  // marks, optional (layers, 6) int64: clock marks at the start of each layer and the end of each of
  // its phases (QKV with the attention norm, attention with rotary, output projection, gate/up with
  // the MLP norm and SiLU * up, down projection), for the profiler; with logits, one more value at the
  // end: when the output head finished.
  // logits, optional (R, vocab) float32, R <= T, needs set_output_head: filled with the output head of
  // the final norm of the last R tokens.
  void forward(at::Tensor x, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, int64_t pos,
               c10::optional<at::Tensor> marks, c10::optional<at::Tensor> logits) {
    const int64_t n_layers = layers.size();
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && (x.dim() == 1 || x.dim() == 2) &&
                    x.size(-1) == max_hidden, "x must be float32 contiguous (tokens, hidden) or (hidden,)");
    const int64_t rows = x.dim() == 1 ? 1 : x.size(0);
    TORCH_CHECK(rows >= 1 && rows <= MAX_ROWS, "a fused step takes 1 to ", MAX_ROWS, " tokens, got ", rows);
    TORCH_CHECK((int64_t)k_caches.size() == n_layers && (int64_t)v_caches.size() == n_layers, "one cache per layer");
    std::vector<float*> kc(n_layers), vc(n_layers);
    int64_t max_seq = 0;
    for (int64_t i = 0; i < n_layers; ++i) {
      const auto& k = k_caches[i];
      const auto& v = v_caches[i];
      TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.is_contiguous() &&
                      v.is_contiguous() && k.dim() == 4 && k.size(0) == 1 && k.size(1) == layers[i]->kv_heads &&
                      k.size(3) == layers[i]->head_dim && v.sizes() == k.sizes(),
                  "caches must be contiguous float32 (1, kv_heads, max_seq, head_dim)");
      max_seq = k.size(2);
      TORCH_CHECK(pos >= 0 && pos + rows <= max_seq, "KV cache holds ", max_seq, " positions, asked to write up to ",
                  pos + rows);
      kc[i] = k.data_ptr<float>();
      vc[i] = v.data_ptr<float>();
    }
    float* logit = nullptr;
    int64_t out_rows = 0;
    if (logits.has_value() && logits->defined()) {
      TORCH_CHECK(head, "logits need the output head (set_output_head)");
      TORCH_CHECK(logits->scalar_type() == at::kFloat && logits->is_contiguous() && logits->dim() == 2 &&
                      logits->size(0) >= 1 && logits->size(0) <= rows && logits->size(1) == head->out_features,
                  "logits must be contiguous float32 (1 .. tokens, vocab)");
      logit = logits->data_ptr<float>();
      out_rows = logits->size(0);
    }
    int64_t* mark = nullptr;
    if (marks.has_value() && marks->defined()) {
      TORCH_CHECK(marks->scalar_type() == at::kLong && marks->numel() == n_layers * (PHASES + 1) + (logit ? 1 : 0) &&
                      marks->is_contiguous(), "marks must be int64 (layers, 6), plus one value with logits");
      mark = marks->data_ptr<int64_t>();
    }
    const int64_t total_phases = n_layers * PHASES + (logit ? 1 : 0);
    const int nthreads = at::get_num_threads();
    std::unique_ptr<PhaseCounter[]> finished(new PhaseCounter[total_phases]);
    std::unique_ptr<RangeCounter[]> ranges(new RangeCounter[total_phases * nthreads]);  // phase p's at p * nthreads
    std::vector<int64_t> phase_items(total_phases);
    if (mark) mark[0] = monotonic_ns();
    // Attention work items: each kv head's positions in spans of at least 64, up to 4 per thread, so
    // a short context is not cut finer than it is worth and a long one keeps every thread busy; each
    // token as a one-token step at its position would split them (see token_spans).
    token_spans.assign(rows, 1);
    span_offset.assign(rows + 1, 0);
    for (int64_t t = 0; t < rows; ++t) {
      token_spans[t] = std::max<int64_t>(1, std::min<int64_t>((pos + t + 1) / 64, 4 * nthreads));
      span_offset[t + 1] = span_offset[t] + token_spans[t];
    }
    max_spans = *std::max_element(token_spans.begin(), token_spans.end());
    partials.resize(rows * max_q / max_head_dim * max_spans * (max_head_dim + 2));
    const int64_t half = layers[0]->head_dim / 2;
    std::vector<float> rot_cos(rows * half), rot_sin(rows * half);
    for (int64_t t = 0; t < rows; ++t)  // the same in every layer
      layers[0]->rotary_table(pos + t, rot_cos.data() + t * half, rot_sin.data() + t * half);
    const Step step{x.data_ptr<float>(), kc.data(), vc.data(), max_seq, pos, rows, rot_cos.data(), rot_sin.data()};
    for (int64_t p = 0; p < total_phases; ++p) {
      const int64_t total = phase_items[p] =
          p < n_layers * PHASES ? items(*layers[p / PHASES], p % PHASES, rows) : head->out_features / TILE;
      for (int t = 0; t < nthreads; ++t) {
        const auto [r0, r1] = split_range(total, t, nthreads);
        ranges[p * nthreads + t].next.store(r0, std::memory_order_relaxed);
        ranges[p * nthreads + t].end = r1;
      }
    }

#pragma omp parallel num_threads(nthreads)
    {
      ThreadWork w;
      w.a.resize(rows);
      for (int64_t t = 0; t < rows; ++t) w.ap[t] = &w.a[t];
      w.normed.resize(rows * max_hidden);
      w.k_rot.resize(rows * max_head_dim);  // one kv head's new keys
      w.q_rot.resize(max_q);  // a kv head's query heads
      w.scores.resize(max_group * max_seq);
      w.attn.resize(rows * max_q);
      const int tid = omp_get_thread_num();
      // Runs the items of phase p, item(i, prepared) each, and returns once all are done.
      auto run_phase = [&](int64_t p, auto&& item_fn) {
        const int64_t total = phase_items[p];
        bool prepared = false;  // this thread's quantized input for the phase, made at its first item
        // Its own range first, then the others' leftovers (and the ranges of threads that the team
        // lacks, if it is smaller than asked for), each from its own counter: uncontended while its
        // owner claims alone, and the last items go one by one.
        for (int k = 0; k < nthreads; ++k) {
          RangeCounter& range = ranges[p * nthreads + (tid + k) % nthreads];
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
      };
      for (int64_t li = 0; li < n_layers; ++li) {
        for (int phase = 0; phase < PHASES; ++phase) {
          run_phase(li * PHASES + phase, [&](int64_t item, bool prepared) { run_item(li, phase, item, prepared, w, step); });
          if (mark && tid == 0) {
            const int64_t now = monotonic_ns();
            mark[li * (PHASES + 1) + phase + 1] = now;
            if (phase == PHASES - 1 && li + 1 < n_layers) mark[(li + 1) * (PHASES + 1)] = now;
          }
        }
      }
      if (logit) {
        run_phase(n_layers * PHASES, [&](int64_t item, bool prepared) { run_head_item(item, prepared, out_rows, w, step, logit); });
        if (mark && tid == 0) mark[n_layers * (PHASES + 1)] = monotonic_ns();
      }
    }
  }
};

// Attention of one new token per sequence over its keys and values in a paged pool (the serving
// engine's decode steps), read where they lie in the pool instead of gathered into a padded copy
// first: q (d, heads, hd); k_pool, v_pool (slots, kv_heads, hd); slots (d, max_len) int64, the pool
// rows of each sequence's positions (anything past its length is ignored); lengths (d,) int64.
// All float32 -> (d, heads, hd). Query head h reads kv head h / (heads / kv_heads).
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots,
                                  at::Tensor lengths, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat &&
                  v_pool.scalar_type() == at::kFloat, "paged_decode_attention takes float32 queries and pools");
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes() && k_pool.size(2) == q.size(2),
              "q must be (d, heads, hd) and the pools (slots, kv_heads, hd)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.size(0) == q.size(0) &&
                  lengths.scalar_type() == at::kLong && lengths.numel() == q.size(0),
              "slots must be int64 (d, max_len) and lengths int64 (d,)");
  const int64_t d = q.size(0), heads = q.size(1), hd = q.size(2), kv_heads = k_pool.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  const int64_t group = heads / kv_heads, max_len = slots.size(1), pool_rows = k_pool.size(0);
  q = q.contiguous();
  k_pool = k_pool.contiguous();
  v_pool = v_pool.contiguous();
  slots = slots.contiguous();
  lengths = lengths.contiguous();
  const int64_t* len_p = lengths.data_ptr<int64_t>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < d; ++b) {
    TORCH_CHECK(len_p[b] >= 1 && len_p[b] <= max_len, "a length is outside 1 .. max_len");
    for (int64_t t = 0; t < len_p[b]; ++t)
      TORCH_CHECK(slot_p[b * max_len + t] >= 0 && slot_p[b * max_len + t] < pool_rows, "a slot is outside the pool");
  }
  auto out = at::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k_pool.data_ptr<float>(), *vp = v_pool.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, d * kv_heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(group * max_len);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / kv_heads, g = item % kv_heads, len = len_p[b];
      const int64_t* sl = slot_p + b * max_len;
      const float* qg = qp + (b * heads + g * group) * hd;  // the group's queries, one after another
      float* og = op + (b * heads + g * group) * hd;
      auto key = [&](int64_t t) { return kp + (sl[t] * kv_heads + g) * hd; };
      auto value = [&](int64_t t) { return vp + (sl[t] * kv_heads + g) * hd; };
      attention_scores(qg, group, hd, len, key, (float)scale, scores.data());
      for (int64_t j = 0; j < group; ++j) {
        float* sc = scores.data() + j * len;
        const float inv = 1.f / exp_shifted(sc, len).second;
        for (int64_t t = 0; t < len; ++t) sc[t] *= inv;
        weighted_value_sum(sc, len, value, hd, og + j * hd);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "leapllm CPU kernels: int4/int8 matmuls on int8 activations (AVX-512 VNNI) and a fused decoder layer";
  m.def("vnni_compiled", &vnni_compiled, "whether the AVX-512 VNNI kernels were compiled in");
  m.def("avx2_compiled", &avx2_compiled, "whether the AVX2 tiles were compiled in (CPUs with AVX2 but no VNNI)");
  m.def("copy_into_huge_pages", &copy_into_huge_pages, pybind11::arg("tensors"),
        "copies of the tensors in one block of memory on 2 MiB pages where Linux gives them");
  m.def("paged_decode_attention", &paged_decode_attention, pybind11::arg("q"), pybind11::arg("k_pool"),
        pybind11::arg("v_pool"), pybind11::arg("slots"), pybind11::arg("lengths"), pybind11::arg("scale"),
        "attention of one new token per sequence over its keys and values in a paged pool",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<PackedLinear, std::shared_ptr<PackedLinear>>(m, "PackedLinear")
      .def(pybind11::init<at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t, bool>(),
           pybind11::arg("weight"), pybind11::arg("scales"), pybind11::arg("mins"), pybind11::arg("bias"),
           pybind11::arg("bits"), pybind11::arg("simd") = true)
      .def("forward", &PackedLinear::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("dequantize", &PackedLinear::dequantize, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("bias", [](const PackedLinear& l) -> c10::optional<at::Tensor> {
        return l.bias.defined() ? c10::optional<at::Tensor>(l.bias) : c10::nullopt;
      })
      .def_readonly("in_features", &PackedLinear::in_features)
      .def_readonly("out_features", &PackedLinear::out_features)
      .def_readonly("bits", &PackedLinear::bits)
      .def_readonly("simd", &PackedLinear::simd)
      .def_property_readonly("kernel", &PackedLinear::kernel);
  pybind11::class_<DecoderLayer, std::shared_ptr<DecoderLayer>>(m, "DecoderLayer")
      .def(pybind11::init<std::shared_ptr<PackedLinear>, std::shared_ptr<PackedLinear>, std::shared_ptr<PackedLinear>,
                          std::shared_ptr<PackedLinear>, at::Tensor, at::Tensor, at::Tensor, double, int64_t, int64_t,
                          int64_t>());
  pybind11::class_<DecoderStack, std::shared_ptr<DecoderStack>>(m, "DecoderStack")
      .def(pybind11::init<std::vector<std::shared_ptr<DecoderLayer>>>())
      .def("set_output_head", &DecoderStack::set_output_head, pybind11::arg("norm_weight"), pybind11::arg("eps"),
           pybind11::arg("head"))
      .def("forward", &DecoderStack::forward, pybind11::arg("x"), pybind11::arg("k_caches"), pybind11::arg("v_caches"),
           pybind11::arg("pos"), pybind11::arg("marks") = pybind11::none(), pybind11::arg("logits") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
