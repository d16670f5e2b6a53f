// int8 W8A8 on tensor cores: per-token activation quantization and the scaled int8 GEMM.
//
//   quantize_int8:   q[r, k] = clamp(rint(x[r, k] / s_r), -127, 127),  s_r = amax_r / 127
//   int8_scaled_mm:  out[m, n] = float(Σ_k a[m, k] b[n, k]) * s_a[m] * s_b[n] + bias[n]
//
// GEMM design (Ampere-style, also what runs on Hopper through mma.sync):
//   * a block computes a BM x BN tile of out; K is walked in BK = 64-byte slices;
//   * global -> shared through cp.async (16-byte, L1-bypassing) in a STAGES-deep ring, so
//     STAGES - 1 slices are in flight while the tensor cores work on the current one;
//   * shared -> registers with ldmatrix.x4, feeding mma.sync.m16n8k32 s8 x s8 -> s32: the
//     accumulation is exact integer arithmetic (|a b| <= 128^2; the op bounds K <= 131071);
//   * shared memory rows are 64 bytes = four 16-byte chunks; chunk c of row r is stored at
//     chunk c ^ ((r >> 1) & 3). ldmatrix reads one chunk from 8 consecutive rows per phase;
//     unswizzled, rows r and r + 2 hit the same banks (4-way conflict); swizzled, the 8 rows
//     land on 8 distinct 16-byte bank groups (rows r, r+1 differ by 64 bytes = half the banks,
//     and the XOR spreads the pairs over the other quarter-offsets);
//   * fused epilogue straight from the accumulator registers: int32 -> fp32, the two scales,
//     bias, one rounding to the output dtype. The fp32 order of operations is the reference's,
//     ((acc * s_a) * s_b) + bias, without FMA contraction, so fp32 output matches bit for bit.
// Not done: a Hopper wgmma/TMA path (sm_90a compiles this mma.sync kernel).
#include "common.cuh"
#include "kernels.h"

namespace qtorch_cuda {
namespace {

constexpr int kBK = 64;  // bytes of K per pipeline stage (two m16n8k32 steps)

// Byte offset of 16-byte chunk `chunk` (0..3) of tile row `row` in a [rows][64] int8 tile.
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// Grouped rasterization: consecutive blocks sweep GROUP_M row-tiles before moving right, so
// the A rows and B columns a wave of blocks needs stay in L2 together.
__device__ __forceinline__ void tile_coords(int num_m, int num_n, int& pm, int& pn) {
  constexpr int GROUP_M = 8;
  const int pid = blockIdx.x;
  const int per_group = GROUP_M * num_n;
  const int first_m = (pid / per_group) * GROUP_M;
  const int gsize = min(num_m - first_m, GROUP_M);
  pm = first_m + (pid % per_group) % gsize;
  pn = (pid % per_group) / gsize;
}

template <typename OutT>
__device__ __forceinline__ void store2(OutT* p, float v0, float v1, bool two, bool aligned);

template <>
__device__ __forceinline__ void store2<float>(float* p, float v0, float v1, bool two,
                                              bool aligned) {
  if (two && aligned) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  } else {
    p[0] = v0;
    if (two) p[1] = v1;
  }
}

template <>
__device__ __forceinline__ void store2<__half>(__half* p, float v0, float v1, bool two,
                                               bool aligned) {
  if (two && aligned) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
  } else {
    p[0] = __float2half_rn(v0);
    if (two) p[1] = __float2half_rn(v1);
  }
}

template <>
__device__ __forceinline__ void store2<__nv_bfloat16>(__nv_bfloat16* p, float v0, float v1,
                                                      bool two, bool aligned) {
  if (two && aligned) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
  } else {
    p[0] = __float2bfloat16_rn(v0);
    if (two) p[1] = __float2bfloat16_rn(v1);
  }
}

