// Weight-only (W8A16 / W4A16) matmul kernels for the CPU backend: torch-free (raw pointers +
// sizes only), so the C++ sanitizer test links them without libtorch. The binding
// (csrc/cpu/weight_only.cpp) owns allocation, argument checks and threading; every kernel here
// computes a caller-given range of 16-column weight blocks for all M rows.
//
// Math. The weights stay quantized in memory and are dequantized inside the kernel, in
// registers; activations are used as they are (fp32, or bf16 on the AVX-512 path; no hidden
// activation quantization). For int4, per output channel n and group g of `gs` k's:
//     sum_{k in g} x[m,k] * (q[n,k] - z[n,g]) * s[n,g]
//         = s[n,g] * sum_{k in g} x[m,k] q[n,k]  +  b[n,g] * xsum[m,g],     b = -s * z
// where xsum[m,g] = sum_{k in g} x[m,k] (fp32, computed once per call). The inner loop thus
// multiplies by the raw nibble q in [0, 15]: exactly representable in fp32 and in bf16, and
// x * q is exact in fp32 for bf16 x, so the only roundings are fp32 accumulations (the
// reference's own error class). On the bf16 path the nibble is turned into a bf16 with one
// OR: the bits 0x4300 | q are the bf16 number 128 + q (exponent 2^7, mantissa unit 1), so
// the kernel accumulates sum x (128 + q) and uses b' = b - 128 s in the group epilogue.
// The offset makes the fp32 partial sums ~10x larger than sum x (q - z), and so their rounding
// error; it stays within depth * 2^-24 * sum |terms| (what test_weight_only.cpp checks), orders of
// magnitude below the bf16 output's 2^-9.
// For int8 there is one "group" spanning K, no zero point, and s is the per-channel scale:
//     out[m,n] = s[n] * sum_k x[m,k] q[n,k]            (q in [-127, 127], exact in bf16)
//
// Packed layouts (block = 16 consecutive output channels; N is padded to a block multiple
// with q = 0, s = 0, b = 0, so pad columns compute 0 and are never stored):
//   int4 weights: u8 [Nb][K/8][64]. In block nb, k-octet o (k0 = 8o), byte 4c + 2e + h
//     (c = 0..15, e, h in {0, 1}) holds channel n = 16 nb + c:
//         low nibble = q[n, k0 + 4h + e],   high nibble = q[n, k0 + 4h + 2 + e].
//     So the 32-bit word of channel c holds its 8 k's, nibble i (bits 4i..4i+3) being
//     k0 + kOctetK[i]; and its 16-bit half e holds k0 + e, k0 + 2 + e, k0 + 4 + e, k0 + 6 + e.
//     Every kernel gets its operands with shifts and masks only, no shuffles:
//     bf16 path: the 64 bytes as 32 u16 lanes; nibble p (p = 0..3) of every lane is a vector
//       whose lane pair (2c, 2c+1) is channel c at k0 + 2p, k0 + 2p + 1, what vdpbf16ps
//       reduces against the x pair (x[k0 + 2p], x[k0 + 2p + 1]).
//     fp32 paths: the 64 bytes (AVX-512; 32 on AVX2: 8 channels) as 32-bit lanes, one channel
//       per lane; nibble i of every lane is the channel vector at k = k0 + kOctetK[i].
//   int4 scale: fp32 [Nb][G][16]; zero: u8 [Nb][G][16] (a byte, not an fp32 b = -s*z: 4x less
//     metadata to stream; the kernels compute b = -(s * z), bitwise what a stored b would be).
//     G = K / gs. With float zero points (zero_point="float", API.md) zero is fp32 [Nb][G][16]
//     instead (Int4Weights::zero_f), the same b = -(s * z) from it: every function taking a
//     zero has an overload for each.
//   int8 weights: s8 [Nb][Kp/2][32], Kp = K rounded up to 2; byte j of k-pair t holds
//     q[16 nb + j/2, 2t + j%2] (0 for k >= K).   int8 scale: fp32 [Nb][16].
// Activations: x [M][ldx] fp32 or bf16 (raw uint16 bits). The int8 kernels read Kp columns
// (the caller zero-pads an odd K); the int4 kernels read K columns (K % gs == 0, gs >= 32,
// so K is a multiple of the k-octet).
// Output: y fp32 [M][ldy], only the N real columns are written; y = x @ ŵ.T + bias (bias fp32
// [N] or null), added in fp32 as the reference does. The caller casts to x.dtype.
#pragma once
#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace qtorch::cpu::weight_only {

