// Per-call temporaries of the CPU bindings without the allocator or the dispatcher.
//
// A decode-sized call (M = 1..16) needs a few small temporaries (packed activations, row
// scales, group sums, an fp32 result before its cast). As tensors, each costs an at::empty:
// a dispatcher round trip plus the allocator, ~1 us hot but several us when a layer's weights
// have just streamed through the caches, which is the normal state in a decode loop. Small
// ones come from a per-thread, 64-byte aligned buffer that is reused by every call on that
// thread; large ones (prefill sizes, where the cost is amortised) stay tensors, so the scratch
// never holds more than kMaxBytes per slot and thread.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>

namespace qtorch::cpu {

class Scratch {
 public:
  static constexpr size_t kMaxBytes = size_t(1) << 20;
  ~Scratch() { std::free(ptr_); }
  void* get(size_t bytes) {
    if (bytes > cap_) {
      std::free(ptr_);
      cap_ = (bytes + 63) / 64 * 64;
      ptr_ = std::aligned_alloc(64, cap_);
      TORCH_CHECK(ptr_ != nullptr, "qtorch: out of memory (", cap_, " bytes of scratch)");
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t cap_ = 0;
};

// `n` elements of T for one call: slot `slot` (0..7) of this thread's scratch when small,
// else a tensor kept alive by `hold`. Distinct temporaries of one call use distinct slots:
// 0-3 the kernels' temporaries, 4-6 a weight an op packs for this call (kPackSlot).
template <class T>
T* temp(int slot, int64_t n, at::ScalarType st, at::Tensor& hold) {
  thread_local Scratch slots[8];
  const size_t bytes = size_t(n > 0 ? n : 1) * sizeof(T);
  if (bytes <= Scratch::kMaxBytes) return static_cast<T*>(slots[slot].get(bytes));
  hold = at::empty({n}, at::TensorOptions().dtype(st));
  return static_cast<T*>(hold.data_ptr());
}

constexpr int kPackSlot = 4;

// A tensor over `n` elements of this call's scratch (or `hold`, when that was allocated): for a
// weight an op packs per call, handed to a binding that takes a packed tensor.
template <class T>
at::Tensor temp_tensor(T* p, int64_t n, at::ScalarType st, const at::Tensor& hold) {
  if (hold.defined()) return hold;
  return at::from_blob(p, {n}, at::TensorOptions().dtype(st));
}

// t as fp32 contiguous, without a dispatcher call when it already is.
inline at::Tensor f32_contiguous(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return t.to(at::kFloat).contiguous();
}

}  // namespace qtorch::cpu
