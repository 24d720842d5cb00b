// The SIMD tiles for CPUs with AVX2 but no AVX-512 VNNI: the integer sums come from maddubs on
// unpacked nibbles, then the VNNI tiles' float steps, so both give the same bits.
#pragma once

#include "common.h"

#if LEAPLLM_AVX2
namespace {

// As the VNNI tiles, on half a tile at a time. A 256-bit vector holds one quad of 8 rows, so rows
// 8h .. 8h + 7 are the h-th 32 bytes of every 64-byte vector of the layout; the tile's bytes stay in
// L1 between the two halves. Each row's integer block sum is exact (the 16-bit partial sums cannot
// overflow: each tile gives its bound where it adds them), and the float steps are the VNNI tiles'
// own, lane for lane.
inline __m256i broadcast_quad8(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
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

// An empty asm that "changes" v: the compiler then adds a row's products in the order written instead
// of re-associating the sum into a tree, which computed all of a block's products first and spilled
// most of them (integer sums, so the result is the same either way).
inline void accumulated(__m256i& v) { asm("" : "+x"(v)); }

// The data of R activation rows, read once per tile call: the compiler cannot tell that a tile's
// stores into its L1 sums leave the rows' vectors be, and would read them again at every use.
template <int R>
struct RowData {
  const int8_t* q[R];
  const float *scale[R], *block_sum[R], *half_sum[R];
  const int32_t* isum[R];
  explicit RowData(const QuantizedRow* const* a) {
    for (int r = 0; r < R; ++r) {
      q[r] = a[r]->q.data();
      scale[r] = a[r]->scale.data();
      block_sum[r] = a[r]->block_sum.data();
      half_sum[r] = a[r]->half_sum.data();
      isum[r] = a[r]->isum.data();
    }
  }
};

// Several activation rows (prefill, batched steps): R rows against all 16 of the tile's rows at once.
// Quad by quad, each activation quad is broadcast once for both halves and each unpacked nibble
// vector serves all R rows, so a maddubs costs about 3.6 vector instructions in all (its 16-bit add,
// half a broadcast, the unpacking and the per-block float steps shared out) rather than 4; the
// accumulators stay in registers (2R of them) and the float sums go through L1. The integer sums and
// the float steps are the one-row tile's, so every row count gives the same bits.
template <int R, class S>
void tile_q4_rows(const uint8_t* w, const S* d, const S* mins, const QuantizedRow* const* a, int64_t blocks,
                  float* out, int64_t ldo) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  alignas(32) float acc[R][TILE] = {};
  const RowData<R> x(a);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * 256;
    prefetch_lines(wb + PREFETCH_Q4, 4);
    __m256i s[R][2];  // 16-bit sums of row r against half h: 8 quads x 2 x 15 x 127 < 2^15
    LEAPLLM_UNROLL
    for (int c = 0; c < 8; ++c) {  // quad c: vector c % 4, its low nibbles for c < 4, else its high ones
      const __m256i v0 = _mm256_loadu_si256((const __m256i*)(wb + (c & 3) * 64));
      const __m256i v1 = _mm256_loadu_si256((const __m256i*)(wb + (c & 3) * 64 + 32));
      const __m256i w0 = _mm256_and_si256(c < 4 ? v0 : _mm256_srli_epi16(v0, 4), low4);
      const __m256i w1 = _mm256_and_si256(c < 4 ? v1 : _mm256_srli_epi16(v1, 4), low4);
      LEAPLLM_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256i xb = broadcast_quad8(x.q[r] + b * BLOCK + 4 * c);
        const __m256i p0 = _mm256_maddubs_epi16(w0, xb), p1 = _mm256_maddubs_epi16(w1, xb);
        if (c == 0) {
          s[r][0] = p0;
          s[r][1] = p1;
        } else {
          s[r][0] = _mm256_add_epi16(s[r][0], p0);
          s[r][1] = _mm256_add_epi16(s[r][1], p1);
        }
        accumulated(s[r][0]);
        accumulated(s[r][1]);
      }
    }
    const __m256 d0 = load_scales8(d + b * TILE), d1 = load_scales8(d + b * TILE + 8);
    const __m256 m0 = load_scales8(mins + b * TILE), m1 = load_scales8(mins + b * TILE + 8);
    LEAPLLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 xs = _mm256_set1_ps(x.scale[r][b]), bs = _mm256_set1_ps(x.block_sum[r][b]);
      __m256 a0 = _mm256_load_ps(acc[r]), a1 = _mm256_load_ps(acc[r] + 8);
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s[r][0], ones)), _mm256_mul_ps(d0, xs), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s[r][1], ones)), _mm256_mul_ps(d1, xs), a1);
      _mm256_store_ps(acc[r], _mm256_fmadd_ps(m0, bs, a0));
      _mm256_store_ps(acc[r] + 8, _mm256_fmadd_ps(m1, bs, a1));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * ldo, _mm256_load_ps(acc[r]));
    _mm256_storeu_ps(out + r * ldo + 8, _mm256_load_ps(acc[r] + 8));
  }
}

