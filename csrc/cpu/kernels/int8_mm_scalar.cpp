// Scalar W8A8 kernels (the portable path and the definition the SIMD paths are tested
// against), weight packing, and the per-process ISA dispatch of int8_mm.h.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_features.h"
#include "kernels/int8_mm.h"

namespace qtorch::cpu::int8_mm {

void pack_b_trailer(int64_t N, int64_t K, uint8_t* out) {
  uint8_t* t = out + packed_b_bytes(N, K) - kTrailerBytes;
  std::memset(t, 0, size_t(kTrailerBytes));
  const int64_t v[3] = {kPackMagic, N, K};
  std::memcpy(t, v, sizeof v);
}

void pack_b(const int8_t* w, int64_t N, int64_t K, int64_t ldw, uint8_t* out) {
  pack_b_panels(w, N, K, ldw, 0, num_panels(N), out);
  pack_b_trailer(N, K, out);
}

void unpack_b(const uint8_t* bp, int64_t N, int64_t K, int8_t* w) {
  const int64_t Kp = padded_k(K);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* panel = bp + (n / kPanel) * kPanel * Kp + (n % kPanel) * kGroup;
    for (int64_t k = 0; k < K; ++k)
      w[n * K + k] = int8_t(panel[(k / kGroup) * kPanel * kGroup + (k % kGroup)]);
  }
}

namespace scalar {

// The definitions the SIMD paths are tested against (byte for byte, bit for bit).
void pack_b_panels(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int64_t p0, int64_t p1,
                   uint8_t* out) {
  const int64_t Kp = padded_k(K);
  std::memset(out + p0 * kPanel * Kp, 0, size_t((p1 - p0) * kPanel * Kp));
  int32_t* comp = reinterpret_cast<int32_t*>(out + packed_b_panel_bytes(N, K));
  std::memset(comp + p0 * kPanel, 0, size_t((p1 - p0) * kPanel) * sizeof(int32_t));
  const int64_t n1 = p1 * kPanel < N ? p1 * kPanel : N;
  for (int64_t n = p0 * kPanel; n < n1; ++n) {
    const int64_t p = n / kPanel, j = n % kPanel;
    uint8_t* panel = out + p * kPanel * Kp;
    int32_t colsum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = w[n * ldw + k];
      panel[(k / kGroup) * kPanel * kGroup + j * kGroup + (k % kGroup)] = uint8_t(v);
      colsum += v;
    }
    comp[n] = int32_t(uint32_t(colsum) * 128u);
  }
}

void dequant_b_slab_t(const uint8_t* bp, const float* w_scale, int64_t N, int64_t K, int64_t k0,
                      int64_t k1, float* dst, int64_t ldd) {
  const int64_t Kp = padded_k(K);
  for (int64_t k = k0; k < k1; ++k) {
    float* d = dst + (k - k0) * ldd;
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* panel = bp + (n / kPanel) * kPanel * Kp + (n % kPanel) * kGroup;
      d[n] = float(int8_t(panel[(k / kGroup) * kPanel * kGroup + (k % kGroup)])) * w_scale[n];
    }
  }
}

static inline float load_x(const void* x, DType t, int64_t i) {
  switch (t) {
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

void quantize_rows(const void* x, DType xt, int64_t K, int64_t ldx, int64_t m0, int64_t m1,
                   float* scale, int8_t* q, int64_t ldq, uint8_t* ap, const float* smooth) {
  const int64_t Kp = padded_k(K);
  // x[m, k], divided by the SmoothQuant scale when there is one.
  auto xs = [&](int64_t m, int64_t k) {
    const float v = load_x(x, xt, m * ldx + k);
    return smooth ? v / smooth[k] : v;
  };
  for (int64_t m = m0; m < m1; ++m) {
    uint32_t amax_bits = 0;
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(xs(m, k));
      uint32_t b;
      std::memcpy(&b, &a, 4);
      amax_bits = std::max(amax_bits, b);
    }
    const float s = row_scale_from_bits(amax_bits);
    const bool finite = amax_bits < kNonFiniteBits;
    scale[m] = s;
    for (int64_t k = 0; k < K; ++k) {
      float r = std::nearbyint(xs(m, k) / s);  // RNE (default rounding mode)
      r = std::fmin(std::fmax(r, -127.f), 127.f);
      const int v = finite ? int(r) : 0;
      if (q) q[m * ldq + k] = int8_t(v);
      if (ap) ap[m * Kp + k] = uint8_t(v + 128);
    }
    if (ap)
      for (int64_t k = K; k < Kp; ++k) ap[m * Kp + k] = 128;
  }
}

void pack_a(const int8_t* a, int64_t K, int64_t lda, int64_t m0, int64_t m1, uint8_t* ap) {
  const int64_t Kp = padded_k(K);
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t k = 0; k < K; ++k) ap[m * Kp + k] = uint8_t(int(a[m * lda + k]) + 128);
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
    for (int64_t m = m0; m < m1; ++m) {
      uint32_t acc[kPanel] = {};  // wraps like vpdpbusd; exact mod 2^32
      const uint8_t* a = ap + m * Kp;
      for (int64_t g = 0; g < Kp / kGroup; ++g) {
        const uint8_t* b = panel + g * kPanel * kGroup;
        for (int64_t j = 0; j < kPanel; ++j)
          for (int64_t t = 0; t < kGroup; ++t)
            acc[j] += uint32_t(int32_t(a[g * kGroup + t]) * int32_t(int8_t(b[j * kGroup + t])));
      }
      for (int64_t j = 0; j < nn; ++j) {
        const int64_t n = n0 + j;
        const int32_t d = int32_t(acc[j] - uint32_t(comp[n]));
        const int64_t o = m * ep.ldo + n;
        if (ep.type == DType::S32) {
          static_cast<int32_t*>(ep.out)[o] = d;
          continue;
        }
        float v = float(d) * ep.scale_a[m] * ep.scale_b[n];
        if (ep.bias) v += ep.bias[n];
        if (ep.type == DType::F32) static_cast<float*>(ep.out)[o] = v;
        else if (ep.type == DType::F16) static_cast<uint16_t*>(ep.out)[o] = f32_to_f16(v);
        else static_cast<uint16_t*>(ep.out)[o] = f32_to_bf16(v);
      }
    }
  }
}

}  // namespace scalar

