// The SIMD tiles for CPUs with AVX-512 VNNI: one vpdpbusd adds 4 products (a quad of the layout) to
// each of a tile's 16 row lanes.
#pragma once

#include "common.h"

#if LEAPLLM_VNNI
namespace {

inline __m512i broadcast_quad(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

// The 16 rows' scales (or minimums) of a block, stored as float16 or float32.
inline __m512 load_scales16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512 load_scales16(const float* p) { return _mm512_loadu_ps(p); }

// A block's integer sums for the 16 rows of unpacked weights wq (quad c of every row in wq[c])
// against activation quads x: s0 over quads 0..3 (features 0..15), s1 over quads 4..7 (16..31), two
// chains for half the latency.
inline void block_dots(const __m512i* wq, const int8_t* x, __m512i& s0, __m512i& s1) {
  s0 = _mm512_setzero_si512();
  s1 = _mm512_setzero_si512();
  for (int c = 0; c < 4; ++c) {
    s0 = _mm512_dpbusd_epi32(s0, wq[c], broadcast_quad(x + 4 * c));
    s1 = _mm512_dpbusd_epi32(s1, wq[c + 4], broadcast_quad(x + 4 * (c + 4)));
  }
}

// The float steps of a block against one activation row, on the block's unpacked weights wq: with a
// scale and minimum per (block, row) (the int4 and int8-block tiles), or per (half block, row) (the
// int8 sub-block tiles).
inline __m512 add_block_terms(__m512 acc, const __m512i* wq, const QuantizedRow& r, int64_t b, __m512 db, __m512 mb) {
  __m512i s0, s1;
  block_dots(wq, r.q.data() + b * BLOCK, s0, s1);
  const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
  acc = _mm512_fmadd_ps(dot, _mm512_mul_ps(db, _mm512_set1_ps(r.scale[b])), acc);
  return _mm512_fmadd_ps(mb, _mm512_set1_ps(r.block_sum[b]), acc);
}

inline __m512 add_sub_block_terms(__m512 acc, const __m512i* wq, const QuantizedRow& r, int64_t b, __m512 d0,
                                  __m512 d1, __m512 m0, __m512 m1) {
  __m512i s0, s1;
  block_dots(wq, r.q.data() + b * BLOCK, s0, s1);
  const __m512 xs = _mm512_set1_ps(r.scale[b]);
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d0, xs), acc);
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(d1, xs), acc);
  acc = _mm512_fmadd_ps(m0, _mm512_set1_ps(r.half_sum[2 * b]), acc);
  return _mm512_fmadd_ps(m1, _mm512_set1_ps(r.half_sum[2 * b + 1]), acc);
}

// A tile of weights with a scale d and minimum per (block, row), stored as S (float16 bits or
// float32): w = d * stored + minimum. BITS 4: two nibbles a byte, minimums given. BITS 8 (int8
// blocks, GGUF's Q8_0): bytes q + 128, so w = d * stored - 128 * d: no minimums given, the minimum
// is -128 d.

template <int MT, int BITS, class S>
void tile_blocks_simd(const uint8_t* w, const S* d, const S* mins, const QuantizedRow* const* a,
                      int64_t blocks, float* out, int64_t ldo) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i wq[8];
    if constexpr (BITS == 4) {
      const uint8_t* wb = w + b * 256;
      // The 4-bit layouts ask for their weights ahead; the full-byte int8 tiles read faster without
      // (benchmarks/README.md, "Prefetching on VNNI").
      prefetch_lines(wb + PREFETCH_Q4, 4);
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512((const void*)(wb + c * 64));
        wq[c] = _mm512_and_si512(v, low4);
        wq[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
    } else {
      for (int qd = 0; qd < 8; ++qd) wq[qd] = _mm512_loadu_si512((const void*)(w + b * 512 + qd * 64));
    }
    const __m512 db = load_scales16(d + b * TILE);
    const __m512 mb = BITS == 4 ? load_scales16(mins + b * TILE) : _mm512_mul_ps(db, _mm512_set1_ps(-128.f));
    for (int m = 0; m < MT; ++m) acc[m] = add_block_terms(acc[m], wq, *a[m], b, db, mb);
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

template <int MT, class S>
void tile_q4_simd(const uint8_t* w, const S* d, const S* mins, const QuantizedRow* const* a,
                  int64_t blocks, float* out, int64_t ldo) {
  tile_blocks_simd<MT, 4, S>(w, d, mins, a, blocks, out, ldo);
}

template <int MT>
void tile_q8_blocks_simd(const uint8_t* w, const uint16_t* d, const QuantizedRow* const* a, int64_t blocks,
                         float* out, int64_t ldo, bool /*narrow: the AVX2 tiles' shortcut*/) {
  tile_blocks_simd<MT, 8, uint16_t>(w, d, nullptr, a, blocks, out, ldo);
}

template <int MT>
void tile_q8_simd(const uint8_t* w, const float* d, const QuantizedRow* const* a, int64_t blocks, float* out,
                  int64_t ldo, bool /*narrow: the AVX2 tiles' shortcut*/) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 512;
    __m512i wq[8];
    for (int qd = 0; qd < 8; ++qd) wq[qd] = _mm512_loadu_si512((const void*)(wb + qd * 64));
    for (int m = 0; m < MT; ++m) {
      __m512i s0, s1;
      block_dots(wq, a[m]->q.data() + b * BLOCK, s0, s1);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_set1_ps(a[m]->scale[b]), acc[m]);
    }
  }
  const __m512 dv = _mm512_loadu_ps(d);
  for (int m = 0; m < MT; ++m) {
    const __m512 y = _mm512_sub_ps(acc[m], _mm512_set1_ps(128.f * a[m]->total));
    _mm512_storeu_ps(out + m * ldo, _mm512_mul_ps(dv, y));
  }
}

