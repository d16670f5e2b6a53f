// CPU feature detection and the kernel ISA of each kernel family.
// Kernels are plain functions on raw pointers; each ISA lives in its own translation unit
// (`*_avx512.cpp`, `*_avx2.cpp`, scalar in the plain file) compiled with its own -m flags
// (csrc/cpu/kernels/isa_flags.txt). A family runs one of those files only on a CPU with every
// feature the file's flags allow the compiler to use, so the choice is made per family: a CPU
// with AVX-512 VNNI but no AVX512-BF16 runs the AVX-512 int8 kernels and the AVX2 weight-only
// and distillation ones.
#pragma once

namespace qtorch::cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

enum class Family { Int8Mm = 0, WeightOnly = 1, Distillation = 2 };
constexpr int kFamilies = 3;

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, amx_int8 = false;
};

const CpuFeatures& features();

// The best ISA this CPU runs `family`'s kernels at.
Isa hardware_isa(Family family);
// The ISA `family`'s kernels use: hardware_isa capped by QTORCH_CPU_ISA (avx512 | avx2 |
// scalar, read once per process) and by set_isa.
Isa isa(Family family);
// The highest ISA any family uses (qtorch._C.isa()).
Isa max_isa();
// Caps every family at `cap` (never above QTORCH_CPU_ISA): tests force the slower paths within
// one process. set_isa(Isa::Avx512) lifts a cap set earlier.
void set_isa(Isa cap);

const char* isa_name(Isa isa);
const char* family_name(Family family);

}  // namespace qtorch::cpu
