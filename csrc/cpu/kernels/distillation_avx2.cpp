// AVX2 + FMA + F16C instance of the distillation row kernel (8 fp32 lanes). bf16 is converted
// with integer shifts (round to nearest even, NaN kept NaN). Row tails go through a small stack
// buffer, so nothing past the row is ever read or written.
#include "distillation.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include <cstring>

#include "distillation_impl.h"

namespace qtorch::cpu::distillation {
namespace {

struct Avx2Vt {
  using V = __m256;
  using M = __m256;  // all-ones / all-zeros lanes
  static constexpr int W = 8;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static M eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static M part(int n) {
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V sub_lane(V v, int lane, float c) {
    const M m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(
        _mm256_set1_epi32(lane), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    return _mm256_sub_ps(v, _mm256_and_ps(m, set1(c)));
  }
  // exp / log: the same Cephes polynomials as the AVX-512 file (see there for the math).
  static V exp(V x) {
    const V lo = set1(-87.33654475f), hi = set1(88.37f);
    const M under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    const M over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    const V xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const V n = _mm256_round_ps(_mm256_mul_ps(xc, set1(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, set1(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    V y = set1(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, set1(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, set1(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, set1(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, set1(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, set1(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, set1(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
    return _mm256_blendv_ps(y, set1(__builtin_inff()), over);
  }
  static V log(V x) {
    const __m256i xi = _mm256_castps_si256(x);
    V e = _mm256_cvtepi32_ps(
        _mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(126)));
    V m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
    const M small = _mm256_cmp_ps(m, set1(0.707106781186547524f), _CMP_LT_OQ);
    const V tmp = _mm256_and_ps(small, m);
    m = _mm256_sub_ps(m, set1(1.0f));
    e = _mm256_sub_ps(e, _mm256_and_ps(small, set1(1.0f)));
    m = _mm256_add_ps(m, tmp);
    const V z = _mm256_mul_ps(m, m);
    V y = set1(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, m, set1(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, m, set1(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, m, set1(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, m, set1(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, m, set1(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, m, set1(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, m, set1(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, m, set1(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
    y = _mm256_fmadd_ps(e, set1(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, set1(0.5f), y);
    return _mm256_fmadd_ps(e, set1(0.693359375f), _mm256_add_ps(m, y));
  }
  template <DType D>
  static V from16(__m128i h) {
    if constexpr (D == DType::BF16)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
  template <DType D>
  static __m128i to16(V v) {
    if constexpr (D == DType::BF16) {
      // round to nearest even on the upper 16 bits; a NaN keeps its top bits, made quiet
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(
          _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
      const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, qnan, isnan);
      return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else {
      return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
  }
  template <DType D>
  static V load(const void* p, int64_t i) {
    if constexpr (D == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    else
      return from16<D>(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
  template <DType D>
  static V load_part(const void* p, int64_t i, int n, float pad) {
    if constexpr (D == DType::F32) {
      alignas(32) float buf[8];
      for (int k = 0; k < 8; ++k) buf[k] = pad;
      std::memcpy(buf, static_cast<const float*>(p) + i, static_cast<size_t>(n) * 4);
      return _mm256_load_ps(buf);
    } else {
      alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(buf, static_cast<const uint16_t*>(p) + i, static_cast<size_t>(n) * 2);
      return select(part(n), from16<D>(_mm_load_si128(reinterpret_cast<const __m128i*>(buf))),
                    set1(pad));
    }
  }
  template <DType D>
  static void store(void* p, int64_t i, V v) {
    if constexpr (D == DType::F32) _mm256_storeu_ps(static_cast<float*>(p) + i, v);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), to16<D>(v));
  }
  template <DType D>
  static void store_part(void* p, int64_t i, V v, int n) {
    if constexpr (D == DType::F32) {
      alignas(32) float buf[8];
      _mm256_store_ps(buf, v);
      std::memcpy(static_cast<float*>(p) + i, buf, static_cast<size_t>(n) * 4);
    } else {
      alignas(16) uint16_t buf[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(buf), to16<D>(v));
      std::memcpy(static_cast<uint16_t*>(p) + i, buf, static_cast<size_t>(n) * 2);
    }
  }
};

}  // namespace

float row_avx2(const void* s, DType sdt, const void* t, DType tdt, int64_t V, int64_t label,
               const Params& P, void* g, DType gdt, float gscale) {
  return row_dispatch<Avx2Vt>(s, sdt, t, tdt, V, label, P, g, gdt, gscale);
}

}  // namespace qtorch::cpu::distillation

#else  // not built with AVX2: never selected (hardware_isa() says so); scalar stub

namespace qtorch::cpu::distillation {
float row_avx2(const void* s, DType sdt, const void* t, DType tdt, int64_t V, int64_t label,
               const Params& P, void* g, DType gdt, float gscale) {
  return row_scalar(s, sdt, t, tdt, V, label, P, g, gdt, gscale);
}
}  // namespace qtorch::cpu::distillation

#endif