template <int MT, class S>
void tile_q4_simd(const uint8_t* w, const S* d, const S* mins, const QuantizedRow* const* a,
                  int64_t blocks, float* out, int64_t ldo) {
  if constexpr (MT == 1) tile_q4_one_row(w, d, mins, *a[0], blocks, out);
  else tile_q4_rows<MT, S>(w, d, mins, a, blocks, out, ldo);
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
// nibble split's integer at half the multiplies. Only the tiles of several rows take it, where the
// whole layer is narrow (PackedLinear::narrow_bytes): one row (a decode step) is bound by memory.
// NARROW_BASE is in common.h.

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

// The int32 sums of 8 rows (a half tile, wb already offset by 32 h) over quads Q0 .. Q1 - 1 of block
// b, against each of R activation rows, into s[r], the quads walked one by one with every row's sums
// in registers. nibble_quad_sums: any bytes, low and high nibbles apart, each in 16 bits (up to 8
// quads: 8 x 2 x 15 x 127 < 2^15). direct_quad_sums: bytes less `shift` all below 64, taken
// directly, two quads in 16 bits (small_quads_sum4's bound) and then in 32 bits.
template <int R, int Q0, int Q1>
inline void nibble_quad_sums(const uint8_t* wb, const int8_t* const* xq, int64_t b, __m256i* s) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256i lo[R], hi[R];
  LEAPLLM_UNROLL
  for (int qd = Q0; qd < Q1; ++qd) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + qd * 64));
    const __m256i vl = _mm256_and_si256(v, low4), vh = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    LEAPLLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256i x = broadcast_quad8(xq[r] + b * BLOCK + 4 * qd);
      const __m256i pl = _mm256_maddubs_epi16(vl, x), ph = _mm256_maddubs_epi16(vh, x);
      if (qd == Q0) {
        lo[r] = pl;
        hi[r] = ph;
      } else {
        lo[r] = _mm256_add_epi16(lo[r], pl);
        hi[r] = _mm256_add_epi16(hi[r], ph);
      }
      accumulated(lo[r]);
      accumulated(hi[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    s[r] = _mm256_add_epi32(_mm256_madd_epi16(lo[r], ones), _mm256_slli_epi32(_mm256_madd_epi16(hi[r], ones), 4));
}

template <int R, int Q0, int Q1>
inline void direct_quad_sums(const uint8_t* wb, __m256i shift, const int8_t* const* xq, int64_t b, __m256i* s) {
  const __m256i ones = _mm256_set1_epi16(1);
  LEAPLLM_UNROLL
  for (int qd = Q0; qd < Q1; qd += 2) {
    const __m256i u0 = _mm256_sub_epi8(_mm256_loadu_si256((const __m256i*)(wb + qd * 64)), shift);
    const __m256i u1 = _mm256_sub_epi8(_mm256_loadu_si256((const __m256i*)(wb + qd * 64 + 64)), shift);
    LEAPLLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xq[r] + b * BLOCK + 4 * qd;
      const __m256i p = _mm256_madd_epi16(
          _mm256_add_epi16(_mm256_maddubs_epi16(u0, broadcast_quad8(x)), _mm256_maddubs_epi16(u1, broadcast_quad8(x + 4))),
          ones);
      s[r] = qd == Q0 ? p : _mm256_add_epi32(s[r], p);
      accumulated(s[r]);
    }
  }
}

