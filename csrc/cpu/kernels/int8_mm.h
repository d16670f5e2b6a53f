// W8A8 int8 GEMM kernels for the CPU backend: torch-free (raw pointers + sizes only), so the
// C++ sanitizer test links them without libtorch. The binding (csrc/cpu/int8_mm.cpp) owns
// allocation, argument checks and threading; every kernel here processes a caller-given range.
//
// Math. vpdpbusd multiplies u8 x s8, so activations are shifted into u8: a_u = a + 128. Then
//     sum_k a[m,k] w[n,k] = sum_k a_u[m,k] w[n,k] - 128 * sum_k w[n,k]
// and the second term ("compensation", comp[n] = 128 * colsum[n]) is computed once, when the
// weight is packed. Accumulation is int32 and exact for K < 2^31 / (255 * 127) ~ 66k (vpdpbusd
// wraps, never saturates; the subtraction is done modulo 2^32, so the result is exact whenever
// the true dot product fits in int32).
//
// Layouts.
//   Packed A (activations): u8 [M, Kp] row-major, Kp = K rounded up to 4, a_u = a + 128, pad
//     columns hold 128 (= 0 before the shift; they meet zero weights anyway).
//   Packed B (weights): panels of kPanel = 64 output channels. Panel p is u8 [Kp/4][64][4]:
//     byte (g * 256 + j * 4 + t) holds w[64p + j, 4g + t] (as s8), i.e. the 4 consecutive k of
//     one channel share one 32-bit lane, which is what vpdpbusd reduces. Channels >= N and
//     k >= K are 0. After the Np panels: int32 comp[Np * 64] (0 for pad channels), then a
//     64-byte trailer int64 {kPackMagic, N, K} so the binding can reject a packed weight used
//     with another shape (different N can give the same byte count).
#pragma once
#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace qtorch::cpu::int8_mm {

constexpr int64_t kPanel = 64;  // output channels per packed weight panel (4 zmm of 16 lanes)
constexpr int64_t kGroup = 4;   // k per 32-bit lane (vpdpbusd reduces 4 u8*s8 products)

inline int64_t padded_k(int64_t K) { return (K + kGroup - 1) / kGroup * kGroup; }
inline int64_t num_panels(int64_t N) { return (N + kPanel - 1) / kPanel; }
inline int64_t packed_b_panel_bytes(int64_t N, int64_t K) {
  return num_panels(N) * kPanel * padded_k(K);
}
constexpr int64_t kPackMagic = 0x3842564e4e4951LL;  // "QINNVB8"
constexpr int64_t kTrailerBytes = 64;
// Total bytes of a packed weight: panels, int32 compensation per (padded) channel, trailer.
inline int64_t packed_b_bytes(int64_t N, int64_t K) {
  return packed_b_panel_bytes(N, K) + num_panels(N) * kPanel * int64_t(sizeof(int32_t)) +
         kTrailerBytes;
}
// The {magic, N, K} trailer of a packed weight of `bytes` bytes.
inline const int64_t* packed_b_trailer(const uint8_t* bp, int64_t bytes) {
  return reinterpret_cast<const int64_t*>(bp + bytes - kTrailerBytes);
}
inline const int32_t* packed_b_comp(const uint8_t* bp, int64_t N, int64_t K) {
  return reinterpret_cast<const int32_t*>(bp + packed_b_panel_bytes(N, K));
}

// Result epilogue, applied to the exact int32 dot product d[m, n]:
//   S32:       out[m, n] = d                                  (test hook; scales/bias unused)
//   otherwise: out[m, n] = cast(float(d) * scale_a[m] * scale_b[n] + bias[n])   (fp32 math,
//              in that order, as the reference; bias may be null; one RNE rounding to F16/BF16)
struct Epilogue {
  const float* scale_a = nullptr;  // [M]
  const float* scale_b = nullptr;  // [N]
  const float* bias = nullptr;     // [N] or null
  void* out = nullptr;             // [M, ldo] of `type`
  int64_t ldo = 0;                 // elements
  DType type = DType::F32;
};

// ---- dispatching entry points (the ISA of isa(Family::Int8Mm), cpu_features.h) --------------

// w: s8 [N, ldw] row-major (ldw >= K). out: packed_b_bytes(N, K) bytes, 64-byte aligned.
// pack_b packs the whole weight on the calling thread: pack_b_panels over every panel, then
// pack_b_trailer. pack_b_panels writes panels [p0, p1) and their compensation entries and
// nothing else, so disjoint panel ranges can be packed by different threads; pack_b_trailer
// writes the 64-byte {magic, N, K} trailer (zero padded). Every ISA writes the same bytes.
void pack_b(const int8_t* w, int64_t N, int64_t K, int64_t ldw, uint8_t* out);
void pack_b_panels(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int64_t p0, int64_t p1,
                   uint8_t* out);
