// The SIMD tiles for CPUs with AVX2 but no AVX-512 VNNI: the integer sums come from maddubs on
// unpacked nibbles, then the VNNI tiles' float steps, so both give the same bits.
#pragma once

#include "common.h"

#if LEAPLLM_AVX2
namespace {

// As the VNNI tiles, on half a tile at a time. A 256-bit vector holds one quad of 8 rows, so rows
// 8h .. 8h + 7 are the h-th 32 bytes of every 64-byte vector of the layout; the tile's bytes stay in
// L1 between the two halves. Each row's integer block sum is exact (the 16-bit partial sums cannot
// overflow, see nibble_block_sums), and the float steps are the VNNI tiles' own, lane for lane.
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
// blocks). Decode reads every weight once, from DRAM, and the hardware prefetcher alone does not
// keep a core's stream busy.
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

// 8 rows' scales (or minimums) of a block, stored as float16 or float32.
inline __m256 load_scales8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline __m256 load_scales8(const float* p) { return _mm256_loadu_ps(p); }

// One activation row (a decode step): both halves in one pass over the blocks, each activation quad
// broadcast once for both, and the nibbles unpacked as they are used rather than kept in registers.
template <class S>
void tile_q4_one_row(const uint8_t* w, const S* d, const S* mins, const QuantizedRow& r, int64_t blocks, float* out) {
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
    const __m256 db0 = load_scales8(d + b * TILE), db1 = load_scales8(d + b * TILE + 8);
    const __m256 mb0 = load_scales8(mins + b * TILE), mb1 = load_scales8(mins + b * TILE + 8);
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

template <int MT, class S>
void tile_q4_simd(const uint8_t* w, const S* d, const S* mins, const QuantizedRow* const* a,
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
      const __m256 db = load_scales8(d + b * TILE + h * 8), mb = load_scales8(mins + b * TILE + h * 8);
      for (int m = 0; m < MT; ++m) {
        const __m256i s = _mm256_madd_epi16(nibble_dot16(nib, a[m]->q.data() + b * BLOCK), ones);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(db, _mm256_set1_ps(a[m]->scale[b])), acc[m]);
        acc[m] = _mm256_fmadd_ps(mb, _mm256_set1_ps(a[m]->block_sum[b]), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(out + m * ldo + h * 8, acc[m]);
  }
}

// Whether every byte of these n vectors is below 64.
inline bool bytes_below_64(const __m256i* v, int n) {
  __m256i any = v[0];
  for (int i = 1; i < n; ++i) any = _mm256_or_si256(any, v[i]);
  return _mm256_testz_si256(any, _mm256_set1_epi8((char)0xC0));
}

// The int32 sums of 8 rows over 4 quads, v[c] holding quad c's bytes (all below 64), against x.
inline __m256i small_quads_sum4(const __m256i* v, const int8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(v[0], broadcast_quad8(x)),
                                       _mm256_maddubs_epi16(v[1], broadcast_quad8(x + 4)));
  const __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(v[2], broadcast_quad8(x + 8)),
                                       _mm256_maddubs_epi16(v[3], broadcast_quad8(x + 12)));
  return _mm256_add_epi32(_mm256_madd_epi16(s01, ones), _mm256_madd_epi16(s23, ones));
}

// int8 blocks whose stored bytes all lie in [112, 175] (q in [-16, 47]: GGUF's Q5_0, stored q - 16
// + 128, and Q8_0 blocks of small values): u - 112 is below 64, so maddubs takes it directly (two
// quads summed in 16 bits, as small_quads_sum4), and sum(u x) = sum((u - 112) x) + 112 sum(x) is the
// nibble split's integer at half the multiplies. Only the tiles of several rows check for it: one
// row (a decode step) is bound by memory, and the check's registers slowed it.
constexpr int NARROW_BASE = 112;

// v[i] - 112 into shifted[i] for n vectors; whether every result is below 64.
inline bool narrow_bytes(const __m256i* v, int n, __m256i* shifted) {
  const __m256i base = _mm256_set1_epi8((char)NARROW_BASE);
  for (int i = 0; i < n; ++i) shifted[i] = _mm256_sub_epi8(v[i], base);
  return bytes_below_64(shifted, n);
}

