// Distillation row kernels (every ISA this CPU runs) against a plain double-precision loop,
// over odd vocab sizes (tails of every length), temperatures, alphas, divergences, masked
// (-inf) teacher entries, non-finite logits and fp32/bf16/fp16 storage, and the gradient written
// in place over the student logits (how the fused-linear chunk loop calls them). Built by
// .ci/cpp_tests.sh with the kernel sources under -fsanitize=address,undefined.
// Returns non-zero on any mismatch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "kernels/distillation.h"

using namespace qtorch::cpu::distillation;
using qtorch::cpu::DType;
using qtorch::cpu::bf16_to_f32;
using qtorch::cpu::dtype_size;
using qtorch::cpu::f16_to_f32;
using qtorch::cpu::f32_to_bf16;
using qtorch::cpu::f32_to_f16;

namespace {

const double kInf = std::numeric_limits<double>::infinity();

// The definition (API.md / qtorch.reference), in double: loss and d loss / d s of one row.
// Teacher -inf entries are masked (every term of that entry is 0).
double ref_row(const std::vector<double>& s, const std::vector<double>& t, int64_t label,
               const Params& P, std::vector<double>& grad) {
  const int64_t V = static_cast<int64_t>(s.size());
  const double T = P.temperature, a = P.alpha, b = P.beta;
  double ms = -kInf, mt = -kInf;
  for (int64_t j = 0; j < V; ++j) ms = std::max(ms, s[j]), mt = std::max(mt, t[j]);
  double zq = 0, zp = 0, zs = 0;
  for (int64_t j = 0; j < V; ++j) {
    zq += std::exp((s[j] - ms) / T);
    zp += std::exp((t[j] - mt) / T);
    zs += std::exp(s[j] - ms);
  }
  std::vector<double> lq(V), lp(V), q(V), p(V), lm(V, 0.0);
  for (int64_t j = 0; j < V; ++j) {
    lq[j] = (s[j] - ms) / T - std::log(zq);
    lp[j] = (t[j] - mt) / T - std::log(zp);
    q[j] = std::exp(lq[j]);
    p[j] = std::exp(lp[j]);
  }
  std::vector<double> gz(V, 0.0);  // dD/dz
  double D = 0;
  if (P.divergence == Divergence::KL) {
    for (int64_t j = 0; j < V; ++j) {
      if (t[j] != -kInf) D += p[j] * (lp[j] - lq[j]);
      gz[j] = q[j] - p[j];
    }
  } else if (P.divergence == Divergence::ReverseKL) {
    double qs = 0;
    for (int64_t j = 0; j < V; ++j)
      if (t[j] != -kInf) D += q[j] * (lq[j] - lp[j]), qs += q[j];
    for (int64_t j = 0; j < V; ++j)
      gz[j] = (t[j] != -kInf ? q[j] * (lq[j] - lp[j] + 1) : 0.0) - q[j] * (D + qs);
  } else {
    // Numerical check of the JSD gradient is in the finite-difference test below; here the
    // closed form is evaluated in double.
    double K = 0, Kp = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double m = b * p[j] + (1 - b) * q[j];
      lm[j] = std::log(m);
      if (p[j] > 0) Kp += p[j] * (lp[j] - lm[j]);
      if (q[j] > 0) K += q[j] * (lq[j] - lm[j]);
    }
    D = (b != 0 ? b * Kp : 0) + (b != 1 ? (1 - b) * K : 0);
    if (b != 1)
      for (int64_t j = 0; j < V; ++j) gz[j] = (1 - b) * q[j] * ((lq[j] - lm[j]) - K);
  }
  double loss = a * T * T * D;
  const bool hard = label >= 0 && a != 1.0;
  if (hard) loss += (1 - a) * (ms + std::log(zs) - s[label]);
  grad.assign(V, 0.0);
  for (int64_t j = 0; j < V; ++j) {
    grad[j] = a * T * gz[j];
    if (hard) grad[j] += (1 - a) * (std::exp(s[j] - ms) / zs - (j == label ? 1.0 : 0.0));
  }
  return loss;
}

