// Placeholder: forwards to the scalar kernels until the avx2 kernels land.
#include "wo_mm.h"

namespace qtorch::cpu::womm {
void int4_mm_avx2(const Int4Weights& w, const Problem& p) { int4_mm_scalar(w, p); }
void int8_mm_avx2(const Int8Weights& w, const Problem& p) { int8_mm_scalar(w, p); }
}  // namespace qtorch::cpu::womm
