// The portable tiles: PackedLinear(simd=False), and the reference the AVX2 and VNNI tiles are
// tested against. They run on any CPU; where it has AVX2, their integer sums use it.
#pragma once

#include "common.h"

namespace {

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

// One tile of 16 weight rows against up to MAX_ROWS activation rows: out[m * ldo + L], for weights
// with a scale d and a minimum per (block, row), w = d * stored + minimum. Block by block, so each
// block's weights are unpacked once for all the rows; each output adds its blocks in order, so a
// row's result does not depend on how many rows share the tile. BITS 4 (int4) or 8 (int8 blocks,
// stored q + 128: no minimums given, the minimum is -128 d).
template <int BITS, class S>
void tile_blocks_portable(const uint8_t* w, const S* d, const S* mins, const QuantizedRow* const* a,
                          int rows, int64_t blocks, float* out, int64_t ldo) {
  float y[MAX_ROWS][TILE] = {};
  int32_t s[MAX_ROWS][TILE];
  float dv[TILE], mv[TILE];
  for (int64_t b = 0; b < blocks; ++b) {
    if constexpr (BITS == 4) block_sums_q4(w + b * 256, a, rows, b, s);
    else block_sums_q8(w + b * 512, a, rows, b, s);
    for (int L = 0; L < TILE; ++L) {
      dv[L] = scale_value(d[b * TILE + L]);
      mv[L] = BITS == 4 ? scale_value(mins[b * TILE + L]) : -128.f * dv[L];
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

// int8 sub-blocks (K-quants): w = d * u + m per (16 features, row), float32 d and m; u the stored
// byte. Scalar integer sums per half block (AVX2 builds run these too).
void tile_q8_sub_blocks_portable(const uint8_t* w, const float* d, const float* mins, const QuantizedRow* const* a,
                                 int rows, int64_t blocks, float* out, int64_t ldo) {
  float y[MAX_ROWS][TILE] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 512;
    const float *d0 = d + 2 * b * TILE, *d1 = d0 + TILE, *m0 = mins + 2 * b * TILE, *m1 = m0 + TILE;
    for (int m = 0; m < rows; ++m) {
      const int8_t* x = a[m]->q.data() + b * BLOCK;
      const float scale = a[m]->scale[b], h0 = a[m]->half_sum[2 * b], h1 = a[m]->half_sum[2 * b + 1];
      for (int L = 0; L < TILE; ++L) {
        int s0 = 0, s1 = 0;
        for (int qd = 0; qd < 4; ++qd) {
          for (int j = 0; j < 4; ++j) {
            s0 += (int)wb[qd * 64 + 4 * L + j] * x[4 * qd + j];
            s1 += (int)wb[(qd + 4) * 64 + 4 * L + j] * x[4 * (qd + 4) + j];
          }
        }
        y[m][L] += (float)s0 * d0[L] * scale + (float)s1 * d1[L] * scale + m0[L] * h0 + m1[L] * h1;
      }
    }
  }
  for (int m = 0; m < rows; ++m)
    for (int L = 0; L < TILE; ++L) out[m * ldo + L] = y[m][L];
}

}  // namespace
