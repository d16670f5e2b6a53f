// Weight-only matmul, AVX2 + FMA, fp32 activations (bf16/fp16 are widened by the caller).
// Math and layouts: weight_only.h. With 16 ymm registers a tile is MR rows x NR "half blocks" of 8
// channels, MR * NR <= 4. int8: 8 bytes of a k-pair widened to 32-bit lanes hold 4 channels x
// 2 k, so a half block is two such vectors; x pairs (x[k], x[k+1]) are broadcast per row, and
// the two k lanes of a channel are summed at the end (hadd + a 64-bit permute). int4: see
// int4_tile (one channel per lane, no reduction).
// int8 packing and slab dequantization as in the AVX-512 file, on 8-channel halves: an 8 x 8
// transpose of 32-bit lanes, then vpshufb + vpermq (+ vperm2i128 across the two halves) to
// de-interleave the pairs; exact floats from bytes by and + xor + sub (simd_avx2.h).
#include "weight_only.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "simd_avx2.h"

#include <cstring>

namespace qtorch::cpu::weight_only {
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

// Byte offset of half block h in the packed int8 weights: block h/2, bytes 16 (h%2) .. +16 of
// each 32-byte k-pair row; `row_bytes` = bytes of one block.
inline int64_t half_offset(int64_t h, int64_t row_bytes) { return (h / 2) * row_bytes + (h % 2) * 16; }

// Rows m0 .. m0+MR, channels 8h .. 8(h+NR) (NR half blocks). One row alone needs NR > 1 so
// that enough independent accumulators hide the FMA latency.
// int4: a half block's 32 bytes of a k-octet are 8 channels x one 32-bit word of 8 nibbles
// (weight_only.h), so nibble i of every lane, widened to fp32, is the channel vector at
// k0 + kOctetK[i]: 8 shift-mask-convert steps and 8 FMAs per row, no shuffles, and no pair
// reduction at the group end.
template <int MR, int NR>
void int4_tile(const Int4Weights& w, const Problem& p, int64_t m0, int64_t h) {
  const int64_t K = w.K, G = K / w.gs, Ko = K / 8, opg = w.gs / 8;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const uint8_t* wb[NR];
  for (int j = 0; j < NR; ++j) wb[j] = w.w + (h + j) / 2 * (Ko * 64) + ((h + j) % 2) * 32;
  const __m256i nib = _mm256_set1_epi32(0xF);
  alignas(32) float out[MR][NR][kHalf] = {};
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t o = g * opg; o < (g + 1) * opg; ++o) {
      __m256i v[NR];
      for (int j = 0; j < NR; ++j)
        v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[j] + o * 64));
      const float* xo = x + 8 * o;
      _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) {
        __m256 xb[MR];
        for (int r = 0; r < MR; ++r) xb[r] = _mm256_broadcast_ss(xo + r * p.ldx + kOctetK[i]);
        for (int j = 0; j < NR; ++j) {
          const __m256 wf =
              _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v[j], 4 * i), nib));
          for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_fmadd_ps(wf, xb[r], acc[r][j]);
        }
      }
    }
    for (int j = 0; j < NR; ++j) {  // out += s * acc + b * xsum
      const int64_t meta = ((h + j) / 2 * G + g) * kBlock + ((h + j) % 2) * kHalf;
      const __m256 s = _mm256_loadu_ps(w.scale + meta);
      const __m256 z = w.zero_f ? _mm256_loadu_ps(w.zero_f + meta)
                                : _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                      reinterpret_cast<const __m128i*>(w.zero + meta))));
      const __m256 b = _mm256_fnmadd_ps(s, z, _mm256_setzero_ps());  // -(s z), one rounding
      for (int r = 0; r < MR; ++r) {
        __m256 o = _mm256_load_ps(out[r][j]);
        o = _mm256_fmadd_ps(acc[r][j], s, o);
        o = _mm256_fmadd_ps(b, _mm256_set1_ps(p.xsum[(m0 + r) * G + g]), o);
        _mm256_store_ps(out[r][j], o);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store_half(p, w.N, m0 + r, h + j, _mm256_load_ps(out[r][j]));
}

