// AVX2 W8A8 kernels (compiled with -mavx2 -mfma -mf16c). Contracts and layouts: int8_mm.h.
//
// AVX2 has no vpdpbusd, and vpmaddubsw (u8 x s8, pairs summed into s16) saturates: two
// products of 255 * 127 overflow int16. So the kernel widens both sides to int16 and uses
// vpmaddwd (s16 x s16, pairs summed into exact int32): from the VNNI panel, 16 bytes = 4
// channels x 4 k sign-extend to one ymm [c0k0 c0k1 c0k2 c0k3 c1k0 ...], the row's 4 u8
// broadcast as [a0 a1 a2 a3] x 4, and vpmaddwd leaves per channel two partial sums (k0+k1,
// k2+k3) that are accumulated separately over all of K and added once at the end (hadd).
//
// Packing and slab dequantization as in the AVX-512 file, on 8 channels: an 8 x 8 transpose of
// 32-bit lanes per 8 rows x 32 bytes (column sums by vpmaddubsw + vpmaddwd with ones), and
// exact floats from bytes by and + xor + sub (simd_avx2.h; no vpternlogd here).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/int8_mm.h"
#include "kernels/simd_avx2.h"

namespace qtorch::cpu::int8_mm::avx2 {

namespace {

using namespace qtorch::cpu::simd;

template <DType T>
inline __m256 load8(const void* x, int64_t i) {
  if constexpr (T == DType::F16) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
  } else if constexpr (T == DType::BF16) {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  }
}

template <DType T>
inline float load1(const void* x, int64_t i) {
  if constexpr (T == DType::F16) return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
  else if constexpr (T == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  else return static_cast<const float*>(x)[i];
}

// 8 elements of x from i, divided by the SmoothQuant scale (column k) when kSmooth.
template <DType T, bool kSmooth>
inline __m256 load8s(const void* x, int64_t i, const float* smooth, int64_t k) {
  const __m256 v = load8<T>(x, i);
  if constexpr (kSmooth) return _mm256_div_ps(v, _mm256_loadu_ps(smooth + k));
  else return v;
}

template <DType T, bool kSmooth>
inline float load1s(const void* x, int64_t i, const float* smooth, int64_t k) {
  if constexpr (kSmooth) return load1<T>(x, i) / smooth[k];
  else return load1<T>(x, i);
}

template <DType T, bool kSmooth>
void quantize_rows_t(const void* x, int64_t K, int64_t ldx, int64_t m0, int64_t m1,
                     float* scale, int8_t* q, int64_t ldq, uint8_t* ap, const float* smooth) {
  const int64_t Kp = padded_k(K), K8 = K / 8 * 8;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i shift = _mm256_set1_epi32(128);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * ldx;
    // Integer max of the |x| bit patterns: finds amax and NaN/inf at once (int8_mm.h).
    __m256i vmax = _mm256_setzero_si256();
    for (int64_t k = 0; k < K8; k += 8)
      vmax = _mm256_max_epi32(
          vmax, _mm256_castps_si256(
                    _mm256_and_ps(load8s<T, kSmooth>(x, base + k, smooth, k), absmask)));
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
    uint32_t amax_bits = 0;
    for (uint32_t v : lanes) amax_bits = std::max(amax_bits, v);
    for (int64_t k = K8; k < K; ++k) {
      const float a = std::fabs(load1s<T, kSmooth>(x, base + k, smooth, k));
      uint32_t b;
      std::memcpy(&b, &a, 4);
      amax_bits = std::max(amax_bits, b);
    }
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
    // q = clamp(rne(x / s)) with a true division, bitwise the reference (cvtps2dq is RNE).
    const __m256 vs = _mm256_set1_ps(s);
    for (int64_t k = 0; k < K8; k += 8) {
      __m256i v = _mm256_cvtps_epi32(_mm256_div_ps(load8s<T, kSmooth>(x, base + k, smooth, k), vs));
      v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
      if (q) {
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + m * ldq + k), _mm_packs_epi16(w, w));
      }
      if (ap) {
        const __m256i u = _mm256_add_epi32(v, shift);  // 1..255
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(ap + m * Kp + k), _mm_packus_epi16(w, w));
      }
    }
    for (int64_t k = K8; k < K; ++k) {
      float r = std::nearbyint(load1s<T, kSmooth>(x, base + k, smooth, k) / s);
      r = std::fmin(std::fmax(r, -127.f), 127.f);
      if (q) q[m * ldq + k] = int8_t(int(r));
      if (ap) ap[m * Kp + k] = uint8_t(int(r) + 128);
    }
    if (ap)
      for (int64_t k = K; k < Kp; ++k) ap[m * Kp + k] = 128;
  }
}

inline __m256i bcast_a(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(v)));
}

inline __m256i bf16_rne(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(r, qnan, nan);
}

