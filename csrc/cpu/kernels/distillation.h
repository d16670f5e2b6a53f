// Knowledge-distillation loss kernels for the CPU backend: torch-free (raw pointers + sizes), so
// the C++ sanitizer test links them without libtorch. The binding (csrc/cpu/distillation.cpp) owns
// argument checks (including the label range), allocation and threading over rows.
//
// Per row (token) i, everything in fp32 whatever the storage dtype (API.md):
//     z = s / T,  u = t / T,  q = softmax(z),  p = softmax(u)
//     "kl"          D = Σ_j p_j (log p_j − log q_j)
//     "reverse_kl"  D = Σ_j q_j (log q_j − log p_j)
//     "jsd"         D = β Σ_j p_j (log p_j − log m_j) + (1 − β) Σ_j q_j (log q_j − log m_j),
//                   m = β p + (1 − β) q
//     loss = α T² D + (1 − α) CE(s, label)           (CE on the un-tempered student)
// A teacher logit of −inf is a masked entry: p_j = 0 and every term of entry j is 0 (the sums
// run over the live set S = {j : t_j ≠ −inf}). Any other non-finite logit (student ±inf or NaN,
// teacher +inf or NaN) makes the loss and the whole gradient row NaN, never a silent 0.
//
// Layout: student, teacher and grad rows are contiguous, V elements, row stride `ld*` elements.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace qtorch::cpu::distillation {

enum class Divergence : int { KL = 0, ReverseKL = 1, JSD = 2 };

struct Params {
  float temperature = 1.0f;  // T > 0
  float alpha = 0.5f;        // weight of the soft term; 1 − alpha weighs the hard CE term
  Divergence divergence = Divergence::KL;
  float beta = 0.5f;         // JSD mixture weight of the teacher, in [0, 1]
};

// One row. `label` < 0 means "no hard term" (labels=None, or alpha == 1); the caller handles
// ignore_index by not calling (loss 0, zero gradient). When `grad` is non-null it receives
// grad_scale * d loss / d student (V elements of `gdt`, which is F32 or the student's dtype).
// Returns the token loss (NaN for a row with a non-finite logit other than a teacher −inf).
using RowFn = float (*)(const void* student, DType sdt, const void* teacher, DType tdt,
                        int64_t V, int64_t label, const Params& params, void* grad, DType gdt,
                        float grad_scale);

float row_scalar(const void* student, DType sdt, const void* teacher, DType tdt, int64_t V,
                 int64_t label, const Params& params, void* grad, DType gdt, float grad_scale);
// The ISA rows exist only on x86-64; elsewhere they are stubs that fall back to row_scalar.
float row_avx2(const void* student, DType sdt, const void* teacher, DType tdt, int64_t V,
               int64_t label, const Params& params, void* grad, DType gdt, float grad_scale);
float row_avx512(const void* student, DType sdt, const void* teacher, DType tdt, int64_t V,
                 int64_t label, const Params& params, void* grad, DType gdt, float grad_scale);

// The row kernel of isa(Family::Distillation) (cpu_features.h), and its name (`qtorch info`).
RowFn row_fn();
const char* kernel_name();

// Rows [begin, end) of a [M, V] problem, serially (the binding parallelizes over ranges).
// labels may be null (every row counts, no hard term). Rows whose label == ignore_index get
// loss 0 and a zero gradient row. token_scale (may be null = all ones) multiplies the gradient
// of row i. Labels must already be checked to lie in [0, V) or equal ignore_index.
void rows(RowFn fn, const void* student, DType sdt, int64_t lds, const void* teacher, DType tdt,
          int64_t ldt, const int64_t* labels, int64_t ignore_index, int64_t V, int64_t begin,
          int64_t end, const Params& params, float* loss, void* grad, DType gdt, int64_t ldg,
          const float* token_scale);

}  // namespace qtorch::cpu::distillation
