// AVX-512 VNNI W8A8 kernels (compiled with -mavx512{f,bw,vl,dq,vnni}, kernels/isa_flags.txt;
// chosen at run time only on CPUs that have them). Contracts and layouts: int8_mm.h.
//
// Micro-kernel: MR (<= 6) rows x one 64-channel panel, full K. Per group of 4 k it loads the
// panel's 4 zmm (64 channels x 4 k, 256 contiguous bytes), broadcasts each row's 4 u8 as one
// 32-bit lane and issues MR x 4 vpdpbusd into 24 zmm int32 accumulators (24 + 4 B registers
// fit the 32 zmm; 24 independent chains cover vpdpbusd's latency at one issue per cycle).
// A 64 x K weight panel (256 KiB at K = 4096) stays in L2 while every row block of the
// thread's share walks it; A rows are read sequentially (MR streams).
//
// Packing (pack_b_panels): a packed group is the 32-bit lane (4 consecutive k) of one channel,
// so a panel is the 32-bit transpose of the weight rows: 16 rows x 64 bytes (16 lanes each)
// are loaded, transposed in registers (16 x 16, 64 shuffles) and stored as 16 groups of 16
// channels; vpdpbusd with a vector of ones sums each channel's 4 bytes into its lane, so the
// compensation needs no horizontal reduction.
//
// Dequantization (dequant_b_slab_t): one 64-byte load is 16 channels x 4 k; each byte becomes
// an exact float with a vpternlogd and a vsubps (exact_byte0/1, simd_avx512.h; bytes 2 and 3
// after one shift), one vmulps by the channel scales rounds it once, and the 16 floats are a
// contiguous piece of row k of ŵᵀ.
#include <immintrin.h>

#include <cstring>

#include "kernels/int8_mm.h"
#include "kernels/simd_avx512.h"

namespace qtorch::cpu::int8_mm::avx512 {

namespace {

using namespace qtorch::cpu::simd;

constexpr int kMR = 6;

inline __mmask16 tail16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }
inline __mmask64 tail64(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

template <DType T>
inline __m512 load16(const void* x, int64_t i, __mmask16 m) {
  if constexpr (T == DType::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i));
  } else if constexpr (T == DType::BF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
  }
}

// 16 elements of x from i, divided by the SmoothQuant scale (column k) when kSmooth; masked-off
// lanes read 0 / 1 = 0.
template <DType T, bool kSmooth>
inline __m512 load16s(const void* x, int64_t i, const float* smooth, int64_t k, __mmask16 m) {
  const __m512 v = load16<T>(x, i, m);
  if constexpr (kSmooth) return _mm512_div_ps(v, _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), m,
                                                                      smooth + k));
  else return v;
}

template <DType T, bool kSmooth>
void quantize_rows_t(const void* x, int64_t K, int64_t ldx, int64_t m0, int64_t m1,
                     float* scale, int8_t* q, int64_t ldq, uint8_t* ap, const float* smooth) {
  const int64_t Kp = padded_k(K);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m512i shift = _mm512_set1_epi32(128);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * ldx;
    // Integer max of the |x| bit patterns: finds amax and NaN/inf at once (int8_mm.h).
    __m512i vmax = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16)
      vmax = _mm512_max_epi32(
          vmax, _mm512_castps_si512(_mm512_abs_ps(
                    load16s<T, kSmooth>(x, base + k, smooth, k, tail16(K - k)))));
    const uint32_t amax_bits = uint32_t(_mm512_reduce_max_epi32(vmax));
    const float s = row_scale_from_bits(amax_bits);
    scale[m] = s;
    if (amax_bits >= kNonFiniteBits) {  // a NaN/inf row: q = 0 (its NaN scale poisons the output)
      for (int64_t k = 0; k < K; ++k) {
        if (q) q[m * ldq + k] = 0;
        if (ap) ap[m * Kp + k] = 128;
      }
      if (ap)
        for (int64_t k = K; k < Kp; ++k) ap[m * Kp + k] = 128;
      continue;
    }
    // q = clamp(rne(x / s)): true division (not x * (127 / amax)) so the result is bitwise the
    // reference's; cvtps2dq rounds half to even under the default MXCSR.
    const __m512 vs = _mm512_set1_ps(s);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = tail16(K - k);
      __m512i v =
          _mm512_cvtps_epi32(_mm512_div_ps(load16s<T, kSmooth>(x, base + k, smooth, k, mk), vs));
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      if (q) _mm512_mask_cvtepi32_storeu_epi8(q + m * ldq + k, mk, v);
      if (ap) _mm512_mask_cvtepi32_storeu_epi8(ap + m * Kp + k, mk, _mm512_add_epi32(v, shift));
    }
    if (ap)
      for (int64_t k = K; k < Kp; ++k) ap[m * Kp + k] = 128;
  }
}

