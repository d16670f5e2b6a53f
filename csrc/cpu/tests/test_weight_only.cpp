// Weight-only matmul kernels (every ISA this CPU runs) against a plain double-precision loop
// over the canonical storage, over odd shapes: M in 1..17 (tile tails), N not a multiple of
// the 16-channel block, K a few groups (int4) or odd (int8), every group size, symmetric and
// asymmetric zeros, fp32 and bf16 activations, with and without bias, and block ranges split
// as threads split them. Buffers are exact-sized and the output carries NaN guard columns, so
// under -fsanitize=address,undefined (.ci/cpp_tests.sh) any out-of-bounds access is caught.
// The int8 packing and slab dequantization of every ISA are compared byte for byte (bit for
// bit) with the layout's formula and float(q) * s. Returns non-zero on any mismatch.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "kernels/weight_only.h"

using namespace qtorch::cpu::weight_only;
using qtorch::cpu::DType;
namespace qc = qtorch::cpu;

namespace {

std::mt19937 rng(1234);
int failures = 0, checks = 0;

uint16_t f32_to_bf16(float f) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}
float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Act2 {  // activations in both storage forms; `val` is what the kernel sees, widened
  std::vector<float> f32, val;
  std::vector<uint16_t> bf16;
};

Act2 make_x(int64_t M, int64_t ldx, int64_t K, DType act) {
  std::normal_distribution<float> nd(0.f, 1.f);
  Act2 a;
  a.val.assign(M * ldx, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      float v = nd(rng);
      if (act == DType::BF16) v = bf16_to_f32(f32_to_bf16(v));
      a.val[m * ldx + k] = v;
    }
  a.f32 = a.val;
  a.bf16.resize(M * ldx);
  for (size_t i = 0; i < a.val.size(); ++i) a.bf16[i] = f32_to_bf16(a.val[i]);
  return a;
}

using Int4Fn = void (*)(const Int4Weights&, const Problem&);
using Int8Fn = void (*)(const Int8Weights&, const Problem&);
using PackFn = void (*)(const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t, int8_t*,
                        float*);
using SlabFn = void (*)(const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                        int64_t);

struct Isa {
  const char* name;
  Int4Fn int4;
  Int8Fn int8;
  bool bf16;  // takes bf16 activations natively
  PackFn pack8;
  SlabFn slab8;
};

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// The packed int8 layout of weight_only.h, from its formula (independent of the kernels).
void int8_layout_reference(const std::vector<int8_t>& wq, const std::vector<float>& scales,
                           int64_t N, int64_t K, std::vector<int8_t>& w, std::vector<float>& s) {
  const int64_t Kh = int8_padded_k(K) / 2;
  w.assign(size_t(int8_packed_bytes(N, K)), 0);
  s.assign(size_t(num_blocks(N) * kBlock), 0.f);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k)
      w[size_t((n / kBlock) * Kh * 32 + (k / 2) * 32 + 2 * (n % kBlock) + k % 2)] = wq[size_t(n * K + k)];
    s[size_t(n)] = scales[size_t(n)];
  }
}

