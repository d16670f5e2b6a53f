// AVX-512 instance of the distillation row kernel (16 fp32 lanes; bf16 via vcvtneps2bf16,
// fp16 via vcvtph2ps/vcvtps2ph). Compiled with the avx512 flags of setup.py.
#include "distillation.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512BF16__)
#include <immintrin.h>

#include "distillation_impl.h"

namespace qtorch::cpu::distillation {
namespace {

struct Avx512Vt {
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static M eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static M part(int n) { return static_cast<M>((1u << n) - 1u); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static V sub_lane(V v, int lane, float c) {
    return _mm512_mask_sub_ps(v, static_cast<M>(1u << lane), v, set1(c));
  }
  // exp: Cephes expf. x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n built in
  // the exponent field. Inputs below ln(FLT_MIN) give exactly 0 (so exp(-inf) = 0 and a masked
  // probability is a true 0); above 88.37 give +inf. (All callers pass x <= 0.)
  static V exp(V x) {
    const V lo = set1(-87.33654475f), hi = set1(88.37f);
    const M under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    const M over = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ);
    const V xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(xc, set1(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, set1(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    V y = set1(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, set1(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, set1(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, set1(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, set1(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, set1(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, set1(1.0f)));
    const __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    y = _mm512_mask_blend_ps(under, y, _mm512_setzero_ps());
    return _mm512_mask_blend_ps(over, y, set1(__builtin_inff()));
  }
  // log: Cephes logf for positive normal x: x = f 2^e, f in [sqrt(1/2), sqrt(2)), log(1 + (f-1))
  // by a degree-9 polynomial. (Callers pass x in [1, 2].)
  static V log(V x) {
    const __m512i xi = _mm512_castps_si512(x);
    V e = _mm512_cvtepi32_ps(
        _mm512_sub_epi32(_mm512_srli_epi32(xi, 23), _mm512_set1_epi32(126)));
    V m = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(xi, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)));
    const M small = _mm512_cmp_ps_mask(m, set1(0.707106781186547524f), _CMP_LT_OQ);
    const V tmp = _mm512_maskz_mov_ps(small, m);
    m = _mm512_sub_ps(m, set1(1.0f));
    e = _mm512_mask_sub_ps(e, small, e, set1(1.0f));
    m = _mm512_add_ps(m, tmp);
    const V z = _mm512_mul_ps(m, m);
    V y = set1(7.0376836292e-2f);
    y = _mm512_fmadd_ps(y, m, set1(-1.1514610310e-1f));
    y = _mm512_fmadd_ps(y, m, set1(1.1676998740e-1f));
    y = _mm512_fmadd_ps(y, m, set1(-1.2420140846e-1f));
    y = _mm512_fmadd_ps(y, m, set1(1.4249322787e-1f));
    y = _mm512_fmadd_ps(y, m, set1(-1.6668057665e-1f));
    y = _mm512_fmadd_ps(y, m, set1(2.0000714765e-1f));
    y = _mm512_fmadd_ps(y, m, set1(-2.4999993993e-1f));
    y = _mm512_fmadd_ps(y, m, set1(3.3333331174e-1f));
    y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
    y = _mm512_fmadd_ps(e, set1(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(z, set1(0.5f), y);
    return _mm512_fmadd_ps(e, set1(0.693359375f), _mm512_add_ps(m, y));
  }
  static V from16(__m256i h, DType d) {
    if (d == DType::BF16)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
  template <DType D>
  static V load(const void* p, int64_t i) {
    if constexpr (D == DType::F32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    else
      return from16(_mm256_loadu_si256(
                        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)),
                    D);
  }
  // Masked loads never touch the lanes >= n (no read past the row).
  template <DType D>
  static V load_part(const void* p, int64_t i, int n, float pad) {
    const M m = part(n);
    if constexpr (D == DType::F32)
      return _mm512_mask_loadu_ps(set1(pad), m, static_cast<const float*>(p) + i);
    else
      return _mm512_mask_blend_ps(
          m, set1(pad), from16(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i), D));
  }
  template <DType D>
  static __m256i to16(V v) {
    if constexpr (D == DType::BF16) return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    else return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  template <DType D>
  static void store(void* p, int64_t i, V v) {
    if constexpr (D == DType::F32) _mm512_storeu_ps(static_cast<float*>(p) + i, v);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), to16<D>(v));
  }
  template <DType D>
  static void store_part(void* p, int64_t i, V v, int n) {
    if constexpr (D == DType::F32) _mm512_mask_storeu_ps(static_cast<float*>(p) + i, part(n), v);
    else _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, part(n), to16<D>(v));
  }
};

}  // namespace

float row_avx512(const void* s, DType sdt, const void* t, DType tdt, int64_t V, int64_t label,
                 const Params& P, void* g, DType gdt, float gscale) {
  return row_dispatch<Avx512Vt>(s, sdt, t, tdt, V, label, P, g, gdt, gscale);
}

}  // namespace qtorch::cpu::distillation

#else  // not built with AVX-512: never selected (hardware_isa() says so); scalar stub

namespace qtorch::cpu::distillation {
float row_avx512(const void* s, DType sdt, const void* t, DType tdt, int64_t V, int64_t label,
                 const Params& P, void* g, DType gdt, float gscale) {
  return row_scalar(s, sdt, t, tdt, V, label, P, g, gdt, gscale);
}
}  // namespace qtorch::cpu::distillation

#endif
