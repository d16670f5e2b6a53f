// AVX2 helpers shared by the *_avx2.cpp kernel files (only they include this header, compiled
// with their flags, kernels/isa_flags.txt). Internal linkage: each file keeps its own copy.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace qtorch::cpu::simd {
namespace {

// The first n (clamped to 0..8) lanes set, as vmaskmovps wants them.
inline __m256i lanes8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n < 0 ? 0 : n > 8 ? 8 : n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// r[i] lane j <-> r[j] lane i (8 x 8, 32-bit lanes; 24 shuffles).
inline void transpose8x8(__m256i r[8]) {
  __m256i t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int b = 0; b < 8; b += 4) {
    r[b] = _mm256_unpacklo_epi64(t[b], t[b + 2]);
    r[b + 1] = _mm256_unpackhi_epi64(t[b], t[b + 2]);
    r[b + 2] = _mm256_unpacklo_epi64(t[b + 1], t[b + 3]);
    r[b + 3] = _mm256_unpackhi_epi64(t[b + 1], t[b + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    t[e] = _mm256_permute2x128_si256(r[e], r[4 + e], 0x20);
    t[4 + e] = _mm256_permute2x128_si256(r[e], r[4 + e], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// float(q) exactly for the s8 q in bits 0..7 / 8..15 of each lane: the bits
// 0x4B000000 | (q + 128) are the float 2^23 + q + 128 (simd_avx512.h says why), here by
// and + xor, then an exact subtraction.
inline __m256 exact_byte0(__m256i x) {
  const __m256i f = _mm256_xor_si256(_mm256_and_si256(x, _mm256_set1_epi32(0xff)),
                                     _mm256_set1_epi32(0x4b000080));
  return _mm256_sub_ps(_mm256_castsi256_ps(f), _mm256_set1_ps(8388736.f));
}
inline __m256 exact_byte1(__m256i x) {
  const __m256i f = _mm256_xor_si256(_mm256_and_si256(x, _mm256_set1_epi32(0xff00)),
                                     _mm256_set1_epi32(0x47008000));
  return _mm256_sub_ps(_mm256_castsi256_ps(f), _mm256_set1_ps(32896.f));
}

}  // namespace
}  // namespace qtorch::cpu::simd