template <int MR, int NR>
void int8_tile(const Int8Weights& w, const Problem& p, int64_t m0, int64_t h) {
  const int64_t Kh = int8_padded_k(w.K) / 2;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const int8_t* wb[NR];
  for (int j = 0; j < NR; ++j) wb[j] = w.w + half_offset(h + j, Kh * 32);
  __m256 acc[MR][NR][2];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_ps();
  for (int64_t t = 0; t < Kh; ++t) {
    __m256 xp[MR];
    for (int r = 0; r < MR; ++r) xp[r] = bcast_pair(x + r * p.ldx + 2 * t);
    for (int j = 0; j < NR; ++j)
      for (int q = 0; q < 2; ++q) {
        const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb[j] + t * 32 + 8 * q))));
        for (int r = 0; r < MR; ++r) acc[r][j][q] = _mm256_fmadd_ps(wf, xp[r], acc[r][j][q]);
      }
  }
  for (int j = 0; j < NR; ++j) {
    const __m256 s = _mm256_loadu_ps(w.scale + (h + j) / 2 * kBlock + ((h + j) % 2) * kHalf);
    for (int r = 0; r < MR; ++r)
      store_half(p, w.N, m0 + r, h + j, _mm256_mul_ps(pair_reduce(acc[r][j][0], acc[r][j][1]), s));
  }
}

// Rows in slices of up to mr_cap over the range's half blocks, MR * NR <= 4 (up to 8
// accumulators for int8's two k lanes, 4 for int4).
// The range's packed weights are walked in ~512 KiB chunks
// so that, for M > 4, they are re-read from L2 and not DRAM. Half blocks made only of padding
// columns (past N) are skipped.
template <class W, class Tile>
void drive(const W& w, const Problem& p, int64_t block_bytes, int mr_cap, Tile&& tile) {
  const int64_t h0 = 2 * p.nb0, hn = (w.N + kHalf - 1) / kHalf;
  const int64_t h1 = 2 * p.nb1 < hn ? 2 * p.nb1 : hn;
  int64_t chunk = 2 * ((int64_t(512) << 10) / (block_bytes > 0 ? block_bytes : 1));
  if (chunk < 4) chunk = 4;
  const int mr_max = p.M >= mr_cap ? mr_cap : int(p.M), nr_max = 4 / mr_max;
  for (int64_t c0 = h0; c0 < h1; c0 += chunk) {
    const int64_t c1 = c0 + chunk < h1 ? c0 + chunk : h1;
    for (int64_t m0 = 0; m0 < p.M; m0 += mr_max) {
      const int mr = int(p.M - m0 < mr_max ? p.M - m0 : mr_max);
      for (int64_t h = c0; h < c1; h += nr_max) {
        const int nr = int(c1 - h < nr_max ? c1 - h : nr_max);
        tile(mr, nr, m0, h);
      }
    }
  }
}

// (mr, nr) -> Tile<mr, nr>, for the pairs drive() produces: mr * nr_max <= 4 with nr <= nr_max.
#define QT_WO_AVX2_DISPATCH(TILE, W)                              \
  switch (mr * 8 + nr) {                                          \
    case 1 * 8 + 1: return TILE<1, 1>(W, p, m0, h);               \
    case 1 * 8 + 2: return TILE<1, 2>(W, p, m0, h);               \
    case 1 * 8 + 3: return TILE<1, 3>(W, p, m0, h);               \
    case 1 * 8 + 4: return TILE<1, 4>(W, p, m0, h);               \
    case 2 * 8 + 1: return TILE<2, 1>(W, p, m0, h);               \
    case 2 * 8 + 2: return TILE<2, 2>(W, p, m0, h);               \
    case 3 * 8 + 1: return TILE<3, 1>(W, p, m0, h);               \
    default: return TILE<4, 1>(W, p, m0, h);                      \
  }

}  // namespace

void pack_int8_blocks_avx2(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                           int64_t nb0, int64_t nb1, int8_t* w_out, float* scale_out) {
  using namespace qtorch::cpu::simd;
  const int64_t Kh = int8_padded_k(K) / 2;
  // In each 128-bit lane (4 channels x pairs a, b as 16-bit words): the words of pair a, then
  // those of pair b.
  const __m256i words = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                         0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int64_t n0 = nb * kBlock;
    int8_t* blk = w_out + nb * Kh * 32;
    // 16 pairs (32 k) of 16 channels per step; bytes past K and rows past N are 0.
    for (int64_t c = 0; c < K; c += 32) {
      __m256i r[2][8];
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 8; ++i) {
          const int64_t n = n0 + 8 * h + i;
          const int8_t* src = w_q + n * K + c;
          if (n >= N) {
            r[h][i] = _mm256_setzero_si256();
          } else if (K - c >= 32) {
            r[h][i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
          } else {
            alignas(32) int8_t tmp[32] = {};
            std::memcpy(tmp, src, size_t(K - c));
            r[h][i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
          }
        }
        transpose8x8(r[h]);  // r[h][d] lane i: channel 8h + i, pairs 2d and 2d + 1
      }
      const int64_t pairs = Kh - c / 2 < 16 ? Kh - c / 2 : 16;
      int8_t* dst = blk + (c / 2) * 32;
      for (int d = 0; d < 8 && 2 * d < pairs; ++d) {
        // [channels 0-7 at pair 2d | channels 0-7 at pair 2d + 1], the same for 8-15.
        const __m256i lo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(r[0][d], words), 0xd8);
        const __m256i hi = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(r[1][d], words), 0xd8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64 * d),
                            _mm256_permute2x128_si256(lo, hi, 0x20));
        if (2 * d + 1 < pairs)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64 * d + 32),
                              _mm256_permute2x128_si256(lo, hi, 0x31));
      }
    }
    for (int64_t i = 0; i < kBlock; ++i)
      scale_out[n0 + i] = n0 + i < N ? w_scale[n0 + i] : 0.f;
  }
}

