// Tensors whose memory the kernel may back with transparent huge pages: packed weights, made
// once and streamed from DRAM by every decode call (through 4 KiB pages each 4 KiB costs a
// TLB miss, which about halves the bandwidth a core sees here). Buffers of 2 MiB or more get
// 2 MiB alignment and madvise(MADV_HUGEPAGE) (best effort: the kernel may decline); smaller
// ones 64-byte alignment. The tensor owns the memory.
//
// Not for per-call outputs: the distillation loss's fresh [M, V] gradient (262 MB at
// 2048 x 32000) in huge pages cut its forward from 170 to 133 ms in a loop of its own, but in
// bench_distill.py, interleaved with eager PyTorch's allocations, fwd+bwd went from 241 to
// 419 ms p50, so it stays in 4 KiB pages.
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
