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
//   qtorch_cpu::mse_search(Tensor w [N, K], Tensor? col_weight [K], int group_size, int kind,
//       float[] shrink) -> (Tensor scale [N, G], Tensor zero [N, G])
//
// The MSE range search of qtorch/quantizers/mse.py (`search`, the reference): per group of
// `group_size` columns (int8: the whole row), RTN's range and its shrunk candidates, the
// (scale, zero) of each by grid.params_from_range, and the one with the smallest
// Σ c_k ((q_k − z) s − w_k)² (c = col_weight or 1), the first of equal errors (shrink[0] = 1
// is RTN's). Every value is computed by the reference's float32 operations; only the order of
// the sum over a group differs (sequential here), so two candidates whose errors agree to the
// last bits may be chosen differently.
//
// Output channels are independent (the error of channel n only moves along channel n), so the
// channels are split across threads; each thread walks the whole block on its slice.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

// Round half to even, as torch.round / nearbyint in the default mode, without a libm call
// (which keeps the loops vectorizable on plain x86-64): exact for |x| < 2^22, and for larger
// |x| the result stays beyond every grid bound (±127), so the clamp that follows gives what it
// would give for nearbyint(x). NaN and ±inf pass through as they do there.
inline float round_even(float x) {
  const float magic = 12582912.0f;  // 1.5 · 2^23: x + magic has ulp 1 for |x| < 2^22
  return (x + magic) - magic;
}

