// The linear entry points of the CPU bindings and their packed-weight checks, shared with the
// quantized modules' kernel and eager fast path (csrc/cpu/linear_packed.cpp), which call them
// directly instead of through the dispatcher.
// Contracts: the schemas at the top of int8_mm.cpp and weight_only.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace qtorch::cpu::binding {

// Packed weight-only weights (weight_only.h) for these sizes, else a ValueError.
void check_int4_packed(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t N, int64_t K, int64_t gs);
void check_int8wo_packed(const at::Tensor& w, const at::Tensor& scale, int64_t N, int64_t K);

// A packed W8A8 weight (int8_mm.h) for this N, K: size and trailer, else a ValueError.
void check_int8_packed(const at::Tensor& w_packed, int64_t N, int64_t K);

// smooth: SmoothQuant's fp32 [K] divisor of x, fused into the activation quantization, or none.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w_packed, int64_t N,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& smooth = std::nullopt);

at::Tensor int4_weight_only_linear(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& scale, const at::Tensor& zero_packed,
                                   int64_t N, int64_t K, int64_t gs,
                                   const std::optional<at::Tensor>& bias);

at::Tensor int8_weight_only_linear(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& scale, int64_t N, int64_t K,
                                   const std::optional<at::Tensor>& bias);

// The linears on canonical buffers, packed for the call only (the public ops' eager fast path).
at::Tensor int8_linear_canonical(const at::Tensor& x, const at::Tensor& w_q,
                                 const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& smooth = std::nullopt);
at::Tensor int8_weight_only_linear_canonical(const at::Tensor& x, const at::Tensor& w_q,
                                             const at::Tensor& w_scale,
                                             const std::optional<at::Tensor>& bias);
at::Tensor int4_weight_only_linear_canonical(const at::Tensor& x, const at::Tensor& qweight,
                                             const at::Tensor& scales, const at::Tensor& zeros,
                                             int64_t gs, const std::optional<at::Tensor>& bias);

}  // namespace qtorch::cpu::binding