// Several activation rows on int8: as tile_q4_rows, quad by quad with the rows' 16-bit sums in
// registers, here half a tile at a time (two nibble products a byte need twice the accumulators).
// NARROW (the layer's bytes all in [112, 175], PackedLinear::narrow_bytes): u - 112 taken directly,
// two quads summed in 16 bits (small_quads_sum4's bound) and 112 sum(x) added back; otherwise low
// and high nibbles, 8 quads each in 16 bits (8 x 2 x 15 x 127 < 2^15). Either way the integer is
// the one-row tile's (q8_block_sums_one_row), and so are the float steps.
template <int R, bool BLOCKS, bool NARROW, class D>
void tile_q8_rows(const uint8_t* w, const D* d, const QuantizedRow* const* a, int64_t blocks, float* out,
                  int64_t ldo) {
  const __m256 minus128 = _mm256_set1_ps(-128.f);
  const RowData<R> x(a);
  for (int h = 0; h < 2; ++h) {
    alignas(32) float acc[R][8] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* wb = w + b * 512 + h * 32;
      if (h == 0) prefetch_lines(wb + PREFETCH_Q8, 8);
      __m256i s[R];  // int32 sums of the 8 rows against row r
      if constexpr (NARROW) {
        direct_quad_sums<R, 0, 8>(wb, _mm256_set1_epi8((char)NARROW_BASE), x.q, b, s);
        for (int r = 0; r < R; ++r) s[r] = _mm256_add_epi32(s[r], _mm256_set1_epi32(NARROW_BASE * x.isum[r][b]));
      } else {
        nibble_quad_sums<R, 0, 8>(wb, x.q, b, s);
      }
      __m256 db = _mm256_setzero_ps(), mb = db;  // BLOCKS: the block's scales and minimums
      if constexpr (BLOCKS) {
        db = load_scales8(d + b * TILE + h * 8);
        mb = _mm256_mul_ps(db, minus128);
      }
      LEAPLLM_UNROLL
      for (int r = 0; r < R; ++r) {
        __m256 y = _mm256_load_ps(acc[r]);
        if constexpr (BLOCKS) {
          y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), _mm256_mul_ps(db, _mm256_set1_ps(x.scale[r][b])), y);
          y = _mm256_fmadd_ps(mb, _mm256_set1_ps(x.block_sum[r][b]), y);
        } else {
          y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), _mm256_set1_ps(x.scale[r][b]), y);
        }
        _mm256_store_ps(acc[r], y);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 y = _mm256_load_ps(acc[r]);
      if constexpr (BLOCKS) {
        _mm256_storeu_ps(out + r * ldo + h * 8, y);
      } else {
        const __m256 centred = _mm256_sub_ps(y, _mm256_set1_ps(128.f * a[r]->total));
        _mm256_storeu_ps(out + r * ldo + h * 8, _mm256_mul_ps(_mm256_loadu_ps(d + h * 8), centred));
      }
    }
  }
}

template <int MT, bool BLOCKS, class D>
void tile_q8_any_rows(const uint8_t* w, const D* d, const QuantizedRow* const* a, int64_t blocks, float* out,
                      int64_t ldo, bool narrow) {
  if constexpr (MT == 1) tile_q8_one_row<BLOCKS>(w, d, *a[0], blocks, out);
  else if (narrow) tile_q8_rows<MT, BLOCKS, true>(w, d, a, blocks, out, ldo);
  else tile_q8_rows<MT, BLOCKS, false>(w, d, a, blocks, out, ldo);
}

