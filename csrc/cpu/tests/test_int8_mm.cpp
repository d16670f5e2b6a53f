// W8A8 int8 kernels (int8_mm.h) against plain scalar loops, over odd shapes (M, N, K of 1,
// tails of every SIMD width, non-multiples of the 6 x 64 tile and of the 4-k group), every
// input/output dtype and split row/panel ranges (as the threaded binding calls them).
// Every buffer is an exact-size std::vector, so under -fsanitize=address (.ci/cpp_tests.sh)
// any out-of-bounds access aborts. The ISA under test is the one QTORCH_CPU_ISA selects
// (scalar | avx2 | avx512, capped by the CPU). Packing and slab dequantization are compared
// byte for byte (bit for bit) with the layout's formula and the scalar definitions.
// Returns non-zero on any mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "kernels/int8_mm.h"

namespace qc = qtorch::cpu;
using namespace qtorch::cpu::int8_mm;
using qtorch::cpu::DType;

namespace {

int failures = 0, checks = 0;

void fail(const std::string& what) {
  if (++failures <= 20) std::printf("FAIL %s\n", what.c_str());
}

// Test-side conversions (independent of the kernel's helpers).
float h2f(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const float v = e == 0 ? std::ldexp(float(m), -24) : std::ldexp(float(m | 1024), e - 25);
  return (h & 0x8000) ? -v : v;
}
uint16_t f2h_exact(float f) {  // encodes a value that is exact as a normal fp16 (or 0)
  const uint16_t sign = f < 0 ? 0x8000 : 0;
  const float a = std::fabs(f);
  if (a == 0.f) return sign;
  const int e = std::ilogb(a);  // a = 1.m * 2^e, -14 <= e <= 15
  const int mant = int(std::ldexp(a, 10 - e)) - 1024;
  return uint16_t(sign | ((e + 15) << 10) | mant);
}
float b2f(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// An exact-size buffer between two guard zones. ASan checks ordinary accesses, but not the
// SIMD masked loads/stores (compiler builtins it does not instrument), so every buffer a
// kernel writes is also checked for writes outside [0, n) by its untouched guard pattern.
template <typename T>
struct Guarded {
  static constexpr size_t kGuard = 256 / sizeof(T);
  std::vector<T> buf;
  T pattern;
  Guarded(size_t n, T fill, T guard) : buf(n + 2 * kGuard, guard), pattern(guard) {
    for (size_t i = 0; i < n; ++i) buf[kGuard + i] = fill;
  }
  T* data() { return buf.data() + kGuard; }
  T& operator[](size_t i) { return buf[kGuard + i]; }
  size_t size() const { return buf.size() - 2 * kGuard; }
  bool intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (std::memcmp(&buf[i], &pattern, sizeof(T)) != 0 ||
          std::memcmp(&buf[buf.size() - 1 - i], &pattern, sizeof(T)) != 0)
        return false;
    return true;
  }
};

std::string cfg(const char* what, int64_t M, int64_t N, int64_t K) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "%s [%s M=%lld N=%lld K=%lld]", what,
                qc::isa_name(qc::isa(qc::Family::Int8Mm)), (long long)M, (long long)N,
                (long long)K);
  return buf;
}

