// Whether tensors hold a NaN or an infinity, read in one call: the loader checks a model's norms and
// quantization scales (a few hundred small tensors), where a PyTorch reduction per tensor cost more
// in calls, and one over them all in copies, than reading them.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

// Counts the values of n IEEE numbers of `Bits` whose exponent field is all ones (NaN or infinity).
template <typename Bits>
inline int64_t count_nonfinite_bits(const Bits* x, int64_t n, Bits exponent) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (x[i] & exponent) == exponent;  // (vectorised by the compiler)
  return count;
}

// The index of the first of `tensors` (CPU, floating point) holding a NaN or an infinity; -1 if none.
inline int64_t first_nonfinite(const std::vector<at::Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor t = tensors[i].contiguous();
    TORCH_CHECK(t.device().is_cpu(), "first_nonfinite reads CPU tensors");
    const int64_t n = t.numel();
    int64_t bad = 0;
    switch (t.scalar_type()) {
      case at::kFloat: bad = count_nonfinite_bits(static_cast<const uint32_t*>(t.data_ptr()), n, (uint32_t)0x7F800000u); break;
      case at::kDouble:
        bad = count_nonfinite_bits(static_cast<const uint64_t*>(t.data_ptr()), n, (uint64_t)0x7FF0000000000000ull);
        break;
      case at::kHalf: bad = count_nonfinite_bits(static_cast<const uint16_t*>(t.data_ptr()), n, (uint16_t)0x7C00); break;
      case at::kBFloat16:
        bad = count_nonfinite_bits(static_cast<const uint16_t*>(t.data_ptr()), n, (uint16_t)0x7F80);
        break;
      default: TORCH_CHECK(false, "first_nonfinite reads float32, float64, float16 and bfloat16 tensors");
    }
    if (bad) return (int64_t)i;
  }
  return -1;
}
