// GGUF block rows straight into the kernels' packed layouts, at load time.
//
// Why here: the loader used to decode each stored tensor into numpy arrays of values and factors,
// then tile them with PyTorch reshapes (kernels/packing.py): most of a big model's load, each weight
// touched a dozen times (benchmarks/README.md). Here a row is decoded once into its values u (one
// byte each) and its factors, and written into its tile's words, rows in parallel. The output is
// the very bytes of packing.py's pack_int4 / pack_int8_blocks / pack_super_blocks on the loader's
// decoded parts (the reference: tests compare them byte for byte).
//
// Forms (the `form` argument) and the outputs they fill, in this order (absent ones None):
//   int4          weight (N, K/2), scales, mins (N, K/32) float16: Q4_0, Q4_1
//   int8          weight (N, K) = q + 128, scales (N, K/32) float16: Q8_0, Q5_0 (q = u - 16)
//   int5          weight (N, K/2), high (N, K/8), scales (N, K/32) float16: Q5_0
//   super-blocks  weight (N, K/2), high (N, K*H/8), sub scales, sub mins (N, K/G) int8, super
//                 scales, super mins (N, K/256) float32: the K-quants, in a target sub-block size G
//                 and high-bit count H at least the type's own (a fused projection's parts of
//                 different K-quants share the most general form; see super_blocks.h)
#pragma once

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace {

enum GGMLType : int64_t { GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q8_0 = 8, GGML_Q2_K = 10,
                          GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14 };

inline uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t load_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline void store_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
inline float half_bits_to_float(uint16_t bits) { return (float)c10::Half(bits, c10::Half::from_bits()); }

// One stored row, decoded: u[K] and its factors per block (32) or sub-block (16 or 32) / super-block.
struct DecodedRow {
  std::vector<uint8_t> u;
  std::vector<uint16_t> half_scales;             // per 32 (float16 bits): Q5_0
  std::vector<int8_t> sub_scales, sub_mins;      // per the type's sub-block: the K-quants
  std::vector<float> super_scales, super_mins;   // per 256
  int group = 32;                                // the type's sub-block size
  bool has_mins = true;                          // K-quants: false where mn = sc
};

// Block sizes in bytes (32 or 256 weights): GGML_QUANT_SIZES.
inline int64_t block_bytes(int64_t type) {
  switch (type) {
    case GGML_Q4_0: return 18;
    case GGML_Q4_1: return 20;
    case GGML_Q5_0: return 22;
    case GGML_Q8_0: return 34;
    case GGML_Q2_K: return 84;
    case GGML_Q3_K: return 110;
    case GGML_Q4_K: return 144;
    case GGML_Q5_K: return 176;
    case GGML_Q6_K: return 210;
  }
  throw std::invalid_argument("GGML type " + std::to_string(type) + " has no packed form");
}

inline bool is_k_quant(int64_t type) { return type >= GGML_Q2_K && type <= GGML_Q6_K; }

// ggml's get_scale_min_k4 for all 8 sub-blocks of a Q4_K / Q5_K super-block.
inline void k4_scales_mins(const uint8_t* s, int8_t* sc, int8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = (int8_t)(s[j] & 63);
    mn[j] = (int8_t)(s[j + 4] & 63);
    sc[j + 4] = (int8_t)((s[j + 8] & 15) | ((s[j] >> 2) & 0x30));
    mn[j + 4] = (int8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30));
  }
}

// Q4_0's w = d (q - 8) as the int4 form's d q + m: the minimum -8 d (float16 bits), exact in
// float16 unless it overflows.
inline uint16_t q4_0_minimum(uint16_t d) {
  const c10::Half m(-8.0f * half_bits_to_float(d));
  if (!std::isfinite((float)m)) throw std::invalid_argument("a Q4_0 scale too large for float16");
  return m.x;
}

// One row of Q5_0 (blocks of 32): values u and float16 scales as stored. (Q4_0, Q4_1 and Q8_0 rows
// need no decoding: write_q4_row, write_q8_0_row.)
inline void decode_q5_0_row(const uint8_t* src, int64_t K, DecodedRow& row) {
  uint8_t* u = row.u.data();
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* x = src + b * 22;
    uint8_t* ub = u + b * 32;
    row.half_scales[b] = load_u16(x);
    const uint8_t* qs = x + 6;  // bit j of qh is value j's fifth bit
    const uint32_t qh = load_u32(x + 2);
    for (int j = 0; j < 16; ++j) {
      ub[j] = qs[j] & 15;
      ub[j + 16] = qs[j] >> 4;
    }
    for (int j = 0; j < 32; ++j) ub[j] |= (uint8_t)(((qh >> j) & 1) << 4);
  }
}

