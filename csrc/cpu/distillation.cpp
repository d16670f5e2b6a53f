// Torch binding of the distillation-loss kernels (csrc/cpu/kernels/distillation.h): schemas in the
// `qtorch_cpu` namespace, the checks that keep every kernel access in bounds (shapes, dtypes,
// contiguity, label range), allocation and threading (at::parallel_for over rows).
//
//   qtorch_cpu::distillation_loss(student [M, V], teacher [M, V], labels int64 [M]?, T, alpha,
//       divergence, beta, ignore_index, compute_grad)
//       -> (loss f32 [M], grad [M, V] student.dtype = d loss_i / d student_i, or empty [0])
//   qtorch_cpu::fused_linear_distillation_loss(student_hidden [M, H], student_weight [V, H],
//       teacher_hidden [M, Ht], teacher_weight [V, Ht], labels int64 [M]?, student_bias [V]?,
//       teacher_bias [V]?, token_scale f32 [M]?, chunk_size, T, alpha, divergence, beta,
//       ignore_index, compute_grad)
//       -> (loss f32 [M], grad_hidden [M, H], grad_weight [V, H], grad_bias [V]) of
//          Σ_i token_scale_i · loss_i, each in its tensor's dtype (empty [0] when absent).
//       Token chunks of `chunk_size` rows (<= 0: ~2M logits per chunk): logits in fp32 by BLAS,
//       the row kernel writes the fp32 gradient over the student logits in place, then
//       grad_hidden = g @ W_s, grad_W += g.T @ h_s, grad_b += Σ_rows g (fp32 accumulators).
//       Peak extra memory: two [chunk, V] fp32 blocks + fp32 copies of W/grad_W when the
//       weights are not fp32; never [M, V].
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
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
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

