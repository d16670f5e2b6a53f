// Weight-only matmul, AVX-512 (F/BW/DQ/VL + BF16). Math and layouts: weight_only.h.
//
// Structure. A tile is MR rows x NR blocks (16 channels each) over the whole K; the
// accumulators live in registers, the int4/int8 weights are widened in registers right before
// the multiply, so the packed weights are the only large stream. A thread walks its block
// range in chunks of about 512 KiB of packed weights (L2-resident) and, inside a chunk, every
// MR-row slice of x over every NR-block tile: for M <= MR (decode) that is a single pass that
// reads each weight byte once from DRAM; for larger M the chunk is re-read from L2, not DRAM.
//
// bf16 activations: vdpbf16ps on (x pair) x (weight pair) per fp32 lane; the weight is the
//   exact bf16 of 128 + q (int4, 0x4300 | q) or of q (int8, via fp32), the product is exact in
//   fp32 and accumulation is fp32.
// fp32 activations: fp32 FMA. int4: one channel per 32-bit lane (see int4_f32_tile). int8: a
//   16-byte slice widened to 32-bit lanes holds 8 channels x 2 consecutive k, multiplied by
//   the broadcast x pair (x[k], x[k+1]); the two lanes of a channel are added at the end
//   (vpermt2ps even/odd + add).
//
// int8 packing (pack_int8_blocks_avx512): a k-pair of a block is 16 channels' 16-bit words, so
// 16 rows x 64 bytes (16 32-bit lanes = 32 pairs each) transposed as 32-bit lanes (16 x 16, in
// registers) give, per lane pair of pairs (2d, 2d+1), 16 channels x 2 words interleaved; one
// vpermw per 64-byte store puts the 16 words of pair 2d before those of pair 2d+1.
// int8 slab dequantization (dequant_int8_slab_t_avx512): a k-pair (32 bytes) zero-extended
// to 32-bit lanes is one channel per lane, its even k in bits 0..7 and odd k in bits 8..15;
// each becomes an exact float by a vpternlogd and a vsubps (simd_avx512.h), rounded once by
// the vmulps with the channel scales: two 16-float pieces of rows 2t, 2t+1 of ŵᵀ.
#include "weight_only.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "simd_avx512.h"

#include <array>
#include <cstring>
#include <utility>

namespace qtorch::cpu::weight_only {
namespace {

using TileFn = void (*)(const void* w, const Problem& p, int64_t m0, int64_t nb);

inline __m512 bcast_pair_f32(const float* x) {  // (x[0], x[1]) in every 64-bit lane
  double d;
  std::memcpy(&d, x, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(d));
}
inline __m512bh bcast_pair_bf16(const uint16_t* x) {  // (x[0], x[1]) in every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}
// Channel sums of two pair-interleaved accumulators: a = (c0k0, c0k1, ..., c7k1),
// b = (c8k0, ..., c15k1) -> (c0, ..., c15).
inline __m512 pair_reduce(__m512 a, __m512 b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}
inline __mmask16 col_mask(int64_t N, int64_t nb) {
  const int64_t left = N - nb * kBlock;
  return left >= kBlock ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}
// y[m, 16 nb ...] = v + col_bias, only the real columns.
inline void store_cols(const Problem& p, int64_t N, int64_t m, int64_t nb, __m512 v) {
  const __mmask16 k = col_mask(N, nb);
  if (p.col_bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, p.col_bias + nb * kBlock));
  _mm512_mask_storeu_ps(p.y + m * p.ldy + nb * kBlock, k, v);
}

// b = -(s * z) for 16 channels' zero points at metadata offset o (u8, or fp32 when the weight
// has float zero points), rounded once (what pack time would store).
inline __m512 neg_scaled_zero(__m512 s, const Int4Weights& w, int64_t o) {
  const __m512 zf = w.zero_f ? _mm512_loadu_ps(w.zero_f + o)
                             : _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.zero + o))));
  return _mm512_fnmadd_ps(s, zf, _mm512_setzero_ps());
}