// An ISA's int8 packing (block ranges split as threads split them, over buffers full of
// garbage: every byte must be written) against the layout's formula, byte for byte; and its
// slab dequantizer against float(q) * s bit for bit (NaN, infinite, signed zero, subnormal
// and overflowing scales included), over slab bounds at both ends and at odd positions, with
// pad columns (ldd > N) that must stay untouched.
void run_int8_layout(const Isa& isa, int64_t N, int64_t K, int splits) {
  std::uniform_int_distribution<int> qd(-128, 127);
  std::uniform_real_distribution<float> sd(-0.05f, 0.05f);
  std::vector<int8_t> wq(size_t(N * K));
  std::vector<float> scales(static_cast<size_t>(N));
  for (auto& q : wq) q = int8_t(qd(rng));
  if (N > 1)
    for (int64_t k = 0; k < K; ++k) wq[size_t(K + k)] = -128;
  const float special[] = {0.f, -0.f, NAN, INFINITY, -INFINITY, 1e-40f, -3e38f, 1.f};
  for (int64_t n = 0; n < N; ++n) scales[size_t(n)] = n % 5 == 3 ? special[(n / 5) % 8] : sd(rng);
  std::vector<int8_t> rw;
  std::vector<float> rs;
  int8_layout_reference(wq, scales, N, K, rw, rs);

  char cfg[128];
  std::snprintf(cfg, sizeof cfg, "[%s N=%lld K=%lld splits=%d]", isa.name, (long long)N,
                (long long)K, splits);
  ++checks;
  const int64_t Nb = num_blocks(N), G = 64;  // guard bytes / floats either side
  std::vector<int8_t> pw(rw.size() + 2 * G, int8_t(0x5b));
  std::vector<float> ps(rs.size() + 2 * G, -5.f);
  for (size_t i = 0; i < rw.size(); ++i) pw[G + i] = int8_t(0xcd);
  for (int sp = 0; sp < splits; ++sp)
    isa.pack8(wq.data(), scales.data(), N, K, Nb * sp / splits, Nb * (sp + 1) / splits,
              pw.data() + G, ps.data() + G);
  bool ok = std::memcmp(pw.data() + G, rw.data(), rw.size()) == 0;
  for (size_t i = 0; i < rs.size() && ok; ++i) ok = bits_of(ps[G + i]) == bits_of(rs[i]);
  for (int64_t i = 0; i < G && ok; ++i)
    ok = pw[size_t(i)] == 0x5b && pw[size_t(G) + rw.size() + size_t(i)] == 0x5b &&
         ps[size_t(i)] == -5.f && ps[size_t(G) + rs.size() + size_t(i)] == -5.f;
  if (!ok) {
    ++failures;
    std::printf("FAIL pack_int8 %s\n", cfg);
  }
  std::vector<int8_t> bq(size_t(N * K));
  std::vector<float> bs(static_cast<size_t>(N));
  unpack_int8(rw.data(), rs.data(), N, K, bq.data(), bs.data());
  if (bq != wq) {
    ++failures;
    std::printf("FAIL unpack_int8 %s\n", cfg);
  }

  std::vector<std::pair<int64_t, int64_t>> slabs = {{0, K}, {0, 1}, {K - 1, K}};
  if (K > 2) slabs.push_back({1, K - 1});
  if (K > 6) slabs.insert(slabs.end(), {{1, 2}, {3, 4}, {3, 6}, {2, 5}, {4, K}});
  if (K > 70) slabs.insert(slabs.end(), {{13, 77}, {64, K}, {K - 67, K - 3}});
  const int64_t ldd = N + 3;
  for (auto [k0, k1] : slabs) {
    ++checks;
    const size_t n_out = size_t((k1 - k0 - 1) * ldd + N);
    std::vector<float> d(n_out + 2 * G, -7.f);
    isa.slab8(rw.data(), rs.data(), N, K, k0, k1, d.data() + G, ldd);
    bool good = true;
    for (int64_t i = 0; i < G && good; ++i) good = d[size_t(i)] == -7.f && d[G + n_out + size_t(i)] == -7.f;
    for (int64_t k = k0; k < k1 && good; ++k)
      for (int64_t n = 0; n < ldd && size_t((k - k0) * ldd + n) < n_out; ++n) {
        const float want = n < N ? float(wq[size_t(n * K + k)]) * scales[size_t(n)] : -7.f;
        if (bits_of(d[G + size_t((k - k0) * ldd + n)]) != bits_of(want)) {
          good = false;
          break;
        }
      }
    if (!good) {
      ++failures;
      std::printf("FAIL dequant_int8_slab_t %s k0=%lld k1=%lld\n", cfg, (long long)k0,
                  (long long)k1);
    }
  }
}

// |y - ref| <= tol: fp32 accumulation error bound depth * 2^-24 * (sum of |terms|), x2.
bool close(double y, double ref, double mag, int64_t depth) {
  const double tol = 2.0 * double(depth + 8) * 5.97e-8 * mag + 1e-30;
  return std::fabs(y - ref) <= tol;
}

void check_output(const char* what, const std::string& cfg, const std::vector<float>& y,
                  const std::vector<double>& ref, const std::vector<double>& mag, int64_t M,
                  int64_t N, int64_t ldy, int64_t depth) {
  ++checks;
  int bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldy; ++n) {
      const float v = y[m * ldy + n];
      if (n >= N) {
        if (!std::isnan(v)) {
          if (bad++ < 3) std::printf("  %s %s: guard column (%lld,%lld) overwritten\n", what,
                                     cfg.c_str(), (long long)m, (long long)n);
        }
        continue;
      }
      if (!close(v, ref[m * N + n], mag[m * N + n], depth)) {
        if (bad++ < 3)
          std::printf("  %s %s: y(%lld,%lld) = %.9g, ref %.9g (mag %.3g)\n", what, cfg.c_str(),
                      (long long)m, (long long)n, v, ref[m * N + n], mag[m * N + n]);
      }
    }
  }
  if (bad) {
    ++failures;
    std::printf("FAIL %s %s: %d bad values\n", what, cfg.c_str(), bad);
  }
}