constexpr int64_t kBlock = 16;  // output channels per packed block (one zmm of fp32)

inline int64_t num_blocks(int64_t N) { return (N + kBlock - 1) / kBlock; }
inline int64_t int8_padded_k(int64_t K) { return (K + 1) / 2 * 2; }
inline int64_t int4_packed_bytes(int64_t N, int64_t K) { return num_blocks(N) * (K / 8) * 64; }
// The k offset (within its octet) of nibble i of a channel's 32-bit word (int4 layout above).
constexpr int kOctetK[8] = {0, 2, 4, 6, 1, 3, 5, 7};
inline int64_t int4_meta_floats(int64_t N, int64_t K, int64_t gs) {
  return num_blocks(N) * (K / gs) * kBlock;
}
inline int64_t int8_packed_bytes(int64_t N, int64_t K) {
  return num_blocks(N) * (int8_padded_k(K) / 2) * 32;
}

struct Int4Weights {
  const uint8_t* w = nullptr;   // int4_packed_bytes(N, K)
  const float* scale = nullptr; // [Nb][G][16]
  const uint8_t* zero = nullptr;  // [Nb][G][16]: the kernels use b = -scale * zero
  const float* zero_f = nullptr;  // [Nb][G][16] fp32 zero points instead of `zero`, or null
  int64_t N = 0, K = 0, gs = 0;
};

struct Int8Weights {
  const int8_t* w = nullptr;    // int8_packed_bytes(N, K)
  const float* scale = nullptr; // [Nb][16]
  int64_t N = 0, K = 0;
};

// One call computes y[0:M, 16*nb0 : min(16*nb1, N)].
struct Problem {
  const void* x = nullptr;      // [M][ldx] fp32 or bf16 bits
  DType act = DType::F32;       // F32 or BF16
  int64_t M = 0, ldx = 0;
  const float* xsum = nullptr;  // int4 only: [M][G] group sums of x (group_sums below)
  const float* col_bias = nullptr;  // [N] fp32 or null
  float* y = nullptr;           // [M][ldy] fp32
  int64_t ldy = 0;
  int64_t nb0 = 0, nb1 = 0;     // block range
};

// ---- packing ----------------------------------------------------------------------------------
// qweight: canonical u8 [N][K/2] (k even in the low nibble); scales fp32 [N][G]; zeros u8
// [N][G]. Requires K % gs == 0 and gs % 4 == 0. Scalar.
void pack_int4(const uint8_t* qweight, const float* scales, const uint8_t* zeros, int64_t N,
               int64_t K, int64_t gs, uint8_t* w_out, float* scale_out, uint8_t* zero_out);
void pack_int4(const uint8_t* qweight, const float* scales, const float* zeros, int64_t N,
               int64_t K, int64_t gs, uint8_t* w_out, float* scale_out, float* zero_out);
// w_q: s8 [N][K]; w_scale fp32 [N]. pack_int8 packs every block on the calling thread;
// pack_int8_blocks writes blocks [nb0, nb1) of w_out and of scale_out and nothing else, so
// disjoint block ranges can be packed by different threads. Every ISA writes the same bytes
// (the _scalar one is the definition the others are tested against).
void pack_int8(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K, int8_t* w_out,
               float* scale_out);
void pack_int8_blocks(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K, int64_t nb0,
                      int64_t nb1, int8_t* w_out, float* scale_out);
void pack_int8_blocks_scalar(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                             int64_t nb0, int64_t nb1, int8_t* w_out, float* scale_out);
void pack_int8_blocks_avx2(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                           int64_t nb0, int64_t nb1, int8_t* w_out, float* scale_out);
void pack_int8_blocks_avx512(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                             int64_t nb0, int64_t nb1, int8_t* w_out, float* scale_out);

