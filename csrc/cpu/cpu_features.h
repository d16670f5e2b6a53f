// CPU feature detection and the per-process kernel ISA choice.
// Kernels are plain functions on raw pointers; each ISA lives in its own translation unit
// (`*_avx512.cpp`, `*_avx2.cpp`, scalar in the plain file) compiled with its own -m flags.
#pragma once
#include <string>

namespace qtorch::cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, amx_int8 = false;
};

const CpuFeatures& features();
// Chosen once per process: the best the CPU supports, capped by QTORCH_CPU_ISA
// (avx512 | avx2 | scalar) when set, so tests can force the slower paths.
Isa isa();
// Re-read QTORCH_CPU_ISA (tests force a path within one process).
void set_isa(Isa isa);
const char* isa_name(Isa isa);

}  // namespace qtorch::cpu