// The GEMM: exact int32 a @ w.T via pack_a / pack_b / gemm, and the fused epilogue for each
// output dtype, with the row and panel ranges split in `splits` pieces.
void check_gemm(int64_t M, int64_t N, int64_t K, int splits, std::mt19937& rng) {
  std::uniform_int_distribution<int> s8(-128, 127);
  std::vector<int8_t> a(size_t(M * K)), w(size_t(N * K));
  for (auto& v : a) v = int8_t(s8(rng));
  for (auto& v : w) v = int8_t(s8(rng));
  if (M > 1)
    for (int64_t k = 0; k < K; ++k) a[size_t(k)] = -128;  // extreme row: -128 * -128 products
  if (N > 1)
    for (int64_t k = 0; k < K; ++k) w[size_t(k)] = -128;

  std::vector<int64_t> ref(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int64_t(a[size_t(m * K + k)]) * w[size_t(n * K + k)];
      ref[size_t(m * N + n)] = s;
    }

  std::vector<uint8_t> bp(size_t(packed_b_bytes(N, K)));
  pack_b(w.data(), N, K, K, bp.data());
  const int64_t Kp = padded_k(K);
  Guarded<uint8_t> ap(size_t(M * Kp), 0, 0xa5);
  for (int i = 0; i < splits; ++i) pack_a(a.data(), K, K, M * i / splits, M * (i + 1) / splits, ap.data());
  if (!ap.intact()) fail(cfg("pack_a wrote out of bounds", M, N, K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < Kp; ++k) {
      const int want = k < K ? int(a[size_t(m * K + k)]) + 128 : 128;
      if (ap[size_t(m * Kp + k)] != want) {
        fail(cfg("pack_a", M, N, K));
        m = M;
        break;
      }
    }

  const int64_t np = num_panels(N);
  auto run = [&](Epilogue& ep) {
    for (int i = 0; i < splits; ++i)
      for (int j = 0; j < splits; ++j)
        gemm(ap.data(), K, bp.data(), N, M * i / splits, M * (i + 1) / splits, np * j / splits,
             np * (j + 1) / splits, ep);
  };

  // int32 hook: exact.
  {
    const int64_t ldo = N + 3;  // a padded output row: the kernel must honour ldo
    Guarded<int32_t> out(size_t((M - 1) * ldo + N), 0x5a5a5a5a, 0x3c3c3c3c);
    Epilogue ep;
    ep.out = out.data();
    ep.ldo = ldo;
    ep.type = DType::S32;
    run(ep);
    ++checks;
    if (!out.intact()) fail(cfg("int32 out of bounds", M, N, K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < ldo && m * ldo + n < int64_t(out.size()); ++n) {
        const int32_t got = out[size_t(m * ldo + n)];
        const bool pad = n >= N;
        if ((pad && got != 0x5a5a5a5a) || (!pad && got != ref[size_t(m * N + n)])) {
          fail(cfg(pad ? "int32 wrote past N" : "int32 dot", M, N, K));
          m = M;
          break;
        }
      }
  }

  // Float epilogues: out = cast(float(d) * sa[m] * sb[n] + bias[n]).
  std::uniform_real_distribution<float> u(0.001f, 0.02f), ub(-2.f, 2.f);
  std::vector<float> sa(static_cast<size_t>(M)), sb(static_cast<size_t>(N)),
      bias(static_cast<size_t>(N));
  for (auto& v : sa) v = u(rng);
  for (auto& v : sb) v = u(rng);
  for (auto& v : bias) v = ub(rng);
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {
    for (bool with_bias : {false, true}) {
      Guarded<float> of(t == DType::F32 ? size_t(M * N) : 0, 0.f, -77.f);
      Guarded<uint16_t> oh(t == DType::F32 ? 0 : size_t(M * N), 0, 0x7e01);
      Epilogue ep;
      ep.scale_a = sa.data();
      ep.scale_b = sb.data();
      ep.bias = with_bias ? bias.data() : nullptr;
      ep.out = t == DType::F32 ? static_cast<void*>(of.data()) : static_cast<void*>(oh.data());
      ep.ldo = N;
      ep.type = t;
      run(ep);
      ++checks;
      if (!of.intact() || !oh.intact()) fail(cfg("epilogue out of bounds", M, N, K));
      for (int64_t i = 0; i < M * N; ++i) {
        const int64_t m = i / N, n = i % N;
        float want = float(int32_t(ref[size_t(i)])) * sa[size_t(m)] * sb[size_t(n)];
        if (with_bias) want += bias[size_t(n)];
        bool ok;
        if (t == DType::F32) {
          ok = of[size_t(i)] == want;  // same fp32 operations in the same order: bitwise
        } else {
          // one round-to-nearest to 11 (fp16) or 8 (bf16) significant bits: within half an ulp
          const float got = t == DType::F16 ? h2f(oh[size_t(i)]) : b2f(oh[size_t(i)]);
          const int bits = t == DType::F16 ? 11 : 8;
          const float ulp = std::ldexp(1.0f, std::ilogb(want == 0.f ? 1e-30f : want) - bits + 1);
          const float tol = std::fmax(0.5f * ulp, t == DType::F16 ? 5.97e-8f : 0.f);
          ok = std::fabs(got - want) <= tol * 1.0001f;
        }
        if (!ok) {
          fail(cfg(t == DType::F32 ? "f32 epilogue" : t == DType::F16 ? "f16 epilogue" : "bf16 epilogue", M, N, K));
          break;
        }
      }
    }
  }

  // Tiny scales put the results in the subnormal range of the output dtype (fp16) or of fp32
  // itself (bf16): still one round-to-nearest-even, never a flush to zero. Bitwise the scalar
  // conversions of kernels/dtype.h applied to the same fp32 value, on every ISA.
  for (DType t : {DType::F16, DType::BF16}) {
    const float tiny = t == DType::F16 ? 1e-4f : 1e-20f;
    std::vector<float> ta(sa), tb(sb);
    for (auto& v : ta) v *= tiny;
    for (auto& v : tb) v *= tiny;
    Guarded<uint16_t> oh(size_t(M * N), 0, 0x7e01);
    Epilogue ep;
    ep.scale_a = ta.data();
    ep.scale_b = tb.data();
    ep.out = oh.data();
    ep.ldo = N;
    ep.type = t;
    run(ep);
    ++checks;
    if (!oh.intact()) fail(cfg("subnormal epilogue out of bounds", M, N, K));
    for (int64_t i = 0; i < M * N; ++i) {
      const float want = float(int32_t(ref[size_t(i)])) * ta[size_t(i / N)] * tb[size_t(i % N)];
      const uint16_t bits = t == DType::F16 ? qc::f32_to_f16(want) : qc::f32_to_bf16(want);
      if (oh[size_t(i)] != bits) {
        fail(cfg(t == DType::F16 ? "f16 subnormal epilogue" : "bf16 subnormal epilogue", M, N, K));
        break;
      }
    }
  }
}

// Per-row quantization: bitwise the definition (true division, RNE, clamp to +-127).
void check_quantize(int64_t M, int64_t K, DType xt, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> xf(size_t(M * K));
  for (auto& v : xf) v = nd(rng);
  if (M > 1)
    for (int64_t k = 0; k < K; ++k) xf[size_t(K + k)] = 0.f;  // all-zero row: scale 1
  if (M > 2 && K > 2) xf[size_t(2 * K + 1)] = 127.f * 0.5f, xf[size_t(2 * K)] = 127.f;  // tie
  // Edge rows (docs/semantics.md): NaN last (a vector tail), +inf first (the vector body),
  // -inf in the middle: scale NaN, q 0; then a row of 1e-45, whose scale underflows: scale 1, q 0.
  if (M > 6) {
    xf[size_t(3 * K + K - 1)] = NAN;
    xf[size_t(4 * K)] = INFINITY;
    xf[size_t(5 * K + K / 2)] = -INFINITY;
    for (int64_t k = 0; k < K; ++k) xf[size_t(6 * K + k)] = 1e-45f;
  }
  std::vector<uint16_t> xh(size_t(M * K));
  const void* x = xf.data();
  if (xt != DType::F32) {
    for (size_t i = 0; i < xf.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &xf[i], 4);
      if (xt == DType::BF16) {
        xh[i] = uint16_t(bits >> 16);
        xf[i] = b2f(xh[i]);
      } else {
        const float c = std::fmax(std::fmin(xf[i], 60000.f), -60000.f);
        // round to a value exact in fp16 first (keep 11 significant bits), then encode
        int e;
        const float mant = std::frexp(c, &e);
        float r = std::ldexp(std::nearbyint(std::ldexp(mant, 11)), e - 11);
        if (std::fabs(r) < 6.2e-5f) r = 0.f;
        xf[i] = r;
        xh[i] = f2h_exact(r);
      }
    }
    x = xh.data();
  }
  Guarded<float> scale(size_t(M), -1.f, -3.f);
  Guarded<int8_t> q(size_t(M * K), 0, 0x55);
  const int64_t Kp = padded_k(K);
  Guarded<uint8_t> ap(size_t(M * Kp), 0, 0xa5);
  quantize_rows(x, xt, K, K, 0, M, scale.data(), q.data(), K, ap.data());
  ++checks;
  if (!scale.intact() || !q.intact() || !ap.intact())
    fail(cfg("quantize out of bounds", M, 0, K));
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      amax = std::fmax(amax, std::fabs(xf[size_t(m * K + k)]));
      finite = finite && std::isfinite(xf[size_t(m * K + k)]);
    }
    const float s = !finite ? NAN : amax / 127.f == 0.f ? 1.f : amax / 127.f;
    if (!(scale[size_t(m)] == s || (std::isnan(s) && std::isnan(scale[size_t(m)])))) {
      fail(cfg("quantize scale", M, 0, K));
      return;
    }
    for (int64_t k = 0; k < Kp; ++k) {
      int want = 0;
      if (k < K && finite)
        want = int(std::fmin(std::fmax(std::nearbyint(xf[size_t(m * K + k)] / s), -127.f), 127.f));
      if ((k < K && q[size_t(m * K + k)] != want) || ap[size_t(m * Kp + k)] != want + 128) {
        fail(cfg(xt == DType::F32 ? "quantize f32" : xt == DType::F16 ? "quantize f16" : "quantize bf16", M, 0, K));
        return;
      }
    }
  }
}