// A narrow block's integer sums for 8 rows (shifted: its 8 quads less 112) against activation row r.
inline __m256i narrow_block_sums(const __m256i* shifted, const QuantizedRow& r, int64_t b) {
  const int8_t* x = r.q.data() + b * BLOCK;
  const __m256i s = _mm256_add_epi32(small_quads_sum4(shifted, x), small_quads_sum4(shifted + 4, x + 16));
  return _mm256_add_epi32(s, _mm256_set1_epi32(NARROW_BASE * r.isum[b]));
}

// int8 (q + 128): the sum is low nibbles + 16 x high nibbles, each half in 16 bits.
// One block's integer sums against one activation row: rows 0..7 in s0, rows 8..15 in s1.
inline void q8_block_sums_one_row(const uint8_t* wb, const int8_t* x, __m256i& s0, __m256i& s1) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
  for (int qd = 0; qd < 8; ++qd) {
    const __m256i xq = broadcast_quad8(x + 4 * qd);
    add_nibble_products(wb + qd * 64, xq, xq, lo0, hi0, lo1, hi1);
  }
  s0 = _mm256_add_epi32(_mm256_madd_epi16(lo0, ones), _mm256_slli_epi32(_mm256_madd_epi16(hi0, ones), 4));
  s1 = _mm256_add_epi32(_mm256_madd_epi16(lo1, ones), _mm256_slli_epi32(_mm256_madd_epi16(hi1, ones), 4));
}

// Half h of one block (wb already offset by 32 h): its 8 quads' low and high nibbles.
inline void unpack_q8_half(const uint8_t* wb, __m256i* lo, __m256i* hi) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int qd = 0; qd < 8; ++qd) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + qd * 64));
    lo[qd] = _mm256_and_si256(v, low4);
    hi[qd] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  }
}

// The integer sums of an unpacked half block against activation quads x: 8 rows, int32.
inline __m256i q8_half_sums(const __m256i* lo, const __m256i* hi, const int8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i s_lo = _mm256_madd_epi16(nibble_dot16(lo, x), ones);
  const __m256i s_hi = _mm256_madd_epi16(nibble_dot16(hi, x), ones);
  return _mm256_add_epi32(s_lo, _mm256_slli_epi32(s_hi, 4));
}

// The int8 tiles. BLOCKS false: a float32 scale per row (d, (N,)), applied once at the end, the
// stored + 128 offset taken off through the row's total. BLOCKS true (GGUF's Q8_0, see
// tiles_vnni.h): a float16 scale per (block, row), applied per block as the int4 tiles do, with
// minimum -128 d.
template <bool BLOCKS, class D>
void tile_q8_one_row(const uint8_t* w, const D* d, const QuantizedRow& r, int64_t blocks, float* out) {
  const __m256 minus128 = _mm256_set1_ps(-128.f);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 512;
    prefetch_lines(wb + PREFETCH_Q8, 8);
    __m256i s0, s1;
    q8_block_sums_one_row(wb, r.q.data() + b * BLOCK, s0, s1);
    const __m256 scale = _mm256_set1_ps(r.scale[b]);
    if constexpr (BLOCKS) {
      const __m256 block_sum = _mm256_set1_ps(r.block_sum[b]);
      const __m256 db0 = load_scales8(d + b * TILE), db1 = load_scales8(d + b * TILE + 8);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(db0, scale), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(db1, scale), acc1);
      acc0 = _mm256_fmadd_ps(_mm256_mul_ps(db0, minus128), block_sum, acc0);
      acc1 = _mm256_fmadd_ps(_mm256_mul_ps(db1, minus128), block_sum, acc1);
    } else {
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), scale, acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), scale, acc1);
    }
  }
  if constexpr (BLOCKS) {
    _mm256_storeu_ps(out, acc0);
    _mm256_storeu_ps(out + 8, acc1);
  } else {
    const __m256 offset = _mm256_set1_ps(128.f * r.total);
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_loadu_ps(d), _mm256_sub_ps(acc0, offset)));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_loadu_ps(d + 8), _mm256_sub_ps(acc1, offset)));
  }
}

