// Knowledge-distillation loss, one block per token row (qtorch.reference.distillation is the
// definition). For row i with student s, teacher t, temperature T:
//
//   z = s / T, u = t / T, q = softmax(z), p = softmax(u), logZ_z = max z + log Σ e^(z - max z)
//   "kl"          D = Σ_live p (u - z) + logZ_z - logZ_u                     (Σ_live p = 1)
//   "reverse_kl"  D = [Σ_live q (z - u) + (logZ_u - logZ_z) Σ_live q]
//   "jsd"         D = β Σ_live p (log p - log m) + (1 - β) Σ q (log q - log m),  m = β p + (1-β) q
//   loss = α T² D + (1 - α) (logZ_s - s[label])          (hard term only with labels)
//   "live" = teacher logit != -inf: a masked vocabulary entry contributes nothing.
//
// Gradient w.r.t. s (chain rule through z = s / T gives the factor T · α):
//   kl:   T α (q_j - p_j)
//   rkl:  T α (live_j q_j (g_j + 1) - q_j (D + Q)),  g_j = log q_j - log p_j,  Q = Σ_live q
//         (= T α q_j (g_j - D) when nothing is masked)
//   jsd:  T α (1 - β) q_j (log q_j - log m_j - KL(q ‖ m))
//   hard: (1 - α) (softmax(s)_j - [j == label])
//
// Passes over the row (128-bit vector loads; the second and third reads come from L2):
//   1. online softmax statistics: running maxima of s and t, Σ e^(z - max), Σ e^(u - max),
//      Σ e^(s - max) (only when T != 1), and the KL / reverse-KL cross sums, rescaled whenever
//      a maximum grows; merged across threads with warp shuffles, then across warps in shared
//      memory. This gives the loss for kl and reverse_kl.
//   2. kl / reverse_kl: the gradient. jsd: Σ p log(p/m) and Σ q log(q/m) (log m does not
//      decompose into running sums, so it needs the normalizers from pass 1).
//   3. jsd only: the gradient.
// All arithmetic is fp32; the gradient is stored in the input dtype.
#include "common.cuh"
#include "kernels.h"

namespace qtorch_cuda {
namespace {

constexpr int kThreads = 256;

// Running statistics of one thread (then of a warp, then of the block).
struct Stats {
  float ms;  // max of raw student logits (max z = ms / T: division is monotonic)
  float sz;  // Σ e^(z - ms/T)
  float ss;  // Σ e^(s - ms)          (T != 1 only; equals sz when T == 1)
  float b;   // Σ_live e^(z - ms/T) (z - u)   reverse_kl
  float ql;  // Σ_live e^(z - ms/T)           reverse_kl
  float mt;  // max of raw teacher logits
  float su;  // Σ e^(u - mt/T)
  float a;   // Σ_live e^(u - mt/T) (u - z)   kl
};

// e^(x - m) that treats x = -inf as 0 even when m = -inf too (e.g. a thread whose slice of a
// masked row holds nothing but -inf), instead of e^NaN.
__device__ __forceinline__ float exp_rel(float x, float m) {
  return x == -INFINITY ? 0.f : __expf(x - m);
}

// Factor that moves sums kept relative to `m_old` onto `m_new` (>= m_old).
__device__ __forceinline__ float rescale(float m_old, float m_new, float inv_t) {
  return m_old == -INFINITY ? 0.f : __expf((m_old - m_new) * inv_t);
}

__device__ __forceinline__ void merge(Stats& x, const Stats& y, float inv_t, bool same) {
  const float ms = fmaxf(x.ms, y.ms), mt = fmaxf(x.mt, y.mt);
  const float fx = rescale(x.ms, ms, inv_t), fy = rescale(y.ms, ms, inv_t);
  x.sz = x.sz * fx + y.sz * fy;
  x.b = x.b * fx + y.b * fy;
  x.ql = x.ql * fx + y.ql * fy;
  if (!same) x.ss = x.ss * rescale(x.ms, ms, 1.f) + y.ss * rescale(y.ms, ms, 1.f);
  const float gx = rescale(x.mt, mt, inv_t), gy = rescale(y.mt, mt, inv_t);
  x.su = x.su * gx + y.su * gy;
  x.a = x.a * gx + y.a * gy;
  x.ms = ms;
  x.mt = mt;
}

__device__ __forceinline__ Stats shfl_xor(const Stats& s, int o) {
  Stats r;
  r.ms = __shfl_xor_sync(0xffffffffu, s.ms, o);
  r.sz = __shfl_xor_sync(0xffffffffu, s.sz, o);
  r.ss = __shfl_xor_sync(0xffffffffu, s.ss, o);
  r.b = __shfl_xor_sync(0xffffffffu, s.b, o);
  r.ql = __shfl_xor_sync(0xffffffffu, s.ql, o);
  r.mt = __shfl_xor_sync(0xffffffffu, s.mt, o);
  r.su = __shfl_xor_sync(0xffffffffu, s.su, o);
  r.a = __shfl_xor_sync(0xffffffffu, s.a, o);
  return r;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int DIV, int VEC>
__global__ void __launch_bounds__(kThreads)
    distillation_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                   const int64_t* __restrict__ labels, float* __restrict__ loss,
                   T* __restrict__ grad, int V, float temperature, float alpha, float beta,
                   int64_t ignore_index) {
  __shared__ Stats warp_stats[kThreads / 32];
  __shared__ float scratch[32];
  const int row = blockIdx.x;
  const T* s_row = student + (size_t)row * V;
  const T* t_row = teacher + (size_t)row * V;
  T* g_row = grad ? grad + (size_t)row * V : nullptr;
  const int nvec = V / VEC;
  using VT = Vec<T, VEC>;

  int64_t label = -1;
  bool has_label = labels != nullptr;
  if (has_label) {
    label = labels[row];
    const bool bad = label != ignore_index && (label < 0 || label >= V);
    if (label == ignore_index || bad) {
      // Ignored: loss 0 and a zero gradient whatever the row holds. Out of range (the caller
      // has already raised; this keeps the kernel in bounds): NaN.
      if (threadIdx.x == 0) loss[row] = bad ? NAN : 0.f;
      if (g_row) {
        VT zero;
#pragma unroll
        for (int e = 0; e < VEC; ++e) zero.v[e] = from_float<T>(0.f);
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) reinterpret_cast<VT*>(g_row)[i] = zero;
      }
      return;
    }
  }