void run_int4(const Isa& isa, DType act, int64_t M, int64_t N, int64_t K, int64_t gs, bool sym,
              bool with_bias, int splits) {
  const int64_t G = K / gs;
  std::uniform_int_distribution<int> byte(0, 255), nib(0, 15);
  std::uniform_real_distribution<float> sd(-0.2f, 0.2f);
  std::vector<uint8_t> qw(N * K / 2), zeros(N * G);
  std::vector<float> scales(N * G), bias(N);
  for (auto& b : qw) b = uint8_t(byte(rng));
  for (auto& z : zeros) z = uint8_t(sym ? 8 : nib(rng));
  for (auto& s : scales) s = sd(rng);
  for (auto& b : bias) b = sd(rng) * 10;
  std::vector<uint8_t> pw(int4_packed_bytes(N, K));
  std::vector<float> ps(int4_meta_floats(N, K, gs));
  std::vector<uint8_t> pz(ps.size());
  pack_int4(qw.data(), scales.data(), zeros.data(), N, K, gs, pw.data(), ps.data(), pz.data());

  const Act2 x = make_x(M, K, K, act);
  std::vector<float> xsum(M * G);
  group_sums(act == DType::F32 ? (const void*)x.f32.data() : (const void*)x.bf16.data(), act, M, K,
             K, gs, xsum.data());

  std::vector<double> ref(M * N), mag(M * N);
  const double offset = act == DType::BF16 ? 128.0 : 0.0;  // the bf16 path carries 128 + q
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = with_bias ? bias[n] : 0.0, mg = std::fabs(acc);
      for (int64_t k = 0; k < K; ++k) {
        const int q = (qw[n * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF;
        const int z = zeros[n * G + k / gs];
        const double s = scales[n * G + k / gs], xv = x.val[m * K + k];
        acc += xv * (q - z) * s;
        mg += std::fabs(xv) * (q + z + 2 * offset) * std::fabs(s);
      }
      ref[m * N + n] = acc, mag[m * N + n] = mg;
    }

  const int64_t ldy = N + 3;
  std::vector<float> y(M * ldy, NAN);
  Int4Weights w;
  w.w = pw.data(), w.scale = ps.data(), w.zero = pz.data(), w.N = N, w.K = K, w.gs = gs;
  const int64_t Nb = num_blocks(N);
  for (int s = 0; s < splits; ++s) {
    Problem p;
    p.x = act == DType::F32 ? (const void*)x.f32.data() : (const void*)x.bf16.data();
    p.act = act, p.M = M, p.ldx = K, p.xsum = xsum.data();
    p.col_bias = with_bias ? bias.data() : nullptr;
    p.y = y.data(), p.ldy = ldy;
    p.nb0 = Nb * s / splits, p.nb1 = Nb * (s + 1) / splits;
    if (p.nb0 < p.nb1) isa.int4(w, p);
  }
  char cfg[160];
  std::snprintf(cfg, sizeof cfg, "[%s %s M=%lld N=%lld K=%lld gs=%lld %s bias=%d splits=%d]",
                isa.name, act == DType::F32 ? "f32" : "bf16", (long long)M, (long long)N,
                (long long)K, (long long)gs, sym ? "sym" : "asym", int(with_bias), splits);
  check_output("int4", cfg, y, ref, mag, M, N, ldy, gs + G);
}

void run_int8(const Isa& isa, DType act, int64_t M, int64_t N, int64_t K, bool with_bias,
              int splits) {
  std::uniform_int_distribution<int> qd(-128, 127);
  std::uniform_real_distribution<float> sd(0.001f, 0.05f);
  std::vector<int8_t> wq(N * K);
  std::vector<float> scales(N), bias(N);
  for (auto& q : wq) q = int8_t(qd(rng));
  for (auto& s : scales) s = sd(rng);
  for (auto& b : bias) b = sd(rng) * 100;
  std::vector<int8_t> pw(int8_packed_bytes(N, K));
  std::vector<float> ps(num_blocks(N) * kBlock);
  pack_int8(wq.data(), scales.data(), N, K, pw.data(), ps.data());

  const int64_t kp = int8_padded_k(K);  // the kernel reads kp columns, zero past K
  const Act2 x = make_x(M, kp, K, act);
  std::vector<double> ref(M * N), mag(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0, mg = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        acc += double(x.val[m * kp + k]) * wq[n * K + k];
        mg += std::fabs(x.val[m * kp + k] * wq[n * K + k]);
      }
      acc *= scales[n], mg *= scales[n];
      if (with_bias) acc += bias[n], mg += std::fabs(bias[n]);
      ref[m * N + n] = acc, mag[m * N + n] = mg;
    }

  const int64_t ldy = N + 3;
  std::vector<float> y(M * ldy, NAN);
  Int8Weights w;
  w.w = pw.data(), w.scale = ps.data(), w.N = N, w.K = K;
  const int64_t Nb = num_blocks(N);
  for (int s = 0; s < splits; ++s) {
    Problem p;
    p.x = act == DType::F32 ? (const void*)x.f32.data() : (const void*)x.bf16.data();
    p.act = act, p.M = M, p.ldx = kp;
    p.col_bias = with_bias ? bias.data() : nullptr;
    p.y = y.data(), p.ldy = ldy;
    p.nb0 = Nb * s / splits, p.nb1 = Nb * (s + 1) / splits;
    if (p.nb0 < p.nb1) isa.int8(w, p);
  }
  char cfg[160];
  std::snprintf(cfg, sizeof cfg, "[%s %s M=%lld N=%lld K=%lld bias=%d splits=%d]", isa.name,
                act == DType::F32 ? "f32" : "bf16", (long long)M, (long long)N, (long long)K,
                int(with_bias), splits);
  check_output("int8", cfg, y, ref, mag, M, N, ldy, kp / 2 + 2);
}

}  // namespace