void dequant_int8_slab_t_avx2(const int8_t* w, const float* scale, int64_t N, int64_t K,
                              int64_t k0, int64_t k1, float* dst, int64_t ldd) {
  using namespace qtorch::cpu::simd;
  if (k1 <= k0) return;
  const int64_t Kh = int8_padded_k(K) / 2, Nb = num_blocks(N);
  const int64_t ta = (k0 + 1) / 2, tb = k1 / 2 > ta ? k1 / 2 : ta;  // whole pairs
  for (int64_t nb = 0; nb < Nb; ++nb) {
    for (int64_t h = 0; h < 2; ++h) {  // 8 channels at a time
      const int64_t n0 = nb * kBlock + 8 * h;
      if (n0 >= N) break;
      const bool full = N - n0 >= 8;
      const __m256i mk = lanes8(N - n0);
      const __m256 s = _mm256_loadu_ps(scale + n0);  // the packed scale: 16 per block
      const int8_t* src = w + nb * Kh * 32 + 16 * h;
      float* d = dst + n0;
      auto pair = [&](int64_t t) {
        return _mm256_cvtepu16_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32 * t)));
      };
      auto put = [&](float* row, __m256 v) {
        if (full) _mm256_storeu_ps(row, v);
        else _mm256_maskstore_ps(row, mk, v);
      };
      if (k0 & 1) put(d, _mm256_mul_ps(exact_byte1(pair(k0 / 2)), s));
      for (int64_t t = ta; t < tb; ++t) {
        const __m256i x = pair(t);
        float* row = d + (2 * t - k0) * ldd;
        put(row, _mm256_mul_ps(exact_byte0(x), s));
        put(row + ldd, _mm256_mul_ps(exact_byte1(x), s));
      }
      if (k1 & 1) put(d + (k1 - 1 - k0) * ldd, _mm256_mul_ps(exact_byte0(pair(k1 / 2)), s));
    }
  }
}

void int4_gemm_avx2(const Int4Weights& w, const Problem& p) {
  drive(w, p, (w.K / 8) * 64, 4, [&](int mr, int nr, int64_t m0, int64_t h) {
    QT_WO_AVX2_DISPATCH(int4_tile, w)
  });
}

void int8_gemm_avx2(const Int8Weights& w, const Problem& p) {
  drive(w, p, (int8_padded_k(w.K) / 2) * 32, 4, [&](int mr, int nr, int64_t m0, int64_t h) {
    QT_WO_AVX2_DISPATCH(int8_tile, w)
  });
}

}  // namespace qtorch::cpu::weight_only

#else  // not compiled for AVX2: never selected (hardware_isa() says so), but must link.

namespace qtorch::cpu::weight_only {
void int4_gemm_avx2(const Int4Weights& w, const Problem& p) { int4_gemm_scalar(w, p); }
void int8_gemm_avx2(const Int8Weights& w, const Problem& p) { int8_gemm_scalar(w, p); }
void pack_int8_blocks_avx2(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                           int64_t nb0, int64_t nb1, int8_t* w_out, float* scale_out) {
  pack_int8_blocks_scalar(w_q, w_scale, N, K, nb0, nb1, w_out, scale_out);
}
void dequant_int8_slab_t_avx2(const int8_t* w, const float* scale, int64_t N, int64_t K,
                              int64_t k0, int64_t k1, float* dst, int64_t ldd) {
  dequant_int8_slab_t_scalar(w, scale, N, K, k0, k1, dst, ldd);
}
}  // namespace qtorch::cpu::weight_only

#endif