// Bits of a float, to compare NaNs and signed zeros exactly.
uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// A weight with extreme rows (-128, 127 everywhere) and columns past K (ldw > K) that must
// not be read into the packed weight.
std::vector<int8_t> random_weight(int64_t N, int64_t K, int64_t ldw, std::mt19937& rng) {
  std::uniform_int_distribution<int> s8(-128, 127);
  std::vector<int8_t> w(size_t(N * ldw));
  for (auto& v : w) v = int8_t(s8(rng));
  if (N > 1)
    for (int64_t k = 0; k < K; ++k) w[size_t(ldw + k)] = -128;
  if (N > 2)
    for (int64_t k = 0; k < K; ++k) w[size_t(2 * ldw + k)] = 127;
  return w;
}

// The packed layout of int8_mm.h, from its formula (independent of the kernels).
std::vector<uint8_t> layout_reference(const std::vector<int8_t>& w, int64_t N, int64_t K,
                                      int64_t ldw) {
  const int64_t Kp = padded_k(K), bytes = packed_b_bytes(N, K);
  std::vector<uint8_t> ref(size_t(bytes), 0);
  for (int64_t n = 0; n < N; ++n) {
    int64_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = w[size_t(n * ldw + k)];
      ref[size_t((n / 64) * 64 * Kp + (k / 4) * 256 + (n % 64) * 4 + k % 4)] = uint8_t(v);
      sum += v;
    }
    const int32_t comp = int32_t(sum * 128);
    std::memcpy(&ref[size_t(packed_b_panel_bytes(N, K) + 4 * n)], &comp, 4);
  }
  const int64_t trailer[3] = {kPackMagic, N, K};
  std::memcpy(&ref[size_t(bytes - kTrailerBytes)], trailer, sizeof trailer);
  return ref;
}