// Epilogue for 8 consecutive channels n..n+cnt-1 (cnt <= 8) of row m; d = exact int32 dots.
inline void store8(__m256i d, int64_t m, int64_t n, int64_t cnt, const Epilogue& ep) {
  const int64_t o = m * ep.ldo + n;
  alignas(32) int32_t buf[8];
  if (ep.type == DType::S32) {
    if (cnt == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int32_t*>(ep.out) + o), d);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(buf), d);
      std::memcpy(static_cast<int32_t*>(ep.out) + o, buf, size_t(cnt) * 4);
    }
    return;
  }
  __m256 sb, bias = _mm256_setzero_ps();
  if (cnt == 8) {
    sb = _mm256_loadu_ps(ep.scale_b + n);
    if (ep.bias) bias = _mm256_loadu_ps(ep.bias + n);
  } else {
    alignas(32) float t[8] = {}, u[8] = {};
    std::memcpy(t, ep.scale_b + n, size_t(cnt) * 4);
    if (ep.bias) std::memcpy(u, ep.bias + n, size_t(cnt) * 4);
    sb = _mm256_load_ps(t);
    bias = _mm256_load_ps(u);
  }
  __m256 f = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(ep.scale_a[m])), sb);
  if (ep.bias) f = _mm256_add_ps(f, bias);
  if (ep.type == DType::F32) {
    if (cnt == 8) {
      _mm256_storeu_ps(static_cast<float*>(ep.out) + o, f);
    } else {
      _mm256_store_ps(reinterpret_cast<float*>(buf), f);
      std::memcpy(static_cast<float*>(ep.out) + o, buf, size_t(cnt) * 4);
    }
    return;
  }
  __m128i h;
  if (ep.type == DType::F16) {
    h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i r = bf16_rne(f);
    h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  uint16_t* dst = static_cast<uint16_t*>(ep.out) + o;
  if (cnt == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
  } else {
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
    std::memcpy(dst, buf, size_t(cnt) * 2);
  }
}

// Sum the (k0+k1, k2+k3) halves: x covers channels 0..3, y channels 4..7 -> int32 [c0..c7].
inline __m256i fold(__m256i x, __m256i y) {
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(x, y), 0xD8);
}

// MR (<= 2) rows x 16 channels (block c of the panel), full K: 8 accumulators, 4 B, 1 A.
template <int MR>
void tile(const uint8_t* a, int64_t Kp, const uint8_t* panel, int c, int64_t m, int64_t n0,
          int64_t nn, const int32_t* comp, const Epilogue& ep) {
  __m256i acc[MR][4];
  _Pragma("GCC unroll 2") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_si256();
  const int64_t ng = Kp / kGroup;
  const uint8_t* b = panel + c * 64;
  for (int64_t g = 0; g < ng; ++g, b += kPanel * kGroup) {
    const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    const __m256i b2 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32)));
    const __m256i b3 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 48)));
    _Pragma("GCC unroll 2") for (int r = 0; r < MR; ++r) {
      const __m256i av = bcast_a(a + r * Kp + g * kGroup);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, b0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, b1));
      acc[r][2] = _mm256_add_epi32(acc[r][2], _mm256_madd_epi16(av, b2));
      acc[r][3] = _mm256_add_epi32(acc[r][3], _mm256_madd_epi16(av, b3));
    }
  }
  _Pragma("GCC unroll 2") for (int r = 0; r < MR; ++r) {
    for (int h = 0; h < 2; ++h) {
      const int64_t j = c * 16 + h * 8;
      if (j >= nn) break;
      const __m256i s = fold(acc[r][2 * h], acc[r][2 * h + 1]);
      const __m256i d = _mm256_sub_epi32(
          s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(comp + n0 + j)));
      store8(d, m + r, n0 + j, nn - j < 8 ? nn - j : 8, ep);
    }
  }
}

// Rows t in [t0, t1) of one 4-k group for one 8-channel vector: row t at d + (t - t0) * ldd.
inline __attribute__((always_inline)) void dequant_group(const uint8_t* src, __m256 s,
                                                         __m256i mk, bool full, float* d,
                                                         int64_t ldd, int t0, int t1) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i y = _mm256_srli_epi32(x, 16);
  const __m256 r[4] = {exact_byte0(x), exact_byte1(x), exact_byte0(y), exact_byte1(y)};
  for (int t = 0; t < 4; ++t) {
    if (t < t0 || t >= t1) continue;
    const __m256 v = _mm256_mul_ps(r[t], s);
    if (full) _mm256_storeu_ps(d + (t - t0) * ldd, v);
    else _mm256_maskstore_ps(d + (t - t0) * ldd, mk, v);
  }
}

}  // namespace