template <int MT, bool BLOCKS, class D>
void tile_q8_rows(const uint8_t* w, const D* d, const QuantizedRow* const* a, int64_t blocks, float* out,
                  int64_t ldo) {
  if constexpr (MT == 1) {
    tile_q8_one_row<BLOCKS>(w, d, *a[0], blocks, out);
    return;
  }
  const __m256 minus128 = _mm256_set1_ps(-128.f);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* wb = w + b * 512 + h * 32;
      if (h == 0) prefetch_lines(wb + PREFETCH_Q8, 8);
      __m256i v[8], shifted[8];
      for (int qd = 0; qd < 8; ++qd) v[qd] = _mm256_loadu_si256((const __m256i*)(wb + qd * 64));
      const bool narrow = narrow_bytes(v, 8, shifted);
      __m256i lo[8], hi[8];  // quad qd's low and high nibbles, in nibble_dot16's order
      if (!narrow) unpack_q8_half(wb, lo, hi);
      __m256 db = _mm256_setzero_ps(), mb = db;  // BLOCKS: the block's scales and minimums
      if constexpr (BLOCKS) {
        db = load_scales8(d + b * TILE + h * 8);
        mb = _mm256_mul_ps(db, minus128);
      }
      for (int m = 0; m < MT; ++m) {
        const __m256i s = narrow ? narrow_block_sums(shifted, *a[m], b) : q8_half_sums(lo, hi, a[m]->q.data() + b * BLOCK);
        if constexpr (BLOCKS) {
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(db, _mm256_set1_ps(a[m]->scale[b])), acc[m]);
          acc[m] = _mm256_fmadd_ps(mb, _mm256_set1_ps(a[m]->block_sum[b]), acc[m]);
        } else {
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(a[m]->scale[b]), acc[m]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      if constexpr (BLOCKS) {
        _mm256_storeu_ps(out + m * ldo + h * 8, acc[m]);
      } else {
        const __m256 y = _mm256_sub_ps(acc[m], _mm256_set1_ps(128.f * a[m]->total));
        _mm256_storeu_ps(out + m * ldo + h * 8, _mm256_mul_ps(_mm256_loadu_ps(d + h * 8), y));
      }
    }
  }
}

template <int MT>
void tile_q8_simd(const uint8_t* w, const float* d, const QuantizedRow* const* a, int64_t blocks, float* out,
                  int64_t ldo) {
  tile_q8_rows<MT, false>(w, d, a, blocks, out, ldo);
}

template <int MT>
void tile_q8_blocks_simd(const uint8_t* w, const uint16_t* d, const QuantizedRow* const* a, int64_t blocks,
                         float* out, int64_t ldo) {
  tile_q8_rows<MT, true>(w, d, a, blocks, out, ldo);
}

// int8 sub-blocks (K-quants, see tiles_vnni.h): w = d * u + m per (16 features, row), the stored bytes
// u unshifted, up to 255 (a Q8_0 part of a mixed projection is q + 128), where maddubs's 16-bit pair
// sums, 2 x 255 x 127, would saturate. Each half block's int32 sum (s0: quads 0..3, s1: quads 4..7)
// comes exact in one of two ways, so either gives the same bits:
//  - any bytes: as the int8 tiles, low and high nibbles: 4 quads x 2 x 15 x 127 = 15240 < 2^15;
//  - a block whose bytes are all below 64 (Q6_K and every smaller type): u itself, two quads added
//    in 16 bits, 2 x 2 x 63 x 127 = 32004 < 2^15 (activations are in -127..127), half the multiplies.

// The same for any bytes, given as their low and high nibbles (unpack_q8_half's).
inline __m256i nibble_quads_sum4(const __m256i* lo, const __m256i* hi, const int8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s_lo = _mm256_maddubs_epi16(lo[0], broadcast_quad8(x));
  __m256i s_hi = _mm256_maddubs_epi16(hi[0], broadcast_quad8(x));
  for (int c = 1; c < 4; ++c) {
    const __m256i xq = broadcast_quad8(x + 4 * c);
    s_lo = _mm256_add_epi16(s_lo, _mm256_maddubs_epi16(lo[c], xq));
    s_hi = _mm256_add_epi16(s_hi, _mm256_maddubs_epi16(hi[c], xq));
  }
  return _mm256_add_epi32(_mm256_madd_epi16(s_lo, ones), _mm256_slli_epi32(_mm256_madd_epi16(s_hi, ones), 4));
}

// The VNNI tile's float steps for one block of 8 rows, in its order.
inline __m256 add_sub_block_terms(__m256 acc, __m256i s0, __m256i s1, __m256 d0, __m256 d1, __m256 m0, __m256 m1,
                                  const QuantizedRow& r, int64_t b) {
  const __m256 xs = _mm256_set1_ps(r.scale[b]);
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d0, xs), acc);
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(d1, xs), acc);
  acc = _mm256_fmadd_ps(m0, _mm256_set1_ps(r.half_sum[2 * b]), acc);
  return _mm256_fmadd_ps(m1, _mm256_set1_ps(r.half_sum[2 * b + 1]), acc);
}