// The inverses of pack_int4 / pack_int8: the canonical buffers, bitwise what was packed.
void unpack_int4(const uint8_t* w, const float* scale, const uint8_t* zero, int64_t N, int64_t K,
                 int64_t gs, uint8_t* qweight, float* scales, uint8_t* zeros);
void unpack_int4(const uint8_t* w, const float* scale, const float* zero, int64_t N, int64_t K,
                 int64_t gs, uint8_t* qweight, float* scales, float* zeros);
void unpack_int8(const int8_t* w, const float* scale, int64_t N, int64_t K, int8_t* w_q,
                 float* w_scale);
// Columns [k0, k1) of ŵ = (q - z) * s in fp32 (the reference's roundings) from a packed int4
// weight, into dst [N, ldd] (column k0 at dst[n * ldd]). For the backward, which dequantizes
// one cache-sized column slab at a time. Scalar.
void dequant_int4_slab(const uint8_t* w, const float* scale, const uint8_t* zero, int64_t N,
                       int64_t K, int64_t gs, int64_t k0, int64_t k1, float* dst, int64_t ldd);
void dequant_int4_slab(const uint8_t* w, const float* scale, const float* zero, int64_t N,
                       int64_t K, int64_t gs, int64_t k0, int64_t k1, float* dst, int64_t ldd);
// Rows [k0, k1) of ŵᵀ, ŵ = q * s in fp32 (one rounded multiply of the exact float(q)), from a
// packed int8 weight, into dst [k1 - k0, ldd] (ldd >= N):
//     dst[(k - k0) * ldd + n] = float(q[n, k]) * s[n]
// Transposed because a k-pair of a block is 16 channels x 2 k: widened to 32-bit lanes it is
// two contiguous 16-float pieces of rows 2t and 2t + 1 of ŵᵀ, stored as whole vectors (the
// backward hands BLAS the transposed view).
void dequant_int8_slab_t(const int8_t* w, const float* scale, int64_t N, int64_t K, int64_t k0,
                         int64_t k1, float* dst, int64_t ldd);
void dequant_int8_slab_t_scalar(const int8_t* w, const float* scale, int64_t N, int64_t K,
                                int64_t k0, int64_t k1, float* dst, int64_t ldd);
void dequant_int8_slab_t_avx2(const int8_t* w, const float* scale, int64_t N, int64_t K,
                              int64_t k0, int64_t k1, float* dst, int64_t ldd);
void dequant_int8_slab_t_avx512(const int8_t* w, const float* scale, int64_t N, int64_t K,
                                int64_t k0, int64_t k1, float* dst, int64_t ldd);

// xsum[m][g] = sum of x[m][g*gs : (g+1)*gs] in fp32 (bf16 widened exactly); gs % 16 == 0.
void group_sums(const void* x, DType act, int64_t M, int64_t ldx, int64_t K, int64_t gs,
                float* xsum);

// ---- kernels ----------------------------------------------------------------------------------
// Which activation types the ISA in force takes natively (others are widened to fp32 by the
// caller): AVX-512 takes F32 and BF16, AVX2 and scalar take F32.
bool supports_act(DType act);
// Dispatching entry points (the ISA of isa(Family::WeightOnly), cpu_features.h).
void int4_gemm(const Int4Weights& w, const Problem& p);
void int8_gemm(const Int8Weights& w, const Problem& p);
// Per-ISA entry points (the test program calls each one it can run).
void int4_gemm_scalar(const Int4Weights& w, const Problem& p);
void int8_gemm_scalar(const Int8Weights& w, const Problem& p);
void int4_gemm_avx2(const Int4Weights& w, const Problem& p);
void int8_gemm_avx2(const Int8Weights& w, const Problem& p);
void int4_gemm_avx512(const Int4Weights& w, const Problem& p);
void int8_gemm_avx512(const Int8Weights& w, const Problem& p);

// Name of the kernel variant the dispatcher uses for `act` (for `qtorch info`).
const char* kernel_name(DType act);

}  // namespace qtorch::cpu::weight_only
