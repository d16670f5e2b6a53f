// W4A16 on tensor cores, Marlin-style: out[M, N] = x[M, K] @ ŵ.T (+ bias), ŵ = (q - z) * s.
//
// Weights are repacked once (qtorch/backends/_cuda_pack.py) from the canonical layout into the
// order the mma.m16n8k16 B fragments want, so the kernel streams them with 16-byte loads and
// never shuffles:
//   qpacked int32 [Kp/64][Np/16][32 lanes][4 words]; word ks (k16 step) of lane l holds the 8
//   nibbles the lane needs for one k16 x n16 block: with g = l / 4, t = l % 4,
//     nibble 0, 4: q[n0][k 2t], q[n0][k 2t+1]      nibble 1, 5: q[n0][2t+8], q[n0][2t+9]
//     nibble 2, 6: q[n1][k 2t], q[n1][k 2t+1]      nibble 3, 7: q[n1][2t+8], q[n1][2t+9]
//   (n0 = 16 nb + g, n1 = n0 + 8, k relative to 16 ks). Nibbles i and i + 4 sit 16 bits apart,
//   so one lop3 turns them into a half2/bfloat162 pair, which is exactly one B register
//   {B[2t][n], B[2t+1][n]} or {B[2t+8][n], B[2t+9][n]}.
//   szpacked int32 [Kp/gs][Np]: {scale, MAGIC + zero} as two 16-bit values of x's dtype.
//
// int4 -> 16-bit in registers ("magic number"): OR-ing a nibble v into the mantissa of MAGIC
// gives the exact value MAGIC + v (fp16: 0x6400 = 1024, 10 mantissa bits; bf16: 0x4300 = 128,
// 7 mantissa bits, v < 16 fits both). Subtracting MAGIC + z is exact (small integers), leaving
// one rounding, in the multiply by the 16-bit scale. lop3 0xEA computes (a & b) | c in one op.
//
// Pipeline: x tile [16 MT][64], weight tile [BN][64] (packed) and two rows of group scales per
// 64-wide K chunk travel by cp.async through a STAGES-deep shared-memory ring; weights carry an
// L2 evict-first hint (each is read once per M tile, x is re-read by every block). fp32
// accumulators; split-K across blockIdx.z for small M, where N / BN blocks alone cannot fill
// the GPU: partial sums go to an fp32 workspace with atomicAdd (order-dependent in the last
// bits) and a second kernel adds the bias and casts.
//
// W8A16 (int8_weight_only_linear) runs on the same kernel with W8 = true:
//   qpacked int32 [Kp/64][Np/16][2 units][32 lanes][4 words] (unit-major: each 16-byte
//   shared-memory read of a warp is contiguous); words 2 ks, 2 ks + 1 of lane l hold,
//   for columns n0 and n1, the bytes q[n][2t], q[n][2t+1], q[n][2t+8], q[n][2t+9] (low byte
//   first), each stored as q + 128 (0..255). fp16: prmt places two bytes under 0x64 (1024 + u,
//   exact), minus 1152 gives q exactly. bf16 has too few mantissa bits for 1024 + u, so the
//   bytes go through fp32 (0x4B000000 | u = 2^23 + u) and are packed back to bf16 (exact:
//   |q| <= 127 needs 7 bits). The per-channel scale is applied to the fp32 accumulator in the
//   epilogue, so the MMA sees the exact integers.
#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace qtorch_cuda {
namespace {

constexpr int kKC = 64;      // K elements per pipeline stage (four k16 MMA steps)
constexpr int kWarps = 4;    // warps per block, side by side along N

template <typename T> struct Magic;
template <> struct Magic<__half> { static constexpr uint32_t value = 0x64006400u; };       // 1024
template <> struct Magic<__nv_bfloat16> { static constexpr uint32_t value = 0x43004300u; };  // 128

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));  // (a & b) | c
  return d;
}

template <typename T> struct Pair;
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

