// Causal attention of a chunk of query tokens over a contiguous KV cache (a prompt's prefill, a
// verification chunk outside the fused step): the part of a 512-token prefill that PyTorch's SDPA
// ran at about a third of the float32 peak on grouped-query heads.
//
// Work item: one kv head of one batch row and a block of query positions, with every query head of
// that kv head's group stacked as rows (position-major, so a few consecutive rows share a causal
// limit). Each item computes its rows' scores against every key they see as a GEMM, the exact
// softmax of each row, then the probabilities times the values as a second GEMM. Both GEMMs are
// C (6 x 16) += A (6 x K) B (K x 16) register tiles: the keys are repacked per (row, kv head) once,
// transposed in panels of 16 (and widened from float16 where the cache is), so that the scores'
// B is a panel; the values' B is 16 columns of the value rows.
#pragma once

#include <omp.h>

#include "attention.h"
#include "common.h"

constexpr int64_t PANEL = 16;     // keys (scores) or value columns (output) per register tile
constexpr int64_t TILE_ROWS = 6;  // query rows per register tile

// c[r][0 .. 16) = sum over k < K of a[r * lda + k] * b[k * ldb + 0 .. 16), r < R.
template <int R>
inline void panel_product(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, float* c,
                          int64_t ldc) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R][2];
  LEAPLLM_UNROLL
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
    LEAPLLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  LEAPLLM_UNROLL
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
#else
  for (int r = 0; r < R; ++r) {
    float acc[PANEL] = {0.f};
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < PANEL; ++j) acc[j] += a[r * lda + k] * b[k * ldb + j];
    std::memcpy(c + r * ldc, acc, sizeof(acc));
  }
#endif
}

// panel_product for the first `rows` (1 .. TILE_ROWS) rows.
inline void panel_rows(int64_t rows, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, float* c,
                       int64_t ldc) {
  switch (rows) {
    case 6: return panel_product<6>(a, lda, b, ldb, K, c, ldc);
    case 5: return panel_product<5>(a, lda, b, ldb, K, c, ldc);
    case 4: return panel_product<4>(a, lda, b, ldb, K, c, ldc);
    case 3: return panel_product<3>(a, lda, b, ldb, K, c, ldc);
    case 2: return panel_product<2>(a, lda, b, ldb, K, c, ldc);
    default: return panel_product<1>(a, lda, b, ldb, K, c, ldc);
  }
}