// int8 sub-blocks (K-quants): w = d * u + m per (16 features, row), float32 d and m. The two chains
// of the dot products are exactly the two halves of a block (quads 0..3 and 4..7).
template <int MT>
void tile_q8_sub_blocks_simd(const uint8_t* w, const float* d, const float* mins, const QuantizedRow* const* a,
                             int64_t blocks, float* out, int64_t ldo, bool /*small: the AVX2 tiles' shortcut*/) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i wq[8];
    for (int qd = 0; qd < 8; ++qd) wq[qd] = _mm512_loadu_si512((const void*)(w + b * 512 + qd * 64));
    const __m512 d0 = _mm512_loadu_ps(d + 2 * b * TILE), d1 = _mm512_loadu_ps(d + (2 * b + 1) * TILE);
    const __m512 m0 = _mm512_loadu_ps(mins + 2 * b * TILE), m1 = _mm512_loadu_ps(mins + (2 * b + 1) * TILE);
    for (int m = 0; m < MT; ++m) acc[m] = add_sub_block_terms(acc[m], wq, *a[m], b, d0, d1, m0, m1);
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

// K-quant super-blocks (super_blocks.h), read as stored: a block's values unpacked from their low
// nibbles and H high bits, its factors D sc and M mn formed in registers (exact products, so the very
// factors of the expanded forms), then the float steps of the int4 tile (Q4_K's form: H = 0, G = 32)
// or else of the int8 sub-block tile: the expanded forms' bits, at the stored form's bytes.
template <int H>
inline void unpack_super_block(const uint8_t* lb, const uint8_t* hb, __m512i* wq) {
  prefetch_lines(lb + PREFETCH_Q4, 4);
  if constexpr (H > 0) prefetch_lines(hb + PREFETCH_Q4 * H / 4, H);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m512i v = _mm512_loadu_si512((const void*)(lb + c * 64));
    wq[c] = _mm512_and_si512(v, low4);
    wq[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  }
  // wq |= shifted & mask (ternary logic A | (B & C)); 16-bit shifts carry bits across bytes only
  // into positions the mask clears.
  if constexpr (H == 1) {
    const __m512i hv = _mm512_loadu_si512((const void*)hb), bit4 = _mm512_set1_epi8(0x10);
    wq[0] = _mm512_ternarylogic_epi32(wq[0], _mm512_slli_epi16(hv, 4), bit4, 0xF8);
    wq[1] = _mm512_ternarylogic_epi32(wq[1], _mm512_slli_epi16(hv, 3), bit4, 0xF8);
    wq[2] = _mm512_ternarylogic_epi32(wq[2], _mm512_slli_epi16(hv, 2), bit4, 0xF8);
    wq[3] = _mm512_ternarylogic_epi32(wq[3], _mm512_slli_epi16(hv, 1), bit4, 0xF8);
    wq[4] = _mm512_ternarylogic_epi32(wq[4], hv, bit4, 0xF8);
    wq[5] = _mm512_ternarylogic_epi32(wq[5], _mm512_srli_epi16(hv, 1), bit4, 0xF8);
    wq[6] = _mm512_ternarylogic_epi32(wq[6], _mm512_srli_epi16(hv, 2), bit4, 0xF8);
    wq[7] = _mm512_ternarylogic_epi32(wq[7], _mm512_srli_epi16(hv, 3), bit4, 0xF8);
  }
  if constexpr (H == 2) {
    const __m512i bits45 = _mm512_set1_epi8(0x30);
    for (int p = 0; p < 2; ++p) {
      const __m512i hv = _mm512_loadu_si512((const void*)(hb + 64 * p));
      wq[4 * p] = _mm512_ternarylogic_epi32(wq[4 * p], _mm512_slli_epi16(hv, 4), bits45, 0xF8);
      wq[4 * p + 1] = _mm512_ternarylogic_epi32(wq[4 * p + 1], _mm512_slli_epi16(hv, 2), bits45, 0xF8);
      wq[4 * p + 2] = _mm512_ternarylogic_epi32(wq[4 * p + 2], hv, bits45, 0xF8);
      wq[4 * p + 3] = _mm512_ternarylogic_epi32(wq[4 * p + 3], _mm512_srli_epi16(hv, 2), bits45, 0xF8);
    }
  }
}