// BM x BN block tile, WM x WN warps, each warp a (BM / WM) x (BN / WN) tile of
// (BM / WM / 16) x (BN / WN / 8) m16n8 accumulators.
template <int BM, int BN, int WM, int WN, int STAGES, typename OutT>
__global__ void __launch_bounds__(WM * WN * 32)
    int8_mm_kernel(const int8_t* __restrict__ A,      // [M, lda]
                   const int8_t* __restrict__ B,      // [N, ldb]
                   const float* __restrict__ scale_a,  // [M]
                   const float* __restrict__ scale_b,  // [N]
                   const float* __restrict__ bias,     // [N] or nullptr
                   OutT* __restrict__ out,             // [M, N]
                   int M, int N, int Kp, int lda, int ldb) {
  constexpr int NT = WM * WN * 32;
  constexpr int WTM = BM / WM, WTN = BN / WN;
  constexpr int MI = WTM / 16, NI = WTN / 8;
  static_assert(MI >= 1 && NI % 2 == 0, "warp tile must be 16 x 16k");
  constexpr int A_STAGE = BM * kBK, B_STAGE = BN * kBK;  // bytes

  extern __shared__ __align__(128) int8_t smem[];
  int8_t* As = smem;
  int8_t* Bs = smem + STAGES * A_STAGE;

  int pm, pn;
  tile_coords(ceil_div(M, BM), ceil_div(N, BN), pm, pn);
  const int m0 = pm * BM, n0 = pn * BN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int KT = Kp / kBK + (Kp % kBK != 0);

  // One 64-byte K slice of A and B into stage `st`. Rows past M/N and chunks past Kp are
  // zero-filled, so the MMAs need no bounds checks.
  auto load_stage = [&](int st, int kt) {
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = tid; i < BM * 4; i += NT) {
      const int r = i >> 2, c = i & 3;
      const int gm = m0 + r, gk = k0 + (c << 4);
      const bool ok = gm < M && gk < Kp;
      const int8_t* src = A + (ok ? (size_t)gm * lda + gk : 0);
      cp_async16(As + st * A_STAGE + swz(r, c), src, ok);
    }
#pragma unroll
    for (int i = tid; i < BN * 4; i += NT) {
      const int r = i >> 2, c = i & 3;
      const int gn = n0 + r, gk = k0 + (c << 4);
      const bool ok = gn < N && gk < Kp;
      const int8_t* src = B + (ok ? (size_t)gn * ldb + gk : 0);
      cp_async16(Bs + st * B_STAGE + swz(r, c), src, ok);
    }
  };

  int acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  // Prologue: STAGES - 1 slices in flight. A commit per slot even when empty keeps the
  // group count uniform, so wait_group<STAGES - 2> always means "slice kt has landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // slice kt visible to all; every warp is done with slice kt - 1
    // Refill the slot slice kt - 1 used (free after the barrier above).
    const int nk = kt + STAGES - 1;
    if (nk < KT) load_stage(nk % STAGES, nk);
    cp_async_commit();

    const int8_t* as = As + (kt % STAGES) * A_STAGE;
    const int8_t* bs = Bs + (kt % STAGES) * B_STAGE;
#pragma unroll
    for (int kk = 0; kk < kBK / 32; ++kk) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        // matrices: (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (8-15, 16-31)
        // = the a0..a3 registers of m16n8k32.
        const int r = wm * WTM + i * 16 + (lane & 15);
        ldmatrix_x4(af[i], as + swz(r, kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int j = 0; j < NI / 2; ++j) {
        // matrices: (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31)
        // = {b0, b1} of n-block 2j, then of n-block 2j + 1.
        const int r = wn * WTN + j * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t t[4];
        ldmatrix_x4(t, bs + swz(r, kk * 2 + ((lane >> 3) & 1)));
        bf[2 * j][0] = t[0];
        bf[2 * j][1] = t[1];
        bf[2 * j + 1][0] = t[2];
        bf[2 * j + 1][1] = t[3];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_s8_16832(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. Accumulator e of an m16n8 tile sits at row gid + 8 * (e / 2), column
  // 2 * tig + (e % 2), gid = lane / 4, tig = lane % 4.
  const int gid = lane >> 2, tig = lane & 3;
  const bool n_even = (N & 1) == 0;  // then column pairs (2 tig, 2 tig + 1) are aligned
#pragma unroll
  for (int j = 0; j < NI; ++j) {
    const int col = n0 + wn * WTN + j * 8 + 2 * tig;
    if (col >= N) continue;
    const bool two = col + 1 < N;
    const float sb0 = scale_b[col], sb1 = two ? scale_b[col + 1] : 0.f;
    const float bb0 = bias ? bias[col] : 0.f, bb1 = (bias && two) ? bias[col + 1] : 0.f;
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * WTM + i * 16 + gid + 8 * h;
        if (row >= M) continue;
        const float sa = scale_a[row];
        // (acc * s_a) * s_b + bias, each step rounded (no FMA): the reference's order.
        float v0 = __fmul_rn(__fmul_rn(static_cast<float>(acc[i][j][2 * h]), sa), sb0);
        float v1 = __fmul_rn(__fmul_rn(static_cast<float>(acc[i][j][2 * h + 1]), sa), sb1);
        if (bias) {
          v0 = __fadd_rn(v0, bb0);
          v1 = __fadd_rn(v1, bb1);
        }
        store2<OutT>(out + (size_t)row * N + col, v0, v1, two, n_even);
      }
    }
  }
}

