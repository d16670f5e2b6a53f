// Weight-only matmul: packing, group sums, the portable scalar kernels and the ISA dispatch.
// See weight_only.h for the math and the layouts.
#include "weight_only.h"

#include <cstring>

#include "../cpu_features.h"

namespace qtorch::cpu::weight_only {

static inline float x_at(const void* x, DType act, int64_t i) {
  return act == DType::F32 ? static_cast<const float*>(x)[i]
                         : bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
}

namespace {
// Z: uint8_t (integer zero points) or float (zero_point="float").
template <class Z>
void pack_int4_t(const uint8_t* qweight, const float* scales, const Z* zeros, int64_t N,
                 int64_t K, int64_t gs, uint8_t* w_out, float* scale_out, Z* zero_out) {
  const int64_t Nb = num_blocks(N), G = K / gs, Ko = K / 8;
  auto q = [&](int64_t n, int64_t k) -> uint8_t {
    if (n >= N) return 0;
    uint8_t byte = qweight[n * (K / 2) + k / 2];
    return (k & 1) ? (byte >> 4) : (byte & 0xF);
  };
  for (int64_t nb = 0; nb < Nb; ++nb) {
    for (int64_t o = 0; o < Ko; ++o) {
      uint8_t* dst = w_out + (nb * Ko + o) * 64;
      for (int b = 0; b < 64; ++b) {  // byte 4c + 2e + h (weight_only.h)
        const int64_t n = nb * kBlock + b / 4, k = 8 * o + 4 * (b & 1) + ((b >> 1) & 1);
        dst[b] = uint8_t(q(n, k) | (q(n, k + 2) << 4));
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t i = 0; i < kBlock; ++i) {
        int64_t n = nb * kBlock + i, o = (nb * G + g) * kBlock + i;
        float s = n < N ? scales[n * G + g] : 0.f;
        scale_out[o] = s;
        zero_out[o] = n < N ? zeros[n * G + g] : Z(0);
      }
    }
  }
}
}  // namespace

void pack_int4(const uint8_t* qweight, const float* scales, const uint8_t* zeros, int64_t N,
               int64_t K, int64_t gs, uint8_t* w_out, float* scale_out, uint8_t* zero_out) {
  pack_int4_t(qweight, scales, zeros, N, K, gs, w_out, scale_out, zero_out);
}
void pack_int4(const uint8_t* qweight, const float* scales, const float* zeros, int64_t N,
               int64_t K, int64_t gs, uint8_t* w_out, float* scale_out, float* zero_out) {
  pack_int4_t(qweight, scales, zeros, N, K, gs, w_out, scale_out, zero_out);
}

void pack_int8_blocks_scalar(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                             int64_t nb0, int64_t nb1, int8_t* w_out, float* scale_out) {
  const int64_t Kh = int8_padded_k(K) / 2;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    for (int64_t t = 0; t < Kh; ++t) {
      int8_t* dst = w_out + (nb * Kh + t) * 32;
      for (int j = 0; j < 32; ++j) {
        int64_t n = nb * kBlock + j / 2, k = 2 * t + (j & 1);
        dst[j] = (n < N && k < K) ? w_q[n * K + k] : 0;
      }
    }
    for (int64_t i = 0; i < kBlock; ++i) {
      int64_t n = nb * kBlock + i;
      scale_out[nb * kBlock + i] = n < N ? w_scale[n] : 0.f;
    }
  }
}

void pack_int8(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K, int8_t* w_out,
               float* scale_out) {
  pack_int8_blocks(w_q, w_scale, N, K, 0, num_blocks(N), w_out, scale_out);
}

// Byte and nibble of q[n, k] in block n / 16 of the int4 layout (weight_only.h): k = 8 o + r with
// r = 4 h + e (low nibble) or 4 h + 2 + e (high nibble), byte 4 c + 2 e + h of octet o.
static inline int64_t int4_byte(int64_t n, int64_t k, int64_t Ko) {
  const int64_t r = k & 7, h = r >> 2, e = r & 1;
  return ((n / kBlock) * Ko + (k >> 3)) * 64 + 4 * (n % kBlock) + 2 * e + h;
}
static inline uint8_t int4_nibble(const uint8_t* w, int64_t n, int64_t k, int64_t Ko) {
  const uint8_t b = w[int4_byte(n, k, Ko)];
  return (k & 2) ? uint8_t(b >> 4) : uint8_t(b & 0xF);
}

template <class Z>
static void unpack_int4_t(const uint8_t* w, const float* scale, const Z* zero, int64_t N,
                          int64_t K, int64_t gs, uint8_t* qweight, float* scales, Z* zeros) {
  const int64_t G = K / gs, Ko = K / 8;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; k += 2)
      qweight[n * (K / 2) + k / 2] =
          uint8_t(int4_nibble(w, n, k, Ko) | (int4_nibble(w, n, k + 1, Ko) << 4));
    for (int64_t g = 0; g < G; ++g) {
      const int64_t o = ((n / kBlock) * G + g) * kBlock + n % kBlock;
      scales[n * G + g] = scale[o];
      zeros[n * G + g] = zero[o];
    }
  }
}

