// The fused batch-1 decode step: DecoderLayer holds one Llama block's weights, DecoderStack runs
// every block (and optionally the output head) in one call and one OpenMP region.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <memory>
#include <vector>

#include "attention.h"
#include "common.h"
#include "packed_linear.h"
#include "scheduler.h"

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
// contiguous float32 or float16 KV cache, output projection, RMSNorm, fused gate/up, SiLU * up, down
// projection, residuals); DecoderStack runs a batch-1 decode step through all of them.
struct DecoderLayer {
  std::shared_ptr<PackedLinear> qkv, o, gate_up, down;
  at::Tensor attn_norm, mlp_norm, inv_freq;
  double eps;
  int64_t heads, kv_heads, head_dim, hidden, intermediate;
  // What the families after Llama change in attention (set_attention): an RMSNorm of each q and k
  // head before rotary (Qwen3; undefined: none), the softmax scale, a soft cap on the scores (0: none),
  // and a sliding window of keys (0: every key before the query).
  at::Tensor q_norm, k_norm;
  float softmax_scale, softcap = 0.f;
  int64_t window = 0;

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
    softmax_scale = 1.f / std::sqrt((float)head_dim);
  }

  void set_attention(at::Tensor q_norm_, at::Tensor k_norm_, double scale, double softcap_, int64_t window_) {
    TORCH_CHECK(q_norm_.numel() == k_norm_.numel() && (q_norm_.numel() == 0 || q_norm_.numel() == head_dim),
                "q and k norms must both have head_dim values, or both none");
    TORCH_CHECK(scale > 0 && softcap_ >= 0 && window_ >= 0, "bad attention settings");
    if (q_norm_.numel()) {
      q_norm = q_norm_.to(at::kFloat).contiguous();
      k_norm = k_norm_.to(at::kFloat).contiguous();
    }
    softmax_scale = (float)scale;
    softcap = (float)softcap_;
    window = window_;
  }

  // One head of q or k as rotary takes it: RMSNorm-ed first where the layer has q/k norms.
  const float* head_input(const float* head, const at::Tensor& norm, float* scratch) const {
    if (!norm.defined()) return head;
    rms_norm(head, norm.data_ptr<float>(), head_dim, eps, scratch);
    return scratch;
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

// The phases of a fused step: five per layer, in the order they run, then the output head once after
// the last layer (when the step computes logits). Each ends at a clock mark for the profiler, which
// shows it as the stage PHASE_NAMES gives, the small steps folded into their neighbours.
enum class Phase : int {
  QkvProj,     // the attention norm, the fused QKV projection
  Attention,   // rotary, this step's keys and values into the cache, attention over the positions
  OProj,       // the attention spans merged, the output projection, the residual
  GateUpProj,  // the MLP norm, the fused gate/up projection, SiLU(gate) * up
  DownProj,    // the down projection, the residual
  OutputHead,  // the final norm, the output head
};
constexpr int LAYER_PHASES = static_cast<int>(Phase::OutputHead);  // QkvProj .. DownProj
// The profiler's stage names (leapllm/profiling/stages.py), read from the extension by
// leapllm/model/fused_decode.py: this list is their one source.
constexpr const char* PHASE_NAMES[] = {"qkv_proj", "attention", "o_proj", "gate_up_proj", "down_proj", "lm_head"};
static_assert(sizeof(PHASE_NAMES) / sizeof(PHASE_NAMES[0]) == LAYER_PHASES + 1, "one name per phase");

// A batch-1 decode step through every layer, in one OpenMP region: one token, or up to MAX_ROWS
// tokens at consecutive positions of the same sequence (speculative decoding verifies a few draft
// tokens at once). The T tokens share every read of the weights: each tile is computed against all
// T activation rows (compute_rows), so T tokens cost far less than T steps. The threads share each
// phase's work items as PhaseSchedule describes.
struct DecoderStack {
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

  // The work items of a phase (of layer l) in a step of `rows` tokens.
  int64_t items(const DecoderLayer& l, Phase phase, int64_t rows) const {
    switch (phase) {
      case Phase::QkvProj: return l.qkv->out_features / TILE;
      case Phase::Attention: return l.kv_heads * span_offset[rows];
      case Phase::OProj: return l.hidden / TILE;
      case Phase::GateUpProj: return l.intermediate / TILE;
      case Phase::DownProj: return l.hidden / TILE;
      case Phase::OutputHead: return head->out_features / TILE;
    }
    return 0;
  }

  // What every work item of one step reads: the tokens, the caches, the rotary tables.
  struct Step {
    float* x;                 // (rows, hidden): the residual stream, updated in place
    void* const* kc;          // per layer (kv_heads, max_seq, head_dim), float32 or (half_cache) float16
    void* const* vc;
    bool half_cache;
    int64_t max_seq, pos, rows;
    const float* rot_cos;     // (rows, head_dim / 2): token t's rotary angles at t * head_dim / 2
    const float* rot_sin;
  };

  // Per-thread scratch of a step, one row per token.
  struct ThreadWork {
    std::vector<QuantizedRow> a;       // the phase's input, quantized
    const QuantizedRow* ap[MAX_ROWS];  // &a[t], as compute_rows takes them
    std::vector<float> normed, k_rot, q_rot, scores, attn, head;  // head: one q or k head, normed
    std::vector<c10::Half> k_half, v_half;  // this call's keys and values as a float16 cache holds them
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

  // One attention work item of layer li: one kv head's query heads, for one token, over one span of
  // its positions, on a cache of element type T (float32, or float16 at half the bytes).
  template <class T>
  void attention_item(const DecoderLayer& l, int64_t li, int64_t item, ThreadWork& w, const Step& st) {
    const int64_t q_size = l.heads * l.head_dim, kv_size = l.kv_heads * l.head_dim;
    const int64_t group = l.heads / l.kv_heads, hd = l.head_dim, rows = st.rows, pos = st.pos;
    std::vector<float>& k_rot = w.k_rot;
    std::vector<float>& q_rot = w.q_rot;
    std::vector<float>& scores = w.scores;
    const int64_t per_head = span_offset[rows], g = item / per_head, r = item % per_head;
    int64_t t = 0;
    while (r >= span_offset[t + 1]) ++t;
    const int64_t span = r - span_offset[t], spans = token_spans[t];
    const int64_t len = pos + t + 1;  // token t sees positions first .. pos + t
    const int64_t first = l.window > 0 ? std::max<int64_t>(0, len - l.window) : 0;
    const int64_t s0 = first + (len - first) * span / spans, s1 = first + (len - first) * (span + 1) / spans;
    const int64_t half = hd / 2;
    // Keys and values of this call's tokens (positions pos ..) come from qkv_out, never from the
    // cache: the item that writes one into the cache may be running right now. This item rotates
    // the new keys its span covers itself, each with its own position's angles, and reads them (and
    // the new values) as the cache stores them: a float16 cache rounds them, so a token sees its own
    // key as the steps after it will.
    T* k_cache = static_cast<T*>(st.kc[li]) + g * st.max_seq * hd;
    T* v_cache = static_cast<T*>(st.vc[li]) + g * st.max_seq * hd;
    auto new_value = [&](int64_t s) { return qkv_out.data() + (s - pos) * max_qkv + q_size + kv_size + g * hd; };
    for (int64_t s = std::max(s0, pos); s < s1; ++s) {
      l.rotate(l.head_input(qkv_out.data() + (s - pos) * max_qkv + q_size + g * hd, l.k_norm, w.head.data()),
               k_rot.data() + (s - pos) * hd, st.rot_cos + (s - pos) * half, st.rot_sin + (s - pos) * half);
      if constexpr (!std::is_same_v<T, float>) {
        store_row(k_rot.data() + (s - pos) * hd, hd, w.k_half.data() + (s - pos) * hd);
        store_row(new_value(s), hd, w.v_half.data() + (s - pos) * hd);
      }
    }
    auto own_key = [&](int64_t s) -> const T* {
      if constexpr (std::is_same_v<T, float>) return k_rot.data() + (s - pos) * hd;
      else return w.k_half.data() + (s - pos) * hd;
    };
    auto own_value = [&](int64_t s) -> const T* {
      if constexpr (std::is_same_v<T, float>) return new_value(s);
      else return w.v_half.data() + (s - pos) * hd;
    };
    if (s1 == len) {  // the last span of token t writes its key and value (one item per new position)
      std::memcpy(k_cache + (pos + t) * hd, own_key(pos + t), hd * sizeof(T));
      std::memcpy(v_cache + (pos + t) * hd, own_value(pos + t), hd * sizeof(T));
    }
    const float softmax_scale = l.softmax_scale;
    const float* q_row = qkv_out.data() + t * max_qkv;
    for (int64_t j = 0; j < group; ++j)  // the group's queries, rotated
      l.rotate(l.head_input(q_row + (g * group + j) * hd, l.q_norm, w.head.data()), q_rot.data() + j * hd,
               st.rot_cos + t * half, st.rot_sin + t * half);
    const int64_t span_len = s1 - s0;
    // Positions s0 .. split - 1 are cached, split .. s1 - 1 this call's own.
    const int64_t split = std::min(std::max(s0, pos), s1);
    auto key = [&](int64_t i) -> const T* {
      const int64_t s = s0 + i;
      return s < split ? k_cache + s * hd : own_key(s);
    };
    auto value = [&](int64_t i) -> const T* {
      const int64_t s = s0 + i;
      return s < split ? v_cache + s * hd : own_value(s);
    };
    attention_scores(q_rot.data(), group, hd, span_len, key, softmax_scale, scores.data());
    if (l.softcap > 0.f)  // Gemma 2: cap * tanh(score / cap)
      for (int64_t i = 0; i < group * span_len; ++i) scores[i] = l.softcap * std::tanh(scores[i] / l.softcap);
    // token t's partial softmaxes, (rows, heads, max_spans, hd + 2)
    float* token_partials = partials.data() + t * l.heads * max_spans * (hd + 2);
    for (int64_t j = 0; j < group; ++j) {
      // this span's partial softmax: its max, sum of exp, and unnormalized output (merged in OProj)
      float* part = token_partials + ((g * group + j) * max_spans + span) * (hd + 2);
      float* sc = scores.data() + j * span_len;
      const auto [best, sum] = exp_shifted(sc, span_len);
      part[0] = best;
      part[1] = sum;
      weighted_value_sum(sc, span_len, value, hd, part + 2);
    }
  }

  // One work item of one phase of layer li; `prepared`: this thread already made the phase's input.
  void run_item(int64_t li, Phase phase, int64_t item, bool prepared, ThreadWork& w, const Step& st) {
    const DecoderLayer& l = *layers[li];
    const int64_t q_size = l.heads * l.head_dim, hd = l.head_dim, inter = l.intermediate;
    const int64_t hidden = max_hidden, rows = st.rows;  // x's row stride: every layer's width
    float* xp = st.x;
    std::vector<QuantizedRow>& a = w.a;
    std::vector<float>& normed = w.normed;
    const int64_t n = item * TILE;
    switch (phase) {
      case Phase::QkvProj:
        if (!prepared) {
          norm_and_quantize(xp, rows, l.attn_norm.data_ptr<float>(), l.hidden, l.eps, w);
        }
        l.qkv->compute_rows(w.ap, rows, n, n + TILE, qkv_out.data(), max_qkv);
        break;
      case Phase::Attention:  // one kv head's query heads, for one token, over one span of its positions
        if (st.half_cache) {
          attention_item<c10::Half>(l, li, item, w, st);
        } else {
          attention_item<float>(l, li, item, w, st);
        }
        break;
      case Phase::OProj:  // added to the residual stream (each tile its own columns of x)
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
      case Phase::GateUpProj:  // gate and up rows of the same channels, then SiLU(gate) * up
        if (!prepared) {
          norm_and_quantize(xp, rows, l.mlp_norm.data_ptr<float>(), l.hidden, l.eps, w);
        }
        l.gate_up->compute_rows(w.ap, rows, n, n + TILE, gate_up_out.data(), 2 * max_inter);
        l.gate_up->compute_rows(w.ap, rows, inter + n, inter + n + TILE, gate_up_out.data(), 2 * max_inter);
        for (int64_t t = 0; t < rows; ++t) silu_times(gate_up_out.data() + t * 2 * max_inter + n, inter,
                                                      act.data() + t * max_inter + n);
        break;
      case Phase::DownProj:  // added to the residual stream
        if (!prepared)
          for (int64_t t = 0; t < rows; ++t) quantize_row(act.data() + t * max_inter, inter, a[t]);
        l.down->compute_rows(w.ap, rows, n, n + TILE, normed.data(), hidden);
        for (int64_t t = 0; t < rows; ++t)
          for (int64_t r = n; r < n + TILE; ++r) xp[t * hidden + r] += normed[t * hidden + r];
        break;
      case Phase::OutputHead:  // not a layer's: run_head_item
        break;
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
  // marks, optional (layers, LAYER_PHASES + 1) int64: clock marks at the start of each layer and the
  // end of each of its phases, for the profiler; with logits, one more value at the end: when the
  // output head finished.
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
    std::vector<void*> kc(n_layers), vc(n_layers);
    int64_t max_seq = 0;
    const bool half_cache = n_layers > 0 && k_caches[0].scalar_type() == at::kHalf;
    const auto cache_type = half_cache ? at::kHalf : at::kFloat;
    for (int64_t i = 0; i < n_layers; ++i) {
      const auto& k = k_caches[i];
      const auto& v = v_caches[i];
      TORCH_CHECK(k.scalar_type() == cache_type && v.scalar_type() == cache_type && k.is_contiguous() &&
                      v.is_contiguous() && k.dim() == 4 && k.size(0) == 1 && k.size(1) == layers[i]->kv_heads &&
                      k.size(3) == layers[i]->head_dim && v.sizes() == k.sizes(),
                  "caches must be contiguous (1, kv_heads, max_seq, head_dim), all float32 or all float16");
      max_seq = k.size(2);
      TORCH_CHECK(pos >= 0 && pos + rows <= max_seq, "KV cache holds ", max_seq, " positions, asked to write up to ",
                  pos + rows);
      kc[i] = k.data_ptr();
      vc[i] = v.data_ptr();
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
      TORCH_CHECK(marks->scalar_type() == at::kLong &&
                      marks->numel() == n_layers * (LAYER_PHASES + 1) + (logit ? 1 : 0) && marks->is_contiguous(),
                  "marks must be int64 (layers, ", LAYER_PHASES + 1, "), plus one value with logits");
      mark = marks->data_ptr<int64_t>();
    }
    const int nthreads = at::get_num_threads();
    // Phase p of the step: layer p / LAYER_PHASES's phase p % LAYER_PHASES, then the output head.
    PhaseSchedule schedule(n_layers * LAYER_PHASES + (logit ? 1 : 0), nthreads);
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
    const Step step{x.data_ptr<float>(), kc.data(), vc.data(), half_cache, max_seq, pos, rows, rot_cos.data(),
                    rot_sin.data()};
    for (int64_t li = 0; li < n_layers; ++li)
      for (int phase = 0; phase < LAYER_PHASES; ++phase)
        schedule.set_items(li * LAYER_PHASES + phase, items(*layers[li], static_cast<Phase>(phase), rows));
    if (logit) schedule.set_items(n_layers * LAYER_PHASES, items(*layers.back(), Phase::OutputHead, rows));

#pragma omp parallel num_threads(nthreads)
    {
      ThreadWork w;
      w.a.resize(rows);
      for (int64_t t = 0; t < rows; ++t) w.ap[t] = &w.a[t];
      w.normed.resize(rows * max_hidden);
      w.k_rot.resize(rows * max_head_dim);  // one kv head's new keys
      if (half_cache) {
        w.k_half.resize(rows * max_head_dim);
        w.v_half.resize(rows * max_head_dim);
      }
      w.q_rot.resize(max_q);  // a kv head's query heads
      w.scores.resize(max_group * max_seq);
      w.attn.resize(rows * max_q);
      w.head.resize(max_head_dim);
      const int tid = omp_get_thread_num();
      for (int64_t li = 0; li < n_layers; ++li) {
        for (int phase = 0; phase < LAYER_PHASES; ++phase) {
          schedule.run(li * LAYER_PHASES + phase, tid, [&](int64_t item, bool prepared) {
            run_item(li, static_cast<Phase>(phase), item, prepared, w, step);
          });
          if (mark && tid == 0) {
            const int64_t now = monotonic_ns();
            mark[li * (LAYER_PHASES + 1) + phase + 1] = now;
            if (phase == LAYER_PHASES - 1 && li + 1 < n_layers) mark[(li + 1) * (LAYER_PHASES + 1)] = now;
          }
        }
      }
      if (logit) {
        schedule.run(n_layers * LAYER_PHASES, tid, [&](int64_t item, bool prepared) {
          run_head_item(item, prepared, out_rows, w, step, logit);
        });
        if (mark && tid == 0) mark[n_layers * (LAYER_PHASES + 1)] = monotonic_ns();
      }
    }
  }
};
