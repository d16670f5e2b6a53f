#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define QTORCH_X86 1
#endif

namespace qtorch::cpu {

static CpuFeatures detect() {
  CpuFeatures f;
#ifdef QTORCH_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  bool osxsave = c & (1u << 27);
  if (!osxsave) return f;
  unsigned xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  bool ymm_os = (xlo & 0x6) == 0x6;
  bool zmm_os = (xlo & 0xe6) == 0xe6;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = ymm_os && (b & (1u << 5));
  f.avx512f = zmm_os && (b & (1u << 16));
  f.avx512dq = zmm_os && (b & (1u << 17));
  f.avx512bw = zmm_os && (b & (1u << 30));
  f.avx512vl = zmm_os && (b & (1u << 31));
  f.avx512_vnni = zmm_os && (c & (1u << 11));
  f.amx_int8 = d & (1u << 25);
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  f.avx512_bf16 = zmm_os && (a1 & (1u << 5));
#endif
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

// The features each family's ISA files are compiled for (csrc/cpu/kernels/isa_flags.txt):
// every *_avx2.cpp gets -mavx2 -mfma -mf16c; every *_avx512.cpp those plus
// -mavx512{f,bw,vl,dq} and the extension its kernels use: VNNI (vpdpbusd) for int8_mm,
// AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16, vcvtneps2bf16) for weight_only and distillation.
Isa hardware_isa(Family family) {
  const CpuFeatures& f = features();
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  const bool avx512 = avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  bool ext = false;
  switch (family) {
    case Family::Int8Mm: ext = f.avx512_vnni; break;
    case Family::WeightOnly:
    case Family::Distillation: ext = f.avx512_bf16; break;
  }
  return avx512 && ext ? Isa::Avx512 : avx2 ? Isa::Avx2 : Isa::Scalar;
}

static Isa env_cap() {
  const char* env = std::getenv("QTORCH_CPU_ISA");
  if (env != nullptr) {
    if (std::strcmp(env, "scalar") == 0) return Isa::Scalar;
    if (std::strcmp(env, "avx2") == 0) return Isa::Avx2;
  }
  return Isa::Avx512;
}

// The ISA of every family, two bits each (family f at bits 2f..2f+1); -1 until first use.
// One relaxed load per kernel dispatch, as cheap as a single global choice.
static std::atomic<int> g_levels{-1};

static int levels_for(Isa cap) {
  const Isa env = env_cap();
  if (static_cast<int>(env) < static_cast<int>(cap)) cap = env;
  int v = 0;
  for (int i = 0; i < kFamilies; ++i) {
    int l = static_cast<int>(hardware_isa(static_cast<Family>(i)));
    if (l > static_cast<int>(cap)) l = static_cast<int>(cap);
    v |= l << (2 * i);
  }
  return v;
}

Isa isa(Family family) {
  int v = g_levels.load(std::memory_order_relaxed);
  if (v < 0) {
    v = levels_for(Isa::Avx512);
    g_levels.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>((v >> (2 * static_cast<int>(family))) & 3);
}

Isa max_isa() {
  int best = 0;
  for (int i = 0; i < kFamilies; ++i) {
    const int l = static_cast<int>(isa(static_cast<Family>(i)));
    if (l > best) best = l;
  }
  return static_cast<Isa>(best);
}

void set_isa(Isa cap) { g_levels.store(levels_for(cap), std::memory_order_relaxed); }

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::Avx512: return "avx512_vnni";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

const char* family_name(Family family) {
  switch (family) {
    case Family::Int8Mm: return "int8_mm";
    case Family::WeightOnly: return "weight_only";
    default: return "distillation";
  }
}

}  // namespace qtorch::cpu