// Store / reload values in a dtype; the reference runs on the reloaded (rounded) values.
std::vector<uint8_t> encode(const std::vector<double>& x, DType d) {
  std::vector<uint8_t> out(x.size() * static_cast<size_t>(dtype_size(d)));
  for (size_t j = 0; j < x.size(); ++j) {
    const float f = static_cast<float>(x[j]);
    if (d == DType::F32) std::memcpy(out.data() + 4 * j, &f, 4);
    else {
      const uint16_t h = d == DType::BF16 ? f32_to_bf16(f) : f32_to_f16(f);
      std::memcpy(out.data() + 2 * j, &h, 2);
    }
  }
  return out;
}
double decode1(const uint8_t* p, DType d, size_t j) {
  if (d == DType::F32) {
    float f;
    std::memcpy(&f, p + 4 * j, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p + 2 * j, 2);
  return d == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

int failures = 0;
void fail(const std::string& what) {
  if (++failures <= 20) std::fprintf(stderr, "FAIL %s\n", what.c_str());
}

const char* dname(DType d) { return d == DType::F32 ? "f32" : d == DType::BF16 ? "bf16" : "f16"; }
const char* vname(Divergence d) {
  return d == Divergence::KL ? "kl" : d == Divergence::ReverseKL ? "rkl" : "jsd";
}

void check_case(const char* isa, RowFn fn, int64_t V, DType sdt, DType gdt, const Params& P,
                int64_t label, bool mask_teacher, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 2.0);
  std::vector<double> s(V), t(V);
  for (int64_t j = 0; j < V; ++j) s[j] = nd(rng), t[j] = nd(rng);
  if (mask_teacher)
    for (int64_t j = 0; j < V; j += 3) t[j] = -kInf;
  const auto sb = encode(s, sdt), tb = encode(t, sdt);
  for (int64_t j = 0; j < V; ++j) s[j] = decode1(sb.data(), sdt, j), t[j] = decode1(tb.data(), sdt, j);
  std::vector<double> gref;
  const double lref = ref_row(s, t, label, P, gref);
  // Guard bytes around the gradient row catch any out-of-bounds write.
  const size_t gsz = static_cast<size_t>(V * dtype_size(gdt));
  std::vector<uint8_t> gbuf(gsz + 128, 0xAB);
  const float l = fn(sb.data(), sdt, tb.data(), sdt, V, label, P, gbuf.data() + 64, gdt, 0.5f);
  for (size_t k = 0; k < 64; ++k)
    if (gbuf[k] != 0xAB || gbuf[gsz + 64 + k] != 0xAB) {
      fail(std::string(isa) + " wrote outside the gradient row");
      break;
    }
  char tag[200];
  std::snprintf(tag, sizeof tag, "%s V=%lld %s->%s %s T=%g a=%g b=%g label=%lld mask=%d", isa,
                static_cast<long long>(V), dname(sdt), dname(gdt), vname(P.divergence),
                P.temperature, P.alpha, P.beta, static_cast<long long>(label), mask_teacher);
  // fp32 math over V terms: relative 1e-5 of the loss scale, plus absolute 2e-5; gradients
  // within the storage dtype's rounding plus 3e-5 of the row's largest |gradient| (fp32 log q
  // carries ~|s/T| ulps, and the reverse-KL gradient q (r + 1 - D - Q) cancels).
  const double ltol = 2e-5 + 1e-5 * std::fabs(lref) + 2e-7 * std::sqrt(static_cast<double>(V));
  if (!(std::fabs(l - lref) <= ltol)) {
    fail(std::string(tag) + " loss " + std::to_string(l) + " vs " + std::to_string(lref));
    return;
  }
  const double gtol_rel = gdt == DType::F32 ? 1e-5 : gdt == DType::BF16 ? 8e-3 : 1e-3;
  double gmax = 0;
  for (double g : gref) gmax = std::max(gmax, std::fabs(0.5 * g));
  for (int64_t j = 0; j < V; ++j) {
    const double g = decode1(gbuf.data() + 64, gdt, j), r = 0.5 * gref[j];
    if (!(std::fabs(g - r) <= gtol_rel * std::fabs(r) + 3e-5 * gmax + 1e-7)) {
      fail(std::string(tag) + " grad[" + std::to_string(j) + "] " + std::to_string(g) + " vs " +
           std::to_string(r));
      return;
    }
  }
}

// A NaN/inf student or NaN/+inf teacher anywhere (including the tail) gives a NaN loss and NaN
// gradient; a teacher -inf does not.
void check_nonfinite(const char* isa, RowFn fn, int64_t V) {
  const double bads[] = {std::numeric_limits<double>::quiet_NaN(), kInf, -kInf};
  for (int64_t pos : {int64_t(0), V / 2, V - 1}) {
    for (int who = 0; who < 2; ++who) {
      for (double bad : bads) {
        std::vector<double> s(V, 0.25), t(V, -0.5);
        for (int64_t j = 0; j < V; ++j) s[j] += 0.01 * j, t[j] += 0.02 * (j % 7);
        (who == 0 ? s : t)[pos] = bad;
        const auto sb = encode(s, DType::F32), tb = encode(t, DType::F32);
        std::vector<float> g(V);
        Params P;
        P.alpha = 0.5f;
        const float l = fn(sb.data(), DType::F32, tb.data(), DType::F32, V, (pos + 1) % V, P,
                           g.data(), DType::F32, 1.0f);
        // (V = 1: the only teacher entry masked leaves p undefined, NaN like the reference)
        const bool masked = who == 1 && bad == -kInf && V > 1;
        char tag[160];
        std::snprintf(tag, sizeof tag, "%s nonfinite V=%lld pos=%lld %s=%g", isa,
                      static_cast<long long>(V), static_cast<long long>(pos),
                      who == 0 ? "student" : "teacher", bad);
        if (masked != std::isfinite(l)) fail(std::string(tag) + " loss " + std::to_string(l));
        if (!masked && !std::isnan(g[V / 3])) fail(std::string(tag) + " grad not NaN");
      }
    }
  }
}

// Finite differences of the kernel's own loss (double-checks the closed-form gradients,
// including the JSD and masked reverse-KL ones, independently of ref_row's derivation).
void check_fd(const char* isa, RowFn fn, Divergence div) {
  const int64_t V = 37;
  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> s(V), t(V);
  for (int64_t j = 0; j < V; ++j) s[j] = nd(rng), t[j] = nd(rng);
  t[5] = t[20] = -kInf;
  Params P;
  P.temperature = 1.7f;
  P.alpha = 0.6f;
  P.divergence = div;
  P.beta = 0.3f;
  std::vector<double> gref;
  ref_row(s, t, 11, P, gref);
  for (int64_t j : {int64_t(0), int64_t(5), int64_t(11), int64_t(36)}) {
    auto sp = s, sm = s;
    const double h = 1e-3;
    sp[j] += h, sm[j] -= h;
    std::vector<double> dummy;
    const double fd = (ref_row(sp, t, 11, P, dummy) - ref_row(sm, t, 11, P, dummy)) / (2 * h);
    if (std::fabs(fd - gref[j]) > 1e-6)
      fail(std::string(isa) + " finite difference " + vname(div) + " j=" + std::to_string(j) +
           " fd=" + std::to_string(fd) + " closed=" + std::to_string(gref[j]));
  }
  (void)fn;
}

// rows(): ignored rows give loss 0 and zero gradient even when they hold NaN; token_scale.
void check_rows(const char* isa, RowFn fn) {
  const int64_t M = 5, V = 19;
  std::vector<float> s(M * V), t(M * V), g(M * V, 7.0f), loss(M, 7.0f);
  for (int64_t k = 0; k < M * V; ++k) s[k] = 0.1f * (k % 11), t[k] = -0.07f * (k % 13);
  s[1 * V + 3] = std::numeric_limits<float>::quiet_NaN();  // row 1 is ignored
  const int64_t labels[M] = {2, -100, 0, 18, -100};
  const float scale[M] = {1.0f, 1.0f, 2.0f, 0.5f, 1.0f};
  Params P;
  rows(fn, s.data(), DType::F32, V, t.data(), DType::F32, V, labels, -100, V, 0, M, P,
       loss.data(), g.data(), DType::F32, V, scale);
  for (int64_t r : {int64_t(1), int64_t(4)}) {
    if (loss[r] != 0.0f) fail(std::string(isa) + " ignored row loss not 0");
    for (int64_t j = 0; j < V; ++j)
      if (g[r * V + j] != 0.0f) fail(std::string(isa) + " ignored row grad not 0");
  }
  for (int64_t r : {int64_t(0), int64_t(2), int64_t(3)}) {
    std::vector<double> sd(s.begin() + r * V, s.begin() + (r + 1) * V);
    std::vector<double> td(t.begin() + r * V, t.begin() + (r + 1) * V);
    std::vector<double> gr;
    const double l = ref_row(sd, td, labels[r], P, gr);
    if (std::fabs(loss[r] - l) > 1e-5) fail(std::string(isa) + " rows() loss");
    for (int64_t j = 0; j < V; ++j)
      if (std::fabs(g[r * V + j] - scale[r] * gr[j]) > 1e-6) {
        fail(std::string(isa) + " rows() token_scale grad");
        break;
      }
  }
}

// rows() with the gradient written over the student logits (grad == student, as the
// fused-linear chunk loop calls it) gives bitwise the same loss and gradient as into a separate
// buffer: every sweep reads element j of a row before it writes element j.
void check_in_place(const char* isa, RowFn fn) {
  const int64_t M = 4;
  const int64_t labels[M] = {3, -100, 0, 36};
  const float scale[M] = {0.5f, 1.0f, 2.0f, 0.25f};
  std::mt19937 rng(99);
  std::normal_distribution<double> nd(0.0, 2.0);
  for (int64_t V : {int64_t(37), int64_t(1000)}) {
    for (Divergence div : {Divergence::KL, Divergence::ReverseKL, Divergence::JSD}) {
      for (DType sdt : {DType::F32, DType::BF16, DType::F16}) {
        std::vector<double> s(M * V), t(M * V);
        for (int64_t k = 0; k < M * V; ++k) s[k] = nd(rng), t[k] = nd(rng);
        for (int64_t k = 0; k < M * V; k += 5) t[k] = -kInf;
        const auto sb = encode(s, sdt), tb = encode(t, sdt);
        std::vector<uint8_t> g(sb.size()), inplace = sb;
        std::vector<float> loss(M), loss_ip(M);
        Params P;
        P.temperature = 1.5f;
        P.alpha = 0.6f;
        P.divergence = div;
        P.beta = 0.3f;
        rows(fn, sb.data(), sdt, V, tb.data(), sdt, V, labels, -100, V, 0, M, P, loss.data(),
             g.data(), sdt, V, scale);
        rows(fn, inplace.data(), sdt, V, tb.data(), sdt, V, labels, -100, V, 0, M, P,
             loss_ip.data(), inplace.data(), sdt, V, scale);
        char tag[120];
        std::snprintf(tag, sizeof tag, "%s in place V=%lld %s %s", isa,
                      static_cast<long long>(V), dname(sdt), vname(div));
        if (std::memcmp(loss.data(), loss_ip.data(), sizeof(float) * M) != 0)
          fail(std::string(tag) + " loss differs");
        if (g != inplace) fail(std::string(tag) + " gradient differs");
      }
    }
  }
}

}  // namespace