// (p - zb) * s on a pair, p = MAGIC + q from lop3, zb = MAGIC + zero, s = scale, each pair
// holding one value broadcast to both halves.
template <typename T>
__device__ __forceinline__ uint32_t dq_pair(uint32_t p, uint32_t zb, uint32_t s) {
  using T2 = typename Pair<T>::type;
  const T2 r = __hmul2(__hsub2(*reinterpret_cast<const T2*>(&p), *reinterpret_cast<const T2*>(&zb)),
                       *reinterpret_cast<const T2*>(&s));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// One packed word -> B fragments of the two n8 blocks of a k16 x n16 block.
// sz0 / sz1: {scale, MAGIC + zero} words of columns n0 / n1.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t q, uint32_t sz0, uint32_t sz1,
                                             uint32_t (&b0)[2], uint32_t (&b1)[2]) {
  constexpr uint32_t kMask = 0x000f000fu, kMagic = Magic<T>::value;
  const uint32_t s0 = __byte_perm(sz0, 0, 0x1010), z0 = __byte_perm(sz0, 0, 0x3232);
  const uint32_t s1 = __byte_perm(sz1, 0, 0x1010), z1 = __byte_perm(sz1, 0, 0x3232);
  b0[0] = dq_pair<T>(lop3_and_or(q, kMask, kMagic), z0, s0);        // nibbles 0, 4
  b0[1] = dq_pair<T>(lop3_and_or(q >> 4, kMask, kMagic), z0, s0);   // nibbles 1, 5
  b1[0] = dq_pair<T>(lop3_and_or(q >> 8, kMask, kMagic), z1, s1);   // nibbles 2, 6
  b1[1] = dq_pair<T>(lop3_and_or(q >> 12, kMask, kMagic), z1, s1);  // nibbles 3, 7
}

// One W8 packed word (bytes u = q + 128 for k 2t, 2t+1, 2t+8, 2t+9 of one column) -> the two
// B registers of that column, holding q exactly.
template <typename T>
__device__ __forceinline__ void dequant_w8(uint32_t w, uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void dequant_w8<__half>(uint32_t w, uint32_t (&b)[2]) {
  const uint32_t lo = __byte_perm(w, 0x64646464u, 0x4140);  // {1024 + u0, 1024 + u1}
  const uint32_t hi = __byte_perm(w, 0x64646464u, 0x4342);  // {1024 + u2, 1024 + u3}
  const __half2 bias = __half2half2(__ushort_as_half(0x6480));  // 1152 = 1024 + 128
  const __half2 r0 = __hsub2(*reinterpret_cast<const __half2*>(&lo), bias);
  const __half2 r1 = __hsub2(*reinterpret_cast<const __half2*>(&hi), bias);
  b[0] = *reinterpret_cast<const uint32_t*>(&r0);
  b[1] = *reinterpret_cast<const uint32_t*>(&r1);
}

template <>
__device__ __forceinline__ void dequant_w8<__nv_bfloat16>(uint32_t w, uint32_t (&b)[2]) {
  constexpr float kBias = 8388736.f;  // 2^23 + 128
  const float f0 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440)) - kBias;
  const float f1 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7441)) - kBias;
  const float f2 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7442)) - kBias;
  const float f3 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7443)) - kBias;
  const __nv_bfloat162 r0 = __floats2bfloat162_rn(f0, f1), r1 = __floats2bfloat162_rn(f2, f3);
  b[0] = *reinterpret_cast<const uint32_t*>(&r0);
  b[1] = *reinterpret_cast<const uint32_t*>(&r1);
}

// x tile rows are 64 halves = 128 bytes = 8 chunks; chunk c of row r lives at c ^ (r & 7), so
// the 8 rows one ldmatrix phase reads fall on 8 different 16-byte bank groups.
__device__ __forceinline__ int xswz(int row, int chunk) {
  return row * 128 + ((chunk ^ (row & 7)) << 4);
}

template <typename T>
__device__ __forceinline__ void store_out(T* p, float v) {
  *p = from_float<T>(v);
}

// Weight format of the shared kernel: int4 with group scales/zeros (W4A16) or int8 with a
// per-channel scale (W8A16).
template <bool W8> struct WFmt {
  static constexpr int kUnitsPerLane = W8 ? 2 : 1;  // 16-byte packed units per lane per chunk
};

