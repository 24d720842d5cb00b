// PackedLinear: a linear layer on packed int4 or int8 weights, running whichever tiles this build has.
#pragma once

#include <string>
#include <type_traits>

#include "common.h"
#include "super_blocks.h"
#include "tiles_avx2.h"
#include "tiles_portable.h"
#include "tiles_vnni.h"

namespace {

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

// f(high bits, sub-block features) as integral constants: the super-block tiles are templates on both.
template <class F>
void with_super_block_form(int64_t high_bits, int64_t group, F&& f) {
  using std::integral_constant;
  if (group == 32) {
    if (high_bits == 0) return f(integral_constant<int, 0>(), integral_constant<int, 32>());
    if (high_bits == 1) return f(integral_constant<int, 1>(), integral_constant<int, 32>());
    return f(integral_constant<int, 2>(), integral_constant<int, 32>());
  }
  if (high_bits == 0) return f(integral_constant<int, 0>(), integral_constant<int, 16>());
  if (high_bits == 1) return f(integral_constant<int, 1>(), integral_constant<int, 16>());
  return f(integral_constant<int, 2>(), integral_constant<int, 16>());
}

// Activation rows per sweep of a thread's tiles in PackedLinear::forward.
constexpr int64_t ROW_CHUNK = 64;

}  // namespace

// A linear layer with packed int4 or int8 weights: y = x W^T (+ bias).
struct PackedLinear {
  int64_t out_features, in_features, bits;
  bool simd;  // the VNNI or AVX2 tiles (whichever this build has); else the portable ones
  bool block_scales = false;  // int8 with a float16 scale per block of 32 (GGUF Q8_0) instead of one per row
  bool sub_blocks = false;    // int8 values with a float32 scale and minimum per 16 features (GGUF K-quants)
  bool float_scales = false;  // int4 with float32 scales and minimums (GGUF Q4_K) instead of float16
  bool narrow_bytes = false;  // int8 whose stored bytes all lie in [112, 175] (GGUF Q5_0): see NARROW_BASE in tiles_avx2.h
  bool small_bytes = false;   // int8 sub-blocks whose stored bytes are all below 64 (Q6_K and smaller K-quants)
  bool super_blocks = false;  // GGUF K-quants near the file's size (super_blocks.h): bits is 4, the low nibbles
  int64_t high_bits = 0, group = 0;  // super-blocks: high bits a value (0, 1, 2), features a sub-block (16, 32)
  bool five_bit = false;  // GGUF Q5_0 as stored: int8 blocks (block_scales) whose values q + 16 are kept as low
                          // nibbles (weight, the int4 layout) and fifth bits (high, as super-blocks' H = 1)
  at::Tensor weight, scales, mins, bias;
  at::Tensor high, sub_scales, sub_mins, super_scales, super_mins;  // super-blocks' parts (weight: low nibbles)
  // Their data, read once here rather than through a checked data_ptr<T>() at each of a step's many
  // tile calls: scale16 / mins16 where they are float16, scale32 / mins32 where they are float32.
  const uint8_t* weight_data = nullptr;
  const uint16_t *scale16 = nullptr, *mins16 = nullptr;
  const float *scale32 = nullptr, *mins32 = nullptr, *bias_data = nullptr;
  const uint8_t* high_data = nullptr;
  const int8_t *sc_data = nullptr, *mn_data = nullptr;  // mn_data is sc_data where the minimums are the scales
  const float *D_data = nullptr, *M_data = nullptr;