// ---------------------------------------------------------------- int4, bf16 activations
// Per k-octet and block: one 64-byte load; nibble q of its 32 u16 lanes, OR 0x4300, is the
// bf16 vector of 128 + q for channel pairs at k0 + 2q, k0 + 2q + 1 (weight_only.h): 3 shifts and 4
// ternary-logic ops feed 4 vdpbf16ps, with no widening shuffle.
template <int MR, int NR>
void int4_bf16_tile(const void* wv, const Problem& p, int64_t m0, int64_t nb) {
  const Int4Weights& w = *static_cast<const Int4Weights*>(wv);
  const int64_t K = w.K, G = K / w.gs, Ko = K / 8, opg = w.gs / 8;
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + m0 * p.ldx;
  const uint8_t* wb = w.w + nb * Ko * 64;
  const __m512i nib = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  __m512 out[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) out[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t o = g * opg; o < (g + 1) * opg; ++o) {
      __m512i v[NR];
      for (int j = 0; j < NR; ++j) v[j] = _mm512_loadu_si512(wb + (j * Ko + o) * 64);
      _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q) {
        __m512bh wq[NR];
        for (int j = 0; j < NR; ++j) {
          if (q == 3) {  // the top nibble needs no mask
            wq[j] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v[j], 12), magic);
          } else {
            const __m512i sh = q == 0 ? v[j] : _mm512_srli_epi16(v[j], 4 * q);
            wq[j] = (__m512bh)_mm512_ternarylogic_epi32(magic, sh, nib, 0xF8);  // magic | (sh & 15)
          }
        }
        for (int r = 0; r < MR; ++r) {
          const __m512bh xp = bcast_pair_bf16(x + r * p.ldx + 8 * o + 2 * q);
          for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wq[j], xp);
        }
      }
    }
    // out += s * acc + (b - 128 s) * xsum   (acc holds sum x (128 + q))
    for (int j = 0; j < NR; ++j) {
      const __m512 s = _mm512_loadu_ps(w.scale + ((nb + j) * G + g) * kBlock);
      const __m512 b = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), s,
                                        neg_scaled_zero(s, w, ((nb + j) * G + g) * kBlock));
      for (int r = 0; r < MR; ++r) {
        out[r][j] = _mm512_fmadd_ps(acc[r][j], s, out[r][j]);
        out[r][j] = _mm512_fmadd_ps(b, _mm512_set1_ps(p.xsum[(m0 + r) * G + g]), out[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store_cols(p, w.N, m0 + r, nb + j, out[r][j]);
}

// ---------------------------------------------------------------- int4, fp32 activations
// Per k-octet and block: one 64-byte load = 16 channels x one 32-bit word of 8 nibbles; nibble
// i of every lane, widened to fp32, is the channel vector at k0 + kOctetK[i] (weight_only.h), FMAd
// with the broadcast x[k0 + kOctetK[i]]: one accumulator per (row, block), no pair reduction.
template <int MR, int NR>
void int4_f32_tile(const void* wv, const Problem& p, int64_t m0, int64_t nb) {
  const Int4Weights& w = *static_cast<const Int4Weights*>(wv);
  const int64_t K = w.K, G = K / w.gs, Ko = K / 8, opg = w.gs / 8;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const uint8_t* wb = w.w + nb * Ko * 64;
  const __m512i nib = _mm512_set1_epi32(0xF);
  __m512 out[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) out[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t o = g * opg; o < (g + 1) * opg; ++o) {
      __m512i v[NR];
      for (int j = 0; j < NR; ++j) v[j] = _mm512_loadu_si512(wb + (j * Ko + o) * 64);
      const float* xo = x + 8 * o;
      _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) {
        __m512 wf[NR];
        for (int j = 0; j < NR; ++j)
          wf[j] = _mm512_cvtepi32_ps(i == 7 ? _mm512_srli_epi32(v[j], 28)
                                            : _mm512_and_si512(_mm512_srli_epi32(v[j], 4 * i), nib));
        for (int r = 0; r < MR; ++r) {
          const __m512 xb = _mm512_set1_ps(xo[r * p.ldx + kOctetK[i]]);
          for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(wf[j], xb, acc[r][j]);
        }
      }
    }
    for (int j = 0; j < NR; ++j) {  // out += s * acc + b * xsum
      const __m512 s = _mm512_loadu_ps(w.scale + ((nb + j) * G + g) * kBlock);
      const __m512 b = neg_scaled_zero(s, w, ((nb + j) * G + g) * kBlock);
      for (int r = 0; r < MR; ++r) {
        out[r][j] = _mm512_fmadd_ps(acc[r][j], s, out[r][j]);
        out[r][j] = _mm512_fmadd_ps(b, _mm512_set1_ps(p.xsum[(m0 + r) * G + g]), out[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store_cols(p, w.N, m0 + r, nb + j, out[r][j]);
}

// ---------------------------------------------------------------- int8, bf16 activations
template <int MR, int NR>
void int8_bf16_tile(const void* wv, const Problem& p, int64_t m0, int64_t nb) {
  const Int8Weights& w = *static_cast<const Int8Weights*>(wv);
  const int64_t Kh = int8_padded_k(w.K) / 2;
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + m0 * p.ldx;
  const int8_t* wb = w.w + nb * Kh * 32;
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < Kh; ++t) {
    __m512bh wq[NR];
    for (int j = 0; j < NR; ++j) {
      // q in [-128, 127] is exact in bf16 (8 significant bits); widen via fp32.
      const int8_t* src = wb + (j * Kh + t) * 32;
      const __m512 f0 = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
      const __m512 f1 = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
      wq[j] = _mm512_cvtne2ps_pbh(f1, f0);  // lanes 0-15 from f0, 16-31 from f1
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh xp = bcast_pair_bf16(x + r * p.ldx + 2 * t);
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wq[j], xp);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const __m512 s = _mm512_loadu_ps(w.scale + (nb + j) * kBlock);
    for (int r = 0; r < MR; ++r) store_cols(p, w.N, m0 + r, nb + j, _mm512_mul_ps(acc[r][j], s));
  }
}

// ---------------------------------------------------------------- int8, fp32 activations
template <int MR, int NR>
void int8_f32_tile(const void* wv, const Problem& p, int64_t m0, int64_t nb) {
  const Int8Weights& w = *static_cast<const Int8Weights*>(wv);
  const int64_t Kh = int8_padded_k(w.K) / 2;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const int8_t* wb = w.w + nb * Kh * 32;
  __m512 acc[MR][NR][2];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j][0] = acc[r][j][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < Kh; ++t) {
    __m512 wf[NR][2];
    for (int j = 0; j < NR; ++j)
      for (int h = 0; h < 2; ++h)
        wf[j][h] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + (j * Kh + t) * 32 + 16 * h))));
    for (int r = 0; r < MR; ++r) {
      const __m512 xp = bcast_pair_f32(x + r * p.ldx + 2 * t);
      for (int j = 0; j < NR; ++j)
        for (int h = 0; h < 2; ++h) acc[r][j][h] = _mm512_fmadd_ps(wf[j][h], xp, acc[r][j][h]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const __m512 s = _mm512_loadu_ps(w.scale + (nb + j) * kBlock);
    for (int r = 0; r < MR; ++r)
      store_cols(p, w.N, m0 + r, nb + j,
                 _mm512_mul_ps(pair_reduce(acc[r][j][0], acc[r][j][1]), s));
  }
}

// ---------------------------------------------------------------- tiling driver
constexpr int kMaxMR = 8, kMaxNR = 4;
using Table = std::array<TileFn, kMaxMR * kMaxNR>;

template <template <int, int> class Tile, int... I>
constexpr Table make_table(std::integer_sequence<int, I...>) {
  return {{&Tile<I / kMaxNR + 1, I % kMaxNR + 1>::run...}};
}
template <int MR, int NR> struct Int4Bf16 { static void run(const void* w, const Problem& p, int64_t m, int64_t n) { int4_bf16_tile<MR, NR>(w, p, m, n); } };
template <int MR, int NR> struct Int8Bf16 { static void run(const void* w, const Problem& p, int64_t m, int64_t n) { int8_bf16_tile<MR, NR>(w, p, m, n); } };
// The int8 fp32 tile holds 2 accumulators per (row, block): at most 4 rows (the table maps
// MR > 4 to MR = 4 entries that are never selected). The int4 one holds one.
template <int MR, int NR> struct Int4F32 { static void run(const void* w, const Problem& p, int64_t m, int64_t n) { int4_f32_tile<MR, NR>(w, p, m, n); } };
template <int MR, int NR> struct Int8F32 { static void run(const void* w, const Problem& p, int64_t m, int64_t n) { int8_f32_tile<(MR < 4 ? MR : 4), NR>(w, p, m, n); } };

const Table kInt4Bf16 = make_table<Int4Bf16>(std::make_integer_sequence<int, kMaxMR * kMaxNR>{});
const Table kInt8Bf16 = make_table<Int8Bf16>(std::make_integer_sequence<int, kMaxMR * kMaxNR>{});
const Table kInt4F32 = make_table<Int4F32>(std::make_integer_sequence<int, kMaxMR * kMaxNR>{});
const Table kInt8F32 = make_table<Int8F32>(std::make_integer_sequence<int, kMaxMR * kMaxNR>{});

// Runs tiles of up to mr_max x nr_max over rows [0, M) and blocks [nb0, nb1), walking blocks
// in chunks of `chunk` (L2-sized), rows inside a chunk.
void drive(const Table& table, const void* w, const Problem& p, int mr_max, int nr_max,
           int64_t chunk) {
  for (int64_t c0 = p.nb0; c0 < p.nb1; c0 += chunk) {
    const int64_t c1 = c0 + chunk < p.nb1 ? c0 + chunk : p.nb1;
    for (int64_t m0 = 0; m0 < p.M; m0 += mr_max) {
      const int mr = int(p.M - m0 < mr_max ? p.M - m0 : mr_max);
      for (int64_t j0 = c0; j0 < c1; j0 += nr_max) {
        const int nr = int(c1 - j0 < nr_max ? c1 - j0 : nr_max);
        table[(mr - 1) * kMaxNR + (nr - 1)](w, p, m0, j0);
      }
    }
  }
}

int64_t chunk_blocks(int64_t block_bytes, int nr) {
  int64_t c = (int64_t(512) << 10) / (block_bytes > 0 ? block_bytes : 1);
  c = c / nr * nr;
  return c < nr ? nr : c;
}

}  // namespace