// Decodes row `src` (K weights) of `type` (not Q4_0, Q4_1 or Q8_0) into `row`, as gguf_tensors.py's
// int5_parts / int8_parts and _super_block_parts read it.
inline void decode_row(const uint8_t* src, int64_t type, int64_t K, DecodedRow& row) {
  if (type == GGML_Q5_0) return decode_q5_0_row(src, K, row);
  uint8_t* u = row.u.data();
  const int64_t bb = block_bytes(type);
  const int per_super = 256 / row.group;
  for (int64_t s = 0; s < K / 256; ++s) {
    const uint8_t* x = src + s * bb;
    uint8_t* us = u + s * 256;
    int8_t* sc = row.sub_scales.data() + s * per_super;
    int8_t* mn = row.has_mins ? row.sub_mins.data() + s * per_super : nullptr;
    switch (type) {
      case GGML_Q4_K:
      case GGML_Q5_K: {
        row.super_scales[s] = half_bits_to_float(load_u16(x));
        row.super_mins[s] = -half_bits_to_float(load_u16(x + 2));
        k4_scales_mins(x + 4, sc, mn);
        const uint8_t* qs = x + (type == GGML_Q4_K ? 16 : 48);
        for (int g = 0; g < 4; ++g)  // sub-blocks 2g and 2g + 1: the low and high nibbles of 32 bytes
          for (int l = 0; l < 32; ++l) {
            us[64 * g + l] = qs[32 * g + l] & 15;
            us[64 * g + 32 + l] = qs[32 * g + l] >> 4;
          }
        if (type == GGML_Q5_K) {
          const uint8_t* qh = x + 16;  // bit j of qh[l]: sub-block j's value l, fifth bit
          for (int j = 0; j < 8; ++j)
            for (int l = 0; l < 32; ++l) us[32 * j + l] |= (uint8_t)(((qh[l] >> j) & 1) << 4);
        }
        break;
      }
      case GGML_Q6_K: {
        const uint8_t *ql = x, *qh = x + 128;
        const float d = half_bits_to_float(load_u16(x + 208));
        row.super_scales[s] = d;
        row.super_mins[s] = -32.0f * d;  // w = d sc (u - 32)
        std::memcpy(sc, x + 192, 16);
        for (int a = 0; a < 2; ++a)
          for (int h = 0; h < 2; ++h)
            for (int e = 0; e < 64; ++e) us[128 * a + 64 * h + e] = (ql[64 * a + e] >> (4 * h)) & 15;
        for (int a = 0; a < 2; ++a)
          for (int j = 0; j < 4; ++j)
            for (int l = 0; l < 32; ++l) us[128 * a + 32 * j + l] |= (uint8_t)(((qh[32 * a + l] >> (2 * j)) & 3) << 4);
        break;
      }
      case GGML_Q3_K: {
        const uint8_t *hmask = x, *qs = x + 32, *packed = x + 96;
        const float d = half_bits_to_float(load_u16(x + 108));
        row.super_scales[s] = d;
        row.super_mins[s] = -4.0f * d;  // w = d sc (u - 4)
        for (int i = 0; i < 16; ++i) {
          const int low4 = i < 8 ? packed[i] & 15 : packed[i - 8] >> 4;
          const int high2 = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
          sc[i] = (int8_t)((low4 | (high2 << 4)) - 32);
        }
        for (int a = 0; a < 2; ++a)
          for (int j = 0; j < 4; ++j)
            for (int l = 0; l < 32; ++l) us[128 * a + 32 * j + l] = (qs[32 * a + l] >> (2 * j)) & 3;
        for (int j = 0; j < 8; ++j)
          for (int l = 0; l < 32; ++l) us[32 * j + l] |= (uint8_t)(((hmask[l] >> j) & 1) << 2);
        break;
      }
      case GGML_Q2_K: {
        const uint8_t *scales = x, *qs = x + 16;
        row.super_scales[s] = half_bits_to_float(load_u16(x + 80));
        row.super_mins[s] = -half_bits_to_float(load_u16(x + 82));
        for (int i = 0; i < 16; ++i) {
          sc[i] = (int8_t)(scales[i] & 15);
          mn[i] = (int8_t)(scales[i] >> 4);
        }
        for (int a = 0; a < 2; ++a)
          for (int j = 0; j < 4; ++j)
            for (int l = 0; l < 32; ++l) us[128 * a + 32 * j + l] = (qs[32 * a + l] >> (2 * j)) & 3;
        break;
      }
    }
  }
}