template <int MT>
void tile_q8_simd(const uint8_t* w, const float* d, const QuantizedRow* const* a, int64_t blocks, float* out,
                  int64_t ldo, bool narrow) {
  tile_q8_any_rows<MT, false>(w, d, a, blocks, out, ldo, narrow);
}

template <int MT>
void tile_q8_blocks_simd(const uint8_t* w, const uint16_t* d, const QuantizedRow* const* a, int64_t blocks,
                         float* out, int64_t ldo, bool narrow) {
  tile_q8_any_rows<MT, true>(w, d, a, blocks, out, ldo, narrow);
}

// int8 sub-blocks (K-quants, see tiles_vnni.h): w = d * u + m per (16 features, row), the stored bytes
// u unshifted, up to 255 (a Q8_0 part of a mixed projection is q + 128), where maddubs's 16-bit pair
// sums, 2 x 255 x 127, would saturate. Each half block's int32 sum (s0: quads 0..3, s1: quads 4..7)
// comes exact in one of two ways, so either gives the same bits:
//  - any bytes: as the int8 tiles, low and high nibbles: 4 quads x 2 x 15 x 127 = 15240 < 2^15;
//  - a block whose bytes are all below 64 (Q6_K and every smaller type): u itself, two quads added
//    in 16 bits, 2 x 2 x 63 x 127 = 32004 < 2^15 (activations are in -127..127), half the multiplies.

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

// Several activation rows on int8 sub-blocks: as tile_q8_rows, quad by quad with the rows' sums in
// registers, half a tile at a time. SMALL (the layer's bytes all below 64, PackedLinear::small_bytes):
// u directly, two quads in 16 bits; otherwise low and high nibbles, four quads in 16 bits. Each half
// block's int32 is the one-row tile's, and the float steps are add_sub_block_terms's, in its order:
// the first half block's term is added as soon as its sum is complete.
template <int R, bool SMALL>
void tile_q8_sub_blocks_rows(const uint8_t* w, const float* d, const float* mins, const QuantizedRow* const* a,
                             int64_t blocks, float* out, int64_t ldo) {
  const RowData<R> x(a);
  for (int h = 0; h < 2; ++h) {
    alignas(32) float acc[R][8] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* wb = w + b * 512 + h * 32;
      if (h == 0) prefetch_lines(wb + PREFETCH_Q8, 8);
      const float *dh = d + 2 * b * TILE + h * 8, *mh = mins + 2 * b * TILE + h * 8;
      LEAPLLM_UNROLL
      for (int k = 0; k < 2; ++k) {  // half block k: quads 4k .. 4k + 3
        __m256i s[R];
        if constexpr (SMALL) {
          if (k == 0) direct_quad_sums<R, 0, 4>(wb, _mm256_setzero_si256(), x.q, b, s);
          else direct_quad_sums<R, 4, 8>(wb, _mm256_setzero_si256(), x.q, b, s);
        } else {
          if (k == 0) nibble_quad_sums<R, 0, 4>(wb, x.q, b, s);
          else nibble_quad_sums<R, 4, 8>(wb, x.q, b, s);
        }
        const __m256 dk = _mm256_loadu_ps(dh + k * TILE);
        LEAPLLM_UNROLL
        for (int r = 0; r < R; ++r) {
          const __m256 y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), _mm256_mul_ps(dk, _mm256_set1_ps(x.scale[r][b])),
                                           _mm256_load_ps(acc[r]));
          _mm256_store_ps(acc[r], y);
        }
      }
      const __m256 m0 = _mm256_loadu_ps(mh), m1 = _mm256_loadu_ps(mh + TILE);
      LEAPLLM_UNROLL
      for (int r = 0; r < R; ++r) {
        __m256 y = _mm256_fmadd_ps(m0, _mm256_set1_ps(x.half_sum[r][2 * b]), _mm256_load_ps(acc[r]));
        _mm256_store_ps(acc[r], _mm256_fmadd_ps(m1, _mm256_set1_ps(x.half_sum[r][2 * b + 1]), y));
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo + h * 8, _mm256_load_ps(acc[r]));
  }
}

