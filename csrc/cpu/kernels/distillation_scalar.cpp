// Scalar (one float per "vector") instance of the distillation row kernel, the ISA choice and
// the row loop. Compiled without ISA flags: runs anywhere.
#include <cmath>
#include <cstring>

#include "../cpu_features.h"
#include "distillation.h"
#include "distillation_impl.h"

namespace qtorch::cpu::distillation {

namespace {

struct ScalarVt {
  using V = float;
  using M = bool;
  static constexpr int W = 1;
  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fmadd(V a, V b, V c) { return std::fma(a, b, c); }
  static V max(V a, V b) { return a > b ? a : b; }  // NaN -> b, like maxps
  static V min(V a, V b) { return a < b ? a : b; }
  static M eq(V a, V b) { return a == b; }
  static M gt(V a, V b) { return a > b; }
  static V select(M m, V a, V b) { return m ? a : b; }
  static M part(int n) { return n > 0; }
  static float hsum(V v) { return v; }
  static float hmax(V v) { return v; }
  static V sub_lane(V v, int, float c) { return v - c; }
  static V exp(V x) { return std::exp(x); }
  static V log(V x) { return std::log(x); }
  template <DType D>
  static V load(const void* p, int64_t i) {
    if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
    else if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    else return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  template <DType D>
  static V load_part(const void* p, int64_t i, int, float) { return load<D>(p, i); }
  template <DType D>
  static void store(void* p, int64_t i, V v) {
    if constexpr (D == DType::F32) static_cast<float*>(p)[i] = v;
    else if constexpr (D == DType::BF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    else static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  }
  template <DType D>
  static void store_part(void* p, int64_t i, V v, int) { store<D>(p, i, v); }
};

}  // namespace

float row_scalar(const void* s, DType sdt, const void* t, DType tdt, int64_t V, int64_t label,
                 const Params& P, void* g, DType gdt, float gscale) {
  return row_dispatch<ScalarVt>(s, sdt, t, tdt, V, label, P, g, gdt, gscale);
}

RowFn row_fn() {
  switch (isa(Family::Distillation)) {
    case Isa::Avx512: return row_avx512;
    case Isa::Avx2: return row_avx2;
    default: return row_scalar;
  }
}

const char* kernel_name() {
  switch (isa(Family::Distillation)) {
    case Isa::Avx512: return "avx512 (16 fp32 lanes)";
    case Isa::Avx2: return "avx2 (8 fp32 lanes)";
    default: return "scalar";
  }
}

void rows(RowFn fn, const void* student, DType sdt, int64_t lds, const void* teacher, DType tdt,
          int64_t ldt, const int64_t* labels, int64_t ignore_index, int64_t V, int64_t begin,
          int64_t end, const Params& params, float* loss, void* grad, DType gdt, int64_t ldg,
          const float* token_scale) {
  const auto* sb = static_cast<const char*>(student);
  const auto* tb = static_cast<const char*>(teacher);
  auto* gb = static_cast<char*>(grad);
  const int64_t ss = lds * dtype_size(sdt), ts = ldt * dtype_size(tdt), gs = ldg * dtype_size(gdt);
  for (int64_t r = begin; r < end; ++r) {
    void* g = gb != nullptr ? gb + r * gs : nullptr;
    int64_t label = -1;
    if (labels != nullptr) {
      if (labels[r] == ignore_index) {  // contributes nothing, whatever the row holds
        loss[r] = 0.0f;
        if (g != nullptr) std::memset(g, 0, static_cast<size_t>(V * dtype_size(gdt)));
        continue;
      }
      label = labels[r];
    }
    const float scale = token_scale != nullptr ? token_scale[r] : 1.0f;
    loss[r] = fn(sb + r * ss, sdt, tb + r * ts, tdt, V, label, params, g, gdt, scale);
  }
}

}  // namespace qtorch::cpu::distillation
