// Weight-only matmul, AVX2 + FMA, fp32 activations (bf16/fp16 are widened by the caller).
// Math and layouts: wo_mm.h. With 16 ymm registers a tile is MR <= 4 rows x 8 channels (half
// a packed block): 8 bytes of a k-quad widened to 32-bit lanes hold 4 channels x 2 k, so a
// half block is two such vectors per nibble; x pairs (x[k], x[k+1]) are broadcast per row.
// The two k lanes of a channel are summed at each group end (hadd + a 64-bit permute).
#include "wo_mm.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <cstring>

namespace qtorch::cpu::womm {
namespace {

constexpr int kHalf = 8;  // channels per AVX2 tile

inline __m256 bcast_pair(const float* x) {
  double d;
  std::memcpy(&d, x, 8);
  return _mm256_castpd_ps(_mm256_set1_pd(d));
}
// a = (c0k0, c0k1, ..., c3k1), b = (c4k0, ..., c7k1) -> (c0, ..., c7)
inline __m256 pair_reduce(__m256 a, __m256 b) {
  const __m256 h = _mm256_hadd_ps(a, b);  // c0 c1 c4 c5 | c2 c3 c6 c7
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(h), 0xD8));
}
// y[m, 8 h ...] = v (+ col_bias), only the real columns.
inline void store_half(const Problem& p, int64_t N, int64_t m, int64_t h, __m256 v) {
  const int64_t n0 = h * kHalf, nn = N - n0 < kHalf ? N - n0 : kHalf;
  alignas(32) float tmp[kHalf];
  _mm256_store_ps(tmp, v);
  float* yr = p.y + m * p.ldy + n0;
  for (int64_t i = 0; i < nn; ++i) yr[i] = tmp[i] + (p.col_bias ? p.col_bias[n0 + i] : 0.f);
}

// Rows m0 .. m0+MR, channels 8h .. 8h+8 (h = half block).
template <int MR>
void int4_tile(const Int4Weights& w, const Problem& p, int64_t m0, int64_t h) {
  const int64_t K = w.K, G = K / w.gs, Kq = K / 4, qpg = w.gs / 4;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const int64_t nb = h / 2, off = (h % 2) * 16;  // byte offset of this half in a 32-byte quad
  const uint8_t* wb = w.w + nb * Kq * 32 + off;
  const __m256i lo_mask = _mm256_set1_epi32(0xF);
  alignas(32) float out[MR][kHalf] = {};
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t t = g * qpg; t < (g + 1) * qpg; ++t) {
      __m256 wl[2], wh[2];
      for (int q = 0; q < 2; ++q) {
        const __m256i v =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + t * 32 + 8 * q)));
        wl[q] = _mm256_cvtepi32_ps(_mm256_and_si256(v, lo_mask));
        wh[q] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
      }
      for (int r = 0; r < MR; ++r) {
        const __m256 xl = bcast_pair(x + r * p.ldx + 4 * t), xh = bcast_pair(x + r * p.ldx + 4 * t + 2);
        for (int q = 0; q < 2; ++q) {
          acc[r][q] = _mm256_fmadd_ps(wl[q], xl, acc[r][q]);
          acc[r][q] = _mm256_fmadd_ps(wh[q], xh, acc[r][q]);
        }
      }
    }
    // out += s * acc + b * xsum
    const int64_t meta = (nb * G + g) * kBlock + (h % 2) * kHalf;
    const __m256 s = _mm256_loadu_ps(w.scale + meta), b = _mm256_loadu_ps(w.bias + meta);
    for (int r = 0; r < MR; ++r) {
      __m256 o = _mm256_load_ps(out[r]);
      o = _mm256_fmadd_ps(pair_reduce(acc[r][0], acc[r][1]), s, o);
      o = _mm256_fmadd_ps(b, _mm256_set1_ps(p.xsum[(m0 + r) * G + g]), o);
      _mm256_store_ps(out[r], o);
    }
  }
  for (int r = 0; r < MR; ++r) store_half(p, w.N, m0 + r, h, _mm256_load_ps(out[r]));
}

template <int MR>
void int8_tile(const Int8Weights& w, const Problem& p, int64_t m0, int64_t h) {
  const int64_t Kh = int8_padded_k(w.K) / 2;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const int64_t nb = h / 2, off = (h % 2) * 16;
  const int8_t* wb = w.w + nb * Kh * 32 + off;
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t t = 0; t < Kh; ++t) {
    __m256 wf[2];
    for (int q = 0; q < 2; ++q)
      wf[q] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + t * 32 + 8 * q))));
    for (int r = 0; r < MR; ++r) {
      const __m256 xp = bcast_pair(x + r * p.ldx + 2 * t);
      for (int q = 0; q < 2; ++q) acc[r][q] = _mm256_fmadd_ps(wf[q], xp, acc[r][q]);
    }
  }
  const __m256 s = _mm256_loadu_ps(w.scale + nb * kBlock + (h % 2) * kHalf);
  for (int r = 0; r < MR; ++r)
    store_half(p, w.N, m0 + r, h, _mm256_mul_ps(pair_reduce(acc[r][0], acc[r][1]), s));
}

// Rows in slices of MR <= 4 over every half block of the range; the range's packed weights
// are walked in ~512 KiB chunks so that, for M > 4, they are re-read from L2 and not DRAM.
template <class W, class Tile>
void drive(const W& w, const Problem& p, int64_t block_bytes, Tile&& tile) {
  const int64_t h0 = 2 * p.nb0, h1 = 2 * (p.nb1 < num_blocks(w.N) ? p.nb1 : num_blocks(w.N));
  int64_t chunk = 2 * ((int64_t(512) << 10) / (block_bytes > 0 ? block_bytes : 1));
  if (chunk < 2) chunk = 2;
  for (int64_t c0 = h0; c0 < h1; c0 += chunk) {
    const int64_t c1 = c0 + chunk < h1 ? c0 + chunk : h1;
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
      const int mr = int(p.M - m0 < 4 ? p.M - m0 : 4);
      for (int64_t h = c0; h < c1; ++h) {
        if (h * kHalf >= w.N) break;  // a half block made only of padding
        tile(mr, m0, h);
      }
    }
  }
}

}  // namespace

void int4_mm_avx2(const Int4Weights& w, const Problem& p) {
  drive(w, p, (w.K / 4) * 32, [&](int mr, int64_t m0, int64_t h) {
    switch (mr) {
      case 1: return int4_tile<1>(w, p, m0, h);
      case 2: return int4_tile<2>(w, p, m0, h);
      case 3: return int4_tile<3>(w, p, m0, h);
      default: return int4_tile<4>(w, p, m0, h);
    }
  });
}

void int8_mm_avx2(const Int8Weights& w, const Problem& p) {
  drive(w, p, (int8_padded_k(w.K) / 2) * 32, [&](int mr, int64_t m0, int64_t h) {
    switch (mr) {
      case 1: return int8_tile<1>(w, p, m0, h);
      case 2: return int8_tile<2>(w, p, m0, h);
      case 3: return int8_tile<3>(w, p, m0, h);
      default: return int8_tile<4>(w, p, m0, h);
    }
  });
}

}  // namespace qtorch::cpu::womm

#else  // not compiled for AVX2: never selected (isa() says so), but must link.

namespace qtorch::cpu::womm {
void int4_mm_avx2(const Int4Weights& w, const Problem& p) { int4_mm_scalar(w, p); }
void int8_mm_avx2(const Int8Weights& w, const Problem& p) { int8_mm_scalar(w, p); }
}  // namespace qtorch::cpu::womm

#endif