inline __m512i bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// fp32 -> bf16 with integer ops (no AVX512-BF16 needed): round to nearest even, a NaN kept a
// quiet NaN, as f32_to_bf16 (dtype.h) and the AVX2 file. Unlike vcvtneps2bf16, an fp32
// denormal is rounded, not flushed to zero, as the reference (torch) does.
inline __m256i bf16_rne(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  const __m512i q =
      _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(q);
}

// Epilogue for one row of one panel: d = acc - comp, then the fused scale/bias/cast.
inline void store_row(__m512i a0, __m512i a1, __m512i a2, __m512i a3, int64_t m, int64_t n0,
                      int64_t nn, const int32_t* comp, const Epilogue& ep) {
  const __m512i acc[4] = {a0, a1, a2, a3};
  const __m512 sa = ep.type == DType::S32 ? _mm512_setzero_ps() : _mm512_set1_ps(ep.scale_a[m]);
  for (int v = 0; v < 4; ++v) {
    const int64_t j = 16 * v;
    if (j >= nn) break;
    const int64_t n = n0 + j;
    const __mmask16 mk = tail16(nn - j);
    const __m512i d = _mm512_sub_epi32(acc[v], _mm512_loadu_si512(comp + n));
    const int64_t o = m * ep.ldo + n;
    if (ep.type == DType::S32) {
      _mm512_mask_storeu_epi32(static_cast<int32_t*>(ep.out) + o, mk, d);
      continue;
    }
    __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), sa),
                             _mm512_maskz_loadu_ps(mk, ep.scale_b + n));
    if (ep.bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mk, ep.bias + n));
    if (ep.type == DType::F32) {
      _mm512_mask_storeu_ps(static_cast<float*>(ep.out) + o, mk, f);
    } else if (ep.type == DType::F16) {
      const __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(ep.out) + o, mk, h);
    } else {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(ep.out) + o, mk, bf16_rne(f));
    }
  }
}

// No software prefetch: the panel is one sequential stream, which the hardware prefetchers
// follow. Prefetching the next panel into L2 from the first row tile (tried) gained nothing at
// M = 1 (DRAM-bound either way) and cost 5-10% at M = 8 and 32 (issue slots in the tile that
// is compute-bound there).
template <int MR>
void tile(const uint8_t* a, int64_t Kp, const uint8_t* panel, int64_t m, int64_t n0,
          int64_t nn, const int32_t* comp, const Epilogue& ep) {
  __m512i acc[MR][4];
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_si512();
  const int64_t ng = Kp / kGroup;
  const uint8_t* b = panel;
  for (int64_t g = 0; g < ng; ++g, b += kPanel * kGroup) {
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);
    const __m512i b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
      const __m512i av = bcast4(a + r * Kp + g * kGroup);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)
    store_row(acc[r][0], acc[r][1], acc[r][2], acc[r][3], m + r, n0, nn, comp, ep);
}

// Rows t in [t0, t1) of one 4-k group for one 16-channel vector: row t at d + (t - t0) * ldd.
inline __attribute__((always_inline)) void dequant_group(const uint8_t* src, __m512 s,
                                                         __mmask16 mk, float* d, int64_t ldd,
                                                         int t0, int t1) {
  const __m512i x = _mm512_loadu_si512(src);
  const __m512i y = _mm512_srli_epi32(x, 16);
  const __m512 r[4] = {exact_byte0(x), exact_byte1(x), exact_byte0(y), exact_byte1(y)};
  _Pragma("GCC unroll 4") for (int t = 0; t < 4; ++t)
    if (t >= t0 && t < t1) _mm512_mask_storeu_ps(d + (t - t0) * ldd, mk, _mm512_mul_ps(r[t], s));
}

}  // namespace