void pack_b_trailer(int64_t N, int64_t K, uint8_t* out);
// The inverse of pack_b: w s8 [N, K] row-major (bitwise the weight that was packed).
void unpack_b(const uint8_t* bp, int64_t N, int64_t K, int8_t* w);
// Rows [k0, k1) of ŵᵀ, ŵ = w * w_scale[n] in fp32 (the reference's one rounded multiply of the
// exact float(w)), from a packed weight, into dst [k1 - k0, ldd] (ldd >= N):
//     dst[(k - k0) * ldd + n] = float(w[n, k]) * w_scale[n]
// For the backward, which dequantizes one cache-sized slab of ŵ at a time and hands BLAS the
// transposed view. Transposed because a 32-bit lane of the packed layout holds 4 consecutive
// k of one channel: 16 lanes are 16 channels at 4 k, i.e. 4 contiguous 16-float pieces of 4
// rows of ŵᵀ, so the SIMD paths store whole vectors with no transpose (ŵ itself would need a
// 16 x 16 register transpose and narrow per-channel stores).
void dequant_b_slab_t(const uint8_t* bp, const float* w_scale, int64_t N, int64_t K, int64_t k0,
                      int64_t k1, float* dst, int64_t ldd);

// Per-row symmetric quantization of rows [m0, m1) of x (F32/F16/BF16 [M, ldx]):
//   amax = max_k |x|, scale = amax / 127 (1 where amax == 0), q = clamp(rne(x / scale), -127, 127)
// with the edge cases of docs/semantics.md: a row holding a NaN or ±inf gets scale NaN and q 0
// (its outputs are NaN, never finite and wrong), and a scale that underflows to 0 counts as
// amax == 0 (scale 1, q 0). scale[m] is written. If q != null, q[m, 0..K) gets q (s8, row stride ldq). If ap != null,
// row m of packed A (stride padded_k(K)) gets q + 128 with the pad columns set to 128.
// smooth (SmoothQuant, fp32 [K]) or null: the rows quantized are x[m, k] / smooth[k], divided
// in fp32 as they are read (one true division, the reference's rounding), so the smoothed
// activation is never written out: no extra pass over x. Null costs nothing (a separate
// instantiation).
void quantize_rows(const void* x, DType xt, int64_t K, int64_t ldx, int64_t m0, int64_t m1,
                   float* scale, int8_t* q, int64_t ldq, uint8_t* ap,
                   const float* smooth = nullptr);

// amax is taken as the integer max of the bit patterns of |x| (sign bit cleared): for
// non-negative floats the integer order is the float order, and every NaN and +inf lies at or
// above 0x7f800000, so one vector max (max_epi32) finds both amax and "row not finite", where
// max_ps would silently drop NaN operands.
constexpr uint32_t kNonFiniteBits = 0x7f800000u;
// The row scale from the max bit pattern of |x|: NaN for a non-finite row, 1 for amax == 0 or
// an amax / 127 that underflows to 0, else amax / 127 (IEEE division, as the reference).
inline float row_scale_from_bits(uint32_t amax_bits) {
  if (amax_bits >= kNonFiniteBits) return __builtin_nanf("");
  float amax;
  __builtin_memcpy(&amax, &amax_bits, 4);
  const float s = amax / 127.f;
  return s == 0.f ? 1.f : s;
}

// Rows [m0, m1) of s8 a [M, lda] into packed A (stride padded_k(K)).
void pack_a(const int8_t* a, int64_t K, int64_t lda, int64_t m0, int64_t m1, uint8_t* ap);

// out rows [m0, m1) x channels of panels [p0, p1) (clipped to N) = epilogue(A_p B_p^T - comp).
void gemm(const uint8_t* ap, int64_t K, const uint8_t* bp, int64_t N, int64_t m0, int64_t m1,
          int64_t p0, int64_t p1, const Epilogue& ep);

// The kernel variant the dispatch uses (for `qtorch info`).
const char* kernel_name();

// ---- per-ISA implementations (same contracts) -------------------------------------------
#define QTORCH_INT8_MM_DECLARE(ns)                                                            \
  namespace ns {                                                                              \
  void quantize_rows(const void* x, DType xt, int64_t K, int64_t ldx, int64_t m0, int64_t m1, \
                     float* scale, int8_t* q, int64_t ldq, uint8_t* ap,                       \
                     const float* smooth = nullptr);                                          \
  void pack_a(const int8_t* a, int64_t K, int64_t lda, int64_t m0, int64_t m1, uint8_t* ap);  \
  void gemm(const uint8_t* ap, int64_t K, const uint8_t* bp, int64_t N, int64_t m0,           \
            int64_t m1, int64_t p0, int64_t p1, const Epilogue& ep);                          \
  void pack_b_panels(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int64_t p0,          \
                     int64_t p1, uint8_t* out);                                               \
  void dequant_b_slab_t(const uint8_t* bp, const float* w_scale, int64_t N, int64_t K,        \
                        int64_t k0, int64_t k1, float* dst, int64_t ldd);                     \
  }
QTORCH_INT8_MM_DECLARE(scalar)
QTORCH_INT8_MM_DECLARE(avx2)
QTORCH_INT8_MM_DECLARE(avx512)
namespace avx512 {
// Runs iters x 24 register-only zmm vpdpbusd and returns the int ops done (int8_vnni_peak,
// csrc/cpu/probes.cpp).
int64_t vnni_spin(int64_t iters);
}
#undef QTORCH_INT8_MM_DECLARE

}  // namespace qtorch::cpu::int8_mm