template <int MT>
void tile_q8_sub_blocks_simd(const uint8_t* w, const float* d, const float* mins, const QuantizedRow* const* a,
                             int64_t blocks, float* out, int64_t ldo, bool small) {
  if constexpr (MT == 1) tile_q8_sub_blocks_one_row(w, d, mins, *a[0], blocks, out);
  else if (small) tile_q8_sub_blocks_rows<MT, true>(w, d, mins, a, blocks, out, ldo);
  else tile_q8_sub_blocks_rows<MT, false>(w, d, mins, a, blocks, out, ldo);
}

// K-quant super-blocks (super_blocks.h) for one activation row (a decode step), read as stored: a
// half tile's values unpacked from their low nibbles and H high bits (all below 64, so taken directly
// as the small sub-block tiles take them), the factors D sc and M mn formed in registers (exact
// products, the expanded forms' very factors), then the float steps of the one-row int4 tile (Q4_K's
// form: H = 0, G = 32) or else of the one-row sub-block tile: the expanded forms' bits. Several rows expand the tile
// once instead (PackedLinear::compute_super_block_rows).
template <int H>
inline void unpack_super_block_half(const uint8_t* lb, const uint8_t* hb, int h, __m256i* v) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m256i w = _mm256_loadu_si256((const __m256i*)(lb + c * 64 + 32 * h));
    v[c] = _mm256_and_si256(w, low4);
    v[c + 4] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
  }
  // 16-bit shifts carry bits across bytes only into positions the mask clears
  if constexpr (H == 1) {
    const __m256i hv = _mm256_loadu_si256((const __m256i*)(hb + 32 * h)), bit4 = _mm256_set1_epi8(0x10);
    v[0] = _mm256_or_si256(v[0], _mm256_and_si256(_mm256_slli_epi16(hv, 4), bit4));
    v[1] = _mm256_or_si256(v[1], _mm256_and_si256(_mm256_slli_epi16(hv, 3), bit4));
    v[2] = _mm256_or_si256(v[2], _mm256_and_si256(_mm256_slli_epi16(hv, 2), bit4));
    v[3] = _mm256_or_si256(v[3], _mm256_and_si256(_mm256_slli_epi16(hv, 1), bit4));
    v[4] = _mm256_or_si256(v[4], _mm256_and_si256(hv, bit4));
    v[5] = _mm256_or_si256(v[5], _mm256_and_si256(_mm256_srli_epi16(hv, 1), bit4));
    v[6] = _mm256_or_si256(v[6], _mm256_and_si256(_mm256_srli_epi16(hv, 2), bit4));
    v[7] = _mm256_or_si256(v[7], _mm256_and_si256(_mm256_srli_epi16(hv, 3), bit4));
  }
  if constexpr (H == 2) {
    const __m256i bits45 = _mm256_set1_epi8(0x30);
    for (int p = 0; p < 2; ++p) {
      const __m256i hv = _mm256_loadu_si256((const __m256i*)(hb + 64 * p + 32 * h));
      v[4 * p] = _mm256_or_si256(v[4 * p], _mm256_and_si256(_mm256_slli_epi16(hv, 4), bits45));
      v[4 * p + 1] = _mm256_or_si256(v[4 * p + 1], _mm256_and_si256(_mm256_slli_epi16(hv, 2), bits45));
      v[4 * p + 2] = _mm256_or_si256(v[4 * p + 2], _mm256_and_si256(hv, bits45));
      v[4 * p + 3] = _mm256_or_si256(v[4 * p + 3], _mm256_and_si256(_mm256_srli_epi16(hv, 2), bits45));
    }
  }
}

// factor * the 8 rows' int8 values at p.
inline __m256 int8_factors8(const int8_t* p, __m256 factor) {
  return _mm256_mul_ps(factor, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))));
}