void pack_b_panels(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int64_t p0, int64_t p1,
                   uint8_t* out) {
  const int64_t Kp = padded_k(K), ng = Kp / kGroup;
  int32_t* comp = reinterpret_cast<int32_t*>(out + packed_b_panel_bytes(N, K));
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t p = p0; p < p1; ++p) {
    uint8_t* panel = out + p * kPanel * Kp;
    for (int64_t jb = 0; jb < kPanel / 16; ++jb) {
      const int64_t n0 = p * kPanel + 16 * jb;
      __m512i sum = _mm512_setzero_si512();
      // 64 k (16 groups) of 16 channels per step; bytes past K and rows past N load as 0.
      for (int64_t c = 0; c < K; c += 64) {
        const __mmask64 km = tail64(K - c);
        __m512i r[16];
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i)
          r[i] = n0 + i < N ? _mm512_maskz_loadu_epi8(km, w + (n0 + i) * ldw + c)
                            : _mm512_setzero_si512();
        transpose16x16(r);
        const int64_t gn = ng - c / kGroup < 16 ? ng - c / kGroup : 16;
        uint8_t* dst = panel + (c / kGroup) * kPanel * kGroup + 64 * jb;
        _Pragma("GCC unroll 16") for (int g = 0; g < 16; ++g) {
          if (g < gn) {
            _mm512_storeu_si512(dst + g * kPanel * kGroup, r[g]);
            sum = _mm512_dpbusd_epi32(sum, ones, r[g]);
          }
        }
      }
      // comp = 128 * colsum, modulo 2^32 as the scalar definition.
      _mm512_storeu_si512(comp + n0, _mm512_slli_epi32(sum, 7));
    }
  }
}

void dequant_b_slab_t(const uint8_t* bp, const float* w_scale, int64_t N, int64_t K, int64_t k0,
                      int64_t k1, float* dst, int64_t ldd) {
  if (k1 <= k0) return;
  const int64_t Kp = padded_k(K), np = num_panels(N);
  // Groups [ga, gb) lie wholly inside [k0, k1); a partial group at either end (g0 < ga, or
  // gb < g1) stores only the rows it owns.
  const int64_t g0 = k0 / kGroup, g1 = (k1 + kGroup - 1) / kGroup;
  const int64_t ga = (k0 + kGroup - 1) / kGroup, gb = k1 / kGroup > ga ? k1 / kGroup : ga;
  for (int64_t p = 0; p < np; ++p) {
    const uint8_t* panel = bp + p * kPanel * Kp;
    const int64_t n0 = p * kPanel, nv = (N - n0 < kPanel ? N - n0 + 15 : kPanel) / 16;
    __mmask16 mk[4];
    __m512 s[4];
    for (int v = 0; v < 4; ++v) {
      mk[v] = lanes16(N - n0 - 16 * v);
      s[v] = _mm512_maskz_loadu_ps(mk[v], w_scale + n0 + (v < nv ? 16 * v : 0));
    }
    auto edge = [&](int64_t g) {
      const int t0 = int(k0 > g * kGroup ? k0 - g * kGroup : 0);
      const int t1 = int(k1 < (g + 1) * kGroup ? k1 - g * kGroup : kGroup);
      float* d = dst + (g * kGroup + t0 - k0) * ldd + n0;
      for (int64_t v = 0; v < nv; ++v)
        dequant_group(panel + g * kPanel * kGroup + 64 * v, s[v], mk[v], d + 16 * v, ldd, t0, t1);
    };
    if (g0 < ga) edge(g0);
    for (int64_t g = ga; g < gb; ++g) {
      const uint8_t* src = panel + g * kPanel * kGroup;
      float* d = dst + (g * kGroup - k0) * ldd + n0;
      for (int64_t v = 0; v < nv; ++v)
        dequant_group(src + 64 * v, s[v], mk[v], d + 16 * v, ldd, 0, kGroup);
    }
    if (gb < g1) edge(gb);
  }
}

template <DType T>
void quantize_rows_d(const void* x, int64_t K, int64_t ldx, int64_t m0, int64_t m1,
                     float* scale, int8_t* q, int64_t ldq, uint8_t* ap, const float* smooth) {
  if (smooth) return quantize_rows_t<T, true>(x, K, ldx, m0, m1, scale, q, ldq, ap, smooth);
  quantize_rows_t<T, false>(x, K, ldx, m0, m1, scale, q, ldq, ap, nullptr);
}