void unpack_int4(const uint8_t* w, const float* scale, const uint8_t* zero, int64_t N, int64_t K,
                 int64_t gs, uint8_t* qweight, float* scales, uint8_t* zeros) {
  unpack_int4_t(w, scale, zero, N, K, gs, qweight, scales, zeros);
}
void unpack_int4(const uint8_t* w, const float* scale, const float* zero, int64_t N, int64_t K,
                 int64_t gs, uint8_t* qweight, float* scales, float* zeros) {
  unpack_int4_t(w, scale, zero, N, K, gs, qweight, scales, zeros);
}

void unpack_int8(const int8_t* w, const float* scale, int64_t N, int64_t K, int8_t* w_q,
                 float* w_scale) {
  const int64_t Kh = int8_padded_k(K) / 2;
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* blk = w + (n / kBlock) * Kh * 32 + 2 * (n % kBlock);
    for (int64_t k = 0; k < K; ++k) w_q[n * K + k] = blk[(k / 2) * 32 + (k & 1)];
    w_scale[n] = scale[n];
  }
}

template <class Z>
static void dequant_int4_slab_t(const uint8_t* w, const float* scale, const Z* zero, int64_t N,
                                int64_t K, int64_t gs, int64_t k0, int64_t k1, float* dst,
                                int64_t ldd) {
  const int64_t G = K / gs, Ko = K / 8;
  for (int64_t n = 0; n < N; ++n) {
    float* d = dst + n * ldd - k0;
    for (int64_t g = k0 / gs; g * gs < k1; ++g) {
      const int64_t o = ((n / kBlock) * G + g) * kBlock + n % kBlock;
      const float s = scale[o], z = float(zero[o]);
      const int64_t a = k0 > g * gs ? k0 : g * gs, b = k1 < (g + 1) * gs ? k1 : (g + 1) * gs;
      for (int64_t k = a; k < b; ++k) d[k] = (float(int4_nibble(w, n, k, Ko)) - z) * s;
    }
  }
}

void dequant_int4_slab(const uint8_t* w, const float* scale, const uint8_t* zero, int64_t N,
                       int64_t K, int64_t gs, int64_t k0, int64_t k1, float* dst, int64_t ldd) {
  dequant_int4_slab_t(w, scale, zero, N, K, gs, k0, k1, dst, ldd);
}
void dequant_int4_slab(const uint8_t* w, const float* scale, const float* zero, int64_t N,
                       int64_t K, int64_t gs, int64_t k0, int64_t k1, float* dst, int64_t ldd) {
  dequant_int4_slab_t(w, scale, zero, N, K, gs, k0, k1, dst, ldd);
}

void dequant_int8_slab_t_scalar(const int8_t* w, const float* scale, int64_t N, int64_t K,
                                int64_t k0, int64_t k1, float* dst, int64_t ldd) {
  const int64_t Kh = int8_padded_k(K) / 2;
  for (int64_t k = k0; k < k1; ++k) {
    float* d = dst + (k - k0) * ldd;
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* blk = w + (n / kBlock) * Kh * 32 + 2 * (n % kBlock);
      d[n] = float(blk[(k / 2) * 32 + (k & 1)]) * scale[n];
    }
  }
}

void group_sums(const void* x, DType act, int64_t M, int64_t ldx, int64_t K, int64_t gs,
                float* xsum) {
  // 16 partial sums (gs is a multiple of 16), so the compiler vectorizes the loop and no
  // serial chain of fp32 adds bounds it; the order differs from a serial sum by fp32 ulps.
  const int64_t G = K / gs;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float part[16] = {0};
      const int64_t base = m * ldx + g * gs;
      if (act == DType::F32) {
        const float* xr = static_cast<const float*>(x) + base;
        for (int64_t k = 0; k < gs; k += 16)
          for (int i = 0; i < 16; ++i) part[i] += xr[k + i];
      } else {
        const uint16_t* xr = static_cast<const uint16_t*>(x) + base;
        for (int64_t k = 0; k < gs; k += 16)
          for (int i = 0; i < 16; ++i) part[i] += bf16_to_f32(xr[k + i]);
      }
      float s = 0.f;
      for (int i = 0; i < 16; ++i) s += part[i];
      xsum[m * G + g] = s;
    }
}

// Stores acc[0:16] (+ bias) into y row m, columns 16*nb .. min(16*nb+16, N).
static void store_block(const Problem& p, int64_t N, int64_t m, int64_t nb, const float* acc) {
  const int64_t n0 = nb * kBlock, nn = N - n0 < kBlock ? N - n0 : kBlock;
  float* yr = p.y + m * p.ldy + n0;
  for (int64_t i = 0; i < nn; ++i) yr[i] = acc[i] + (p.col_bias ? p.col_bias[n0 + i] : 0.f);
}

