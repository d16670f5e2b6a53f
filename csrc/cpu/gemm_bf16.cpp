// bf16 x bf16 -> fp32 GEMM on the CPU, for the fused distillation loss's bf16 heads.
//
// torch 2.13 has no CPU GEMM with 16-bit inputs and an fp32 result (`torch.mm(out_dtype=)` is
// not implemented on the CPU), but its CPU library carries oneMKL, whose
// cblas_gemm_bf16bf16f32 does exactly that: bf16 operands, products and sums in fp32, an fp32
// C (on AMX machines through the AMX tiles). It is looked up at run time, so a torch built
// without MKL still loads this extension: `bf16_gemm_available()` then says False and the
// caller keeps its fp32 path.
//
// Each product of two bf16 numbers is exact in fp32, so the result is the fp32 GEMM of the
// widened operands up to the order of the sums.
#include <torch/extension.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

namespace {

// CBLAS_LAYOUT / CBLAS_TRANSPOSE values of the CBLAS standard.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// cblas_gemm_bf16bf16f32(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc),
// LP64 (32-bit ints), MKL_BF16 = uint16_t.
using GemmFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                        const uint16_t*, int, float, float*, int);

GemmFn resolve() {
  static const GemmFn fn = [] {
    void* p = dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32");
    if (p == nullptr) {
      // torch's CPU library may have been loaded RTLD_LOCAL: ask it by name.
      if (void* h = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD)) {
        p = dlsym(h, "cblas_gemm_bf16bf16f32");
        dlclose(h);
      }
    }
    return reinterpret_cast<GemmFn>(p);
  }();
  return fn;
}

bool bf16_gemm_available() { return resolve() != nullptr; }

// (transposed, leading dimension) of a 2-D [r, c] matrix for a row-major CBLAS call; a
// matrix that is neither row- nor column-major with a valid leading dimension is copied.
std::pair<bool, int64_t> layout_of(at::Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1);
  if (t.stride(1) == 1 && (r <= 1 || t.stride(0) >= std::max<int64_t>(c, 1)))
    return {false, std::max<int64_t>({t.stride(0), c, 1})};
  if (t.stride(0) == 1 && (c <= 1 || t.stride(1) >= std::max<int64_t>(r, 1)))
    return {true, std::max<int64_t>({t.stride(1), r, 1})};
  t = t.contiguous();
  return {false, std::max<int64_t>(c, 1)};
}

// out = a @ b + beta * out: a [m, k] and b [k, n] bf16 (any of row- or column-major),
// out [m, n] fp32 with unit column stride. beta = 0 ignores out's contents (NaN included).
void mm_bf16_f32_(at::Tensor out, at::Tensor a, at::Tensor b, double beta) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2,
              "mm_bf16_f32_: a, b and out must be 2-D");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
              "mm_bf16_f32_: a and b must be bfloat16, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "mm_bf16_f32_: out must be float32");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(),
              "mm_bf16_f32_: CPU tensors only");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(b.size(0) == k, "mm_bf16_f32_: a is ", a.sizes(), " but b is ", b.sizes());
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "mm_bf16_f32_: out is ", out.sizes(),
              ", expected [", m, ", ", n, "]");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: out = beta * out (0 for beta = 0, whatever out held)
    if (beta == 0.0) out.zero_();
    else out.mul_(beta);
    return;
  }
  TORCH_CHECK(out.stride(1) == 1 && (m <= 1 || out.stride(0) >= n),
              "mm_bf16_f32_: out must be row-major with unit column stride");
  const GemmFn gemm = resolve();
  TORCH_CHECK(gemm != nullptr, "mm_bf16_f32_: torch's CPU library has no cblas_gemm_bf16bf16f32");
  auto [ta, lda] = layout_of(a);
  auto [tb, ldb] = layout_of(b);
  const int64_t ldc = std::max<int64_t>({out.stride(0), n, 1});
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "mm_bf16_f32_: a dimension or stride exceeds the 32-bit BLAS interface");
  gemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m),
       static_cast<int>(n), static_cast<int>(k), 1.0f,
       reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>()), static_cast<int>(lda),
       reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>()), static_cast<int>(ldb),
       static_cast<float>(beta), out.data_ptr<float>(), static_cast<int>(ldc));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m) {
  m.def("bf16_gemm_available() -> bool", &bf16_gemm_available);
  m.def("mm_bf16_f32_(Tensor(a!) out, Tensor a, Tensor b, float beta) -> ()");
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) {
  m.impl("mm_bf16_f32_", &mm_bf16_f32_);
}