  const float inv_t = 1.f / temperature;
  const bool same = temperature == 1.f;  // then softmax(s) = q and Σ e^(s - ms) = sz

  // ---- pass 1: online statistics -----------------------------------------------------------
  Stats st = {-INFINITY, 0.f, 0.f, 0.f, 0.f, -INFINITY, 0.f, 0.f};
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const VT sv = reinterpret_cast<const VT*>(s_row)[i];
    const VT tv = reinterpret_cast<const VT*>(t_row)[i];
    float s[VEC], t[VEC];
    float vs = -INFINITY, vt = -INFINITY;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      s[e] = to_float(sv.v[e]);
      t[e] = to_float(tv.v[e]);
      vs = fmaxf(vs, s[e]);
      vt = fmaxf(vt, t[e]);
    }
    // One rescale per vector, not per element.
    if (vs > st.ms) {
      const float f = rescale(st.ms, vs, inv_t);
      st.sz *= f;
      st.b *= f;
      st.ql *= f;
      if (!same) st.ss *= rescale(st.ms, vs, 1.f);
      st.ms = vs;
    }
    if (vt > st.mt) {
      const float g = rescale(st.mt, vt, inv_t);
      st.su *= g;
      st.a *= g;
      st.mt = vt;
    }
    const float mz = st.ms / temperature, mu = st.mt / temperature;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float z = s[e] / temperature, u = t[e] / temperature;
      const float ez = exp_rel(z, mz), eu = exp_rel(u, mu);
      const bool live = t[e] != -INFINITY;
      st.sz += ez;
      st.su += eu;
      if (!same) st.ss += exp_rel(s[e], st.ms);
      if (DIV == kKL && live) st.a += eu * (u - z);
      if (DIV == kReverseKL && live) {
        st.b += ez * (z - u);
        st.ql += ez;
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(st, shfl_xor(st, o), inv_t, same);
  if ((threadIdx.x & 31) == 0) warp_stats[threadIdx.x >> 5] = st;
  __syncthreads();
  st = warp_stats[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) merge(st, warp_stats[w], inv_t, same);

  const float log_zz = st.ms / temperature + logf(st.sz);  // log Σ e^z
  const float log_zu = st.mt / temperature + logf(st.su);  // log Σ e^u
  const float log_zs = same ? log_zz : st.ms + logf(st.ss);
  float hard = 0.f;
  if (has_label) hard = log_zs - to_float(s_row[label]);

  float d = 0.f, q_live = 1.f, kl_qm = 0.f;
  if (DIV == kKL) d = st.a / st.su + log_zz - log_zu;
  if (DIV == kReverseKL) {
    q_live = st.ql / st.sz;
    d = (st.b + (log_zu - log_zz) * st.ql) / st.sz;
  }
  if (DIV == kJSD) {
    // ---- pass 2 (jsd): the two divergences against the mixture m --------------------------
    float kl_pm = 0.f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const VT sv = reinterpret_cast<const VT*>(s_row)[i];
      const VT tv = reinterpret_cast<const VT*>(t_row)[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float t = to_float(tv.v[e]);
        const float lq = to_float(sv.v[e]) / temperature - log_zz;
        const float lp = t / temperature - log_zu;
        const float q = __expf(lq), p = __expf(lp);
        const float lm = logf(beta * p + (1.f - beta) * q);
        // A term whose weight is 0 is left out, as in the reference (no 0 * inf).
        if (beta != 0.f && t != -INFINITY) kl_pm += p * (lp - lm);
        if (beta != 1.f) kl_qm += q * (lq - lm);
      }
    }
    kl_pm = block_reduce<false>(kl_pm, scratch);
    kl_qm = block_reduce<false>(kl_qm, scratch);
    if (beta != 0.f) d += beta * kl_pm;
    if (beta != 1.f) d += (1.f - beta) * kl_qm;
  }

