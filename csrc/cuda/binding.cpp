// Thin torch binding of the CUDA kernels: ops in the `qtorch_cuda` namespace, CUDA dispatch
// key only. The public ops (`torch.ops.qtorch.*`, qtorch/ops.py) validate arguments and carry
// the fake impls; qtorch/backends/cuda.py calls these from the `cuda` backend. The checks here
// are the ones the raw-pointer launchers rely on (device, dtype, contiguity, alignment).
//
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers
// the kernels never use). Built only where a CUDA build of torch and nvcc exist (setup.py -> qtorch._C_cuda).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "kernels.h"

namespace qtorch_cuda {
namespace {

using at::Tensor;

#define CHECK_CUDA_TENSOR(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
#define CHECK_CONTIG(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define CHECK_LAUNCH(expr)                                                               \
  do {                                                                                   \
    cudaError_t err_ = (expr);                                                           \
    TORCH_CHECK(err_ == cudaSuccess, "qtorch_cuda: ", #expr, ": ", cudaGetErrorString(err_)); \
  } while (0)

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "qtorch_cuda: unsupported dtype ", t);
  }
  return -1;
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// [R, K] int8 -> a contiguous [R, Kp] int8 with Kp = K rounded up to 16, zero padded, 16-byte
// aligned (the GEMM's cp.async requirement). Returns `t` itself when it already qualifies.
Tensor pad_k16(const Tensor& t) {
  const int64_t k = t.size(1), kp = (k + 15) / 16 * 16;
  if (k == kp && t.is_contiguous() && aligned16(t)) return t;
  Tensor out = at::zeros({t.size(0), kp}, t.options());
  out.narrow(1, 0, k).copy_(t);
  return out;
}

std::tuple<Tensor, Tensor> quantize_int8(const Tensor& x) {
  CHECK_CUDA_TENSOR(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D");
  const Tensor xc = x.contiguous();
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(launch_quantize_int8(xc.data_ptr(), dtype_code(x.scalar_type()), q.data_ptr<int8_t>(),
                                    s.data_ptr<float>(), M, K, K,
                                    c10::cuda::getCurrentCUDAStream()));
  return {q, s};
}

Tensor scaled_mm_impl(const Tensor& a, const Tensor& b, const Tensor& scale_a,
                      const Tensor& scale_b, const c10::optional<Tensor>& bias,
                      at::ScalarType out_dtype, int64_t N) {
  const int64_t M = a.size(0), Kp = a.size(1);
  TORCH_CHECK(b.size(1) == Kp, "a and b must have the same padded K");
  Tensor sa = scale_a.to(at::kFloat).contiguous(), sb = scale_b.to(at::kFloat).contiguous();
  Tensor bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  CHECK_LAUNCH(launch_int8_scaled_mm(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), sa.data_ptr<float>(),
                                     sb.data_ptr<float>(), bf.defined() ? bf.data_ptr<float>() : nullptr,
                                     out.data_ptr(), dtype_code(out_dtype), M, N, Kp, Kp, Kp,
                                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

Tensor int8_scaled_mm(const Tensor& a, const Tensor& b, const Tensor& scale_a,
                      const Tensor& scale_b, const c10::optional<Tensor>& bias,
                      at::ScalarType out_dtype) {
  CHECK_CUDA_TENSOR(a);
  CHECK_CUDA_TENSOR(b);
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar, "a, b must be int8");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "a [M, K], b [N, K]");
  c10::cuda::CUDAGuard guard(a.device());
  return scaled_mm_impl(pad_k16(a), pad_k16(b), scale_a, scale_b, bias, out_dtype, b.size(0));
}

// Dynamic W8A8. `w_q` is [N, Kw] with Kw >= K, Kw % 16 == 0 allowed (columns past K zero):
// the Python side caches such a padded copy of the weight once when K % 16 != 0.
// smooth: SmoothQuant's fp32 [K] divisor of x, fused into the activation quantization.
Tensor int8_linear(const Tensor& x, const Tensor& w_q, const Tensor& w_scale,
                   const c10::optional<Tensor>& bias, const c10::optional<Tensor>& smooth) {
  CHECK_CUDA_TENSOR(x);
  CHECK_CUDA_TENSOR(w_q);
  Tensor sm;
  if (smooth.has_value()) {
    CHECK_CUDA_TENSOR(*smooth);
    TORCH_CHECK(smooth->scalar_type() == at::kFloat && smooth->dim() == 1 &&
                    smooth->size(0) == x.size(-1),
                "smooth_scale must be float32 [K]");
    sm = smooth->contiguous();
  }
  TORCH_CHECK(x.dim() == 2 && w_q.dim() == 2 && w_q.size(1) >= x.size(1), "x [M, K], w_q [N, >=K]");
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const Tensor w = (w_q.size(1) % 16 == 0 && w_q.is_contiguous() && aligned16(w_q)) ? w_q : pad_k16(w_q);
  const int64_t Kp = w.size(1);
  Tensor q = at::empty({M, Kp}, x.options().dtype(at::kChar));
  Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(launch_quantize_int8(xc.data_ptr(), dtype_code(x.scalar_type()), q.data_ptr<int8_t>(),
                                    s.data_ptr<float>(), M, K, Kp,
                                    c10::cuda::getCurrentCUDAStream(),
                                    sm.defined() ? sm.data_ptr<float>() : nullptr));
  return scaled_mm_impl(q, w, s, w_scale, bias, x.scalar_type(), w.size(0));
}

// W4A16 with weights from qtorch/backends/_cuda_pack.py.
Tensor int4_weight_only_linear(const Tensor& x, const Tensor& qpacked, const Tensor& szpacked,
                               int64_t N, int64_t group_size, const c10::optional<Tensor>& bias) {
  CHECK_CUDA_TENSOR(x);
  CHECK_CUDA_TENSOR(qpacked);
  CHECK_CONTIG(qpacked);
  CHECK_CONTIG(szpacked);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be fp16/bf16");
  TORCH_CHECK(qpacked.scalar_type() == at::kInt && szpacked.scalar_type() == at::kInt, "packed weights are int32");
  c10::cuda::CUDAGuard guard(x.device());
  Tensor xc = x.contiguous();
  if (!aligned16(xc)) xc = xc.clone();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(qpacked.dim() == 4 && qpacked.size(0) * 64 >= K && qpacked.size(1) * 16 >= N,
              "qpacked does not match x / N");
  Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type()).contiguous();
  Tensor out = at::empty({M, N}, x.options());
  int sms = 0;
  CHECK_LAUNCH(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int split = weight_only_pick_split_k(M, N, K, sms);
  Tensor ws;
  if (split > 1) ws = at::zeros({M, N}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(launch_int4_weight_only_linear(
      xc.data_ptr(), dtype_code(x.scalar_type()), qpacked.data_ptr<int32_t>(), szpacked.data_ptr<int32_t>(),
      b.defined() ? b.data_ptr() : nullptr, out.data_ptr(), ws.defined() ? ws.data_ptr<float>() : nullptr, M, N,
      K, group_size, split, sms, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// W8A16 with weights from qtorch/backends/_cuda_pack.py (pack_int8); x's K % 8 == 0 (the
// Python side zero-pads x otherwise; the packed weight is zero past the real K).
Tensor int8_weight_only_linear(const Tensor& x, const Tensor& qpacked, const Tensor& w_scale,
                               int64_t N, const c10::optional<Tensor>& bias) {
  CHECK_CUDA_TENSOR(x);
  CHECK_CUDA_TENSOR(qpacked);
  CHECK_CONTIG(qpacked);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be fp16/bf16");
  TORCH_CHECK(qpacked.scalar_type() == at::kInt && qpacked.dim() == 5, "qpacked: int32 [Kp/64, Np/16, 2, 32, 4]");
  c10::cuda::CUDAGuard guard(x.device());
  Tensor xc = x.contiguous();
  if (!aligned16(xc)) xc = xc.clone();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0 && qpacked.size(0) * 64 >= K && qpacked.size(1) * 16 >= N,
              "qpacked does not match x / N");
  const Tensor sc = w_scale.to(at::kFloat).contiguous();
  Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type()).contiguous();
  Tensor out = at::empty({M, N}, x.options());
  int sms = 0;
  CHECK_LAUNCH(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int split = weight_only_pick_split_k(M, N, K, sms);
  Tensor ws;
  if (split > 1) ws = at::zeros({M, N}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(launch_int8_weight_only_linear(
      xc.data_ptr(), dtype_code(x.scalar_type()), qpacked.data_ptr<int32_t>(), sc.data_ptr<float>(),
      b.defined() ? b.data_ptr() : nullptr, out.data_ptr(), ws.defined() ? ws.data_ptr<float>() : nullptr, M, N,
      K, split, sms, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// Returns (loss fp32 [M], grad [M, V] in the student's dtype, or an empty tensor).
std::tuple<Tensor, Tensor> distillation_loss(const Tensor& student, const Tensor& teacher,
                                             const c10::optional<Tensor>& labels,
                                             double temperature, double alpha, int64_t divergence,
                                             double beta, int64_t ignore_index, bool compute_grad) {
  CHECK_CUDA_TENSOR(student);
  CHECK_CUDA_TENSOR(teacher);
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), "student, teacher [M, V]");
  c10::cuda::CUDAGuard guard(student.device());
  const Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  Tensor lab;
  if (labels.has_value() && labels->defined()) lab = labels->to(at::kLong).contiguous();
  const int64_t M = s.size(0), V = s.size(1);
  Tensor loss = at::empty({M}, s.options().dtype(at::kFloat));
  Tensor grad = compute_grad ? at::empty({M, V}, s.options()) : at::empty({0}, s.options());
  CHECK_LAUNCH(launch_distillation_loss(s.data_ptr(), t.data_ptr(), lab.defined() ? lab.data_ptr<int64_t>() : nullptr,
                                        loss.data_ptr<float>(), compute_grad ? grad.data_ptr() : nullptr,
                                        dtype_code(s.scalar_type()), M, V, (float)temperature,
                                        (float)alpha, (int)divergence, (float)beta, ignore_index,
                                        c10::cuda::getCurrentCUDAStream()));
  return {loss, grad};
}

}  // namespace
}  // namespace qtorch_cuda

TORCH_LIBRARY_FRAGMENT(qtorch_cuda, m) {
  m.def("quantize_int8(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_scaled_mm(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor? smooth=None) -> Tensor");
  m.def("int4_weight_only_linear(Tensor x, Tensor qpacked, Tensor szpacked, int N, int group_size, Tensor? bias) -> Tensor");
  m.def("int8_weight_only_linear(Tensor x, Tensor qpacked, Tensor w_scale, int N, Tensor? bias) -> Tensor");
  m.def("distillation_loss(Tensor student, Tensor teacher, Tensor? labels, float temperature, float alpha, int divergence, float beta, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qtorch_cuda, CUDA, m) {
  m.impl("quantize_int8", &qtorch_cuda::quantize_int8);
  m.impl("int8_scaled_mm", &qtorch_cuda::int8_scaled_mm);
  m.impl("int8_linear", &qtorch_cuda::int8_linear);
  m.impl("int4_weight_only_linear", &qtorch_cuda::int4_weight_only_linear);
  m.impl("int8_weight_only_linear", &qtorch_cuda::int8_weight_only_linear);
  m.impl("distillation_loss", &qtorch_cuda::distillation_loss);
}

// The extension module itself only needs to exist (the ops register at load time); it also
// reports what it was compiled for.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("archs", []() { return std::string("sm_80, sm_90a"); });
}