  PackedLinear() = default;  // (from_super_blocks fills one in)

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
      float_scales = scales.scalar_type() == at::kFloat;
      const auto scale_type = float_scales ? at::kFloat : at::kHalf;
      TORCH_CHECK((float_scales || scales.scalar_type() == at::kHalf) && scales.numel() == out_features * (in_features / BLOCK),
                  "int4 scales must be float16 or float32 (N, K/32)");
      TORCH_CHECK(mins_.has_value() && mins_->scalar_type() == scale_type && mins_->numel() == scales.numel(),
                  "int4 needs minimums (N, K/32) of its scales' dtype");
      mins = mins_->contiguous();
    } else if (mins_.has_value() && mins_->defined()) {
      TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == out_features * (in_features / 16),
                  "int8 sub-block scales must be float32 (N, K/16)");
      TORCH_CHECK(mins_->scalar_type() == at::kFloat && mins_->numel() == scales.numel(),
                  "int8 sub-block minimums must be float32 (N, K/16)");
      mins = mins_->contiguous();
      sub_blocks = true;
    } else if (scales.scalar_type() == at::kHalf) {
      TORCH_CHECK(scales.numel() == out_features * (in_features / BLOCK), "int8 block scales must be float16 (N, K/32)");
      block_scales = true;
    } else {
      TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == out_features,
                  "int8 scales must be float32 (N,) or float16 (N, K/32)");
    }
    set_bias(bias_);
    weight_data = weight.data_ptr<uint8_t>();
    if (bits == 8) {  // chunks of OR-ed bytes, so that the loop vectorizes
      const uint8_t shift = sub_blocks ? 0 : NARROW_BASE;  // sub-blocks: below 64; else: in [112, 175]
      bool all = true;
      const int64_t count = weight.numel();
      for (int64_t i0 = 0; i0 < count && all; i0 += 4096) {
        uint8_t high = 0;
        for (int64_t i = i0; i < std::min(count, i0 + 4096); ++i) high |= (uint8_t)(weight_data[i] - shift);
        all = (high & 0xC0) == 0;
      }
      (sub_blocks ? small_bytes : narrow_bytes) = all;
    }
    if (scales.scalar_type() == at::kFloat) scale32 = scales.data_ptr<float>();
    else scale16 = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
    if (mins.defined() && mins.scalar_type() == at::kFloat) mins32 = mins.data_ptr<float>();
    else if (mins.defined()) mins16 = reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>());
  }

  // A layer whose weight holds values' low nibbles in the int4 layout (N, K/2): the start of the
  // super-block and five-bit layers.
  static std::shared_ptr<PackedLinear> on_low_nibbles(at::Tensor weight_, bool simd_) {
    auto l = std::shared_ptr<PackedLinear>(new PackedLinear());
    l->simd = simd_ && (LEAPLLM_VNNI || LEAPLLM_AVX2);
    l->weight = weight_.contiguous();
    TORCH_CHECK(l->weight.scalar_type() == at::kByte && l->weight.dim() == 2, "packed weight must be a 2-D uint8 tensor");
    l->out_features = l->weight.size(0);
    l->in_features = l->weight.size(1) * 2;
    l->weight_data = l->weight.data_ptr<uint8_t>();
    return l;
  }

  void set_bias(const c10::optional<at::Tensor>& bias_) {
    if (!bias_.has_value() || !bias_->defined()) return;
    bias = bias_->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == out_features, "bias must have out_features values");
    bias_data = bias.data_ptr<float>();
  }

  // A layer on GGUF K-quant super-blocks (super_blocks.h's layout).
  static std::shared_ptr<PackedLinear> from_super_blocks(at::Tensor weight_, c10::optional<at::Tensor> high_,
                                                         at::Tensor sub_scales_, c10::optional<at::Tensor> sub_mins_,
                                                         at::Tensor super_scales_, at::Tensor super_mins_,
                                                         c10::optional<at::Tensor> bias_, int64_t high_bits_,
                                                         int64_t group_, bool simd_) {
    auto l = on_low_nibbles(weight_, simd_);
    const int64_t n = l->out_features, k = l->in_features;
    l->bits = 4;
    l->super_blocks = true;
    l->high_bits = high_bits_;
    l->group = group_;
    TORCH_CHECK(k % SUPER_BLOCK == 0 && n % TILE == 0, "super-blocks need in_features % 256 == 0, out_features % 16 == 0");
    TORCH_CHECK(high_bits_ >= 0 && high_bits_ <= 2, "high_bits must be 0, 1 or 2");
    TORCH_CHECK(group_ == 16 || group_ == 32, "sub-blocks are of 16 or 32 features");
    if (high_bits_) {
      TORCH_CHECK(high_.has_value() && high_->scalar_type() == at::kByte && high_->numel() == n * k * high_bits_ / 8,
                  "high bits must be (N, K * high_bits / 8) uint8");
      l->high = high_->contiguous();
      l->high_data = l->high.data_ptr<uint8_t>();
    }
    l->sub_scales = sub_scales_.contiguous();
    TORCH_CHECK(l->sub_scales.scalar_type() == at::kChar && l->sub_scales.numel() == n * (k / group_),
                "sub-block scales must be (N, K / group) int8");
    l->sc_data = l->sub_scales.data_ptr<int8_t>();
    l->mn_data = l->sc_data;
    if (sub_mins_.has_value() && sub_mins_->defined()) {
      l->sub_mins = sub_mins_->contiguous();
      TORCH_CHECK(l->sub_mins.scalar_type() == at::kChar && l->sub_mins.numel() == l->sub_scales.numel(),
                  "sub-block minimums must be (N, K / group) int8");
      l->mn_data = l->sub_mins.data_ptr<int8_t>();
    }
    l->super_scales = super_scales_.contiguous();
    l->super_mins = super_mins_.contiguous();
    for (const auto* t : {&l->super_scales, &l->super_mins})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == n * (k / SUPER_BLOCK),
                  "super-block scales and minimums must be (N, K / 256) float32");
    l->D_data = l->super_scales.data_ptr<float>();
    l->M_data = l->super_mins.data_ptr<float>();
    l->set_bias(bias_);
    l->small_bytes = true;  // values of at most 6 bits
    return l;
  }

  // A layer on GGUF Q5_0 blocks as stored: w = d (u - 16), u = q + 16 in [0, 31], d float16 per block.
  static std::shared_ptr<PackedLinear> from_five_bit_blocks(at::Tensor weight_, at::Tensor high_, at::Tensor scales_,
                                                            c10::optional<at::Tensor> bias_, bool simd_) {
    auto l = on_low_nibbles(weight_, simd_);
    const int64_t n = l->out_features, k = l->in_features;
    l->bits = 8;  // int8 blocks, as the tiles of several rows on AVX2 and the portable loops run them
    l->five_bit = l->block_scales = true;
    l->narrow_bytes = true;  // u + 112 lies in [112, 143]
    TORCH_CHECK(k % BLOCK == 0 && n % TILE == 0, "five-bit blocks need in_features % 32 == 0, out_features % 16 == 0");
    l->high = high_.contiguous();
    TORCH_CHECK(l->high.scalar_type() == at::kByte && l->high.numel() == n * k / 8, "fifth bits must be (N, K / 8) uint8");
    l->scales = scales_.contiguous();
    TORCH_CHECK(l->scales.scalar_type() == at::kHalf && l->scales.numel() == n * (k / BLOCK),
                "five-bit block scales must be float16 (N, K/32)");
    l->set_bias(bias_);
    l->high_data = l->high.data_ptr<uint8_t>();
    l->scale16 = reinterpret_cast<const uint16_t*>(l->scales.data_ptr<at::Half>());
    return l;
  }

  // out[m * ldo + n] = row n . a[m] (+ bias) for n in [n0, n1) (multiples of 16), every m < rows.
  void compute_rows(const QuantizedRow* const* a, int64_t rows, int64_t n0, int64_t n1, float* out,
                    int64_t ldo) const {
    if (super_blocks) return compute_super_block_rows(a, rows, n0, n1, out, ldo);
    if (five_bit) return compute_five_bit_rows(a, rows, n0, n1, out, ldo);
    const int64_t blocks = in_features / BLOCK;
    const uint8_t* w = weight_data;
    const int64_t tile_bytes = TILE * in_features * bits / 8;
    // The AVX2 tiles have 16 registers for their unpacked weights and accumulators: 4 rows at a time,
    // the tile read again (from L1) for the next 4. A row's result is the same in any group.
    const int64_t row_group = simd && LEAPLLM_AVX2 ? 4 : MAX_ROWS;
    for (int64_t n = n0; n < n1; n += TILE) {
      const uint8_t* wt = w + n / TILE * tile_bytes;
      for (int64_t m0 = 0; m0 < rows; m0 += row_group) {
        const int mt = (int)std::min<int64_t>(row_group, rows - m0);
        tile(wt, n, a + m0, mt, blocks, out + m0 * ldo + n, ldo);
      }
      add_bias(n, rows, out, ldo);
    }
  }

  void add_bias(int64_t n, int64_t rows, float* out, int64_t ldo) const {
    if (!bias_data) return;
    const float* b = bias_data + n;
    for (int64_t m = 0; m < rows; ++m)
      for (int L = 0; L < TILE; ++L) out[m * ldo + n + L] += b[L];
  }

  // compute_rows on super-blocks. The VNNI tiles, and the AVX2 tile of one row, read them as stored.
  // Otherwise each tile is expanded once (into this thread's scratch) to the form whose tiles run it,
  // for all the rows: Q4_K's 4-bit values with 32-feature sub-blocks are already the int4 layout and
  // need only float scales; the others become int8 sub-blocks. Either way, the same bits.
  void compute_super_block_rows(const QuantizedRow* const* a, int64_t rows, int64_t n0, int64_t n1, float* out,
                                int64_t ldo) const {
    const int64_t blocks = in_features / BLOCK, subs = in_features / group, supers = in_features / SUPER_BLOCK;
    const int64_t high_tile = TILE * in_features * high_bits / 8;
#if LEAPLLM_VNNI || LEAPLLM_AVX2
    if (simd && (LEAPLLM_VNNI || rows == 1)) {
      for (int64_t n = n0; n < n1; n += TILE) {
        const int64_t t = n / TILE;
        const uint8_t* low = weight_data + t * TILE * in_features / 2;
        const uint8_t* hi = high_data ? high_data + t * high_tile : nullptr;
        const int8_t *sc = sc_data + t * TILE * subs, *mn = mn_data + t * TILE * subs;
        const float *D = D_data + t * TILE * supers, *M = M_data + t * TILE * supers;
        with_super_block_form(high_bits, group, [&](auto H, auto G) {
#if LEAPLLM_VNNI
          for (int64_t m0 = 0; m0 < rows; m0 += MAX_ROWS)
            with_rows((int)std::min<int64_t>(MAX_ROWS, rows - m0), [&](auto r) {
              tile_super_blocks_simd<decltype(r)::value, decltype(H)::value, decltype(G)::value>(
                  low, hi, sc, mn, D, M, a + m0, blocks, out + m0 * ldo + n, ldo);
            });
#else
          tile_super_blocks_one_row<decltype(H)::value, decltype(G)::value>(low, hi, sc, mn, D, M, *a[0], blocks,
                                                                            out + n);
#endif
        });
        add_bias(n, rows, out, ldo);
      }
      return;
    }
#endif
    const bool as_int4 = high_bits == 0 && group == 32;
    const int64_t step = as_int4 ? 32 : 16;  // features per expanded scale
    thread_local std::vector<float> d, mv;
    thread_local std::vector<uint8_t> u;
    d.resize(TILE * in_features / step);
    mv.resize(d.size());
    if (!as_int4) u.resize(TILE * in_features);
    const int64_t row_group = simd && LEAPLLM_AVX2 ? 4 : MAX_ROWS;
    for (int64_t n = n0; n < n1; n += TILE) {
      const int64_t t = n / TILE;
      expand_tile_scales(sc_data + t * TILE * subs, mn_data + t * TILE * subs, D_data + t * TILE * supers,
                         M_data + t * TILE * supers, group, step, in_features, d.data(), mv.data());
      const uint8_t* low = weight_data + t * TILE * in_features / 2;
      const uint8_t* hi = high_data ? high_data + t * high_tile : nullptr;
      if (high_bits == 2) expand_tile_values<2>(low, hi, blocks, u.data());
      else if (high_bits == 1) expand_tile_values<1>(low, hi, blocks, u.data());
      else if (!as_int4) expand_tile_values<0>(low, hi, blocks, u.data());
      for (int64_t m0 = 0; m0 < rows; m0 += row_group) {
        const int mt = (int)std::min<int64_t>(row_group, rows - m0);
        if (as_int4) tile_q4(low, d.data(), mv.data(), a + m0, mt, blocks, out + m0 * ldo + n, ldo);
        else tile_sub_blocks(u.data(), d.data(), mv.data(), a + m0, mt, blocks, out + m0 * ldo + n, ldo);
      }
      add_bias(n, rows, out, ldo);
    }
  }

  void tile(const uint8_t* wt, int64_t n, const QuantizedRow* const* a, int mt, int64_t blocks, float* out,
            int64_t ldo) const {
    if (bits == 4 && float_scales) {
      tile_q4(wt, scale32 + n * blocks, mins32 + n * blocks, a, mt, blocks, out, ldo);
    } else if (bits == 4) {
      tile_q4(wt, scale16 + n * blocks, mins16 + n * blocks, a, mt, blocks, out, ldo);
    } else if (sub_blocks) {
      tile_sub_blocks(wt, scale32 + 2 * n * blocks, mins32 + 2 * n * blocks, a, mt, blocks, out, ldo);
    } else if (block_scales) {
      const uint16_t* d = scale16 + n * blocks;
#if LEAPLLM_VNNI || LEAPLLM_AVX2
      if (simd)
        return with_rows(mt, [&](auto r) { tile_q8_blocks_simd<decltype(r)::value>(wt, d, a, blocks, out, ldo, narrow_bytes); });
#endif
      tile_blocks_portable<8, uint16_t>(wt, d, nullptr, a, mt, blocks, out, ldo);
    } else {
      const float* d = scale32 + n;
#if LEAPLLM_VNNI || LEAPLLM_AVX2
      if (simd) return with_rows(mt, [&](auto r) { tile_q8_simd<decltype(r)::value>(wt, d, a, blocks, out, ldo, narrow_bytes); });
#endif
      tile_q8_portable(wt, d, a, mt, blocks, out, ldo);
    }
  }

  // compute_rows on five-bit blocks: the VNNI tiles, and the AVX2 tile of one row, read them as stored;
  // otherwise each tile is expanded once into the int8 bytes u + 112 (this thread's scratch) and run
  // on the int8-block tiles. The same bits either way.
  void compute_five_bit_rows(const QuantizedRow* const* a, int64_t rows, int64_t n0, int64_t n1, float* out,
                             int64_t ldo) const {
    const int64_t blocks = in_features / BLOCK;
#if LEAPLLM_VNNI || LEAPLLM_AVX2
    if (simd && (LEAPLLM_VNNI || rows == 1)) {
      for (int64_t n = n0; n < n1; n += TILE) {
        const int64_t t = n / TILE;
        const uint8_t* low = weight_data + t * TILE * in_features / 2;
        const uint8_t* hi = high_data + t * TILE * in_features / 8;
        const uint16_t* d = scale16 + n * blocks;
#if LEAPLLM_VNNI
        for (int64_t m0 = 0; m0 < rows; m0 += MAX_ROWS)
          with_rows((int)std::min<int64_t>(MAX_ROWS, rows - m0), [&](auto r) {
            tile_q5_blocks_simd<decltype(r)::value>(low, hi, d, a + m0, blocks, out + m0 * ldo + n, ldo);
          });
#else
        tile_q5_blocks_one_row(low, hi, d, *a[0], blocks, out + n);
#endif
        add_bias(n, rows, out, ldo);
      }
      return;
    }
#endif
    thread_local std::vector<uint8_t> u;
    u.resize(TILE * in_features);
    const int64_t row_group = simd && LEAPLLM_AVX2 ? 4 : MAX_ROWS;
    for (int64_t n = n0; n < n1; n += TILE) {
      const int64_t t = n / TILE;
      expand_tile_values<1>(weight_data + t * TILE * in_features / 2, high_data + t * TILE * in_features / 8, blocks,
                            u.data(), NARROW_BASE);
      for (int64_t m0 = 0; m0 < rows; m0 += row_group)
        tile(u.data(), n, a + m0, (int)std::min<int64_t>(row_group, rows - m0), blocks, out + m0 * ldo + n, ldo);
      add_bias(n, rows, out, ldo);
    }
  }

  // An int8 sub-block tile: d and mn its float32 scales and minimums as (half block, row).
  void tile_sub_blocks(const uint8_t* wt, const float* d, const float* mn, const QuantizedRow* const* a, int mt,
                       int64_t blocks, float* out, int64_t ldo) const {
#if LEAPLLM_VNNI || LEAPLLM_AVX2
    if (simd) return with_rows(mt, [&](auto r) { tile_q8_sub_blocks_simd<decltype(r)::value>(wt, d, mn, a, blocks, out, ldo, small_bytes); });
#endif
    tile_q8_sub_blocks_portable(wt, d, mn, a, mt, blocks, out, ldo);
  }

  // An int4 tile, its scales and minimums stored as S (float16 bits or float32).
  template <class S>
  void tile_q4(const uint8_t* wt, const S* d, const S* mn, const QuantizedRow* const* a, int mt, int64_t blocks,
               float* out, int64_t ldo) const {
#if LEAPLLM_VNNI || LEAPLLM_AVX2
    if (simd) return with_rows(mt, [&](auto r) { tile_q4_simd<decltype(r)::value, S>(wt, d, mn, a, blocks, out, ldo); });
#endif
    tile_blocks_portable<4, S>(wt, d, mn, a, mt, blocks, out, ldo);
  }

  // Row n's block b as 32 floats: row L = n % 16 of tile n / 16.
  void dequantize_block(int64_t n, int64_t b, float* r) const {
    const int64_t blocks = in_features / BLOCK, t = n / TILE, L = n % TILE;
    if (five_bit) {  // as the int8 blocks' (stored - 128) * d, stored = u + 112
      const float dv = half_to_float(scale16[t * TILE * blocks + b * TILE + L]);
      float u[BLOCK];
      dequantize_super_block_values(weight_data + t * TILE * in_features / 2, high_data + t * TILE * in_features / 8, 1,
                                    b, (int)L, u);
      for (int i = 0; i < BLOCK; ++i) r[i] = (u[i] - 16.f) * dv;
      return;
    }
    if (super_blocks) {
      const int64_t subs = in_features / group, supers = in_features / SUPER_BLOCK;
      dequantize_super_block_block(weight_data + t * TILE * in_features / 2,
                                   high_data ? high_data + t * TILE * in_features * high_bits / 8 : nullptr, (int)high_bits,
                                   sc_data + t * TILE * subs, mn_data + t * TILE * subs, D_data + t * TILE * supers,
                                   M_data + t * TILE * supers, group, b, (int)L, r);
      return;
    }
    const uint8_t* wb = weight_data + t * (TILE * in_features * bits / 8) + b * (bits == 4 ? 256 : 512);
    if (bits == 4) {
      const int64_t at = t * TILE * blocks + b * TILE + L;  // (tile, block, row)
      const float dv = float_scales ? scale32[at] : half_to_float(scale16[at]);
      const float mv = float_scales ? mins32[at] : half_to_float(mins16[at]);
      for (int c = 0; c < 4; ++c) {
        for (int j = 0; j < 4; ++j) {
          const uint8_t byte = wb[c * 64 + 4 * L + j];
          r[4 * c + j] = (float)(byte & 15) * dv + mv;
          r[4 * (c + 4) + j] = (float)(byte >> 4) * dv + mv;
        }
      }
      return;
    }
    if (sub_blocks) {  // fma: one rounding of d * u + m, as the gguf package's d * (q - offset)
      for (int h = 0; h < 2; ++h) {
        const int64_t at = t * TILE * 2 * blocks + (2 * b + h) * TILE + L;  // (tile, half block, row)
        for (int qd = 4 * h; qd < 4 * h + 4; ++qd)
          for (int j = 0; j < 4; ++j) r[4 * qd + j] = std::fma((float)wb[qd * 64 + 4 * L + j], scale32[at], mins32[at]);
      }
      return;
    }
    const float dv = block_scales ? half_to_float(scale16[t * TILE * blocks + b * TILE + L]) : scale32[n];
    for (int qd = 0; qd < 8; ++qd)
      for (int j = 0; j < 4; ++j) r[4 * qd + j] = (float)((int)wb[qd * 64 + 4 * L + j] - 128) * dv;
  }

  // Row n of the weights as float32 values (K,).
  void dequantize_row(int64_t n, float* r) const {
    for (int64_t b = 0; b < in_features / BLOCK; ++b) dequantize_block(n, b, r + b * BLOCK);
  }

  // The weights as a dense (N, K) float32 or bfloat16 matrix: for many activation rows (prefill) a
  // GEMM on it beats the dot-product tiles.
  at::Tensor dequantize(at::ScalarType dtype) const {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize to float32 or bfloat16");
    auto out = at::empty({out_features, in_features}, at::TensorOptions().dtype(dtype));
    at::parallel_for(0, out_features / TILE, 4, [&](int64_t t0, int64_t t1) {
      std::vector<float> rows(TILE * in_features);
      for (int64_t t = t0; t < t1; ++t) {
        for (int L = 0; L < TILE; ++L) dequantize_row(t * TILE + L, rows.data() + L * in_features);
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

  // The rows of the weights that `indices` (int64, any shape) name, as float32 (..., K): an embedding
  // lookup on a quantized table, which then never exists as floats.
  at::Tensor dequantize_rows(at::Tensor indices) const {
    TORCH_CHECK(indices.scalar_type() == at::kLong, "row indices must be int64");
    auto idx = indices.contiguous();
    const int64_t count = idx.numel();
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < count; ++i)
      TORCH_CHECK(ip[i] >= 0 && ip[i] < out_features, "row index ", ip[i], " out of range [0, ", out_features, ")");
    std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end());
    shape.push_back(in_features);
    auto out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
    float* op = out.data_ptr<float>();
    at::parallel_for(0, count, 8, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dequantize_row(ip[i], op + i * in_features);
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
    // Many rows (prefill, batched steps): each thread sweeps its tiles once per chunk of rows, so the
    // chunk's activations stay in L2 while its share of the weights streams past; a row's result does
    // not depend on the chunking.
    const int64_t chunk = ROW_CHUNK;
    at::parallel_for(0, out_features / TILE, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t r0 = 0; r0 < rows; r0 += chunk)
        compute_rows(ptrs.data() + r0, std::min(chunk, rows - r0), t0 * TILE, t1 * TILE, op + r0 * out_features,
                     out_features);
    });
    return out.view(shape);
  }
};
