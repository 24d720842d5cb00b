// GGUF's K-quants near the file's size: super-blocks of 256 weights under a float scale and
// minimum factor (per row), sub-blocks of 16 or 32 with small integer scales and minimums, values
// of 2 to 6 bits. w = (D sc) u + (M mn), where D sc and M mn are exact float32 products (an 11-bit
// float16 times an integer of at most 8 bits), so they are the very factors the int8 sub-block and
// float32-scale int4 forms store (common.h): expanding a tile into those forms and running their
// tiles gives their bits exactly, at 4.75 to 6.6 bits a weight read from memory instead of 6 or 12.
//
// Layout (built by leapllm/kernels/packing.py: pack_super_blocks), tile by tile:
//   weight     (N, K/2) uint8: the values' low 4 bits in the int4 layout.
//   high       (N, K * H / 8) uint8, H = 1 or 2 high bits (absent for H = 0): per (tile, block), H
//              64-byte vectors; byte i of vector p holds, for quads c = 4p .. 4p + 3 (H = 2; for H = 1
//              one vector and quads 0 .. 7), quad c's high bits of byte i at bits H (c - 4p) upwards.
//   sub_scales (N, K/G) int8, G = 16 or 32, as (tile, sub-block, row); sub_mins the same, or absent:
//              then mn = sc (the symmetric types, Q6_K and Q3_K, whose minimum is a fixed multiple).
//   super_scales, super_mins (N, K/256) float32 as (tile, super-block, row): D and M.
#pragma once

#include "common.h"

namespace {

constexpr int64_t SUPER_BLOCK = 256;

// One tile's values u = low nibble | high << 4, plus offset, in the int8 layout (bytes, 8 quad
// vectors a block).
template <int H>
void expand_tile_values(const uint8_t* low, const uint8_t* high, int64_t blocks, uint8_t* u, uint8_t offset = 0) {
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* lb = low + b * 256;
    const uint8_t* hb = high + b * 64 * H;
    uint8_t* ub = u + b * 512;
    for (int c = 0; c < 8; ++c) {
      const uint8_t* src = lb + (c & 3) * 64;
      const int shift = c < 4 ? 0 : 4;
      for (int i = 0; i < 64; ++i) {
        uint8_t v = (uint8_t)((src[i] >> shift) & 15);
        if constexpr (H == 1) v |= (uint8_t)(((hb[i] >> c) & 1) << 4);
        if constexpr (H == 2) v |= (uint8_t)(((hb[(c >> 2) * 64 + i] >> (2 * (c & 3))) & 3) << 4);
        ub[c * 64 + i] = (uint8_t)(v + offset);
      }
    }
  }
}

// One tile's float scales and minimums per `step` features (16 or 32, a multiple of its sub-block
// size `group`), as (step, row): d = D sc, m = M mn.
inline void expand_tile_scales(const int8_t* sc, const int8_t* mn, const float* D, const float* M, int64_t group,
                               int64_t step, int64_t in_features, float* d, float* m) {
  for (int64_t j = 0; j < in_features / step; ++j) {
    const int64_t g = j * step / group, s = j * step / SUPER_BLOCK;
    for (int L = 0; L < TILE; ++L) {
      d[j * TILE + L] = D[s * TILE + L] * (float)sc[g * TILE + L];
      m[j * TILE + L] = M[s * TILE + L] * (float)mn[g * TILE + L];
    }
  }
}

// Row L of a tile's block b: its 32 values (low nibbles and high_bits high bits), as floats.
inline void dequantize_super_block_values(const uint8_t* low, const uint8_t* high, int high_bits, int64_t b, int L,
                                          float* u) {
  const uint8_t* lb = low + b * 256;
  const uint8_t* hb = high_bits ? high + b * 64 * high_bits : nullptr;
  for (int c = 0; c < 8; ++c) {
    for (int j = 0; j < 4; ++j) {
      const int i = 4 * L + j;
      int v = (lb[(c & 3) * 64 + i] >> (c < 4 ? 0 : 4)) & 15;
      if (high_bits == 1) v |= ((hb[i] >> c) & 1) << 4;
      if (high_bits == 2) v |= ((hb[(c >> 2) * 64 + i] >> (2 * (c & 3))) & 3) << 4;
      u[4 * c + j] = (float)v;
    }
  }
}

// Row L of a tile's block b as 32 weights (fma: one rounding, as the gguf package's own).
inline void dequantize_super_block_block(const uint8_t* low, const uint8_t* high, int high_bits, const int8_t* sc,
                                         const int8_t* mn, const float* D, const float* M, int64_t group, int64_t b,
                                         int L, float* r) {
  float u[BLOCK];
  dequantize_super_block_values(low, high, high_bits, b, L, u);
  for (int i = 0; i < BLOCK; ++i) {
    const int64_t feature = b * BLOCK + i, g = feature / group, s = feature / SUPER_BLOCK;
    const float dv = D[s * TILE + L] * (float)sc[g * TILE + L], mv = M[s * TILE + L] * (float)mn[g * TILE + L];
    r[i] = std::fma(u[i], dv, mv);
  }
}

}  // namespace