template <int Kind>
inline float code(float w, float s, float z) {
  if constexpr (Kind == 0) {
    return std::min(std::max(round_even(w / s), -127.0f), 127.0f);
  } else if constexpr (Kind == 1) {
    return std::min(std::max(round_even(w / s), -8.0f), 7.0f) + 8.0f;
  } else if constexpr (Kind == 2) {
    return std::min(std::max(round_even(w / s) + z, 0.0f), 15.0f);
  } else {
    return std::min(std::max(round_even(w / s + z), 0.0f), 15.0f);
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

// grid.params_from_range of [lo, hi] (symmetric kinds: of amax = hi)
template <int Kind>
inline void params(float lo, float hi, float* s, float* z) {
  if constexpr (Kind == 0) {
    *s = hi == 0.0f ? 1.0f : hi / 127.0f;
    *z = 0.0f;
  } else if constexpr (Kind == 1) {
    *s = hi == 0.0f ? 1.0f : hi / 7.0f;
    *z = 8.0f;
  } else {
    const float sc = hi == lo ? 1.0f : (hi - lo) / 15.0f;
    *s = sc;
    if constexpr (Kind == 2) *z = std::min(std::max(round_even(-lo / sc), 0.0f), 15.0f);
    else *z = -lo / sc;
  }
}

template <int Kind>
void search_rows(const float* w, const float* cw, int64_t K, int64_t gs, const float* shrink,
                 int64_t P, float* scale, float* zero, int64_t r0, int64_t r1) {
  const int64_t G = K / gs;
  std::vector<float> buf(3 * P);
  float* const cs = buf.data();
  float* const cz = cs + P;
  float* const ce = cz + P;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* wg = w + r * K + g * gs;
      const float* cg = cw ? cw + g * gs : nullptr;
      // grid.rtn_range
      // (torch's amin / amax propagate NaN: so does the range here, and with it the scale)
      bool nan = false;
      for (int64_t j = 0; j < gs; ++j) nan |= std::isnan(wg[j]);
      float lo, hi;
      if (nan) {
        lo = hi = std::numeric_limits<float>::quiet_NaN();
      } else if constexpr (Kind == 0 || Kind == 1) {
        float amax = 0.0f;
        for (int64_t j = 0; j < gs; ++j) amax = std::max(amax, std::fabs(wg[j]));
        lo = -amax;
        hi = amax;
      } else {
        lo = wg[0];
        hi = wg[0];
        for (int64_t j = 1; j < gs; ++j) {
          lo = std::min(lo, wg[j]);
          hi = std::max(hi, wg[j]);
        }
        if constexpr (Kind == 2) {
          lo = std::min(lo, 0.0f);
          hi = std::max(hi, 0.0f);
        }
      }
      // every candidate's (scale, zero), then their errors side by side: the loop over the
      // candidates vectorizes, and each error is still summed in order over the group
      for (int64_t c = 0; c < P; ++c) {
        const float p = shrink[c];
        float clo = lo, chi = hi;  // mse.candidate_range
        if (p != 1.0f) {
          if constexpr (Kind == 3) {
            const float mid = (hi + lo) * 0.5f, half = (hi - lo) * (0.5f * p);
            clo = mid - half;
            chi = mid + half;
          } else {
            clo = lo * p;
            chi = hi * p;
          }
        }
        params<Kind>(clo, chi, &cs[c], &cz[c]);
        ce[c] = 0.0f;
      }
      for (int64_t j = 0; j < gs; ++j) {
        const float x = wg[j], cj = cg ? cg[j] : 1.0f;
        for (int64_t c = 0; c < P; ++c) {
          const float t = (code<Kind>(x, cs[c], cz[c]) - cz[c]) * cs[c] - x;
          ce[c] += cg ? (t * t) * cj : t * t;
        }
      }
      int64_t best = 0;
      float best_e = std::isnan(ce[0]) ? std::numeric_limits<float>::infinity() : ce[0];
      for (int64_t c = 1; c < P; ++c) {
        if (ce[c] < best_e) {  // NaN never wins: it compares false
          best = c;
          best_e = ce[c];
        }
      }
      const float best_s = cs[best], best_z = cz[best];
      scale[r * G + g] = best_s;
      zero[r * G + g] = best_z;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> mse_search(const at::Tensor& w,
                                              const c10::optional<at::Tensor>& col_weight,
                                              int64_t group_size, int64_t kind,
                                              at::ArrayRef<double> shrink) {
  TORCH_CHECK_VALUE(w.dim() == 2, "w must be 2-D, got shape ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  check(w, "w", N, K);
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, "kind must be 0..3, got ", kind);
  TORCH_CHECK_VALUE(group_size > 0 && K % group_size == 0, "group_size must divide K = ", K,
                    ", got ", group_size);
  TORCH_CHECK_VALUE(!shrink.empty(), "shrink must not be empty");
  const float* cw = nullptr;
  if (col_weight.has_value() && col_weight->defined()) {
    check(*col_weight, "col_weight", K, -1);
    cw = col_weight->data_ptr<float>();
  }
  // the factors as the reference's float32 arithmetic sees them (a Python float times a
  // float32 tensor computes in float32; 0.5 * p rounds as 0.5 * float(p) does)
  std::vector<float> pf(shrink.size());
  for (size_t i = 0; i < shrink.size(); ++i) pf[i] = static_cast<float>(shrink[i]);
  const int64_t G = K / group_size, P = static_cast<int64_t>(pf.size());
  at::Tensor scale = at::empty({N, G}, w.options());
  at::Tensor zero = at::empty({N, G}, w.options());
  const float* wp = w.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  float* zp = zero.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / K), [&](int64_t r0, int64_t r1) {
    switch (kind) {
      case 0: search_rows<0>(wp, cw, K, group_size, pf.data(), P, sp, zp, r0, r1); break;
      case 1: search_rows<1>(wp, cw, K, group_size, pf.data(), P, sp, zp, r0, r1); break;
      case 2: search_rows<2>(wp, cw, K, group_size, pf.data(), P, sp, zp, r0, r1); break;
      default: search_rows<3>(wp, cw, K, group_size, pf.data(), P, sp, zp, r0, r1); break;
    }
  });
  return {scale, zero};
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
  m.def(
      "mse_search(Tensor w, Tensor? col_weight, int group_size, int kind, float[] shrink) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) {
  m.impl("gptq_block_", &gptq_block_);
  m.impl("mse_search", &mse_search);
}