// pack_b and pack_b_panels (panel ranges split in `splits` pieces, as the binding's threads
// split them, over a buffer full of garbage: every byte must be written) against the layout's
// formula and the scalar definition, byte for byte; unpack_b gives the weight back.
void check_pack(int64_t N, int64_t K, int64_t ldw, int splits, std::mt19937& rng) {
  const std::vector<int8_t> w = random_weight(N, K, ldw, rng);
  const std::vector<uint8_t> ref = layout_reference(w, N, K, ldw);
  const int64_t bytes = packed_b_bytes(N, K), np = num_panels(N);
  ++checks;
  Guarded<uint8_t> whole(size_t(bytes), 0xcd, 0x3c);
  pack_b(w.data(), N, K, ldw, whole.data());
  if (!whole.intact()) fail(cfg("pack_b wrote out of bounds", 0, N, K));
  if (std::memcmp(whole.data(), ref.data(), size_t(bytes)) != 0) fail(cfg("pack_b bytes", 0, N, K));
  Guarded<uint8_t> split(size_t(bytes), 0xcd, 0x3c), scal(size_t(bytes), 0xcd, 0x3c);
  for (int i = 0; i < splits; ++i) {
    pack_b_panels(w.data(), N, K, ldw, np * i / splits, np * (i + 1) / splits, split.data());
    scalar::pack_b_panels(w.data(), N, K, ldw, np * i / splits, np * (i + 1) / splits, scal.data());
  }
  pack_b_trailer(N, K, split.data());
  pack_b_trailer(N, K, scal.data());
  if (!split.intact() || !scal.intact()) fail(cfg("pack_b_panels wrote out of bounds", 0, N, K));
  if (std::memcmp(split.data(), ref.data(), size_t(bytes)) != 0)
    fail(cfg("pack_b_panels (split) bytes", 0, N, K));
  if (std::memcmp(scal.data(), ref.data(), size_t(bytes)) != 0)
    fail(cfg("scalar pack_b_panels bytes", 0, N, K));
  std::vector<int8_t> back(size_t(N * K));
  unpack_b(whole.data(), N, K, back.data());
  for (int64_t n = 0; n < N; ++n)
    if (std::memcmp(&back[size_t(n * K)], &w[size_t(n * ldw)], size_t(K)) != 0) {
      fail(cfg("unpack_b", 0, N, K));
      break;
    }
}

