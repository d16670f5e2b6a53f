// The per-column loop of GPTQ inside one column block (qtorch/quantizers/gptq.py, whose
// `gptq_block_reference` defines it and serves every other device):
//
//   qtorch_cpu::gptq_block_(Tensor(a!) w [B, N], Tensor u [B, B], Tensor scale [B, N],
//       Tensor zero [B, N], Tensor inv_d [B], Tensor(b!) q [B, N], Tensor(c!) err [B, N],
//       int kind) -> ()
//
// w holds the block's columns of the weight transposed (row i = column i of W, one entry per
// output channel n), all float32 and contiguous. For i = 0 .. B-1, every n:
//   q[i, n]   = the grid code of w[i, n] with scale[i, n], zero[i, n]   (grid.codes)
//   err[i, n] = (w[i, n] - (q[i, n] - zero[i, n]) * scale[i, n]) * inv_d[i]
//   w[j, n]  -= u[i, j] * err[i, n]   for j > i
// kind: 0 int8 (clamp(round(w / s), -127, 127)), 1 int4 symmetric (clamp(round(w / s), -8, 7)
// + 8), 2 int4 integer zeros (clamp(round(w / s) + z, 0, 15)), 3 int4 float zeros
// (clamp(round(w / s + z), 0, 15)); round half to even, as torch.round. The same operations
// in the same order as the reference, each rounded on its own (no FMA contraction: the pragmas
// below), so the codes and the updated weights are the reference's bit for bit.
//
// Output channels are independent (the error of channel n only moves along channel n), so the
// channels are split across threads; each thread walks the whole block on its slice.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

template <int Kind>
inline float code(float w, float s, float z) {
  if constexpr (Kind == 0) {
    return std::min(std::max(std::nearbyint(w / s), -127.0f), 127.0f);
  } else if constexpr (Kind == 1) {
    return std::min(std::max(std::nearbyint(w / s), -8.0f), 7.0f) + 8.0f;
  } else if constexpr (Kind == 2) {
    return std::min(std::max(std::nearbyint(w / s) + z, 0.0f), 15.0f);
  } else {
    return std::min(std::max(std::nearbyint(w / s + z), 0.0f), 15.0f);
  }
}

template <int Kind>
void block_slice(float* w, const float* u, const float* sc, const float* zr, const float* inv_d,
                 float* q, float* err, int64_t B, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t i = 0; i < B; ++i) {
    float* wi = w + i * N;
    const float* si = sc + i * N;
    const float* zi = zr + i * N;
    float* qi = q + i * N;
    float* ei = err + i * N;
    const float d = inv_d[i];
    for (int64_t n = n0; n < n1; ++n) {
      const float c = code<Kind>(wi[n], si[n], zi[n]);
      qi[n] = c;
      ei[n] = (wi[n] - (c - zi[n]) * si[n]) * d;
    }
    for (int64_t j = i + 1; j < B; ++j) {
      const float uij = u[i * B + j];
      float* wj = w + j * N;
      for (int64_t n = n0; n < n1; ++n) wj[n] -= uij * ei[n];
    }
  }
}

void check(const at::Tensor& t, const char* what, int64_t rows, int64_t cols) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, what, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.is_contiguous(), what, " must be contiguous");
  if (cols < 0) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, what, " must have shape [", rows,
                      "], got ", t.sizes());
  } else {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, what,
                      " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  }
}

void gptq_block_(at::Tensor w, const at::Tensor& u, const at::Tensor& scale,
                 const at::Tensor& zero, const at::Tensor& inv_d, at::Tensor q, at::Tensor err,
                 int64_t kind) {
  TORCH_CHECK_VALUE(w.dim() == 2, "w must be 2-D, got shape ", w.sizes());
  const int64_t B = w.size(0), N = w.size(1);
  check(w, "w", B, N);
  check(u, "u", B, B);
  check(scale, "scale", B, N);
  check(zero, "zero", B, N);
  check(inv_d, "inv_d", B, -1);
  check(q, "q", B, N);
  check(err, "err", B, N);
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, "kind must be 0..3, got ", kind);
  float* wp = w.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  const float* dp = inv_d.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* ep = err.data_ptr<float>();
  // slices of 64 channels: B rows of 256 bytes per array stay in L1/L2 for the whole block
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (kind) {
      case 0: block_slice<0>(wp, up, sp, zp, dp, qp, ep, B, N, n0, n1); break;
      case 1: block_slice<1>(wp, up, sp, zp, dp, qp, ep, B, N, n0, n1); break;
      case 2: block_slice<2>(wp, up, sp, zp, dp, qp, ep, B, N, n0, n1); break;
      default: block_slice<3>(wp, up, sp, zp, dp, qp, ep, B, N, n0, n1); break;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m) {
  m.def(
      "gptq_block_(Tensor(a!) w, Tensor u, Tensor scale, Tensor zero, Tensor inv_d, "
      "Tensor(b!) q, Tensor(c!) err, int kind) -> ()");
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) { m.impl("gptq_block_", &gptq_block_); }