// factor * the 16 rows' int8 values at p.
inline __m512 int8_factors16(const int8_t* p, __m512 factor) {
  return _mm512_mul_ps(factor, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))));
}

template <int MT, int H, int G>
void tile_super_blocks_simd(const uint8_t* low, const uint8_t* high, const int8_t* sc, const int8_t* mn, const float* D,
                            const float* M, const QuantizedRow* const* a, int64_t blocks, float* out, int64_t ldo) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  __m512 Dv = _mm512_setzero_ps(), Mv = Dv;
  for (int64_t b = 0; b < blocks; ++b) {
    if (b % 8 == 0) {  // a super-block of 256 features: 8 blocks
      Dv = _mm512_loadu_ps(D + b / 8 * TILE);
      Mv = _mm512_loadu_ps(M + b / 8 * TILE);
    }
    __m512i wq[8];
    unpack_super_block<H>(low + b * 256, high + b * 64 * H, wq);
    if constexpr (H == 0 && G == 32) {  // the int4 layout itself
      const __m512 db = int8_factors16(sc + b * TILE, Dv), mb = int8_factors16(mn + b * TILE, Mv);
      for (int m = 0; m < MT; ++m) acc[m] = add_block_terms(acc[m], wq, *a[m], b, db, mb);
    } else {
      // sub-blocks of 32 with high bits expand to int8 sub-blocks of 16, each half taking its block's factors
      const int64_t i0 = G == 16 ? 2 * b : b, i1 = G == 16 ? 2 * b + 1 : b;
      const __m512 d0 = int8_factors16(sc + i0 * TILE, Dv), d1 = int8_factors16(sc + i1 * TILE, Dv);
      const __m512 m0 = int8_factors16(mn + i0 * TILE, Mv), m1 = int8_factors16(mn + i1 * TILE, Mv);
      for (int m = 0; m < MT; ++m) acc[m] = add_sub_block_terms(acc[m], wq, *a[m], b, d0, d1, m0, m1);
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

// GGUF's Q5_0 as stored (PackedLinear::five_bit): the values u = q + 16 unpacked from their low
// nibbles and fifth bits, then the int8-block tile's steps on the bytes it would hold, u + 112
// (q + 128): the same integer sums (plus 112 x the activations' block sum) and so the same bits.
template <int MT>
void tile_q5_blocks_simd(const uint8_t* low, const uint8_t* high, const uint16_t* d, const QuantizedRow* const* a,
                         int64_t blocks, float* out, int64_t ldo) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i wq[8];
    unpack_super_block<1>(low + b * 256, high + b * 64, wq);
    const __m512 db = load_scales16(d + b * TILE), mb = _mm512_mul_ps(db, _mm512_set1_ps(-128.f));
    for (int m = 0; m < MT; ++m) {
      __m512i s0, s1;
      block_dots(wq, a[m]->q.data() + b * BLOCK, s0, s1);
      const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(NARROW_BASE * a[m]->isum[b]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(db, _mm512_set1_ps(a[m]->scale[b])), acc[m]);
      acc[m] = _mm512_fmadd_ps(mb, _mm512_set1_ps(a[m]->block_sum[b]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

}  // namespace
#endif