template <int BM, int BN, int WM, int WN, int STAGES, typename OutT>
cudaError_t run_mm(const int8_t* a, const int8_t* b, const float* sa, const float* sb,
                   const float* bias, void* out, int M, int N, int Kp, int lda, int ldb,
                   cudaStream_t stream) {
  auto kernel = int8_mm_kernel<BM, BN, WM, WN, STAGES, OutT>;
  constexpr int smem = STAGES * (BM + BN) * kBK;
  // Over 48 KiB of dynamic shared memory needs an opt-in, per device: set it on every launch
  // (a cheap host call) rather than caching it and missing a second GPU.
  cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const int blocks = ceil_div(M, BM) * ceil_div(N, BN);
  kernel<<<blocks, WM * WN * 32, smem, stream>>>(a, b, sa, sb, bias, static_cast<OutT*>(out), M,
                                                 N, Kp, lda, ldb);
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t dispatch_mm(const int8_t* a, const int8_t* b, const float* sa, const float* sb,
                        const float* bias, void* out, int M, int N, int Kp, int lda, int ldb,
                        cudaStream_t stream) {
  // Small M (decode, small batches): a 64-row tile wastes less of the MMA on padding rows.
  if (M <= 64)
    return run_mm<64, 128, 2, 2, 4, OutT>(a, b, sa, sb, bias, out, M, N, Kp, lda, ldb, stream);
  return run_mm<128, 128, 2, 4, 4, OutT>(a, b, sa, sb, bias, out, M, N, Kp, lda, ldb, stream);
}

// ---- quantize_int8 ---------------------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// One block per row. Pass 1: amax (fp32). Pass 2: q = clamp(rint(x / s), -127, 127) with
// IEEE division (nvcc's default -prec-div=true) and rint = round-half-to-even, exactly the
// reference's torch.round(x / scale). The row is read twice; the second read hits L2/L1.
// SMOOTH (SmoothQuant): each element is x[r, k] / smooth[k] (IEEE division in fp32) as it is
// read, in both passes, so the smoothed activation never goes to memory.
template <typename T, int VEC, bool SMOOTH>
__global__ void __launch_bounds__(256)
    quantize_int8_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                         float* __restrict__ scale, int K, int ldq,
                         const float* __restrict__ smooth) {
  __shared__ float scratch[32];
  const int row = blockIdx.x;
  const T* xr = x + (size_t)row * K;
  int8_t* qr = q + (size_t)row * ldq;
  const int nvec = K / VEC;

  // fmaxf drops NaN operands, so NaN and ±inf entries are counted alongside: a row holding one
  // gets a NaN scale and q = 0, as in the reference (docs/semantics.md), so its outputs are NaN.
  float amax = 0.f, nans = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> v = reinterpret_cast<const Vec<T, VEC>*>(xr)[i];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float f = to_float(v.v[e]);
      if constexpr (SMOOTH) f = f / smooth[i * VEC + e];
      amax = fmaxf(amax, fabsf(f));
      nans += isfinite(f) ? 0.f : 1.f;
    }
  }
  amax = block_reduce<true>(amax, scratch);
  nans = block_reduce<false>(nans, scratch);
  const bool bad = nans > 0.f;
  // A scale that underflows to 0 (amax < 127 * 2^-149) counts as amax == 0: scale 1, q 0.
  float s = amax / 127.f;
  s = bad ? NAN : (s == 0.f ? 1.f : s);
  if (threadIdx.x == 0) scale[row] = s;

  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> v = reinterpret_cast<const Vec<T, VEC>*>(xr)[i];
    Vec<int8_t, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float f = to_float(v.v[e]);
      if constexpr (SMOOTH) f = f / smooth[i * VEC + e];
      const float r = rintf(f / s);
      const int8_t qv = static_cast<int8_t>(static_cast<int>(fminf(fmaxf(r, -127.f), 127.f)));
      o.v[e] = bad ? int8_t(0) : qv;
    }
    reinterpret_cast<Vec<int8_t, VEC>*>(qr)[i] = o;
  }
  // K padding columns read by the GEMM must be zero.
  for (int k = K + threadIdx.x; k < ldq; k += blockDim.x) qr[k] = 0;
}