// ---- dispatch ----------------------------------------------------------------------------

void quantize_rows(const void* x, DType xt, int64_t K, int64_t ldx, int64_t m0, int64_t m1,
                   float* scale, int8_t* q, int64_t ldq, uint8_t* ap, const float* smooth) {
  switch (isa(Family::Int8Mm)) {
    case Isa::Avx512:
      return avx512::quantize_rows(x, xt, K, ldx, m0, m1, scale, q, ldq, ap, smooth);
    case Isa::Avx2: return avx2::quantize_rows(x, xt, K, ldx, m0, m1, scale, q, ldq, ap, smooth);
    default: return scalar::quantize_rows(x, xt, K, ldx, m0, m1, scale, q, ldq, ap, smooth);
  }
}

void pack_a(const int8_t* a, int64_t K, int64_t lda, int64_t m0, int64_t m1, uint8_t* ap) {
  switch (isa(Family::Int8Mm)) {
    case Isa::Avx512: return avx512::pack_a(a, K, lda, m0, m1, ap);
    case Isa::Avx2: return avx2::pack_a(a, K, lda, m0, m1, ap);
    default: return scalar::pack_a(a, K, lda, m0, m1, ap);
  }
}

void gemm(const uint8_t* ap, int64_t K, const uint8_t* bp, int64_t N, int64_t m0, int64_t m1,
          int64_t p0, int64_t p1, const Epilogue& ep) {
  switch (isa(Family::Int8Mm)) {
    case Isa::Avx512: return avx512::gemm(ap, K, bp, N, m0, m1, p0, p1, ep);
    case Isa::Avx2: return avx2::gemm(ap, K, bp, N, m0, m1, p0, p1, ep);
    default: return scalar::gemm(ap, K, bp, N, m0, m1, p0, p1, ep);
  }
}

void pack_b_panels(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int64_t p0, int64_t p1,
                   uint8_t* out) {
  switch (isa(Family::Int8Mm)) {
    case Isa::Avx512: return avx512::pack_b_panels(w, N, K, ldw, p0, p1, out);
    case Isa::Avx2: return avx2::pack_b_panels(w, N, K, ldw, p0, p1, out);
    default: return scalar::pack_b_panels(w, N, K, ldw, p0, p1, out);
  }
}

void dequant_b_slab_t(const uint8_t* bp, const float* w_scale, int64_t N, int64_t K, int64_t k0,
                      int64_t k1, float* dst, int64_t ldd) {
  switch (isa(Family::Int8Mm)) {
    case Isa::Avx512: return avx512::dequant_b_slab_t(bp, w_scale, N, K, k0, k1, dst, ldd);
    case Isa::Avx2: return avx2::dequant_b_slab_t(bp, w_scale, N, K, k0, k1, dst, ldd);
    default: return scalar::dequant_b_slab_t(bp, w_scale, N, K, k0, k1, dst, ldd);
  }
}

const char* kernel_name() {
  switch (isa(Family::Int8Mm)) {
    case Isa::Avx512: return "avx512_vnni (vpdpbusd)";
    case Isa::Avx2: return "avx2 (vpmaddwd)";
    default: return "scalar";
  }
}

}  // namespace qtorch::cpu::int8_mm