// Where row R's values and factors go in the tile layouts (kernels/packing.py).
struct TiledRow {
  int64_t tile, lane, blocks;  // R / 16, R % 16, K / 32
  // Column `col` of (N, cols) factors, stored as (tile, column, row).
  int64_t factor(int64_t col, int64_t cols) const { return (tile * cols + col) * TILE + lane; }
};

// The int4 layout: per (tile, block), vector c < 4 holds quad c in its low nibbles and quad c + 4 in
// its high ones; byte 4 lane + j of a vector is the row's value 4 c + j of the quad.
inline void write_low_nibbles(const uint8_t* u, const TiledRow& r, uint8_t* weight) {
  for (int64_t b = 0; b < r.blocks; ++b) {
    uint8_t* out = weight + (r.tile * r.blocks + b) * 256 + 4 * r.lane;
    const uint8_t* ub = u + b * 32;
    for (int c = 0; c < 4; ++c)
      store_u32(out + 64 * c, (load_u32(ub + 4 * c) & 0x0F0F0F0Fu) | ((load_u32(ub + 16 + 4 * c) & 0x0F0F0F0Fu) << 4));
  }
}

// A Q4_0 / Q4_1 row straight into the int4 layout, without decoding its values: byte j of a block's
// nibbles holds values j and j + 16 in its low and high nibbles, which is write_low_nibbles' byte
// j of quad j / 4, so each quad's word is 4 of the stored bytes. Most of the default model's load
// packed these rows.
inline void write_q4_row(const uint8_t* src, int64_t type, const TiledRow& r, uint8_t* weight, uint8_t* scales,
                         uint8_t* mins) {
  const int64_t bb = type == GGML_Q4_1 ? 20 : 18, nibbles = type == GGML_Q4_1 ? 4 : 2;
  auto* sc = reinterpret_cast<uint16_t*>(scales);
  auto* mn = reinterpret_cast<uint16_t*>(mins);
  for (int64_t b = 0; b < r.blocks; ++b) {
    const uint8_t* x = src + b * bb;
    uint8_t* out = weight + (r.tile * r.blocks + b) * 256 + 4 * r.lane;
    for (int c = 0; c < 4; ++c) store_u32(out + 64 * c, load_u32(x + nibbles + 4 * c));
    const uint16_t d = load_u16(x);
    sc[r.factor(b, r.blocks)] = d;
    mn[r.factor(b, r.blocks)] = type == GGML_Q4_1 ? load_u16(x + 2) : q4_0_minimum(d);
  }
}

// A Q8_0 row straight into the int8 layout, without decoding its values: each quad's word is 4 of
// the stored int8 bytes with their sign bits flipped (q + 128). The default model's output head.
inline void write_q8_0_row(const uint8_t* src, const TiledRow& r, uint8_t* weight, uint8_t* scales) {
  auto* sc = reinterpret_cast<uint16_t*>(scales);
  for (int64_t b = 0; b < r.blocks; ++b) {
    const uint8_t* x = src + b * 34;
    uint8_t* out = weight + (r.tile * r.blocks + b) * 512 + 4 * r.lane;
    for (int c = 0; c < 8; ++c) store_u32(out + 64 * c, load_u32(x + 2 + 4 * c) ^ 0x80808080u);
    sc[r.factor(b, r.blocks)] = load_u16(x);
  }
}

// The int8 layout: per (tile, block), 8 quad vectors of the values' bytes, plus `offset` (mod 256).
// (offset is added to 4 bytes at once: the callers' bytes plus offset stay below 256, so no carry.)
inline void write_bytes(const uint8_t* u, const TiledRow& r, uint8_t offset, uint8_t* weight) {
  const uint32_t add = 0x01010101u * offset;
  for (int64_t b = 0; b < r.blocks; ++b) {
    uint8_t* out = weight + (r.tile * r.blocks + b) * 512 + 4 * r.lane;
    for (int c = 0; c < 8; ++c) store_u32(out + 64 * c, load_u32(u + b * 32 + 4 * c) + add);
  }
}