// MT: m16 tiles per block (block rows = 16 MT); NW: n16 blocks per warp (BN = 64 NW).
template <typename T, bool W8, int MT, int NW, int STAGES>
__global__ void __launch_bounds__(kWarps * 32)
    weight_only_kernel(const T* __restrict__ x,          // [M, K]
                       const int4* __restrict__ qp,        // [Kp/64][Np/16][UPL][32 lanes] x 16 B
                       const uint32_t* __restrict__ szp,   // int4: [Kp/gs][Np]; W8: unused
                       const float* __restrict__ wscale,   // W8: [N] channel scales; int4: unused
                       const T* __restrict__ bias,         // [N] or nullptr
                       T* __restrict__ out,                // [M, N]   (split_k == 1)
                       float* __restrict__ ws,             // [M, N]   (split_k > 1)
                       int M, int N, int K, int group_size, int chunks_per_split) {
  constexpr int NT = kWarps * 32;
  constexpr int BM = 16 * MT, BN = kWarps * NW * 16;
  constexpr int X_BYTES = BM * kKC * 2;
  constexpr int UPL = WFmt<W8>::kUnitsPerLane;
  constexpr int W_UNITS = kWarps * NW * 32 * UPL;  // 16-byte units of packed weights per stage
  constexpr int SZ_WORDS = W8 ? 0 : 2 * BN;        // two group rows (int4 only)
  constexpr int STAGE_BYTES = X_BYTES + W_UNITS * 16 + SZ_WORDS * 4;

  extern __shared__ __align__(128) uint8_t smem[];

  const int Np = (N + 15) & ~15, Nb16 = Np >> 4;
  const int Kp = (K + kKC - 1) / kKC * kKC;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int kc_begin = blockIdx.z * chunks_per_split;
  const int kc_end = min(Kp / kKC, kc_begin + chunks_per_split);
  if (kc_begin >= kc_end) return;  // whole block: nothing to add (workspace starts at 0)
  const int KT = kc_end - kc_begin;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  auto load_stage = [&](int st, int kc) {
    uint8_t* base = smem + st * STAGE_BYTES;
    // x: BM rows x 8 chunks of 8 elements; rows past M and columns past K read as 0.
#pragma unroll
    for (int i = tid; i < BM * 8; i += NT) {
      const int r = i >> 3, c = i & 7;
      const int gm = m0 + r, gk = kc * kKC + c * 8;
      const bool ok = gm < M && gk < K;
      cp_async16(base + xswz(r, c), x + (ok ? (size_t)gm * K + gk : 0), ok);
    }
    // packed weights: the block's n16 blocks of chunk kc are contiguous.
    const int4* wsrc = qp + ((size_t)kc * Nb16 + (n0 >> 4)) * 32 * UPL;
    int4* wdst = reinterpret_cast<int4*>(base + X_BYTES);
#pragma unroll
    for (int u = tid; u < W_UNITS; u += NT) {
      const bool ok = (n0 >> 4) + u / (32 * UPL) < Nb16;
      cp_async16_stream(wdst + u, ok ? wsrc + u : qp, ok);
    }
    // group scales: rows of k = 64 kc and 64 kc + 32 (group_size >= 32, so each k16 step
    // of the chunk lies in one of them; for group_size >= 64 both rows are the same).
    uint32_t* sdst = reinterpret_cast<uint32_t*>(base + X_BYTES + W_UNITS * 16);
#pragma unroll
    for (int u = tid; u < SZ_WORDS / 4; u += NT) {  // (no iterations for W8)
      const int h = u / (BN / 4), c = (u % (BN / 4)) * 4;
      const int g = (kc * kKC + 32 * h) / group_size;
      const bool ok = n0 + c < Np;
      cp_async16(sdst + h * BN + c, ok ? szp + (size_t)g * Np + n0 + c : szp, ok);
    }
  };

  float acc[MT][NW][2][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NW; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][h][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, kc_begin + s);
    cp_async_commit();
  }

  const int gid = lane >> 2;
  for (int it = 0; it < KT; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nk = it + STAGES - 1;
    if (nk < KT) load_stage(nk % STAGES, kc_begin + nk);
    cp_async_commit();

    const uint8_t* base = smem + (it % STAGES) * STAGE_BYTES;
    const int4* wsm = reinterpret_cast<const int4*>(base + X_BYTES);
    const uint32_t* ssm = reinterpret_cast<const uint32_t*>(base + X_BYTES + W_UNITS * 16);

    int4 wq[NW][UPL];
#pragma unroll
    for (int j = 0; j < NW; ++j)
#pragma unroll
      for (int h = 0; h < UPL; ++h) wq[j][h] = wsm[((warp * NW + j) * UPL + h) * 32 + lane];

#pragma unroll
    for (int ks = 0; ks < kKC / 16; ++ks) {
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        // matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a0..a3.
        const int r = i * 16 + (lane & 15);
        ldmatrix_x4(af[i], base + xswz(r, ks * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        uint32_t b0[2], b1[2];
        if constexpr (W8) {
          // words 2 ks (column n0) and 2 ks + 1 (column n1) of the lane's 8
          const int4 v = wq[j][ks >> 1];
          dequant_w8<T>((ks & 1) ? (uint32_t)v.z : (uint32_t)v.x, b0);
          dequant_w8<T>((ks & 1) ? (uint32_t)v.w : (uint32_t)v.y, b1);
        } else {
          const uint32_t* srow = ssm + (ks >= 2 ? BN : 0);
          const int col = (warp * NW + j) * 16 + gid;  // n0 of this lane, block-relative
          const int4 v = wq[j][0];
          const uint32_t word = ks == 0   ? (uint32_t)v.x
                                : ks == 1 ? (uint32_t)v.y
                                : ks == 2 ? (uint32_t)v.z
                                          : (uint32_t)v.w;
          dequant_word<T>(word, srow[col], srow[col + 8], b0, b1);
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_16816<T>(acc[i][j][0], af[i], b0);
          mma_16816<T>(acc[i][j][1], af[i], b1);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Accumulator e of an m16n8 tile: row gid + 8 (e / 2), column 2 tig + e % 2.
  const int tig = lane & 3;
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int colb = n0 + (warp * NW + j) * 16 + h * 8 + 2 * tig;
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + i * 16 + gid + 8 * (e >> 1), col = colb + (e & 1);
          if (row >= M || col >= N) continue;
          float v = acc[i][j][h][e];
          if constexpr (W8) v *= wscale[col];  // ŵ = q * scale[n], applied once per output
          if (split) {
            atomicAdd(ws + (size_t)row * N + col, v);
          } else {
            store_out<T>(out + (size_t)row * N + col, bias ? v + to_float(bias[col]) : v);
          }
        }
    }
}

// Split-K epilogue: out = (T)(ws + bias).
template <typename T>
__global__ void splitk_finish_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                                     T* __restrict__ out, int M, int N) {
  const size_t total = (size_t)M * N;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const float v = ws[i];
    out[i] = from_float<T>(bias ? v + to_float(bias[i % N]) : v);
  }
}