// Attention of n new tokens per batch row, at positions start .. start + n - 1, each over the cached
// keys it sees (positions 0 .. its own; the last `window` of them with window > 0): q (d, heads, n, hd)
// float32, any strides; k_cache, v_cache (d, kv_heads, max_seq, hd), float32 or float16, positions
// 0 .. start + n - 1 written. -> (d, n, heads, hd) float32 (the layout the output projection reads).
at::Tensor cached_prefill_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, int64_t start,
                                    int64_t window, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && v_cache.scalar_type() == k_cache.scalar_type(),
              "cached_prefill_attention takes float32 queries and caches of one dtype");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.size(0) == q.size(0) && k_cache.size(3) == q.size(3),
              "q must be (d, heads, n, hd) and the caches (d, kv_heads, max_seq, hd)");
  const int64_t d = q.size(0), heads = q.size(1), n = q.size(2), hd = q.size(3), kv_heads = k_cache.size(1);
  const int64_t max_seq = k_cache.size(2), keys = start + n;
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(n >= 1 && start >= 0 && keys <= max_seq, "positions ", start, " .. ", keys - 1,
              " are outside a cache of ", max_seq);
  TORCH_CHECK(hd % PANEL == 0, "head_dim must be a multiple of ", PANEL);
  const int64_t group = heads / kv_heads, padded = (keys + PANEL - 1) / PANEL * PANEL;
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  auto out = at::empty({d, n, heads, hd}, q.options());
  // Keys transposed in panels of 16 (kt[b][g][panel][hd][16]; past the last key, zeros) and values
  // (vf[b][g][key][hd]), both float32.
  std::vector<float> kt(d * kv_heads * padded * hd), vf(d * kv_heads * padded * hd, 0.f);
  with_rows(k_cache, v_cache, "the caches", [&](const auto* kp, const auto* vp) {
    const int64_t panels = padded / PANEL;
    at::parallel_for(0, d * kv_heads * panels, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t head = item / panels, p = item % panels;  // head = b * kv_heads + g
        float* panel = kt.data() + (head * panels + p) * hd * PANEL;
        for (int64_t j = 0; j < PANEL; ++j) {
          const int64_t key = p * PANEL + j;
          float* v_row = vf.data() + (head * padded + key) * hd;
          if (key >= keys) {
            for (int64_t i = 0; i < hd; ++i) panel[i * PANEL + j] = 0.f;
            continue;
          }
          const auto* k_row = kp + (head * max_seq + key) * hd;
          const auto* v_src = vp + (head * max_seq + key) * hd;
          for (int64_t i = 0; i < hd; ++i) {
            panel[i * PANEL + j] = widen(k_row[i]);
            v_row[i] = widen(v_src[i]);
          }
        }
      }
    });
  });
  // Query blocks small enough that an item's scores (rows x keys) stay within about 256 KiB.
  const int64_t block = std::max<int64_t>(2, std::min<int64_t>(32, 65536 / (group * padded)));
  const int64_t blocks = (n + block - 1) / block;
  const float* q_base = q.data_ptr<float>();
  const auto qs = q.strides();
  float* out_base = out.data_ptr<float>();
  const float sc = (float)scale;
  const int64_t items = d * kv_heads * blocks;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qb(block * group * hd), scores(block * group * padded), ob(block * group * hd);
    // Later query blocks see more keys: they go first, and threads take items one at a time.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t head = it / blocks, qblock = blocks - 1 - it % blocks;
      const int64_t b = head / kv_heads, g = head % kv_heads;
      const int64_t i0 = qblock * block, i1 = std::min(n, i0 + block), rows = (i1 - i0) * group;
      // Row r: position i0 + r / group, query head g * group + r % group, scaled by the softmax scale.
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = q_base + b * qs[0] + (g * group + r % group) * qs[1] + (i0 + r / group) * qs[2];
        for (int64_t i = 0; i < hd; ++i) qb[r * hd + i] = src[i * qs[3]] * sc;
      }
      // Keys first .. last of a row: first_of / last_of its position; the block's range is k0 .. k1 - 1.
      auto last_of = [&](int64_t r) { return start + i0 + r / group; };
      auto first_of = [&](int64_t r) { return window > 0 ? std::max<int64_t>(0, last_of(r) + 1 - window) : 0; };
      const int64_t k0 = first_of(0) / PANEL * PANEL, k1 = std::min(padded, (last_of(rows - 1) / PANEL + 1) * PANEL);
      const int64_t span = k1 - k0;
      const float* panels = kt.data() + head * padded * hd;
      for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        const int64_t tr = std::min(TILE_ROWS, rows - r0);
        const int64_t end = std::min(k1, (last_of(r0 + tr - 1) / PANEL + 1) * PANEL);  // this tile's keys
        for (int64_t p = k0; p < end; p += PANEL)
          panel_rows(tr, qb.data() + r0 * hd, hd, panels + p * hd, PANEL, hd, scores.data() + r0 * span + (p - k0),
                     span);
      }
      // Each row's softmax over the keys it sees; every other score of the block becomes 0.
      for (int64_t r = 0; r < rows; ++r) {
        float* s = scores.data() + r * span;
        const int64_t f = first_of(r) - k0, l = last_of(r) - k0 + 1;
        const float inv = 1.f / exp_shifted(s + f, l - f).second;
        std::fill(s, s + f, 0.f);
        for (int64_t k = f; k < l; ++k) s[k] *= inv;
        std::fill(s + l, s + span, 0.f);
      }
      const float* values = vf.data() + (head * padded + k0) * hd;
      for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        const int64_t tr = std::min(TILE_ROWS, rows - r0);
        const int64_t used = std::min(k1, (last_of(r0 + tr - 1) / PANEL + 1) * PANEL) - k0;
        for (int64_t c = 0; c < hd; c += PANEL)
          panel_rows(tr, scores.data() + r0 * span, span, values + c, hd, used, ob.data() + r0 * hd + c, hd);
      }
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(out_base + ((b * n + i0 + r / group) * heads + g * group + r % group) * hd, ob.data() + r * hd,
                    hd * sizeof(float));
    }
  }
  return out;
}
