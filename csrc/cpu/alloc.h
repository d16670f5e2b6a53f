// Tensors whose memory the kernel may back with transparent huge pages.
//
// Two kinds of buffer here are large and touched end to end: packed weights, which decode
// streams from DRAM every call (through 4 KiB pages each 4 KiB costs a TLB miss, which about
// halves the bandwidth a core sees here), and the vocabulary-sized gradient of the
// distillation loss, written once per call into fresh memory (262 MB at 2048 x 32000 fp32:
// ~64 K first-touch page faults through 4 KiB pages, ~58 ms of a 68 ms empty+fill here).
// Buffers of 2 MiB or more get 2 MiB alignment and madvise(MADV_HUGEPAGE) (best effort: the
// kernel may decline); smaller ones 64-byte alignment. The tensor owns the memory.
#pragma once
#include <ATen/ATen.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>

namespace qtorch::cpu {

inline at::Tensor huge_page_empty(at::IntArrayRef sizes, at::ScalarType dt, const char* what) {
  int64_t n = 1;
  for (const int64_t s : sizes) n *= s;
  const size_t bytes = size_t(std::max<int64_t>(n, 1)) * at::elementSize(dt);
  const size_t huge = size_t(2) << 20;
  const bool use_huge = bytes >= huge;
  const size_t align = use_huge ? huge : 64;
  const size_t alloc = (bytes + align - 1) / align * align;
  void* ptr = nullptr;
  TORCH_CHECK(posix_memalign(&ptr, align, alloc) == 0, what, ": out of memory (", alloc,
              " bytes)");
  if (use_huge) (void)madvise(ptr, alloc, MADV_HUGEPAGE);
  return at::from_blob(ptr, sizes, [](void* p) { std::free(p); },
                       at::TensorOptions().dtype(dt));
}

}  // namespace qtorch::cpu