void quantize_rows(const void* x, DType xt, int64_t K, int64_t ldx, int64_t m0, int64_t m1,
                   float* scale, int8_t* q, int64_t ldq, uint8_t* ap, const float* smooth) {
  switch (xt) {
    case DType::F16: return quantize_rows_d<DType::F16>(x, K, ldx, m0, m1, scale, q, ldq, ap, smooth);
    case DType::BF16:
      return quantize_rows_d<DType::BF16>(x, K, ldx, m0, m1, scale, q, ldq, ap, smooth);
    default: return quantize_rows_d<DType::F32>(x, K, ldx, m0, m1, scale, q, ldq, ap, smooth);
  }
}


void pack_a(const int8_t* a, int64_t K, int64_t lda, int64_t m0, int64_t m1, uint8_t* ap) {
  const int64_t Kp = padded_k(K);
  const __m512i flip = _mm512_set1_epi8(char(0x80));  // s8 -> u8 + 128 is a sign-bit flip
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 mk = tail64(K - k);
      const __m512i v = _mm512_maskz_loadu_epi8(mk, a + m * lda + k);
      _mm512_mask_storeu_epi8(ap + m * Kp + k, mk, _mm512_xor_si512(v, flip));
    }
    for (int64_t k = K; k < Kp; ++k) ap[m * Kp + k] = 128;
  }
}

void gemm(const uint8_t* ap, int64_t K, const uint8_t* bp, int64_t N, int64_t m0, int64_t m1,
          int64_t p0, int64_t p1, const Epilogue& ep) {
  const int64_t Kp = padded_k(K);
  const int32_t* comp = packed_b_comp(bp, N, K);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = bp + p * kPanel * Kp;
    const int64_t n0 = p * kPanel, nn = N - n0 < kPanel ? N - n0 : kPanel;
    // Rows in tiles of 6 and a remainder (8 = 6 + 2, not 4 + 4): the first tile streams the
    // panel from DRAM, so it should carry as much of the compute as possible. 4 + 4 was 3.7%
    // faster at M = 8 with hot weights but ~10% slower with cold ones (decode's case).
    for (int64_t m = m0; m < m1; m += kMR) {
      const uint8_t* a = ap + m * Kp;
      switch (m1 - m < kMR ? m1 - m : kMR) {
        case 1: tile<1>(a, Kp, panel, m, n0, nn, comp, ep); break;
        case 2: tile<2>(a, Kp, panel, m, n0, nn, comp, ep); break;
        case 3: tile<3>(a, Kp, panel, m, n0, nn, comp, ep); break;
        case 4: tile<4>(a, Kp, panel, m, n0, nn, comp, ep); break;
        case 5: tile<5>(a, Kp, panel, m, n0, nn, comp, ep); break;
        default: tile<6>(a, Kp, panel, m, n0, nn, comp, ep); break;
      }
    }
  }
}

// The VNNI roofline: `iters` x 24 independent zmm vpdpbusd (no memory traffic, registers
// only, in asm so the compiler cannot drop or spill them). Returns the int ops done
// (each vpdpbusd zmm = 64 u8*s8 products + 64 adds = 128 ops).
int64_t vnni_spin(int64_t iters) {
  if (iters <= 0) return 0;
  const int64_t n = iters;
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm30, %%zmm30, %%zmm30\n"
      "vpternlogd $0xff, %%zmm31, %%zmm31, %%zmm31\n"
      "1:\n"
#define QTORCH_DP(i) "vpdpbusd %%zmm31, %%zmm30, %%zmm" #i "\n"
      QTORCH_DP(0) QTORCH_DP(1) QTORCH_DP(2) QTORCH_DP(3) QTORCH_DP(4) QTORCH_DP(5)
      QTORCH_DP(6) QTORCH_DP(7) QTORCH_DP(8) QTORCH_DP(9) QTORCH_DP(10) QTORCH_DP(11)
      QTORCH_DP(12) QTORCH_DP(13) QTORCH_DP(14) QTORCH_DP(15) QTORCH_DP(16) QTORCH_DP(17)
      QTORCH_DP(18) QTORCH_DP(19) QTORCH_DP(20) QTORCH_DP(21) QTORCH_DP(22) QTORCH_DP(23)
#undef QTORCH_DP
      "dec %0\n"
      "jnz 1b\n"
      : "+r"(iters)
      :
      : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18",
        "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm30", "xmm31");
  return n * 24 * 128;
}

}  // namespace qtorch::cpu::int8_mm::avx512
