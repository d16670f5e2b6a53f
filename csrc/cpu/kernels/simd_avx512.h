// AVX-512 helpers shared by the *_avx512.cpp kernel files (only they include this header,
// compiled with their own flags, kernels/isa_flags.txt; AVX512F/BW suffice here). Internal
// linkage: each file keeps its own copy, built for its own flags.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace qtorch::cpu::simd {
namespace {

// The first n lanes (0 <= n; n >= 16 is all of them).
inline __mmask16 lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
inline __mmask64 lanes64(int64_t n) {
  return n >= 64 ? ~__mmask64(0) : n <= 0 ? __mmask64(0) : (__mmask64(1) << n) - 1;
}

// r[i] lane j <-> r[j] lane i (32-bit lanes): in-lane 4 x 4 transposes (unpack 32, unpack 64:
// 32 shuffles), then the 128-bit lanes (two vshufi32x4 stages: 32 more).
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  _Pragma("GCC unroll 8") for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // Now r[b + e] (b = 0, 4, 8, 12), 128-bit lane L: element 4L + e of rows b .. b + 3.
  _Pragma("GCC unroll 4") for (int b = 0; b < 16; b += 4) {
    r[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
    r[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
    r[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
    r[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
  }
  _Pragma("GCC unroll 4") for (int e = 0; e < 4; ++e) {
    t[e] = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);  // lanes 0, 2 of rows 0-3 and 4-7
    t[4 + e] = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xdd);  // lanes 1, 3
    t[8 + e] = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
    t[12 + e] = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xdd);
  }
  _Pragma("GCC unroll 4") for (int e = 0; e < 4; ++e) {
    r[e] = _mm512_shuffle_i32x4(t[e], t[8 + e], 0x88);           // elements e (lane 0)
    r[8 + e] = _mm512_shuffle_i32x4(t[e], t[8 + e], 0xdd);       // 8 + e (lane 2)
    r[4 + e] = _mm512_shuffle_i32x4(t[4 + e], t[12 + e], 0x88);  // 4 + e (lane 1)
    r[12 + e] = _mm512_shuffle_i32x4(t[4 + e], t[12 + e], 0xdd); // 12 + e (lane 3)
  }
}

// float(q), exactly, of the s8 q in bits 0..7 (exact_byte0) or 8..15 (exact_byte1) of each
// 32-bit lane, whatever the other bits hold. With u = q ^ 0x80 = q + 128 in [0, 255], the bits
// 0x4B000000 | u are the float 2^23 + u and the bits 0x47000000 | (u << 8) the float 2^15 + u
// (the byte lands on the mantissa bits whose unit is 1); one vpternlogd makes either,
// (x & byte mask) ^ (exponent | bit 7 of the byte), and subtracting 2^23 + 128 (2^15 + 128)
// is exact and leaves q (+0 for q = 0, as float(0) is). Two p05 uops, no int->float convert.
constexpr int kAndXor = 0x6a;  // vpternlogd truth table of (a & b) ^ c
inline __m512 exact_byte0(__m512i x) {
  const __m512i f = _mm512_ternarylogic_epi32(x, _mm512_set1_epi32(0xff),
                                              _mm512_set1_epi32(0x4b000080), kAndXor);
  return _mm512_sub_ps(_mm512_castsi512_ps(f), _mm512_set1_ps(8388736.f));  // 2^23 + 128
}
inline __m512 exact_byte1(__m512i x) {
  const __m512i f = _mm512_ternarylogic_epi32(x, _mm512_set1_epi32(0xff00),
                                              _mm512_set1_epi32(0x47008000), kAndXor);
  return _mm512_sub_ps(_mm512_castsi512_ps(f), _mm512_set1_ps(32896.f));  // 2^15 + 128
}

}  // namespace
}  // namespace qtorch::cpu::simd