template <int H, int G>
void tile_super_blocks_one_row(const uint8_t* low, const uint8_t* high, const int8_t* sc, const int8_t* mn,
                               const float* D, const float* M, const QuantizedRow& r, int64_t blocks, float* out) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // rows 0..7, 8..15
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* lb = low + b * 256;
    const uint8_t* hb = high + b * 64 * H;
    prefetch_lines(lb + PREFETCH_Q4, 4);
    if constexpr (H > 0) prefetch_lines(hb + PREFETCH_Q4 * H / 4, H);
    const int8_t* x = r.q.data() + b * BLOCK;
    const float* Ds = D + b / 8 * TILE;
    const float* Ms = M + b / 8 * TILE;
    for (int h = 0; h < 2; ++h) {
      __m256i v[8];
      unpack_super_block_half<H>(lb, hb, h, v);
      const __m256i s0 = small_quads_sum4(v, x), s1 = small_quads_sum4(v + 4, x + 16);
      const __m256 Dh = _mm256_loadu_ps(Ds + 8 * h), Mh = _mm256_loadu_ps(Ms + 8 * h);
      if constexpr (H == 0 && G == 32) {  // the int4 layout itself: tile_q4_one_row's float steps
        const __m256 db = int8_factors8(sc + b * TILE + 8 * h, Dh), mb = int8_factors8(mn + b * TILE + 8 * h, Mh);
        acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), _mm256_mul_ps(db, _mm256_set1_ps(r.scale[b])),
                                 acc[h]);
        acc[h] = _mm256_fmadd_ps(mb, _mm256_set1_ps(r.block_sum[b]), acc[h]);
      } else {
        // sub-blocks of 32 with high bits expand to int8 sub-blocks of 16, each half taking its block's factors
        const int64_t i0 = G == 16 ? 2 * b : b, i1 = G == 16 ? 2 * b + 1 : b;
        const int8_t *s = sc + 8 * h, *n = mn + 8 * h;
        acc[h] = add_sub_block_terms(acc[h], s0, s1, int8_factors8(s + i0 * TILE, Dh), int8_factors8(s + i1 * TILE, Dh),
                                     int8_factors8(n + i0 * TILE, Mh), int8_factors8(n + i1 * TILE, Mh), r, b);
      }
    }
  }
  _mm256_storeu_ps(out, acc[0]);
  _mm256_storeu_ps(out + 8, acc[1]);
}

// GGUF's Q5_0 as stored, one activation row (see tiles_vnni.h): the values unpacked, summed directly
// (below 64), 112 x the activations' block sum added: tile_q8_one_row's integer and float steps.
inline void tile_q5_blocks_one_row(const uint8_t* low, const uint8_t* high, const uint16_t* d, const QuantizedRow& r,
                                   int64_t blocks, float* out) {
  const __m256 minus128 = _mm256_set1_ps(-128.f);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // rows 0..7, 8..15
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* lb = low + b * 256;
    const uint8_t* hb = high + b * 64;
    prefetch_lines(lb + PREFETCH_Q4, 4);
    prefetch_lines(hb + PREFETCH_Q4 / 4, 1);
    const int8_t* x = r.q.data() + b * BLOCK;
    const __m256 scale = _mm256_set1_ps(r.scale[b]), block_sum = _mm256_set1_ps(r.block_sum[b]);
    const __m256i offset = _mm256_set1_epi32(NARROW_BASE * r.isum[b]);
    for (int h = 0; h < 2; ++h) {
      __m256i v[8];
      unpack_super_block_half<1>(lb, hb, h, v);
      const __m256i s = _mm256_add_epi32(_mm256_add_epi32(small_quads_sum4(v, x), small_quads_sum4(v + 4, x + 16)),
                                         offset);
      const __m256 db = load_scales8(d + b * TILE + 8 * h);
      acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(db, scale), acc[h]);
      acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(db, minus128), block_sum, acc[h]);
    }
  }
  _mm256_storeu_ps(out, acc[0]);
  _mm256_storeu_ps(out + 8, acc[1]);
}

}  // namespace
#endif