int main() {
  namespace qc = qtorch::cpu;
  const qc::Isa hw = qc::hardware_isa(qc::Family::Distillation);
  struct Isa { const char* name; RowFn fn; bool ok; };
  const Isa isas[] = {
      {"scalar", row_scalar, true},
      {"avx2", row_avx2, hw >= qc::Isa::Avx2},
      {"avx512", row_avx512, hw >= qc::Isa::Avx512},
  };
  // With QTORCH_CPU_ISA set (.ci/cpp_tests.sh runs once per ISA) only the ISA in force is
  // tested; without it, every ISA the CPU supports.
  const bool forced = std::getenv("QTORCH_CPU_ISA") != nullptr;
  const int in_force = static_cast<int>(qc::isa(qc::Family::Distillation));
  std::mt19937 rng(1234);
  int cases = 0;
  for (int k = 0; k < 3; ++k) {
    const Isa& isa = isas[k];
    if (!isa.ok || (forced && k != in_force)) {
      std::printf("%s: %s, skipped\n", isa.name,
                  isa.ok ? "not the forced ISA" : "not supported by this CPU");
      continue;
    }
    for (int64_t V : {1, 2, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 257, 1000}) {
      for (Divergence div : {Divergence::KL, Divergence::ReverseKL, Divergence::JSD}) {
        for (float T : {1.0f, 2.5f, 0.7f}) {
          for (float alpha : {0.0f, 0.5f, 1.0f}) {
            for (DType sdt : {DType::F32, DType::BF16, DType::F16}) {
              for (bool to_f32 : {false, true}) {
                if (sdt == DType::F32 && to_f32) continue;
                Params P;
                P.temperature = T;
                P.alpha = alpha;
                P.divergence = div;
                P.beta = div == Divergence::JSD ? (V % 3 == 0 ? 0.0f : V % 3 == 1 ? 0.3f : 1.0f)
                                                : 0.5f;
                const int64_t label = (V * 7 + 3) % V;
                const bool mask = V > 2 && (V % 2 == 1);
                check_case(isa.name, isa.fn, V, sdt, to_f32 ? DType::F32 : sdt, P,
                           alpha == 1.0f ? -1 : label, mask, rng);
                ++cases;
              }
            }
          }
        }
      }
      check_nonfinite(isa.name, isa.fn, V);
    }
    for (Divergence div : {Divergence::KL, Divergence::ReverseKL, Divergence::JSD})
      check_fd(isa.name, isa.fn, div);
    check_rows(isa.name, isa.fn);
    check_in_place(isa.name, isa.fn);
  }
  std::printf("test_distillation: %d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