void pack_int8_blocks_avx512(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                             int64_t nb0, int64_t nb1, int8_t* w_out, float* scale_out) {
  using namespace qtorch::cpu::simd;
  const int64_t Kh = int8_padded_k(K) / 2;
  // Word i of the store: pair 2d of channel i (i < 16), pair 2d + 1 of channel i - 16.
  alignas(64) static const uint16_t kDeinterleave[32] = {
      0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
      1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i idx = _mm512_load_si512(kDeinterleave);
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int64_t n0 = nb * kBlock;
    int8_t* blk = w_out + nb * Kh * 32;
    // 32 pairs (64 k) of 16 channels per step; bytes past K and rows past N load as 0.
    for (int64_t c = 0; c < K; c += 64) {
      const __mmask64 km = lanes64(K - c);
      __m512i r[16];
      _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i)
        r[i] = n0 + i < N ? _mm512_maskz_loadu_epi8(km, w_q + (n0 + i) * K + c)
                          : _mm512_setzero_si512();
      transpose16x16(r);
      const int64_t pairs = Kh - c / 2 < 32 ? Kh - c / 2 : 32;
      int8_t* dst = blk + (c / 2) * 32;
      _Pragma("GCC unroll 16") for (int d = 0; d < 16; ++d) {
        if (2 * d >= pairs) break;
        const __m512i v = _mm512_permutexvar_epi16(idx, r[d]);
        if (2 * d + 1 < pairs) _mm512_storeu_si512(dst + 64 * d, v);
        else _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64 * d), _mm512_castsi512_si256(v));
      }
    }
    const __mmask16 mk = lanes16(N - n0);
    _mm512_storeu_ps(scale_out + n0, _mm512_maskz_loadu_ps(mk, w_scale + (n0 < N ? n0 : 0)));
  }
}

