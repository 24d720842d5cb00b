// Attention of one query token over n positions. The fused decode step (a contiguous cache, cut in
// spans), cached_decode_attention (a batch of contiguous caches) and paged_decode_attention (rows
// scattered in a pool) share its three steps: scores, softmax, weighted sum of the values; key(s) and
// value(s) give position s's row of hd values. Each position's score and each output lane are
// computed by the same instructions wherever the position falls in the loop, so a token's attention
// has the same bits in a one-token step and in a multi-token verification (speculative decoding
// relies on it).
//
// Rows are float32 or float16 (a KV cache kept at half width, as llama.cpp keeps its own): every
// load widens to float32, so what follows a load is the same arithmetic for both.
#pragma once

#include <ATen/Parallel.h>

#include "common.h"

inline float widen(float v) { return v; }
inline float widen(c10::Half v) { return static_cast<float>(v); }

// A float32 row as stored in a cache of element type T: copied, or rounded to nearest even (the
// rounding torch's .to(torch.float16) does, so a key written here and one written by PyTorch agree).
inline void store_row(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(const float* src, int64_t n, c10::Half* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(f);
#endif
}

// out[0 .. 8 NV) = sum over s of p[s] * row(s)[0 .. 8 NV), NV vectors kept in registers.
template <int NV, class Row>
void weighted_rows(const float* p, int64_t n, Row row, int64_t offset, float* out) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    const auto* r = row(s) + offset;
    const __m256 ps = _mm256_set1_ps(p[s]);
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(ps, load8(r + 8 * v), acc[v]);
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
      decltype(key(0)) k[8];
      for (int64_t p = 0; p < 8; ++p) k[p] = key(s0 + std::min<int64_t>(p, count - 1));  // a short block repeats its last row
      for (int64_t j = 0; j < group; ++j) {
        const float* qj = q + j * hd;
        // 8 accumulators in registers: every block computes 8 dot products (the fixed trip count
        // keeps them out of memory); a short block's extra ones are dropped below
        __m256 acc[8];
        for (int p = 0; p < 8; ++p) acc[p] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
          const __m256 qv = _mm256_loadu_ps(qj + i);
          for (int p = 0; p < 8; ++p) acc[p] = _mm256_fmadd_ps(qv, load8(k[p] + i), acc[p]);
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
    const auto* k = key(s);
    for (int64_t j = 0; j < group; ++j) {
      const float* qj = q + j * hd;
      float dot = 0.f;
      for (int64_t i = 0; i < hd; ++i) dot += qj[i] * widen(k[i]);
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
    const auto* v = value(s);
    for (int64_t i = c; i < hd; ++i) out[i] += p[s] * widen(v[i]);
  }
}

// One kv head's group of query heads (group, hd) over positions 0 .. len - 1 -> out (group, hd);
// scores holds group * len floats.
template <class KeyRow, class ValueRow>
void attend_group(const float* q, int64_t group, int64_t hd, int64_t len, KeyRow key, ValueRow value, float scale,
                  float* scores, float* out) {
  attention_scores(q, group, hd, len, key, scale, scores);
  for (int64_t j = 0; j < group; ++j) {
    float* sc = scores + j * len;
    const float inv = 1.f / exp_shifted(sc, len).second;
    for (int64_t t = 0; t < len; ++t) sc[t] *= inv;
    weighted_value_sum(sc, len, value, hd, out + j * hd);
  }
}

// Calls body(keys, values) with the data of two float32 or two float16 tensors, typed.
template <class Body>
void with_rows(const at::Tensor& k, const at::Tensor& v, const char* what, Body body) {
  if (k.scalar_type() == at::kFloat) {
    body(k.data_ptr<float>(), v.data_ptr<float>());
  } else {
    TORCH_CHECK(k.scalar_type() == at::kHalf, what, " must be float32 or float16");
    body(static_cast<const c10::Half*>(k.data_ptr()), static_cast<const c10::Half*>(v.data_ptr()));
  }
}

// Attention of one new token per sequence over its keys and values in a paged pool (the serving
// engine's decode steps), read where they lie in the pool instead of gathered into a padded copy
// first: q (d, heads, hd) float32; k_pool, v_pool (slots, kv_heads, hd), float32 or float16; slots
// (d, max_len) int64, the pool rows of each sequence's positions (anything past its length is
// ignored); lengths (d,) int64. -> (d, heads, hd) float32. Query head h reads kv head h / (heads / kv_heads).
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots,
                                  at::Tensor lengths, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && v_pool.scalar_type() == k_pool.scalar_type(),
              "paged_decode_attention takes float32 queries and pools of one dtype");
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
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  with_rows(k_pool, v_pool, "the pools", [&](const auto* kp, const auto* vp) {
    at::parallel_for(0, d * kv_heads, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(group * max_len);
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t b = item / kv_heads, g = item % kv_heads;
        const int64_t* sl = slot_p + b * max_len;
        auto key = [&](int64_t t) { return kp + (sl[t] * kv_heads + g) * hd; };
        auto value = [&](int64_t t) { return vp + (sl[t] * kv_heads + g) * hd; };
        // the group's queries and outputs, one head after another
        attend_group(qp + (b * heads + g * group) * hd, group, hd, len_p[b], key, value, (float)scale, scores.data(),
                     op + (b * heads + g * group) * hd);
      }
    });
  });
  return out;
}

// Attention of one new token per row of a batch over its contiguous cache (batched decode outside
// the serving engine): q (d, heads, hd) float32; k_cache, v_cache (d, kv_heads, max_seq, hd), float32
// or float16, positions 0 .. length - 1 written (the new token's included); with window > 0 each
// query sees only the last `window` of them. -> (d, heads, hd) float32.
at::Tensor cached_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, int64_t length,
                                   int64_t window, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && v_cache.scalar_type() == k_cache.scalar_type(),
              "cached_decode_attention takes float32 queries and caches of one dtype");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.size(0) == q.size(0) && k_cache.size(3) == q.size(2),
              "q must be (d, heads, hd) and the caches (d, kv_heads, max_seq, hd)");
  const int64_t d = q.size(0), heads = q.size(1), hd = q.size(2), kv_heads = k_cache.size(1);
  const int64_t max_seq = k_cache.size(2);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(length >= 1 && length <= max_seq, "length must be 1 .. ", max_seq, ", got ", length);
  const int64_t group = heads / kv_heads, first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
  const int64_t len = length - first;
  q = q.contiguous();
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  auto out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  with_rows(k_cache, v_cache, "the caches", [&](const auto* kp, const auto* vp) {
    at::parallel_for(0, d * kv_heads, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(group * len);
      for (int64_t item = i0; item < i1; ++item) {
        const auto* kg = kp + (item * max_seq + first) * hd;  // item = b * kv_heads + g: its rows in the cache
        const auto* vg = vp + (item * max_seq + first) * hd;
        const int64_t b = item / kv_heads, g = item % kv_heads;
        auto key = [&](int64_t t) { return kg + t * hd; };
        auto value = [&](int64_t t) { return vg + t * hd; };
        attend_group(qp + (b * heads + g * group) * hd, group, hd, len, key, value, (float)scale, scores.data(),
                     op + (b * heads + g * group) * hd);
      }
    });
  });
  return out;
}