void int4_gemm_scalar(const Int4Weights& w, const Problem& p) {
  const int64_t K = w.K, gs = w.gs, G = K / gs, Ko = K / 8;
  for (int64_t nb = p.nb0; nb < p.nb1; ++nb) {
    const uint8_t* wb = w.w + nb * Ko * 64;
    for (int64_t m = 0; m < p.M; ++m) {
      float out[kBlock] = {0};
      for (int64_t g = 0; g < G; ++g) {
        float acc[kBlock] = {0};
        for (int64_t o = g * gs / 8; o < (g + 1) * gs / 8; ++o) {
          const uint8_t* src = wb + o * 64;
          for (int b = 0; b < 64; ++b) {  // byte 4c + 2e + h: k = 8o + 4h + e (+ 2 high)
            const int64_t k = 8 * o + 4 * (b & 1) + ((b >> 1) & 1);
            const float xl = x_at(p.x, p.act, m * p.ldx + k);
            const float xh = x_at(p.x, p.act, m * p.ldx + k + 2);
            acc[b / 4] += xl * float(src[b] & 0xF) + xh * float(src[b] >> 4);
          }
        }
        const float* s = w.scale + (nb * G + g) * kBlock;
        const int64_t zo = (nb * G + g) * kBlock;
        float xs = p.xsum[m * G + g];
        for (int i = 0; i < kBlock; ++i) {
          const float z = w.zero_f ? w.zero_f[zo + i] : float(w.zero[zo + i]);
          out[i] += s[i] * acc[i] + (-(s[i] * z)) * xs;
        }
      }
      store_block(p, w.N, m, nb, out);
    }
  }
}

void int8_gemm_scalar(const Int8Weights& w, const Problem& p) {
  const int64_t Kh = int8_padded_k(w.K) / 2;
  for (int64_t nb = p.nb0; nb < p.nb1; ++nb) {
    const int8_t* wb = w.w + nb * Kh * 32;
    for (int64_t m = 0; m < p.M; ++m) {
      float acc[kBlock] = {0};
      for (int64_t t = 0; t < Kh; ++t)
        for (int j = 0; j < 32; ++j)
          acc[j / 2] += x_at(p.x, p.act, m * p.ldx + 2 * t + (j & 1)) * float(wb[t * 32 + j]);
      const float* s = w.scale + nb * kBlock;
      for (int i = 0; i < kBlock; ++i) acc[i] *= s[i];
      store_block(p, w.N, m, nb, acc);
    }
  }
}

bool supports_act(DType act) {
  return act == DType::F32 || isa(Family::WeightOnly) == Isa::Avx512;
}

void int4_gemm(const Int4Weights& w, const Problem& p) {
  switch (isa(Family::WeightOnly)) {
    case Isa::Avx512: return int4_gemm_avx512(w, p);
    case Isa::Avx2: return int4_gemm_avx2(w, p);
    default: return int4_gemm_scalar(w, p);
  }
}

void int8_gemm(const Int8Weights& w, const Problem& p) {
  switch (isa(Family::WeightOnly)) {
    case Isa::Avx512: return int8_gemm_avx512(w, p);
    case Isa::Avx2: return int8_gemm_avx2(w, p);
    default: return int8_gemm_scalar(w, p);
  }
}

void pack_int8_blocks(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K, int64_t nb0,
                      int64_t nb1, int8_t* w_out, float* scale_out) {
  switch (isa(Family::WeightOnly)) {
    case Isa::Avx512: return pack_int8_blocks_avx512(w_q, w_scale, N, K, nb0, nb1, w_out, scale_out);
    case Isa::Avx2: return pack_int8_blocks_avx2(w_q, w_scale, N, K, nb0, nb1, w_out, scale_out);
    default: return pack_int8_blocks_scalar(w_q, w_scale, N, K, nb0, nb1, w_out, scale_out);
  }
}

void dequant_int8_slab_t(const int8_t* w, const float* scale, int64_t N, int64_t K, int64_t k0,
                         int64_t k1, float* dst, int64_t ldd) {
  switch (isa(Family::WeightOnly)) {
    case Isa::Avx512: return dequant_int8_slab_t_avx512(w, scale, N, K, k0, k1, dst, ldd);
    case Isa::Avx2: return dequant_int8_slab_t_avx2(w, scale, N, K, k0, k1, dst, ldd);
    default: return dequant_int8_slab_t_scalar(w, scale, N, K, k0, k1, dst, ldd);
  }
}

const char* kernel_name(DType act) {
  switch (isa(Family::WeightOnly)) {
    case Isa::Avx512: return act == DType::BF16 ? "avx512_bf16 (vdpbf16ps)" : "avx512 (fp32 fma)";
    case Isa::Avx2: return "avx2 (fp32 fma)";
    default: return "scalar";
  }
}

}  // namespace qtorch::cpu::weight_only