// One activation row (a decode step): both halves of the tile in one pass over the blocks.
inline void tile_q8_sub_blocks_one_row(const uint8_t* w, const float* d, const float* mins, const QuantizedRow& r,
                                       int64_t blocks, float* out) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // rows 0..7, 8..15
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 512;
    prefetch_lines(wb + PREFETCH_Q8, 8);
    const int8_t* x = r.q.data() + b * BLOCK;
    __m256i v[16];  // v[8h + qd]: quad qd of rows 8h .. 8h + 7
    for (int qd = 0; qd < 8; ++qd)
      for (int h = 0; h < 2; ++h) v[8 * h + qd] = _mm256_loadu_si256((const __m256i*)(wb + qd * 64 + h * 32));
    __m256i s[2][2];  // s[h][half block]
    if (bytes_below_64(v, 16)) {
      for (int h = 0; h < 2; ++h) {
        s[h][0] = small_quads_sum4(v + 8 * h, x);
        s[h][1] = small_quads_sum4(v + 8 * h + 4, x + 16);
      }
    } else {  // as q8_block_sums_one_row, each half block's sums apart
      const __m256i ones = _mm256_set1_epi16(1);
      for (int k = 0; k < 2; ++k) {
        __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
        for (int qd = 4 * k; qd < 4 * k + 4; ++qd) {
          const __m256i xq = broadcast_quad8(x + 4 * qd);
          add_nibble_products(wb + qd * 64, xq, xq, lo0, hi0, lo1, hi1);
        }
        s[0][k] = _mm256_add_epi32(_mm256_madd_epi16(lo0, ones), _mm256_slli_epi32(_mm256_madd_epi16(hi0, ones), 4));
        s[1][k] = _mm256_add_epi32(_mm256_madd_epi16(lo1, ones), _mm256_slli_epi32(_mm256_madd_epi16(hi1, ones), 4));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const float *dh = d + 2 * b * TILE + h * 8, *mh = mins + 2 * b * TILE + h * 8;
      acc[h] = add_sub_block_terms(acc[h], s[h][0], s[h][1], _mm256_loadu_ps(dh), _mm256_loadu_ps(dh + TILE),
                                   _mm256_loadu_ps(mh), _mm256_loadu_ps(mh + TILE), r, b);
    }
  }
  _mm256_storeu_ps(out, acc[0]);
  _mm256_storeu_ps(out + 8, acc[1]);
}

template <int MT>
void tile_q8_sub_blocks_simd(const uint8_t* w, const float* d, const float* mins, const QuantizedRow* const* a,
                             int64_t blocks, float* out, int64_t ldo) {
  if constexpr (MT == 1) {
    tile_q8_sub_blocks_one_row(w, d, mins, *a[0], blocks, out);
    return;
  }
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* wb = w + b * 512 + h * 32;
      if (h == 0) prefetch_lines(wb + PREFETCH_Q8, 8);
      const float *dh = d + 2 * b * TILE + h * 8, *mh = mins + 2 * b * TILE + h * 8;
      const __m256 d0 = _mm256_loadu_ps(dh), d1 = _mm256_loadu_ps(dh + TILE);
      const __m256 m0 = _mm256_loadu_ps(mh), m1 = _mm256_loadu_ps(mh + TILE);
      __m256i v[8];
      for (int qd = 0; qd < 8; ++qd) v[qd] = _mm256_loadu_si256((const __m256i*)(wb + qd * 64));
      if (bytes_below_64(v, 8)) {
        for (int m = 0; m < MT; ++m) {
          const int8_t* x = a[m]->q.data() + b * BLOCK;
          acc[m] = add_sub_block_terms(acc[m], small_quads_sum4(v, x), small_quads_sum4(v + 4, x + 16), d0, d1, m0,
                                       m1, *a[m], b);
        }
      } else {
        __m256i lo[8], hi[8];
        unpack_q8_half(wb, lo, hi);
        for (int m = 0; m < MT; ++m) {
          const int8_t* x = a[m]->q.data() + b * BLOCK;
          acc[m] = add_sub_block_terms(acc[m], nibble_quads_sum4(lo, hi, x), nibble_quads_sum4(lo + 4, hi + 4, x + 16),
                                       d0, d1, m0, m1, *a[m], b);
        }
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(out + m * ldo + h * 8, acc[m]);
  }
}

}  // namespace
#endif