// The high-bit planes of super_blocks.h: H = 1: bit c of byte 4 lane + j is quad c's fifth bit;
// H = 2: vector p's bits 2 q, 2 q + 1 hold quad 4 p + q's two high bits. (4 bytes at once: each
// byte's bits are masked before they move up within it, so none crosses into the next byte.)
inline void write_high_bits(const uint8_t* u, const TiledRow& r, int H, uint8_t* high) {
  const uint32_t mask = H == 1 ? 0x01010101u : 0x03030303u;
  for (int64_t b = 0; b < r.blocks; ++b) {
    const uint8_t* ub = u + b * 32;
    uint8_t* out = high + (r.tile * r.blocks + b) * 64 * H + 4 * r.lane;
    for (int p = 0; p < H; ++p) {
      uint32_t word = 0;
      for (int q = 0; q < 8 / H; ++q) word |= ((load_u32(ub + 4 * ((8 / H) * p + q)) >> 4) & mask) << (H * q);
      store_u32(out + 64 * p, word);
    }
  }
}

// The high bits a form keeps in planes beside the low nibbles: the target's for super-blocks, Q5_0's
// fifth bit for int5, none for int4 and int8.
inline int64_t plane_high_bits(const std::string& form, int64_t high_bits) {
  return form == "super-blocks" ? high_bits : form == "int5" ? 1 : 0;
}

