// Packed weights on 2 MiB pages, so that streaming them costs fewer TLB misses.
#pragma once

#include <cstdlib>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"

// What each tensor in a block holds: the block, alive while any of its tensors is. Its deleter is
// also how HugePageBlock::holds recognises a tensor in a block.
inline void release_block_reference(void* reference) { delete static_cast<std::shared_ptr<char>*>(reference); }

// One block of memory that Linux backs with 2 MiB pages where it can (transparent huge pages, asked
// for with madvise), in which packed weights lie one after another (64-byte aligned): copied in, or
// packed in place at load. A decode step streams every packed weight once: on 4 KiB pages that is a
// TLB miss, and a page walk, every 4 KiB of every stream, which the kernels' prefetches stall on.
// Elsewhere it is plain memory. The block is reserved whole (address space only) but its pages are
// touched only as tensors are written, so a caller that frees each original after its copy never
// holds two copies of every weight, and a loader may reserve more than it will use.
struct HugePageBlock {
  static constexpr size_t ALIGN = 64, PAGE = 2 << 20;
  std::shared_ptr<char> block;
  char* base = nullptr;
  size_t capacity = 0, offset = 0;
  // Bytes of the block's own mapping, from its start (not base): shared with the deleter, which must
  // unmap only what release_unused left mapped (the address space it gave back may be another's by then).
  std::shared_ptr<size_t> mapping_bytes;

  static size_t aligned(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

  explicit HugePageBlock(int64_t bytes) : capacity(std::max<size_t>(ALIGN, (size_t)bytes)) {
    TORCH_CHECK(bytes >= 0, "a block of ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const size_t size = std::max<size_t>(PAGE, (capacity + PAGE - 1) / PAGE * PAGE) + PAGE;  // + PAGE: room to align
    // MAP_NORESERVE: only the pages written count against the system's commit limit.
    void* raw = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw != MAP_FAILED) {
      mapping_bytes = std::make_shared<size_t>(size);
      block = std::shared_ptr<char>(static_cast<char*>(raw), [bytes = mapping_bytes](char* p) { munmap(p, *bytes); });
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

  // A tensor of `sizes` and `dtype` in the block's next free bytes, its values unset (a loader packs
  // into it); it keeps the whole block alive.
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    int64_t count = 1;
    for (const int64_t n : sizes) {
      TORCH_CHECK(n >= 0, "a negative size");
      count *= n;
    }
    const size_t nbytes = (size_t)count * c10::elementSize(dtype);
    TORCH_CHECK(offset + nbytes <= capacity, "the block holds ", capacity, " bytes, ", offset, " used; ", nbytes,
                " more asked");
    at::Tensor out = at::for_blob(base + offset, sizes)
                         .context(new std::shared_ptr<char>(block), &release_block_reference)
                         .options(at::TensorOptions().dtype(dtype))
                         .make_tensor();
    offset += aligned(nbytes);
    return out;
  }

  // A copy of t in the block's next free bytes; the copy keeps the whole block alive.
  at::Tensor copy(const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "HugePageBlock takes CPU tensors");
    const at::Tensor c = t.contiguous();
    at::Tensor out = empty(c.sizes(), c.scalar_type());
    std::memcpy(out.data_ptr(), c.data_ptr(), c.nbytes());
    return out;
  }

  // Gives back the pages past the bytes used (whole 2 MiB pages), once nothing more is placed in it:
  // a loader reserves for the most its weights may take.
  void release_unused() {
    capacity = offset;
#if defined(__linux__)
    if (mapping_bytes) {
      char* start = block.get();
      char* keep_to = base + std::max<size_t>(PAGE, (offset + PAGE - 1) / PAGE * PAGE);
      if (keep_to < start + *mapping_bytes) {
        munmap(keep_to, start + *mapping_bytes - keep_to);
        *mapping_bytes = keep_to - start;  // the deleter unmaps only this much
      }
    }
#endif
  }

  // Whether t's memory is a block's (placed by empty or copy).
  static bool holds(const at::Tensor& t) {
    return t.defined() && t.has_storage() && t.storage().data_ptr().get_deleter() == &release_block_reference;
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