template <typename T, bool W8, int MT, int NW, int STAGES>
cudaError_t run_wo(const void* x, const int32_t* qp, const int32_t* szp, const float* wscale,
                   const void* bias, void* out, float* ws, int M, int N, int K, int group_size,
                   int split_k, cudaStream_t stream) {
  constexpr int BM = 16 * MT, BN = kWarps * NW * 16;
  constexpr int STAGE_BYTES =
      BM * kKC * 2 + kWarps * NW * 32 * 16 * WFmt<W8>::kUnitsPerLane + (W8 ? 0 : 2 * BN * 4);
  constexpr int smem = STAGES * STAGE_BYTES;
  auto kernel = weight_only_kernel<T, W8, MT, NW, STAGES>;
  // Over 48 KiB of dynamic shared memory needs an opt-in, per device: set it on every launch
  // (a cheap host call) rather than caching it and missing a second GPU.
  cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const int chunks = ceil_div(K, kKC);
  const int per = ceil_div(chunks, split_k);
  const int splits = ceil_div(chunks, per);  // no empty trailing splits
  dim3 grid(ceil_div(N, BN), ceil_div(M, BM), splits);
  kernel<<<grid, kWarps * 32, smem, stream>>>(
      static_cast<const T*>(x), reinterpret_cast<const int4*>(qp),
      reinterpret_cast<const uint32_t*>(szp), wscale, static_cast<const T*>(bias),
      static_cast<T*>(out),
      ws, M, N, K, group_size, per);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || splits == 1) return e;
  const int threads = 256;
  const int blocks = (int)std::min<size_t>(((size_t)M * N + threads - 1) / threads, 65535);
  splitk_finish_kernel<T><<<blocks, threads, 0, stream>>>(ws, static_cast<const T*>(bias),
                                                          static_cast<T*>(out), M, N);
  return cudaGetLastError();
}