// Packs `count` stored rows into rows row0 .. row0 + count of the form's outputs (see the top).
// rows[i] is the stored row for output row row0 + i (a row map undoes llama.cpp's Q/K order).
// Rows go tile by tile across threads, so no two threads write one tile.
inline void pack_gguf_rows(const uint8_t* data, int64_t row_stride, const int64_t* rows, int64_t count, int64_t row0,
                           int64_t type, int64_t K, const std::string& form, const std::vector<uint8_t*>& out,
                           int64_t group, int64_t high_bits) {
  if (K % 32 || (is_k_quant(type) && K % 256)) throw std::invalid_argument("row length does not fill whole blocks");
  const bool k_quant = is_k_quant(type);
  const bool ok = (form == "int4" && (type == GGML_Q4_0 || type == GGML_Q4_1)) ||
                  (form == "int8" && (type == GGML_Q8_0 || type == GGML_Q5_0)) ||
                  (form == "int5" && type == GGML_Q5_0) || (form == "super-blocks" && k_quant);
  if (!ok) throw std::invalid_argument("GGML type " + std::to_string(type) + " has no packed form " + form);
  const int type_group = (type == GGML_Q4_K || type == GGML_Q5_K) ? 32 : 16;
  const bool type_mins = type == GGML_Q4_K || type == GGML_Q5_K || type == GGML_Q2_K;
  const int type_high = type == GGML_Q5_K ? 1 : type == GGML_Q6_K ? 2 : 0;
  if (k_quant && (group > type_group || type_group % group || high_bits < type_high || high_bits > 2 ||
                  (type_mins && out[3] == nullptr)))
    throw std::invalid_argument("the target super-block form cannot hold GGML type " + std::to_string(type));
  // (the form's parts, decided once here rather than per row)
  const bool full_bytes = form == "int8", int4 = form == "int4";
  const int H = (int)plane_high_bits(form, high_bits);
  const int64_t first_tile = row0 / TILE, last_tile = (row0 + count + TILE - 1) / TILE;
  std::string error;
#pragma omp parallel
  {
    DecodedRow row;
    row.u.resize(K);
    row.half_scales.resize(K / 32);
    row.group = type_group;
    row.has_mins = type_mins;
    row.sub_scales.resize(K / 16);
    row.sub_mins.resize(K / 16);
    row.super_scales.resize(K / 256 + 1);
    row.super_mins.resize(K / 256 + 1);
#pragma omp for schedule(static)
    for (int64_t t = first_tile; t < last_tile; ++t) {
      for (int64_t R = std::max(row0, t * TILE); R < std::min(row0 + count, (t + 1) * TILE); ++R) {
        const TiledRow r{R / TILE, R % TILE, K / 32};
        try {
          if (int4) {  // Q4_0 and Q4_1, whose stored bytes are the layout's
            write_q4_row(data + rows[R - row0] * row_stride, type, r, out[0], out[2], out[3]);
            continue;
          }
          if (full_bytes && type == GGML_Q8_0) {
            write_q8_0_row(data + rows[R - row0] * row_stride, r, out[0], out[2]);
            continue;
          }
          decode_row(data + rows[R - row0] * row_stride, type, K, row);
        } catch (const std::exception& e) {
#pragma omp critical
          error = e.what();
          continue;
        }
        const uint8_t* u = row.u.data();
        if (full_bytes) {
          write_bytes(u, r, 112, out[0]);  // Q5_0, the only int8-form type decoded here: q - 16 + 128
        } else {
          write_low_nibbles(u, r, out[0]);
          if (H) write_high_bits(u, r, H, out[1]);
        }
        if (!k_quant) {
          auto* scales = reinterpret_cast<uint16_t*>(out[2]);
          for (int64_t b = 0; b < K / 32; ++b) scales[r.factor(b, K / 32)] = row.half_scales[b];
          continue;
        }
        auto* sc = reinterpret_cast<int8_t*>(out[2]);
        auto* mn = reinterpret_cast<int8_t*>(out[3]);
        const int64_t cols = K / group, repeat = type_group / group;
        for (int64_t g = 0; g < cols; ++g) {  // smaller target sub-blocks repeat the type's factors
          sc[r.factor(g, cols)] = row.sub_scales[g / repeat];
          if (mn) mn[r.factor(g, cols)] = type_mins ? row.sub_mins[g / repeat] : row.sub_scales[g / repeat];
        }
        auto* D = reinterpret_cast<float*>(out[4]);
        auto* M = reinterpret_cast<float*>(out[5]);
        for (int64_t s = 0; s < K / 256; ++s) {
          D[r.factor(s, K / 256)] = row.super_scales[s];
          M[r.factor(s, K / 256)] = row.super_mins[s];
        }
      }
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);
}

// The binding: data is the stored rows (a read-only buffer such as a numpy view of the memory-mapped
// file, rows contiguous), rows an int64 tensor; the outputs' shapes and dtypes are checked against
// the form before a byte is written.
inline void pack_gguf_rows_into(pybind11::buffer data, at::Tensor rows, int64_t row0, int64_t type, int64_t K,
                                const std::string& form, std::vector<c10::optional<at::Tensor>> outputs,
                                int64_t group, int64_t high_bits) {
  const pybind11::buffer_info info = data.request();
  TORCH_CHECK(info.ndim == 2 && info.itemsize == 1 && info.strides[1] == 1,
              "data: stored rows of bytes, each contiguous");
  const int64_t weights_per_block = is_k_quant(type) ? 256 : 32;
  TORCH_CHECK(info.shape[1] * weights_per_block == K * block_bytes(type), "data: rows of ", info.shape[1],
              " bytes do not hold ", K, " weights of GGML type ", type);
  TORCH_CHECK(rows.dtype() == at::kLong && rows.dim() == 1 && rows.is_contiguous(), "rows: a 1-D int64 tensor");
  const int64_t count = rows.size(0);
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) TORCH_CHECK(row_ids[i] >= 0 && row_ids[i] < info.shape[0], "rows: out of range");
  TORCH_CHECK(outputs.size() == 6, "outputs: weight, high, scales, mins, super scales, super mins");
  const bool k_quant = form == "super-blocks";
  const int64_t H = plane_high_bits(form, high_bits);
  const int64_t factor_cols = k_quant ? K / group : K / 32;
  const at::ScalarType factor_type = k_quant ? at::kChar : at::kHalf;
  const std::vector<std::tuple<int64_t, at::ScalarType, bool>> expected = {  // columns, dtype, required
      {form == "int8" ? K : K / 2, at::kByte, true}, {K * H / 8, at::kByte, H > 0},
      {factor_cols, factor_type, true}, {factor_cols, factor_type, form == "int4"},
      {K / 256, at::kFloat, k_quant}, {K / 256, at::kFloat, k_quant}};
  std::vector<uint8_t*> out(6, nullptr);
  for (size_t i = 0; i < 6; ++i) {
    const auto& [cols, dtype, required] = expected[i];
    if (!outputs[i].has_value()) {
      TORCH_CHECK(!required || (k_quant && i == 3), "outputs[", i, "] is needed for the form ", form);
      continue;
    }
    const at::Tensor& t = *outputs[i];
    TORCH_CHECK(t.dtype() == dtype && t.dim() == 2 && t.size(1) == cols && t.is_contiguous() &&
                    t.size(0) % TILE == 0 && row0 >= 0 && row0 + count <= t.size(0),
                "outputs[", i, "]: wrong dtype, shape or rows for the form ", form);
    out[i] = static_cast<uint8_t*>(t.data_ptr());
  }
  const auto* base = static_cast<const uint8_t*>(info.ptr);
  const int64_t stride = info.strides[0];
  pybind11::gil_scoped_release release;
  pack_gguf_rows(base, stride, row_ids, count, row0, type, K, form, out, group, high_bits);
}

}  // namespace
