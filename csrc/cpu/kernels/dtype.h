// Storage dtypes of the CPU kernels' raw buffers, and the scalar fp16 / bf16 <-> fp32
// conversions, shared by every kernel family. Torch-free.
//
// The narrowing conversions round to nearest even and keep a NaN a NaN: fp16 gives the quiet
// NaN 0x7e00 with the input's sign (as c10::Half), bf16 the input's top 16 bits with the quiet
// bit set. The widening ones are exact. They serve the scalar kernels and the SIMD tails.
//
// Every function is `static inline`: each translation unit that uses one keeps its own copy,
// so the linker never merges the scalar kernels' calls into a copy compiled with AVX-512 flags.
#pragma once
#include <cstdint>
#include <cstring>

namespace qtorch::cpu {

// The codes match the CUDA launchers' (csrc/cuda/kernels.h). S32 is the int8 GEMM's exact
// int32 output (a test hook); no kernel takes it as an input.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, S32 = 3 };

static inline int64_t dtype_size(DType d) { return d == DType::F16 || d == DType::BF16 ? 2 : 4; }

static inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                         // RNE
  return uint16_t(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
    const float v = float(m) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (e == 31) bits = sign | 0x7f800000u | (m << 13);  // inf or NaN (payload kept)
  else bits = sign | ((e + 112u) << 23) | (m << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t f32_to_f16(float f) {
  // Round to nearest even (F. Giesen's float_to_half_fast3_rtne).
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x47800000u)  // >= 2^16 (rounds to inf), inf or NaN
    return uint16_t(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (u < 0x38800000u) {  // below 2^-14, a half subnormal: adding 0.5 puts the fp32 ulp at
    float a;              // 2^-24, the half subnormal step, so the fp32 add rounds (RNE)
    std::memcpy(&a, &u, 4);
    a += 0.5f;
    uint32_t r;
    std::memcpy(&r, &a, 4);
    return uint16_t(sign | (r - 0x3f000000u));
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += (uint32_t(15 - 127) << 23) + 0xfffu + odd;  // rebias the exponent, round half to even
  return uint16_t(sign | (u >> 13));
}

}  // namespace qtorch::cpu