void dequant_int8_slab_t_avx512(const int8_t* w, const float* scale, int64_t N, int64_t K,
                                int64_t k0, int64_t k1, float* dst, int64_t ldd) {
  using namespace qtorch::cpu::simd;
  if (k1 <= k0) return;
  const int64_t Kh = int8_padded_k(K) / 2, Nb = num_blocks(N);
  // Pairs [ta, tb) lie wholly inside [k0, k1): row k0 alone when k0 is odd, row k1 - 1 alone
  // when k1 is odd.
  const int64_t ta = (k0 + 1) / 2, tb = k1 / 2 > ta ? k1 / 2 : ta;
  for (int64_t nb = 0; nb < Nb; ++nb) {
    const int64_t n0 = nb * kBlock;
    const __mmask16 mk = lanes16(N - n0);
    const __m512 s = _mm512_loadu_ps(scale + n0);  // the packed scale: 16 per block, 0 past N
    const int8_t* blk = w + nb * Kh * 32;
    float* d = dst + n0;
    auto pair = [&](int64_t t) {
      return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * t)));
    };
    if (k0 & 1)
      _mm512_mask_storeu_ps(d, mk, _mm512_mul_ps(exact_byte1(pair(k0 / 2)), s));
    for (int64_t t = ta; t < tb; ++t) {
      const __m512i x = pair(t);
      float* row = d + (2 * t - k0) * ldd;
      _mm512_mask_storeu_ps(row, mk, _mm512_mul_ps(exact_byte0(x), s));
      _mm512_mask_storeu_ps(row + ldd, mk, _mm512_mul_ps(exact_byte1(x), s));
    }
    if (k1 & 1)
      _mm512_mask_storeu_ps(d + (k1 - 1 - k0) * ldd, mk,
                            _mm512_mul_ps(exact_byte0(pair(k1 / 2)), s));
  }
}