void pack_b_panels(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int64_t p0, int64_t p1,
                   uint8_t* out) {
  const int64_t Kp = padded_k(K), ng = Kp / kGroup;
  int32_t* comp = reinterpret_cast<int32_t*>(out + packed_b_panel_bytes(N, K));
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t p = p0; p < p1; ++p) {
    uint8_t* panel = out + p * kPanel * Kp;
    for (int64_t jb = 0; jb < kPanel / 8; ++jb) {
      const int64_t n0 = p * kPanel + 8 * jb;
      __m256i sum = _mm256_setzero_si256();
      // 32 k (8 groups) of 8 channels per step; bytes past K and rows past N are 0.
      for (int64_t c = 0; c < K; c += 32) {
        __m256i r[8];
        for (int i = 0; i < 8; ++i) {
          const int8_t* src = w + (n0 + i) * ldw + c;
          if (n0 + i >= N) {
            r[i] = _mm256_setzero_si256();
          } else if (K - c >= 32) {
            r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
          } else {
            alignas(32) int8_t tmp[32] = {};
            std::memcpy(tmp, src, size_t(K - c));
            r[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
          }
        }
        transpose8x8(r);
        const int64_t gn = ng - c / kGroup < 8 ? ng - c / kGroup : 8;
        uint8_t* dst = panel + (c / kGroup) * kPanel * kGroup + 32 * jb;
        for (int g = 0; g < 8; ++g) {
          if (g >= gn) break;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * kPanel * kGroup), r[g]);
          // 4 bytes summed exactly: pairs in int16 (|sum| <= 256), then pairs of pairs in int32.
          sum = _mm256_add_epi32(
              sum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, r[g]), ones16));
        }
      }
      // comp = 128 * colsum, modulo 2^32 as the scalar definition.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(comp + n0), _mm256_slli_epi32(sum, 7));
    }
  }
}

void dequant_b_slab_t(const uint8_t* bp, const float* w_scale, int64_t N, int64_t K, int64_t k0,
                      int64_t k1, float* dst, int64_t ldd) {
  if (k1 <= k0) return;
  const int64_t Kp = padded_k(K), np = num_panels(N);
  // Whole groups [ga, gb); a partial one at either end stores only the rows it owns.
  const int64_t g0 = k0 / kGroup, g1 = (k1 + kGroup - 1) / kGroup;
  const int64_t ga = (k0 + kGroup - 1) / kGroup, gb = k1 / kGroup > ga ? k1 / kGroup : ga;
  for (int64_t p = 0; p < np; ++p) {
    const uint8_t* panel = bp + p * kPanel * Kp;
    const int64_t n0 = p * kPanel, nn = N - n0 < kPanel ? N - n0 : kPanel;
    // 8 channels at a time over every group of the slab (16 ymm cannot hold 8 scale vectors);
    // the panel's slab (64 x 4 bytes per group) stays in L1 across the 8 passes.
    for (int64_t v = 0; v * 8 < nn; ++v) {
      const int64_t left = nn - 8 * v;
      const bool full = left >= 8;
      const __m256i mk = lanes8(left);
      const __m256 s = full ? _mm256_loadu_ps(w_scale + n0 + 8 * v)
                            : _mm256_maskload_ps(w_scale + n0 + 8 * v, mk);
      const uint8_t* src = panel + 32 * v;
      float* d = dst + n0 + 8 * v;
      auto edge = [&](int64_t g) {
        const int t0 = int(k0 > g * kGroup ? k0 - g * kGroup : 0);
        const int t1 = int(k1 < (g + 1) * kGroup ? k1 - g * kGroup : kGroup);
        dequant_group(src + g * kPanel * kGroup, s, mk, full, d + (g * kGroup + t0 - k0) * ldd,
                      ldd, t0, t1);
      };
      if (g0 < ga) edge(g0);
      if (full) {
        for (int64_t g = ga; g < gb; ++g)
          dequant_group(src + g * kPanel * kGroup, s, mk, true, d + (g * kGroup - k0) * ldd, ldd,
                        0, kGroup);
      } else {
        for (int64_t g = ga; g < gb; ++g)
          dequant_group(src + g * kPanel * kGroup, s, mk, false, d + (g * kGroup - k0) * ldd,
                        ldd, 0, kGroup);
      }
      if (gb < g1) edge(gb);
    }
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
  const int64_t Kp = padded_k(K), K32 = K / 32 * 32;
  const __m256i flip = _mm256_set1_epi8(char(0x80));  // s8 -> u8 + 128 is a sign-bit flip
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t k = 0; k < K32; k += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * lda + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ap + m * Kp + k), _mm256_xor_si256(v, flip));
    }
    for (int64_t k = K32; k < K; ++k) ap[m * Kp + k] = uint8_t(int(a[m * lda + k]) + 128);
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
    for (int c = 0; c < 4 && c * 16 < nn; ++c) {
      int64_t m = m0;
      for (; m + 2 <= m1; m += 2) tile<2>(ap + m * Kp, Kp, panel, c, m, n0, nn, comp, ep);
      if (m < m1) tile<1>(ap + m * Kp, Kp, panel, c, m, n0, nn, comp, ep);
    }
  }
}

}  // namespace qtorch::cpu::int8_mm::avx2
