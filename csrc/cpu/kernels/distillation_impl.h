// The distillation row kernel, written once over a vector-traits class `Vt` and instantiated by
// each ISA translation unit (distillation_scalar.cpp, distillation_avx2.cpp,
// distillation_avx512.cpp) with its own traits class. Include it only from those files.
//
// Each ISA's Vt is a distinct type, so row_t<Vt, ...> instantiations have distinct symbols
// (and internal linkage) even though this template lives in one namespace.
//
// Vt provides: V (vector of W floats), M (lane mask), set1, add, sub, mul, fmadd(a,b,c)=a*b+c,
// max(a,b) (returns b when either is NaN, as x86 maxps does), min, eq, gt, land, select(m,a,b),
// part(n) (lanes < n), hsum, hmax, exp (exact 0 below ln FLT_MIN, so exp(-inf) == 0), log
// (positive normal inputs), sub_lane(v, lane, c), load<D>, load_part<D>(p, i, n, pad),
// store<D>, store_part<D>(p, i, v, n).
//
// Per row, with the statistics of pass 1 in hand (all natural logs, lse = log-sum-exp):
//     log q_j = s_j / T − (max s / T + log Σ exp((s − max s) / T))       = fmadd(s_j, 1/T, −a_s)
//     log p_j = t_j / T − (max t / T + log Σ exp((t − max t) / T))       = fmadd(t_j, 1/T, −a_t)
//     log softmax(s)_j = s_j − (max s + log Σ exp(s − max s))            = s_j − c_s
// The token gradient with respect to s (z = s / T, dz/ds = 1/T) is
//     d loss / d s_j = α T² (1/T) dD/dz_j + (1 − α) (softmax(s)_j − [j == label])
// with dD/dz per divergence derived next to the code that computes it.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "distillation.h"