std::tuple<at::Tensor, at::Tensor> distillation_loss(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    double temperature, double alpha, c10::string_view divergence, double beta,
    int64_t ignore_index, bool compute_grad) {
  check_2d(student, "student");
  check_2d(teacher, "teacher");
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "student ", student.sizes(),
                    " and teacher ", teacher.sizes(), " must have the same shape");
  const DType sdt = kernel_dtype(student, "student"), tdt = kernel_dtype(teacher, "teacher");
  const dk::Params P = make_params(temperature, alpha, divergence, beta);
  const int64_t M = student.size(0), V = student.size(1);
  TORCH_CHECK_VALUE(V >= 1, "vocab size must be >= 1, got ", V);
  const int64_t* lab = check_labels(labels, M, V, ignore_index);
  TORCH_CHECK_VALUE(lab != nullptr || P.alpha == 1.0f,
                    "labels=None leaves no hard-label term, so alpha must be 1.0, got ", alpha);
  at::Tensor loss = at::empty({M}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty_like(student) : at::empty({0}, student.options());
  run_rows(P, student.data_ptr(), sdt, teacher.data_ptr(), tdt, lab, ignore_index, M, V,
           loss.data_ptr<float>(), compute_grad ? grad.data_ptr() : nullptr, sdt, nullptr);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_distillation_loss(
    const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ht, const at::Tensor& wt,
    const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& bs,
    const c10::optional<at::Tensor>& bt, const c10::optional<at::Tensor>& token_scale,
    int64_t chunk_size, double temperature, double alpha, c10::string_view divergence,
    double beta, int64_t ignore_index, bool compute_grad) {
  check_2d(hs, "student_hidden");
  check_2d(ws, "student_weight");
  check_2d(ht, "teacher_hidden");
  check_2d(wt, "teacher_weight");
  for (const at::Tensor* t : {&hs, &ws, &ht, &wt}) kernel_dtype(*t, "hidden states and weights");
  const int64_t M = hs.size(0), H = hs.size(1), V = ws.size(0);
  TORCH_CHECK_VALUE(ws.size(1) == H, "student_weight ", ws.sizes(), " must be [V, H] with H=", H,
                    " of student_hidden ", hs.sizes());
  TORCH_CHECK_VALUE(ht.size(0) == M && wt.size(1) == ht.size(1),
                    "teacher_hidden ", ht.sizes(), " and teacher_weight ", wt.sizes(),
                    " must be [M, Ht] and [V, Ht] with M=", M);
  TORCH_CHECK_VALUE(wt.size(0) == V, "student and teacher vocab sizes must match: student_weight ",
                    ws.sizes(), " vs teacher_weight ", wt.sizes());
  TORCH_CHECK_VALUE(V >= 1, "vocab size must be >= 1, got ", V);
  for (const auto* b : {&bs, &bt})
    if (b->has_value())
      TORCH_CHECK_VALUE((*b)->dim() == 1 && (*b)->size(0) == V, "bias must have shape [", V,
                        "], got ", (*b)->sizes());
  const float* ts = nullptr;
  at::Tensor ts_c;
  if (token_scale.has_value()) {
    ts_c = token_scale->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(ts_c.dim() == 1 && ts_c.size(0) == M, "token_scale must have shape [", M,
                      "], got ", ts_c.sizes());
    ts = ts_c.data_ptr<float>();
  }
  const dk::Params P = make_params(temperature, alpha, divergence, beta);
  const int64_t* lab = check_labels(labels, M, V, ignore_index);
  TORCH_CHECK_VALUE(lab != nullptr || P.alpha == 1.0f,
                    "labels=None leaves no hard-label term, so alpha must be 1.0, got ", alpha);

  const auto f32 = hs.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({M}, f32);
  at::Tensor empty = at::empty({0}, hs.options());
  at::Tensor grad_h = compute_grad ? at::empty_like(hs) : empty;
  if (M == 0) {
    at::Tensor gw = compute_grad ? at::zeros_like(ws) : at::empty({0}, hs.options());
    at::Tensor gb = compute_grad && bs.has_value() ? at::zeros_like(*bs) : at::empty({0}, hs.options());
    return {loss, grad_h, gw, gb};
  }
  // The logits are defined in fp32 (as the reference computes them): fp32 views of the
  // weights (no copy for fp32 weights), fp32 accumulators for the weight/bias gradients.
  const at::Tensor ws32 = ws.to(at::kFloat), wt32 = wt.to(at::kFloat);
  const at::Tensor bs32 = bs.has_value() ? bs->to(at::kFloat) : at::Tensor();
  const at::Tensor bt32 = bt.has_value() ? bt->to(at::kFloat) : at::Tensor();
  at::Tensor gw32 = compute_grad ? at::zeros({V, H}, f32) : at::Tensor();
  at::Tensor gb32 = compute_grad && bs.has_value() ? at::zeros({V}, f32) : at::Tensor();

  const int64_t chunk = std::min<int64_t>(
      M, chunk_size > 0 ? chunk_size : std::max<int64_t>(1, (int64_t(2) << 20) / V));
  at::Tensor s_buf = at::empty({chunk, V}, f32), t_buf = at::empty({chunk, V}, f32);
  at::Tensor gh32 = compute_grad && hs.scalar_type() != at::kFloat ? at::empty({chunk, H}, f32)
                                                                   : at::Tensor();
  for (int64_t start = 0; start < M; start += chunk) {
    const int64_t n = std::min(chunk, M - start);
    const at::Tensor h = hs.narrow(0, start, n).to(at::kFloat);
    const at::Tensor htc = ht.narrow(0, start, n).to(at::kFloat);
    at::Tensor s = s_buf.narrow(0, 0, n), t = t_buf.narrow(0, 0, n);
    if (bs32.defined()) at::addmm_out(s, bs32, h, ws32.t());
    else at::mm_out(s, h, ws32.t());
    if (bt32.defined()) at::addmm_out(t, bt32, htc, wt32.t());
    else at::mm_out(t, htc, wt32.t());
    // Each row's gradient overwrites its own student logits: the kernel reads element j of a
    // row before it writes it, and never reads it again afterwards.
    run_rows(P, s.data_ptr(), DType::F32, t.data_ptr(), DType::F32,
             lab != nullptr ? lab + start : nullptr, ignore_index, n, V,
             loss.data_ptr<float>() + start, compute_grad ? s.data_ptr() : nullptr,
             DType::F32, ts != nullptr ? ts + start : nullptr);
    if (!compute_grad) continue;
    const at::Tensor& g = s;
    if (gh32.defined()) {
      at::Tensor ghc = gh32.narrow(0, 0, n);
      at::mm_out(ghc, g, ws32);
      grad_h.narrow(0, start, n).copy_(ghc);
    } else {
      at::Tensor ghc = grad_h.narrow(0, start, n);
      at::mm_out(ghc, g, ws32);
    }
    gw32.addmm_(g.t(), h);
    if (gb32.defined()) gb32.add_(g.sum(0));
  }
  if (!compute_grad) return {loss, empty, at::empty({0}, hs.options()), at::empty({0}, hs.options())};
  at::Tensor gw = gw32.to(ws.scalar_type());
  at::Tensor gb = gb32.defined() ? gb32.to(bs->scalar_type()) : at::empty({0}, hs.options());
  return {loss, grad_h, gw, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m) {
  m.def(
      "distillation_loss(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
      "float alpha, str divergence, float beta, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "fused_linear_distillation_loss(Tensor student_hidden, Tensor student_weight, "
      "Tensor teacher_hidden, Tensor teacher_weight, Tensor? labels, Tensor? student_bias, "
      "Tensor? teacher_bias, Tensor? token_scale, int chunk_size, float temperature, "
      "float alpha, str divergence, float beta, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) {
  m.impl("distillation_loss", &distillation_loss);
  m.impl("fused_linear_distillation_loss", &fused_linear_distillation_loss);
}
