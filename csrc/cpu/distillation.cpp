// Torch binding of the distillation-loss kernels (csrc/cpu/kernels/distillation.h): schemas in the
// `qtorch_cpu` namespace, the checks that keep every kernel access in bounds (shapes, dtypes,
// contiguity, label range), allocation and threading (at::parallel_for over rows).
//
//   qtorch_cpu::distillation_loss(student [M, V], teacher [M, V], labels int64 [M]?, T, alpha,
//       divergence, beta, ignore_index, compute_grad)
//       -> (loss f32 [M], grad [M, V] student.dtype = d loss_i / d student_i, or empty [0])
//   qtorch_cpu::distillation_loss_inplace(student [M, V], teacher [M, V], labels int64 [M]?,
//       token_scale f32 [M]?, T, alpha, divergence, beta, ignore_index, compute_grad)
//       -> loss f32 [M]; with compute_grad, student is overwritten with
//          token_scale_i · d loss_i / d student_i (token_scale absent: all ones).
//       The per-chunk kernel of fused_linear_distillation_loss, whose chunk loop (the GEMMs,
//       fp32 accumulation of the weight gradient) is written once for every backend, in
//       qtorch/reference/distillation.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "kernels/distillation.h"

namespace dk = qtorch::cpu::distillation;
using qtorch::cpu::DType;

namespace {

DType kernel_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, what, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
}

dk::Params make_params(double temperature, double alpha, c10::string_view divergence,
                       double beta) {
  // The op's range (qtorch/_checks.py): below 0.01, 1 / T overflows fp32 logits and T² D
  // loses every digit; above 100 every softmax is flat to fp32 precision.
  TORCH_CHECK_VALUE(temperature >= 0.01 && temperature <= 100,
                    "temperature must be in [0.01, 100], got ", temperature);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "beta must be in [0, 1], got ", beta);
  dk::Params p;
  p.temperature = static_cast<float>(temperature);
  p.alpha = static_cast<float>(alpha);
  p.beta = static_cast<float>(beta);
  if (divergence == "kl") p.divergence = dk::Divergence::KL;
  else if (divergence == "reverse_kl") p.divergence = dk::Divergence::ReverseKL;
  else if (divergence == "jsd") p.divergence = dk::Divergence::JSD;
  else TORCH_CHECK_VALUE(false, "divergence must be one of kl, reverse_kl, jsd, got ", divergence);
  return p;
}

void check_2d(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 2, what, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.is_contiguous(), what, " must be contiguous");
}

// labels int64 [M], every value in [0, V) or == ignore_index; returns the data pointer (or null).
const int64_t* check_labels(const c10::optional<at::Tensor>& labels, int64_t M, int64_t V,
                            int64_t ignore_index) {
  if (!labels.has_value()) return nullptr;
  const at::Tensor& l = *labels;
  TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, "labels must be int64, got ", l.scalar_type());
  TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == M && l.is_contiguous() && l.device().is_cpu(),
                    "labels must be a contiguous CPU tensor of shape [", M, "], got ", l.sizes());
  const int64_t* p = l.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK_VALUE(p[i] == ignore_index || (p[i] >= 0 && p[i] < V), "labels: value ", p[i],
                      " is outside [0, ", V, ") and is not ignore_index=", ignore_index);
  return p;
}

// Rows of a [rows, V] problem in parallel; each row is ~V exps, so small grains pay off.
void run_rows(const dk::Params& P, const void* s, DType sdt, const void* t, DType tdt,
              const int64_t* labels, int64_t ignore_index, int64_t rows, int64_t V, float* loss,
              void* g, DType gdt, const float* token_scale) {
  const dk::RowFn fn = dk::row_fn();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    dk::rows(fn, s, sdt, V, t, tdt, V, labels, ignore_index, V, b, e, P, loss, g, gdt, V,
             token_scale);
  });
}