namespace qtorch::cpu::distillation {

template <class Vt, DType SD, DType TD, DType GD>
static float row_t(const void* sp, const void* tp, int64_t V, int64_t label, const Params& P,
                   void* gp, float gscale) {
  using Vec = typename Vt::V;
  using Msk = typename Vt::M;
  constexpr int W = Vt::W;
  constexpr int U = 4;  // vectors per online-softmax block: one rescale exp per 4 vectors
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const float kInf = std::numeric_limits<float>::infinity();
  const float T = P.temperature, invT = 1.0f / T;
  const bool soft = P.alpha != 0.0f;
  const bool hard = label >= 0 && P.alpha != 1.0f;
  const bool same_t = T == 1.0f;  // softmax(s / T) == softmax(s): share the CE statistics
  const bool need_zs = hard && !same_t;
  const Vec vinvT = Vt::set1(invT), vzero = Vt::set1(0.0f), vlow = Vt::set1(-FLT_MAX);
  const Vec vninf = Vt::set1(-kInf);
  const int64_t Vfull = V / W * W, Vblock = V / (W * U) * (W * U);

  // ---- pass 1: online max and sum-exp of s/T, s (if CE needs it at T != 1) and t/T --------
  // Lane maxima start at -FLT_MAX, not -inf, so a rescale exp(m_old - m_new) is never
  // exp(-inf + inf) = NaN and a masked (-inf) logit adds exp(-inf) = 0.
  // `bad` accumulates s * 0 (NaN for s = ±inf or NaN) and max(-FLT_MAX, t) * 0 (NaN for
  // t = +inf or NaN; t = -inf maps to -FLT_MAX and stays finite).
  Vec ms = vlow, mt = vlow, zq = vzero, zs = vzero, zp = vzero, bad = vzero;
  // JSD with 0 < β < 1 keeps pass 1's exponentials: per vector e_s = exp((s − n_s) / T) and
  // e_t = exp((t − n_t) / T) against the lane maxima n of its block (kept too), so that pass 2
  // forms q and p as e · exp((n − max) / T) / Z, one multiply each, instead of two exps. The
  // row scratch (per thread, cache-resident beside the row) then holds q and r in their place.
  const bool jsd_mid = soft && P.divergence == Divergence::JSD && P.beta > 0.0f &&
                       P.beta < 1.0f;
  const int64_t kn = Vfull + W;  // room for the padded tail vector
  const int64_t nblk = Vblock / (W * U) + (Vfull - Vblock) / W + 1;
  thread_local std::vector<float> keep;
  if (jsd_mid && keep.size() < static_cast<size_t>(2 * kn + 2 * nblk * W))
    keep.resize(2 * kn + 2 * nblk * W);
  float* const es = jsd_mid ? keep.data() : nullptr;
  float* const et = jsd_mid ? es + kn : nullptr;
  float* const bms = jsd_mid ? et + kn : nullptr;
  float* const bmt = jsd_mid ? bms + nblk * W : nullptr;
  int64_t blk = 0;  // the stat_block call, in order
  auto stat_block = [&](const Vec* s, const Vec* t, int n, int64_t i0) {
    Vec bs = s[0], bt = t[0];
    for (int k = 1; k < n; ++k) {
      bs = Vt::max(bs, s[k]);
      bt = Vt::max(bt, t[k]);
    }
    const Vec ns = Vt::max(ms, bs), nt = Vt::max(mt, bt);
    Vec aq = Vt::mul(zq, Vt::exp(Vt::mul(Vt::sub(ms, ns), vinvT)));
    Vec ap = Vt::mul(zp, Vt::exp(Vt::mul(Vt::sub(mt, nt), vinvT)));
    Vec as = need_zs ? Vt::mul(zs, Vt::exp(Vt::sub(ms, ns))) : vzero;
    for (int k = 0; k < n; ++k) {
      const Vec e_q = Vt::exp(Vt::mul(Vt::sub(s[k], ns), vinvT));
      const Vec e_p = Vt::exp(Vt::mul(Vt::sub(t[k], nt), vinvT));
      if (jsd_mid) {
        Vt::template store<DType::F32>(es, i0 + k * W, e_q);
        Vt::template store<DType::F32>(et, i0 + k * W, e_p);
      }
      aq = Vt::add(aq, e_q);
      ap = Vt::add(ap, e_p);
      if (need_zs) as = Vt::add(as, Vt::exp(Vt::sub(s[k], ns)));
    }
    if (jsd_mid) {
      Vt::template store<DType::F32>(bms, blk * W, ns);
      Vt::template store<DType::F32>(bmt, blk * W, nt);
    }
    ++blk;
    zq = aq;
    zp = ap;
    zs = as;
    ms = ns;
    mt = nt;
  };
  for (int64_t i = 0; i < Vblock; i += W * U) {
    Vec s[U], t[U];
    for (int k = 0; k < U; ++k) {
      s[k] = Vt::template load<SD>(sp, i + k * W);
      t[k] = Vt::template load<TD>(tp, i + k * W);
      bad = Vt::fmadd(s[k], vzero, bad);
      bad = Vt::fmadd(Vt::max(vlow, t[k]), vzero, bad);
    }
    stat_block(s, t, U, i);
  }
  for (int64_t i = Vblock; i < Vfull; i += W) {
    Vec s = Vt::template load<SD>(sp, i), t = Vt::template load<TD>(tp, i);
    bad = Vt::fmadd(s, vzero, bad);
    bad = Vt::fmadd(Vt::max(vlow, t), vzero, bad);
    stat_block(&s, &t, 1, i);
  }
  const int tail = static_cast<int>(V - Vfull);
  if (tail > 0) {  // pad with -inf: adds exp(-inf) = 0 to every sum and never wins a max
    Vec s = Vt::template load_part<SD>(sp, Vfull, tail, -kInf);
    Vec t = Vt::template load_part<TD>(tp, Vfull, tail, -kInf);
    bad = Vt::fmadd(Vt::select(Vt::part(tail), s, vzero), vzero, bad);
    bad = Vt::fmadd(Vt::max(vlow, t), vzero, bad);
    stat_block(&s, &t, 1, Vfull);
  }
  auto fill = [&](float v) {
    if (gp == nullptr) return;
    const Vec vv = Vt::set1(v);
    for (int64_t i = 0; i < Vfull; i += W) Vt::template store<GD>(gp, i, vv);
    if (tail > 0) Vt::template store_part<GD>(gp, Vfull, vv, tail);
  };
  if (std::isnan(Vt::hsum(bad))) {
    fill(kNaN);
    return kNaN;
  }
  // Read before any gradient is written: the fused-linear caller writes the gradient over the
  // student row in place (each sweep reads element j before it writes element j).
  float s_label = 0.0f;
  if (hard) {
    const Vec sl = Vt::template load_part<SD>(sp, label, 1, 0.0f);
    s_label = Vt::hsum(Vt::select(Vt::part(1), sl, vzero));
  }
  // Combine lanes: Z = Σ_lanes z_lane * exp((m_lane - M) / T).
  const float Ms = Vt::hmax(ms), Mt = Vt::hmax(mt);
  const Vec vMs = Vt::set1(Ms), vMt = Vt::set1(Mt);
  const float Zq = Vt::hsum(Vt::mul(zq, Vt::exp(Vt::mul(Vt::sub(ms, vMs), vinvT))));
  const float Zp = Vt::hsum(Vt::mul(zp, Vt::exp(Vt::mul(Vt::sub(mt, vMt), vinvT))));
  const float Zs = need_zs ? Vt::hsum(Vt::mul(zs, Vt::exp(Vt::sub(ms, vMs)))) : Zq;
  if (!(Zp > 0.0f)) {  // every teacher entry masked: p is undefined (the reference gives NaN)
    fill(kNaN);
    return kNaN;
  }
  const float a_s = Ms * invT + std::log(Zq), a_t = Mt * invT + std::log(Zp);
  const float c_s = same_t ? a_s : Ms + std::log(Zs);  // log-sum-exp of s, for CE
  const Vec va_s = Vt::set1(-a_s), va_t = Vt::set1(-a_t), vc_s = Vt::set1(-c_s);

  const float cS = soft ? gscale * P.alpha * T : 0.0f;  // α T² · (1/T)
  const float cH = hard ? gscale * (1.0f - P.alpha) : 0.0f;
  const Vec vcS = Vt::set1(cS), vcH = Vt::set1(cH);
  const bool want_grad = gp != nullptr;

  // Shared epilogue: g = cS · dD/dz + cH · (softmax(s) − onehot(label)), then store.
  auto emit = [&](int64_t i, int n, Vec s, Vec q, Vec gz) {
    Vec g = Vt::mul(vcS, gz);
    if (hard) {
      const Vec sm = same_t ? q : Vt::exp(Vt::add(s, vc_s));
      g = Vt::fmadd(vcH, sm, g);
      const int64_t lane = label - i;
      if (lane >= 0 && lane < n) g = Vt::sub_lane(g, static_cast<int>(lane), cH);
    }
    if (n == W) Vt::template store<GD>(gp, i, g);
    else Vt::template store_part<GD>(gp, i, g, n);
  };
  // Runs body(i, n, s, t) over the row in vectors (the last one partial, padded with -inf).
  auto sweep = [&](auto&& body) {
    for (int64_t i = 0; i < Vfull; i += W)
      body(i, W, Vt::template load<SD>(sp, i), Vt::template load<TD>(tp, i));
    if (tail > 0)
      body(Vfull, tail, Vt::template load_part<SD>(sp, Vfull, tail, -kInf),
           Vt::template load_part<TD>(tp, Vfull, tail, -kInf));
  };

  float D = 0.0f;
  if (soft && P.divergence == Divergence::KL) {
    // D = Σ_{j∈S} p_j (log p_j − log q_j);  dD/dz_j = q_j − p_j (p_j = 0 off S, so this holds
    // for every j). One pass gives loss and gradient.
    Vec acc = vzero;
    sweep([&](int64_t i, int n, Vec s, Vec t) {
      const Vec lq = Vt::fmadd(s, vinvT, va_s), lp = Vt::fmadd(t, vinvT, va_t);
      const Vec q = Vt::exp(lq), p = Vt::exp(lp);
      // masked (t = -inf) and padded entries: p = 0 and p · (−inf) would be NaN, so select 0
      acc = Vt::add(acc, Vt::select(Vt::eq(t, vninf), vzero, Vt::mul(p, Vt::sub(lp, lq))));
      if (want_grad) emit(i, n, s, q, Vt::sub(q, p));
    });
    D = Vt::hsum(acc);
  } else if (soft && P.divergence == Divergence::ReverseKL) {
    // D = Σ_{j∈S} q_j r_j with r_j = log q_j − log p_j. With dq_j/dz_k = q_j (δ_jk − q_k):
    //   dD/dz_k = [k∈S] q_k (r_k + 1) − q_k (D + Q_S),   Q_S = Σ_{j∈S} q_j
    // (= q_k (r_k − D) when nothing is masked). Needs D and Q_S first: a second sweep.
    Vec acc = vzero, accq = vzero;
    sweep([&](int64_t, int, Vec s, Vec t) {
      const Vec lq = Vt::fmadd(s, vinvT, va_s), lp = Vt::fmadd(t, vinvT, va_t);
      const Vec q = Vt::exp(lq);
      const Msk dead = Vt::eq(t, vninf);
      acc = Vt::add(acc, Vt::select(dead, vzero, Vt::mul(q, Vt::sub(lq, lp))));
      accq = Vt::add(accq, Vt::select(dead, vzero, q));
    });
    D = Vt::hsum(acc);
    if (want_grad) {
      const Vec vk = Vt::set1(D + Vt::hsum(accq)), vone = Vt::set1(1.0f);
      sweep([&](int64_t i, int n, Vec s, Vec t) {
        const Vec lq = Vt::fmadd(s, vinvT, va_s), lp = Vt::fmadd(t, vinvT, va_t);
        const Vec q = Vt::exp(lq);
        const Vec live = Vt::select(Vt::eq(t, vninf), vzero,
                                    Vt::mul(q, Vt::add(Vt::sub(lq, lp), vone)));
        emit(i, n, s, q, Vt::sub(live, Vt::mul(q, vk)));
      });
    }
  } else if (soft) {
    // JSD. With a_j = β p_j, b_j = (1 − β) q_j, m_j = a_j + b_j:
    //   D = β Σ_{j∈S} p_j (log p_j − log m_j) + (1 − β) Σ_j q_j (log q_j − log m_j)
    // Expanding, D = β Σ p log p + (1 − β) Σ q log q − Σ m log m, so treating q as free,
    //   ∂D/∂q_j = (1 − β)(log q_j + 1) − (1 − β)(log m_j + 1) = (1 − β)(log q_j − log m_j)
    // and through the softmax (dq_j/dz_k = q_j (δ_jk − q_k)):
    //   dD/dz_k = (1 − β) q_k ((log q_k − log m_k) − K),   K = Σ_j q_j (log q_j − log m_j).
    // log m is computed in the log domain, log m = hi + log(1 + exp(lo − hi)) with
    // {hi, lo} = {max, min}(log β + log p, log(1 − β) + log q), so it never takes log of an
    // underflowed m. A term whose weight (a_j, b_j or q_j) is 0 is left out, never 0 · inf.
    const float beta = P.beta;
    const Vec vlb = Vt::set1(beta > 0.0f ? std::log(beta) : -kInf);
    const Vec vl1b = Vt::set1(beta < 1.0f ? std::log1p(-beta) : -kInf);
    const Vec vone = Vt::set1(1.0f);
    auto log_m = [&](Vec lp, Vec lq) {
      const Vec la = Vt::add(lp, vlb), lb = Vt::add(lq, vl1b);
      const Vec hi = Vt::max(la, lb), lo = Vt::min(la, lb);
      const Vec lm = Vt::add(hi, Vt::log(Vt::add(vone, Vt::exp(Vt::sub(lo, hi)))));
      return Vt::select(Vt::eq(hi, vninf), vninf, lm);  // m = 0: every term is left out
    };
    // The gradient pass needs q_j and r_j = log q_j − log m_j, which the loss pass already
    // forms: the loss pass keeps them in a per-thread row scratch (2 × V floats, cache-resident
    // beside the row at vocabulary sizes), so the gradient pass does no exp or log of its own.
    // β = 0 (D = 0 identically, the log-domain log m equals log q exactly) keeps q and r in a
    // scratch of its own; 0 < β < 1 writes them over pass 1's exponentials.
    thread_local std::vector<float> keep0;
    const bool keep_qr = want_grad && beta != 1.0f;
    if (keep_qr && !jsd_mid && keep0.size() < static_cast<size_t>(2 * kn)) keep0.resize(2 * kn);
    float* const kq = !keep_qr ? nullptr : jsd_mid ? es : keep0.data();
    float* const kr = !keep_qr ? nullptr : jsd_mid ? et : kq + kn;
    Vec accp = vzero, accq = vzero;
    auto accumulate = [&](Vec lp, Vec lq, Vec p, Vec q, Vec lm) {
      const Vec r = Vt::sub(lq, lm);
      accp = Vt::add(accp, Vt::select(Vt::gt(p, vzero), Vt::mul(p, Vt::sub(lp, lm)), vzero));
      accq = Vt::add(accq, Vt::select(Vt::gt(q, vzero), Vt::mul(q, r), vzero));
      return r;
    };
    if (jsd_mid) {
      // q = e_s · exp((n_s − max s) / T) / Z_q (likewise p): the factor changes once per block.
      // m = β p + (1 − β) q is formed directly and log m taken of it when every lane is a
      // normal number; a vector holding an m below FLT_MIN (underflowed q and p, or the
      // padding) takes the log-domain form instead, as β = 0 and β = 1 always do.
      const Vec viZq = Vt::set1(1.0f / Zq), viZp = Vt::set1(1.0f / Zp);
      const Vec vb = Vt::set1(beta), v1b = Vt::set1(1.0f - beta), vmin = Vt::set1(FLT_MIN);
      int64_t cur = -1;
      Vec fq = vzero, fp = vzero;
      sweep([&](int64_t i, int, Vec s, Vec t) {
        const int64_t b = i < Vblock ? i / (W * U) : Vblock / (W * U) + (i - Vblock) / W;
        if (b != cur) {
          cur = b;
          const Vec bs = Vt::template load<DType::F32>(bms, b * W);
          const Vec bt = Vt::template load<DType::F32>(bmt, b * W);
          fq = Vt::mul(Vt::exp(Vt::mul(Vt::sub(bs, vMs), vinvT)), viZq);
          fp = Vt::mul(Vt::exp(Vt::mul(Vt::sub(bt, vMt), vinvT)), viZp);
        }
        const Vec lq = Vt::fmadd(s, vinvT, va_s), lp = Vt::fmadd(t, vinvT, va_t);
        const Vec q = Vt::mul(Vt::template load<DType::F32>(es, i), fq);
        const Vec p = Vt::mul(Vt::template load<DType::F32>(et, i), fp);
        const Vec m = Vt::fmadd(vb, p, Vt::mul(v1b, q));
        const bool tiny = Vt::hsum(Vt::select(Vt::gt(vmin, m), vone, vzero)) > 0.0f;
        const Vec r = accumulate(lp, lq, p, q, tiny ? log_m(lp, lq) : Vt::log(m));
        if (keep_qr) {
          Vt::template store<DType::F32>(kq, i, q);
          Vt::template store<DType::F32>(kr, i, r);
        }
      });
    } else {
      sweep([&](int64_t i, int, Vec s, Vec t) {
        const Vec lq = Vt::fmadd(s, vinvT, va_s), lp = Vt::fmadd(t, vinvT, va_t);
        const Vec q = Vt::exp(lq), p = Vt::exp(lp);
        const Vec r = accumulate(lp, lq, p, q, log_m(lp, lq));
        if (keep_qr) {
          Vt::template store<DType::F32>(kq, i, q);
          Vt::template store<DType::F32>(kr, i, r);
        }
      });
    }
    const float Kp = Vt::hsum(accp), K = Vt::hsum(accq);
    D = (beta != 0.0f ? beta * Kp : 0.0f) + (beta != 1.0f ? (1.0f - beta) * K : 0.0f);
    if (want_grad && beta == 1.0f) {  // D = KL(p || p) does not depend on z; K may be inf
      sweep([&](int64_t i, int n, Vec s, Vec) {
        emit(i, n, s, Vt::exp(Vt::fmadd(s, vinvT, va_s)), vzero);
      });
    } else if (want_grad) {
      const Vec vK = Vt::set1(K), v1b = Vt::set1(1.0f - beta);
      sweep([&](int64_t i, int n, Vec s, Vec) {
        const Vec q = Vt::template load<DType::F32>(kq, i);
        const Vec r = Vt::template load<DType::F32>(kr, i);
        const Vec gz =
            Vt::select(Vt::gt(q, vzero), Vt::mul(v1b, Vt::mul(q, Vt::sub(r, vK))), vzero);
        emit(i, n, s, q, gz);
      });
    }
  } else if (want_grad) {
    // alpha == 0: only the hard term; q is needed only when T == 1 (then q = softmax(s)).
    sweep([&](int64_t i, int n, Vec s, Vec) {
      const Vec q = same_t ? Vt::exp(Vt::fmadd(s, vinvT, va_s)) : vzero;
      emit(i, n, s, q, vzero);
    });
  }

  float loss = soft ? P.alpha * T * T * D : 0.0f;
  if (hard) loss += (1.0f - P.alpha) * (c_s - s_label);  // CE = log Σ exp(s) − s_label
  return loss;
}

// Dispatch on (student, teacher, grad) storage dtypes; grad is F32 or the student's dtype.
template <class Vt>
static float row_dispatch(const void* s, DType sdt, const void* t, DType tdt, int64_t V,
                          int64_t label, const Params& P, void* g, DType gdt, float gscale) {
#define QT_ROW(SD, TD, GD)                                                   \
  if (sdt == DType::SD && tdt == DType::TD && gdt == DType::GD)              \
    return row_t<Vt, DType::SD, DType::TD, DType::GD>(s, t, V, label, P, g, gscale);
#define QT_ROW_T(SD, TD) QT_ROW(SD, TD, F32) QT_ROW(SD, TD, SD)
#define QT_ROW_S(SD) QT_ROW_T(SD, F32) QT_ROW_T(SD, BF16) QT_ROW_T(SD, F16)
  QT_ROW_S(F32)
  QT_ROW_S(BF16)
  QT_ROW_S(F16)
#undef QT_ROW_S
#undef QT_ROW_T
#undef QT_ROW
  return std::numeric_limits<float>::quiet_NaN();  // unreachable for valid dtypes
}

}  // namespace qtorch::cpu::distillation
