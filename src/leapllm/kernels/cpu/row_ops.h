// The small per-row steps of a layer outside the fused decode step (prefill, batched decode, the
// serving engine's steps): RMSNorm, SiLU(gate) * up and the rotary embedding, each one call over
// every row with the fused step's own arithmetic. In PyTorch each is several dispatched ops over
// strided views, which took a tenth of a 512-token prefill and of a 32-row decode step.
#pragma once

#include <ATen/Parallel.h>

#include "common.h"
#include "decoder_stack.h"

// RMSNorm of each row of x (..., n) with weight (n,), float32 -> a new tensor of x's shape.
at::Tensor rms_norm_rows(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                  x.dim() >= 1 && x.size(-1) == weight.size(0), "rms_norm_rows takes float32 x (..., n) and weight (n,)");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  auto out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) DecoderLayer::rms_norm(xp + r * n, wp, n, eps, op + r * n);
  });
  return out;
}

// SiLU(gate) * up for each row of gate_up (..., 2 inter) = [gate | up], float32 -> (..., inter).
at::Tensor silu_and_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "silu_and_mul takes float32 (..., 2 * inter)");
  gate_up = gate_up.contiguous();
  const int64_t inter = gate_up.size(-1) / 2, rows = inter ? gate_up.numel() / (2 * inter) : 0;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inter;
  auto out = at::empty(sizes, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gate = gp + r * 2 * inter;
      float* o = op + r * inter;
      int64_t c = 0;
      for (; c + TILE <= inter; c += TILE) silu_times(gate + c, inter, o + c);  // the fused step's arithmetic
      for (; c < inter; ++c) o[c] = gate[c] / (1.f + std::exp(-gate[c])) * gate[inter + c];
    }
  });
  return out;
}

// Rotate-half rotary embedding of x (batch, heads, seq, hd), any strides, with cos and sin (seq, hd)
// (model/llama.py's tables: each half of a row holds the same angles) -> a tensor of x's shape whose
// memory is laid out (batch, seq, heads, hd), the layout the projections wrote.
at::Tensor rotary_rows(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rotary_rows takes float32 tensors");
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0 && cos.dim() == 2 && cos.size(0) == x.size(2) &&
                  cos.size(1) == x.size(3) && sin.sizes() == cos.sizes(),
              "x must be (batch, heads, seq, hd) and cos, sin (seq, hd)");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t batch = x.size(0), heads = x.size(1), seq = x.size(2), hd = x.size(3), half = hd / 2;
  auto out = at::empty({batch, seq, heads, hd}, x.options());
  const auto xs = x.strides();
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * seq, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / seq, t = item % seq;
      const float *c = cp + t * hd, *s = sp + t * hd;
      for (int64_t h = 0; h < heads; ++h) {
        const float* in = xp + b * xs[0] + h * xs[1] + t * xs[2];
        float* o = op + (item * heads + h) * hd;
        if (xs[3] == 1) {  // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
          for (int64_t i = 0; i < half; ++i) o[i] = in[i] * c[i] - in[i + half] * s[i];
          for (int64_t i = half; i < hd; ++i) o[i] = in[i] * c[i] + in[i - half] * s[i];
        } else {
          for (int64_t i = 0; i < half; ++i) o[i] = in[i * xs[3]] * c[i] - in[(i + half) * xs[3]] * s[i];
          for (int64_t i = half; i < hd; ++i) o[i] = in[i * xs[3]] * c[i] + in[(i - half) * xs[3]] * s[i];
        }
      }
    }
  });
  return out.transpose(1, 2);
}