// Checks shared by both ops: student and teacher [M, V] contiguous CPU fp32/fp16/bf16 of one
// shape, V >= 1, the loss parameters, labels in range (or none, and then alpha == 1).
struct Rows {
  DType sdt, tdt;
  dk::Params P;
  int64_t M, V;
  const int64_t* labels;
};

Rows check_rows(const at::Tensor& student, const at::Tensor& teacher,
                const c10::optional<at::Tensor>& labels, double temperature, double alpha,
                c10::string_view divergence, double beta, int64_t ignore_index) {
  check_2d(student, "student");
  check_2d(teacher, "teacher");
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "student ", student.sizes(),
                    " and teacher ", teacher.sizes(), " must have the same shape");
  Rows r;
  r.sdt = kernel_dtype(student, "student");
  r.tdt = kernel_dtype(teacher, "teacher");
  r.P = make_params(temperature, alpha, divergence, beta);
  r.M = student.size(0);
  r.V = student.size(1);
  TORCH_CHECK_VALUE(r.V >= 1, "vocab size must be >= 1, got ", r.V);
  r.labels = check_labels(labels, r.M, r.V, ignore_index);
  // (labels of an empty batch have no data pointer: ask whether labels were given, not that)
  TORCH_CHECK_VALUE(labels.has_value() || r.P.alpha == 1.0f,
                    "labels=None leaves no hard-label term, so alpha must be 1.0, got ", alpha);
  return r;
}

std::tuple<at::Tensor, at::Tensor> distillation_loss(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    double temperature, double alpha, c10::string_view divergence, double beta,
    int64_t ignore_index, bool compute_grad) {
  const Rows r = check_rows(student, teacher, labels, temperature, alpha, divergence, beta,
                            ignore_index);
  at::Tensor loss = at::empty({r.M}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty_like(student) : at::empty({0}, student.options());
  run_rows(r.P, student.data_ptr(), r.sdt, teacher.data_ptr(), r.tdt, r.labels, ignore_index,
           r.M, r.V, loss.data_ptr<float>(), compute_grad ? grad.data_ptr() : nullptr, r.sdt,
           nullptr);
  return {loss, grad};
}

// The per-chunk kernel of the fused-linear loop (qtorch/reference/distillation.py): the
// gradient, times token_scale_i, overwrites the student logits row by row. In place is safe
// because the gradient has the student's dtype (same element positions) and the row kernel
// reads element j of a row before it writes element j, and never reads it again afterwards.
at::Tensor distillation_loss_inplace(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& token_scale, double temperature, double alpha,
    c10::string_view divergence, double beta, int64_t ignore_index, bool compute_grad) {
  const Rows r = check_rows(student, teacher, labels, temperature, alpha, divergence, beta,
                            ignore_index);
  at::Tensor ts;
  if (token_scale.has_value()) {
    ts = token_scale->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(ts.dim() == 1 && ts.size(0) == r.M && ts.device().is_cpu(),
                      "token_scale must be a CPU tensor of shape [", r.M, "], got ", ts.sizes());
  }
  at::Tensor loss = at::empty({r.M}, student.options().dtype(at::kFloat));
  run_rows(r.P, student.data_ptr(), r.sdt, teacher.data_ptr(), r.tdt, r.labels, ignore_index,
           r.M, r.V, loss.data_ptr<float>(), compute_grad ? student.data_ptr() : nullptr, r.sdt,
           ts.defined() ? ts.data_ptr<float>() : nullptr);
  return loss;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m) {
  m.def(
      "distillation_loss(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
      "float alpha, str divergence, float beta, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "distillation_loss_inplace(Tensor(a!) student, Tensor teacher, Tensor? labels, "
      "Tensor? token_scale, float temperature, float alpha, str divergence, float beta, "
      "int ignore_index, bool compute_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) {
  m.impl("distillation_loss", &distillation_loss);
  m.impl("distillation_loss_inplace", &distillation_loss_inplace);
}
