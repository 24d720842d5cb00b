// Packed weights on 2 MiB pages, so that streaming them costs fewer TLB misses.
#pragma once

#include <cstdlib>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"

// One block of memory that Linux backs with 2 MiB pages where it can (transparent huge pages, asked
// for with madvise), into which packed weights are copied one after another (64-byte aligned). A
// decode step streams every packed weight once: on 4 KiB pages that is a TLB miss, and a page walk,
// every 4 KiB of every stream, which the kernels' prefetches stall on. Elsewhere it is plain memory.
// The block is reserved whole but its pages are touched only as tensors are copied in, so a caller
// that frees each original after its copy never holds two copies of every weight.
struct HugePageBlock {
  static constexpr size_t ALIGN = 64, PAGE = 2 << 20;
  std::shared_ptr<char> block;
  char* base = nullptr;
  size_t capacity = 0, offset = 0;

  static size_t aligned(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

  explicit HugePageBlock(int64_t bytes) : capacity(std::max<size_t>(ALIGN, (size_t)bytes)) {
    TORCH_CHECK(bytes >= 0, "a block of ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const size_t size = std::max<size_t>(PAGE, (capacity + PAGE - 1) / PAGE * PAGE) + PAGE;  // + PAGE: room to align
    void* raw = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      block = std::shared_ptr<char>(static_cast<char*>(raw), [size](char* p) { munmap(p, size); });
      base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + PAGE - 1) / PAGE * PAGE);
      madvise(base, size - PAGE, MADV_HUGEPAGE);  // before the pages are first touched; a no-op where THP is off
    }
#endif
    if (!base) {
      block = std::shared_ptr<char>(static_cast<char*>(std::aligned_alloc(ALIGN, aligned(capacity))),
                                    [](char* p) { std::free(p); });
      TORCH_CHECK(block, "out of memory");
      base = block.get();
    }
  }

  // A copy of t in the block's next free bytes; the copy keeps the whole block alive.
  at::Tensor copy(const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "HugePageBlock takes CPU tensors");
    const at::Tensor c = t.contiguous();
    TORCH_CHECK(offset + c.nbytes() <= capacity, "the block holds ", capacity, " bytes, ", offset, " used; ",
                c.nbytes(), " more asked");
    std::memcpy(base + offset, c.data_ptr(), c.nbytes());
    auto keep = block;
    at::Tensor out = at::from_blob(base + offset, c.sizes(), [keep](void*) {}, c.options());
    offset += aligned(c.nbytes());
    return out;
  }
};

// Copies of `tensors`, one after another in one HugePageBlock.
std::vector<at::Tensor> copy_into_huge_pages(const std::vector<at::Tensor>& tensors) {
  size_t total = 0;
  for (const auto& t : tensors) total += HugePageBlock::aligned(t.nbytes());
  HugePageBlock block((int64_t)total);
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(block.copy(t));
  return out;
}