// dequant_b_slab_t: rows [k0, k1) of ŵᵀ, bitwise float(w) * s (NaN, infinite, zero, signed
// zero, subnormal and overflowing scales included), for slab bounds at both ends, inside one
// 4-k group and at odd positions; the pad columns of each row (ldd > N) and the guards stay
// untouched. Against the scalar definition too.
void check_dequant(int64_t N, int64_t K, std::mt19937& rng) {
  const std::vector<int8_t> w = random_weight(N, K, K, rng);
  std::vector<uint8_t> bp(size_t(packed_b_bytes(N, K)));
  pack_b(w.data(), N, K, K, bp.data());
  std::uniform_real_distribution<float> u(-0.05f, 0.05f);
  std::vector<float> s(static_cast<size_t>(N));
  const float special[] = {0.f, -0.f, NAN, INFINITY, -INFINITY, 1e-40f, -3e38f, 1.f};
  for (int64_t n = 0; n < N; ++n) s[size_t(n)] = n % 5 == 3 ? special[(n / 5) % 8] : u(rng);
  std::vector<std::pair<int64_t, int64_t>> slabs = {{0, K}, {0, 1}, {K - 1, K}};
  if (K > 2) slabs.push_back({1, K - 1});
  if (K > 6) slabs.insert(slabs.end(), {{3, 5}, {5, 6}, {1, 2}, {2, K}, {4, 8 < K ? 8 : K}});
  if (K > 70) slabs.insert(slabs.end(), {{13, 77}, {64, K}, {K - 67, K - 3}});
  const int64_t ldd = N + 5;
  for (auto [k0, k1] : slabs) {
    const int64_t rows = k1 - k0;
    Guarded<float> got(size_t((rows - 1) * ldd + N), -7.f, -9.f);
    Guarded<float> scal(size_t((rows - 1) * ldd + N), -7.f, -9.f);
    dequant_b_slab_t(bp.data(), s.data(), N, K, k0, k1, got.data(), ldd);
    scalar::dequant_b_slab_t(bp.data(), s.data(), N, K, k0, k1, scal.data(), ldd);
    ++checks;
    char what[96];
    std::snprintf(what, sizeof what, "dequant_b_slab_t k0=%lld k1=%lld", (long long)k0,
                  (long long)k1);
    if (!got.intact() || !scal.intact()) fail(cfg(what, 0, N, K));
    bool ok = true;
    for (int64_t k = k0; k < k1 && ok; ++k)
      for (int64_t n = 0; n < ldd && (k - k0) * ldd + n < int64_t(got.size()); ++n) {
        const size_t i = size_t((k - k0) * ldd + n);
        const float want = n < N ? float(w[size_t(n * K + k)]) * s[size_t(n)] : -7.f;
        if (bits_of(got[i]) != bits_of(want) || bits_of(scal[i]) != bits_of(want)) {
          ok = false;
          break;
        }
      }
    if (!ok) fail(cfg(what, 0, N, K));
  }
}

}  // namespace

int main() {
  std::printf("test_int8_mm: ISA %s (QTORCH_CPU_ISA=%s)\n",
              qc::isa_name(qc::isa(qc::Family::Int8Mm)),
              std::getenv("QTORCH_CPU_ISA") ? std::getenv("QTORCH_CPU_ISA") : "unset");
  std::mt19937 rng(1234);
  const int64_t Ms[] = {1, 2, 5, 6, 7, 13};
  const int64_t Ns[] = {1, 15, 16, 17, 63, 64, 65, 130};
  const int64_t Ks[] = {1, 2, 3, 4, 5, 31, 64, 65, 131};
  int i = 0;
  for (int64_t M : Ms)
    for (int64_t N : Ns)
      for (int64_t K : Ks) {
        ++i;
        if ((i % 3) != 0 && !(M == 1 || N == 1 || K == 1)) continue;  // thin the cross product
        check_gemm(M, N, K, 1 + i % 3, rng);
      }
  check_gemm(19, 200, 300, 2, rng);
  for (int64_t N : {1, 2, 3, 15, 16, 17, 63, 64, 65, 100, 129})
    for (int64_t K : {1, 2, 3, 4, 5, 15, 63, 64, 65, 67, 128, 131, 200}) {
      check_pack(N, K, K, 1 + int(N + K) % 3, rng);
      check_dequant(N, K, rng);
    }
  check_pack(70, 37, 45, 2, rng);  // a row stride past K
  check_pack(130, 300, 300, 3, rng);
  check_dequant(130, 300, rng);
  for (DType xt : {DType::F32, DType::F16, DType::BF16})
    for (int64_t M : {1, 3, 8})
      for (int64_t K : {1, 2, 3, 7, 8, 15, 16, 17, 33, 64, 100})
        check_quantize(M, K, xt, rng);
  std::printf("%s: %d checks, %d failures\n", failures ? "FAIL" : "OK", checks, failures);
  return failures ? 1 : 0;
}
