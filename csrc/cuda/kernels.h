// Host-side launchers of the qtorch CUDA kernels. Raw pointers and ints only, so the binding
// (the one file that sees torch) and plain-nvcc builds share this header.
//
// Every launcher returns the cudaError_t of its launch (cudaGetLastError after it) and does
// not synchronize. Pointers are device pointers; "ld" arguments are row strides in elements.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace qtorch_cuda {

// dtype codes of the launchers' `*_dtype` arguments (ints, so launchers need no torch types)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- int8_mm.cu -----------------------------------------------------------------------------

// Per-row symmetric int8 quantization (API.md "int8, symmetric, per row"):
//   x [M, K] of dtype `x_dtype` (0 fp32, 1 fp16, 2 bf16), row stride K;
//   q [M, ldq] int8 with ldq >= K: columns [K, ldq) are written as 0 so q can feed the GEMM
//   directly with K padded to a multiple of 16; scale [M] fp32.
//   smooth fp32 [K] or null (SmoothQuant): x[r, k] / smooth[k] is what gets quantized, the
//   division fused into both passes of the kernel.
cudaError_t launch_quantize_int8(const void* x, int x_dtype, int8_t* q, float* scale, int M,
                                 int K, int ldq, cudaStream_t stream,
                                 const float* smooth = nullptr);

// out[M, N] = (a @ b.T in exact int32) * scale_a[:, None] * scale_b[None, :] (+ bias[None, :])
//   a [M, lda] int8, b [N, ldb] int8, only the first Kp columns are read; requirements:
//   Kp % 16 == 0, lda % 16 == 0, ldb % 16 == 0, a and b 16-byte aligned, columns [K, Kp) zero.
//   scale_a [M], scale_b [N], bias [N] or nullptr: fp32. out [M, N] dtype `out_dtype`.
cudaError_t launch_int8_scaled_mm(const int8_t* a, const int8_t* b, const float* scale_a,
                                  const float* scale_b, const float* bias, void* out,
                                  int out_dtype, int M, int N, int Kp, int lda, int ldb,
                                  cudaStream_t stream);

// ---- weight_only.cu -------------------------------------------------------------------------

// W4A16: out[M, N] = x[M, K] @ ŵ.T (+ bias), ŵ = (q - zero) * scale, fp32 accumulation.
//   x [M, K] fp16/bf16 (x_dtype 1/2), row stride K, K % 8 == 0, 16-byte aligned.
//   qpacked: the fragment-ordered weights from qtorch/backends/_cuda_pack.py, int32
//     [Kp / 64][Np / 16][32 lanes][4], Kp = K rounded up to 64, Np = N rounded up to 16.
//   szpacked: int32 [Kp / group_size][Np], each word {scale, 1024 + zero (fp16) or
//     128 + zero (bf16)} as two x_dtype halves (low half the scale).
//   bias [N] x_dtype or nullptr; out [M, N] x_dtype.
//   workspace: fp32 [M, N] zeroed by the caller when split_k > 1, else unused (nullptr ok).
//   split_k <= 0 picks one from the grid size and `num_sms`.
cudaError_t launch_int4_weight_only_linear(const void* x, int x_dtype, const int32_t* qpacked,
                                           const int32_t* szpacked, const void* bias, void* out,
                                           float* workspace, int M, int N, int K, int group_size,
                                           int split_k, int num_sms, cudaStream_t stream);

// W8A16: out[M, N] = (x[M, K] @ q.T) * w_scale[None, :] (+ bias), fp32 accumulation, on the
// W4A16 kernel's skeleton.
//   x [M, K] fp16/bf16, K % 8 == 0 (the caller zero-pads x otherwise), 16-byte aligned.
//   qpacked: int32 [Kp/64][Np/16][2][32 lanes][4] from _cuda_pack.pack_int8 (bytes q + 128).
//   w_scale fp32 [N]; bias [N] x_dtype or nullptr; workspace and split_k as for int4.
cudaError_t launch_int8_weight_only_linear(const void* x, int x_dtype, const int32_t* qpacked,
                                           const float* w_scale, const void* bias, void* out,
                                           float* workspace, int M, int N, int K, int split_k,
                                           int num_sms, cudaStream_t stream);

// The split_k the int4 / W8A16 launchers would use (so the caller can size the workspace).
int weight_only_pick_split_k(int M, int N, int K, int num_sms);

// ---- distillation.cu ------------------------------------------------------------------------

enum Divergence : int { kKL = 0, kReverseKL = 1, kJSD = 2 };

// One block per row. student, teacher [M, V] of dtype `dtype` (0/1/2), row stride V;
// labels int64 [M] or nullptr; loss fp32 [M]; grad [M, V] dtype or nullptr.
// A label outside [0, V) other than ignore_index gives a NaN loss for that row (the caller
// checks labels first and raises ValueError; this only keeps the kernel in bounds).
cudaError_t launch_distillation_loss(const void* student, const void* teacher,
                                     const int64_t* labels, float* loss, void* grad, int dtype,
                                     int M, int V, float temperature, float alpha,
                                     int divergence, float beta, int64_t ignore_index,
                                     cudaStream_t stream);

}  // namespace qtorch_cuda