// Tile shape by M: one m16 tile and 256 columns per block for decode (M <= 16), two m16 tiles
// for M <= 32, four m16 tiles x 128 columns beyond (grid.y covers the rest of M).
inline void pick_shape(int M, int& bm, int& bn) {
  if (M <= 16) { bm = 16; bn = 256; }
  else if (M <= 32) { bm = 32; bn = 256; }
  else { bm = 64; bn = 128; }
}

template <typename T, bool W8>
cudaError_t dispatch_wo(const void* x, const int32_t* qp, const int32_t* szp, const float* wscale,
                        const void* bias, void* out, float* ws, int M, int N, int K,
                        int group_size, int split_k, cudaStream_t stream) {
  if (M <= 16)
    return run_wo<T, W8, 1, 4, 4>(x, qp, szp, wscale, bias, out, ws, M, N, K, group_size, split_k, stream);
  if (M <= 32)
    return run_wo<T, W8, 2, 4, 4>(x, qp, szp, wscale, bias, out, ws, M, N, K, group_size, split_k, stream);
  return run_wo<T, W8, 4, 2, 4>(x, qp, szp, wscale, bias, out, ws, M, N, K, group_size, split_k, stream);
}

}  // namespace

int weight_only_pick_split_k(int M, int N, int K, int num_sms) {
  int bm, bn;
  pick_shape(M, bm, bn);
  const int blocks = ceil_div(N, bn) * ceil_div(M, bm);
  const int chunks = ceil_div(K, kKC);
  // Aim for two waves of blocks; keep at least 4 chunks (K = 256) per split so the pipeline
  // prologue is amortized.
  int split = ceil_div(2 * num_sms, blocks);
  split = std::min(split, std::max(1, chunks / 4));
  split = std::max(split, 1);
  const int per = ceil_div(chunks, split);
  return ceil_div(chunks, per);
}

cudaError_t launch_int4_weight_only_linear(const void* x, int x_dtype, const int32_t* qpacked,
                                           const int32_t* szpacked, const void* bias, void* out,
                                           float* workspace, int M, int N, int K, int group_size,
                                           int split_k, int num_sms, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 8 || group_size < 32 || group_size % 32 || K % group_size ||
      reinterpret_cast<uintptr_t>(x) % 16)
    return cudaErrorInvalidValue;
  if (split_k <= 0) split_k = weight_only_pick_split_k(M, N, K, num_sms);
  if (split_k > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case kFloat16:
      return dispatch_wo<__half, false>(x, qpacked, szpacked, nullptr, bias, out, workspace, M, N, K, group_size, split_k, stream);
    case kBFloat16:
      return dispatch_wo<__nv_bfloat16, false>(x, qpacked, szpacked, nullptr, bias, out, workspace, M, N, K, group_size, split_k, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_int8_weight_only_linear(const void* x, int x_dtype, const int32_t* qpacked,
                                           const float* w_scale, const void* bias, void* out,
                                           float* workspace, int M, int N, int K, int split_k,
                                           int num_sms, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 8 || reinterpret_cast<uintptr_t>(x) % 16) return cudaErrorInvalidValue;
  if (split_k <= 0) split_k = weight_only_pick_split_k(M, N, K, num_sms);
  if (split_k > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case kFloat16:
      return dispatch_wo<__half, true>(x, qpacked, nullptr, w_scale, bias, out, workspace, M, N, K, 64, split_k, stream);
    case kBFloat16:
      return dispatch_wo<__nv_bfloat16, true>(x, qpacked, nullptr, w_scale, bias, out, workspace, M, N, K, 64, split_k, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qtorch_cuda