int main() {
  // Every ISA up to the one in force (the CPU's best, capped by QTORCH_CPU_ISA, which is how
  // .ci/cpp_tests.sh runs each path); the dispatching entry points are checked too.
  const qc::Isa top = qc::isa(qc::Family::WeightOnly);
  std::vector<Isa> isas = {{"scalar", int4_gemm_scalar, int8_gemm_scalar, true,
                            pack_int8_blocks_scalar, dequant_int8_slab_t_scalar}};
  if (top >= qc::Isa::Avx2)
    isas.push_back({"avx2", int4_gemm_avx2, int8_gemm_avx2, false, pack_int8_blocks_avx2,
                    dequant_int8_slab_t_avx2});
  if (top >= qc::Isa::Avx512)
    isas.push_back({"avx512", int4_gemm_avx512, int8_gemm_avx512, true, pack_int8_blocks_avx512,
                    dequant_int8_slab_t_avx512});
  isas.push_back({"dispatch", int4_gemm, int8_gemm, supports_act(DType::BF16), pack_int8_blocks,
                  dequant_int8_slab_t});
  std::printf("kernel ISA in force: %s\n", qc::isa_name(top));

  for (const Isa& isa : isas) {
    int i = 0;
    for (int64_t N : {1, 2, 15, 16, 17, 33, 70})
      for (int64_t K : {1, 2, 3, 5, 31, 63, 64, 65, 66, 127, 130, 200})
        run_int8_layout(isa, N, K, 1 + (i++) % 3);
  }
  // pack_int8 (all blocks, one call) is the layout too.
  {
    std::vector<int8_t> wq(size_t(37 * 45)), rw, pw(size_t(int8_packed_bytes(37, 45)));
    std::vector<float> sc(37, 0.25f), rs, ps(size_t(num_blocks(37) * kBlock));
    for (size_t i = 0; i < wq.size(); ++i) wq[i] = int8_t(i * 7);
    int8_layout_reference(wq, sc, 37, 45, rw, rs);
    pack_int8(wq.data(), sc.data(), 37, 45, pw.data(), ps.data());
    ++checks;
    if (pw != rw || ps != rs) {
      ++failures;
      std::printf("FAIL pack_int8 [dispatch N=37 K=45]\n");
    }
  }

  const int64_t Ms[] = {1, 2, 3, 4, 5, 8, 9, 17};
  const int64_t Ns[] = {1, 15, 16, 17, 40, 70};
  for (const Isa& isa : isas) {
    for (DType act : {DType::F32, DType::BF16}) {
      if (act == DType::BF16 && !isa.bf16) continue;
      int i = 0;
      for (int64_t M : Ms)
        for (int64_t N : Ns) {
          ++i;
          const int64_t gs = int64_t(32) << (i % 4);
          const int64_t K = gs * (1 + i % 3);
          run_int4(isa, act, M, N, K, gs, i % 2 == 0, i % 3 != 0, 1 + i % 3);
          run_int8(isa, act, M, N, 1 + (i * 37) % 300, i % 2 == 1, 1 + i % 3);
        }
      run_int8(isa, act, 3, 33, 1, true, 2);  // K = 1: one padded k pair
    }
  }
  std::printf("%s: %d checks, %d failures\n", failures ? "FAIL" : "OK", checks, failures);
  return failures ? 1 : 0;
}
