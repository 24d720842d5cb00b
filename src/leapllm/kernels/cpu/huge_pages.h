// Packed weights on 2 MiB pages, so that streaming them costs fewer TLB misses.
#pragma once

#include <cstdlib>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"

// Copies of `tensors`, one after another (64-byte aligned) in one block of memory that Linux backs
// with 2 MiB pages where it can (transparent huge pages, asked for with madvise). A decode step
// streams every packed weight once: on 4 KiB pages that is a TLB miss, and a page walk, every 4 KiB
// of every stream, which the kernels' prefetches stall on. Elsewhere the copies are plain.
std::vector<at::Tensor> copy_into_huge_pages(const std::vector<at::Tensor>& tensors) {
  constexpr size_t ALIGN = 64, PAGE = 2 << 20;
  size_t total = 0;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "copy_into_huge_pages takes CPU tensors");
    total += (t.nbytes() + ALIGN - 1) / ALIGN * ALIGN;
  }
  std::shared_ptr<char> block;
  char* base = nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t size = std::max<size_t>(PAGE, (total + PAGE - 1) / PAGE * PAGE) + PAGE;  // + PAGE: room to align
  void* raw = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw != MAP_FAILED) {
    block = std::shared_ptr<char>(static_cast<char*>(raw), [size](char* p) { munmap(p, size); });
    base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + PAGE - 1) / PAGE * PAGE);
    madvise(base, size - PAGE, MADV_HUGEPAGE);  // before the pages are first touched; a no-op where THP is off
  }
#endif
  if (!base) {
    block = std::shared_ptr<char>(static_cast<char*>(std::aligned_alloc(ALIGN, std::max<size_t>(ALIGN, total))),
                                  [](char* p) { std::free(p); });
    TORCH_CHECK(block, "out of memory");
    base = block.get();
  }
  std::vector<at::Tensor> out;
  size_t offset = 0;
  for (const auto& t : tensors) {
    const at::Tensor c = t.contiguous();
    std::memcpy(base + offset, c.data_ptr(), c.nbytes());
    // every copy keeps the whole block alive
    out.push_back(at::from_blob(base + offset, c.sizes(), [block](void*) {}, c.options()));
    offset += (c.nbytes() + ALIGN - 1) / ALIGN * ALIGN;
  }
  return out;
}