  if (threadIdx.x == 0) {
    float l = alpha * temperature * temperature * d;
    if (has_label) l += (1.f - alpha) * hard;
    loss[row] = l;
  }
  if (!g_row) return;

  // ---- last pass: d loss / d s_j ----------------------------------------------------------
  const float w_soft = alpha * temperature, w_hard = 1.f - alpha;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const VT sv = reinterpret_cast<const VT*>(s_row)[i];
    const VT tv = reinterpret_cast<const VT*>(t_row)[i];
    VT out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float sj = to_float(sv.v[e]), t = to_float(tv.v[e]);
      const float lq = sj / temperature - log_zz, lp = t / temperature - log_zu;
      const float q = __expf(lq), p = __expf(lp);
      float soft;
      if (DIV == kKL) {
        soft = q - p;
      } else if (DIV == kReverseKL) {
        soft = (t != -INFINITY) ? q * ((lq - lp) + 1.f - d - q_live) : -q * (d + q_live);
      } else {
        soft = 0.f;
        if (beta != 1.f) {
          const float lm = logf(beta * p + (1.f - beta) * q);
          soft = (1.f - beta) * q * (lq - lm - kl_qm);
        }
      }
      float gj = w_soft * soft;
      if (has_label) {
        const float sm = same ? q : __expf(sj - log_zs);
        const int j = i * VEC + e;
        gj += w_hard * (sm - (j == label ? 1.f : 0.f));
      }
      out.v[e] = from_float<T>(gj);
    }
    reinterpret_cast<VT*>(g_row)[i] = out;
  }
}

template <typename T, int DIV>
cudaError_t run_distill(const void* s, const void* t, const int64_t* labels, float* loss,
                        void* grad, int M, int V, float temperature, float alpha, float beta,
                        int64_t ignore_index, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = V % VEC == 0 && reinterpret_cast<uintptr_t>(s) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(t) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(grad) % 16 == 0;
  if (vec)
    distillation_kernel<T, DIV, VEC><<<M, kThreads, 0, stream>>>(
        static_cast<const T*>(s), static_cast<const T*>(t), labels, loss, static_cast<T*>(grad),
        V, temperature, alpha, beta, ignore_index);
  else
    distillation_kernel<T, DIV, 1><<<M, kThreads, 0, stream>>>(
        static_cast<const T*>(s), static_cast<const T*>(t), labels, loss, static_cast<T*>(grad),
        V, temperature, alpha, beta, ignore_index);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_div(const void* s, const void* t, const int64_t* labels, float* loss,
                         void* grad, int M, int V, float temperature, float alpha, int div,
                         float beta, int64_t ignore_index, cudaStream_t stream) {
  switch (div) {
    case kKL: return run_distill<T, kKL>(s, t, labels, loss, grad, M, V, temperature, alpha, beta, ignore_index, stream);
    case kReverseKL: return run_distill<T, kReverseKL>(s, t, labels, loss, grad, M, V, temperature, alpha, beta, ignore_index, stream);
    case kJSD: return run_distill<T, kJSD>(s, t, labels, loss, grad, M, V, temperature, alpha, beta, ignore_index, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_distillation_loss(const void* student, const void* teacher,
                                     const int64_t* labels, float* loss, void* grad, int dtype,
                                     int M, int V, float temperature, float alpha,
                                     int divergence, float beta, int64_t ignore_index,
                                     cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (V <= 0 || !(temperature > 0.f)) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat32: return dispatch_div<float>(student, teacher, labels, loss, grad, M, V, temperature, alpha, divergence, beta, ignore_index, stream);
    case kFloat16: return dispatch_div<__half>(student, teacher, labels, loss, grad, M, V, temperature, alpha, divergence, beta, ignore_index, stream);
    case kBFloat16: return dispatch_div<__nv_bfloat16>(student, teacher, labels, loss, grad, M, V, temperature, alpha, divergence, beta, ignore_index, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qtorch_cuda