template <typename T, bool SMOOTH>
cudaError_t run_quantize(const void* x, int8_t* q, float* scale, int M, int K, int ldq,
                         const float* smooth, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  // Vector path when each row starts 16-byte aligned in x and VEC-byte aligned in q.
  const bool vec = (K % VEC == 0) && (ldq % VEC == 0) &&
                   (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(q) % VEC == 0);
  if (vec)
    quantize_int8_kernel<T, VEC, SMOOTH>
        <<<M, 256, 0, stream>>>(static_cast<const T*>(x), q, scale, K, ldq, smooth);
  else
    quantize_int8_kernel<T, 1, SMOOTH>
        <<<M, 256, 0, stream>>>(static_cast<const T*>(x), q, scale, K, ldq, smooth);
  return cudaGetLastError();
}

}  // namespace

template <bool SMOOTH>
cudaError_t quantize_for(const void* x, int x_dtype, int8_t* q, float* scale, int M, int K,
                         int ldq, const float* smooth, cudaStream_t stream) {
  switch (x_dtype) {
    case kFloat32: return run_quantize<float, SMOOTH>(x, q, scale, M, K, ldq, smooth, stream);
    case kFloat16: return run_quantize<__half, SMOOTH>(x, q, scale, M, K, ldq, smooth, stream);
    case kBFloat16:
      return run_quantize<__nv_bfloat16, SMOOTH>(x, q, scale, M, K, ldq, smooth, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_quantize_int8(const void* x, int x_dtype, int8_t* q, float* scale, int M,
                                 int K, int ldq, cudaStream_t stream, const float* smooth) {
  if (M == 0) return cudaSuccess;
  if (smooth) return quantize_for<true>(x, x_dtype, q, scale, M, K, ldq, smooth, stream);
  return quantize_for<false>(x, x_dtype, q, scale, M, K, ldq, nullptr, stream);
}

cudaError_t launch_int8_scaled_mm(const int8_t* a, const int8_t* b, const float* scale_a,
                                  const float* scale_b, const float* bias, void* out,
                                  int out_dtype, int M, int N, int Kp, int lda, int ldb,
                                  cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (Kp % 16 || lda % 16 || ldb % 16 || reinterpret_cast<uintptr_t>(a) % 16 ||
      reinterpret_cast<uintptr_t>(b) % 16)
    return cudaErrorInvalidValue;
  switch (out_dtype) {
    case kFloat32: return dispatch_mm<float>(a, b, scale_a, scale_b, bias, out, M, N, Kp, lda, ldb, stream);
    case kFloat16: return dispatch_mm<__half>(a, b, scale_a, scale_b, bias, out, M, N, Kp, lda, ldb, stream);
    case kBFloat16:
      return dispatch_mm<__nv_bfloat16>(a, b, scale_a, scale_b, bias, out, M, N, Kp, lda, ldb, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qtorch_cuda
