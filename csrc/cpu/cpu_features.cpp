#include "cpu_features.h"

#include <cstdlib>
#include <cstring>
#include <atomic>

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

static Isa best_isa() {
  const auto& f = features();
  Isa best = Isa::Scalar;
  if (f.avx2 && f.fma && f.f16c) best = Isa::Avx2;
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni && f.avx512_bf16 &&
      f.fma && f.f16c)
    best = Isa::Avx512;
  const char* env = std::getenv("QTORCH_CPU_ISA");
  if (env != nullptr) {
    Isa cap = best;
    if (std::strcmp(env, "scalar") == 0) cap = Isa::Scalar;
    else if (std::strcmp(env, "avx2") == 0) cap = Isa::Avx2;
    else if (std::strcmp(env, "avx512") == 0) cap = Isa::Avx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

static std::atomic<int> g_isa{-1};

Isa isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(best_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa want) {
  // Never above what the hardware supports.
  g_isa.store(-1);
  Isa hw = isa();
  if (static_cast<int>(want) > static_cast<int>(hw)) want = hw;
  g_isa.store(static_cast<int>(want));
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::Avx512: return "avx512_vnni";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace qtorch::cpu