void int4_gemm_avx512(const Int4Weights& w, const Problem& p) {
  const int64_t block_bytes = (w.K / 8) * 64;
  // Registers: MR*NR accumulators + 2 NR weight vectors + 1 x + 2 constants <= 32.
  const int mr = p.M <= 3 ? int(p.M) : 8, nr = p.M <= 3 ? 4 : 2;
  drive(p.act == DType::BF16 ? kInt4Bf16 : kInt4F32, &w, p, mr, nr, chunk_blocks(block_bytes, nr));
}

void int8_gemm_avx512(const Int8Weights& w, const Problem& p) {
  const int64_t block_bytes = (int8_padded_k(w.K) / 2) * 32;
  if (p.act == DType::BF16) {
    const int mr = p.M <= 3 ? int(p.M) : 8, nr = p.M <= 3 ? 4 : 2;
    drive(kInt8Bf16, &w, p, mr, nr, chunk_blocks(block_bytes, nr));
  } else {
    const int mr = p.M == 1 ? 1 : 4, nr = p.M == 1 ? 4 : 2;
    drive(kInt8F32, &w, p, mr, nr, chunk_blocks(block_bytes, nr));
  }
}

}  // namespace qtorch::cpu::weight_only

#else  // not compiled for AVX-512: never selected (hardware_isa() says so), but must link.

namespace qtorch::cpu::weight_only {
void int4_gemm_avx512(const Int4Weights& w, const Problem& p) { int4_gemm_scalar(w, p); }
void int8_gemm_avx512(const Int8Weights& w, const Problem& p) { int8_gemm_scalar(w, p); }
void pack_int8_blocks_avx512(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                             int64_t nb0, int64_t nb1, int8_t* w_out, float* scale_out) {
  pack_int8_blocks_scalar(w_q, w_scale, N, K, nb0, nb1, w_out, scale_out);
}
void dequant_int8_slab_t_avx512(const int8_t* w, const float* scale, int64_t N, int64_t K,
                                int64_t k0, int64_t k1, float* dst, int64_t ldd) {
  dequant_int8_slab_t_scalar(w, scale, N, K, k0, k1, dst, ldd);
}
}  // namespace qtorch::cpu::weight_only

#endif
