// Torch binding of the W8A8 int8 kernels (csrc/cpu/kernels/int8_mm.h): schemas in the
// `qtorch_cpu` namespace, argument checks that keep every kernel access in bounds, buffer
// allocation and threading (at::parallel_for over weight panels x row blocks).
//
//   qtorch_cpu::pack_int8_mm(w s8 [N, K]) -> u8 [packed_b_bytes(N, K)]
//       VNNI panels + compensation (layout in int8_mm.h): a quantized module packs once and
//       keeps it (qtorch/nn/linear.py); an op on a canonical weight packs per call.
//   qtorch_cpu::unpack_int8_mm(w_packed, N, K) -> s8 [N, K], bitwise what was packed
//   qtorch_cpu::quantize_int8(x [M, K] f32/f16/bf16) -> (q s8 [M, K], scale f32 [M])
//   qtorch_cpu::int8_scaled_mm(a s8 [M, K], b_packed, N, scale_a f32 [M], scale_b f32 [N],
//       bias f32 [N]?, out_dtype f32/f16/bf16/int32) -> [M, N]
//       out_dtype=int32 is a test hook: the exact int32 a @ b.T, scales and bias ignored.
//   qtorch_cpu::int8_linear(x [M, K] float, w_packed, N, w_scale f32 [N], bias [N]?,
//       smooth f32 [K]?) -> [M, N] x.dtype; x (divided by smooth, SmoothQuant, when given) is
//       quantized per row straight into the packed-A buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "alloc.h"
#include "bindings.h"
#include "scratch.h"
#include "kernels/int8_mm.h"

namespace im = qtorch::cpu::int8_mm;
using qtorch::cpu::DType;

// The largest K whose int32 dot products of int8 values cannot overflow: 128 * 128 * K must
// stay <= 2^31 - 1 (API.md promises exact int32 accumulation).
constexpr int64_t kMaxExactK = ((int64_t(1) << 31) - 1) / (128 * 128);  // 131071

namespace {

DType kernel_dtype(at::ScalarType t, const char* what, bool allow_int32) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kInt:
      if (allow_int32) return DType::S32;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, what, " must be float32, float16 or bfloat16", allow_int32 ? " (or int32)" : "",
                       ", got ", t);
  }
}

void check_2d(const at::Tensor& t, const char* what, at::ScalarType dt) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, what, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, what, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, " must be a CPU tensor");
}

at::Tensor f32_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, what, " must have shape [", n, "], got ",
                    t.sizes());
  return qtorch::cpu::f32_contiguous(t);
}

}  // namespace

namespace qtorch::cpu::binding {

void check_int8_packed(const at::Tensor& bp, int64_t N, int64_t K) {
  TORCH_CHECK_TYPE(bp.scalar_type() == at::kByte, "packed weight must be uint8");
  TORCH_CHECK_VALUE(bp.dim() == 1 && bp.is_contiguous() && bp.numel() == im::packed_b_bytes(N, K),
                    "packed weight does not match N=", N, ", K=", K, " (", bp.numel(),
                    " bytes, expected ", im::packed_b_bytes(N, K), ")");
  int64_t trailer[3];  // memcpy: a user-made tensor need not be 8-byte aligned
  std::memcpy(trailer, im::packed_b_trailer(bp.data_ptr<uint8_t>(), bp.numel()), sizeof trailer);
  TORCH_CHECK_VALUE(trailer[0] == im::kPackMagic && trailer[1] == N && trailer[2] == K,
                    "packed weight was packed for another shape (N=", trailer[1], ", K=",
                    trailer[2], "), not N=", N, ", K=", K);
}

}  // namespace qtorch::cpu::binding

namespace {

using qtorch::cpu::binding::check_int8_packed;

// Threads: items are (panel, row block) pairs, panel-major, so a thread's contiguous share
// walks consecutive panels and reuses each 64 x K weight panel (L2-resident) across all of its
// rows. Rows are split only when there are too few panels to keep every thread busy.
void run_gemm(const uint8_t* ap, int64_t M, int64_t K, const uint8_t* bp, int64_t N,
              const im::Epilogue& ep) {
  if (M == 0 || N == 0) return;
  const int64_t np = im::num_panels(N);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  int64_t nmb = 1;
  if (np < 4 * nt) nmb = std::min<int64_t>((M + 23) / 24, (4 * nt + np - 1) / np);
  nmb = std::max<int64_t>(nmb, 1);
  const int64_t mb = (M + nmb - 1) / nmb;
  at::parallel_for(0, np * nmb, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t p = it / nmb, m0 = (it % nmb) * mb, m1 = std::min(M, m0 + mb);
      if (m0 < m1) im::gemm(ap, K, bp, N, m0, m1, p, p + 1, ep);
    }
  });
}

// Packs w (s8 [N, K], contiguous) into bp: the panels split over threads, in tasks of at least
// 256 KiB of packed weight (a small weight stays on one thread), then the trailer.
void pack_weight(const int8_t* w, int64_t N, int64_t K, uint8_t* bp) {
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 18) / (im::kPanel * im::padded_k(K)));
  at::parallel_for(0, im::num_panels(N), grain, [&](int64_t b, int64_t e) {
    im::pack_b_panels(w, N, K, K, b, e, bp);
  });
  im::pack_b_trailer(N, K, bp);
}

at::Tensor pack_int8_mm(const at::Tensor& w_in) {
  check_2d(w_in, "w", at::kChar);
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t bytes = im::packed_b_bytes(N, K);
  // Large packed weights are streamed from DRAM at small M: huge pages (alloc.h).
  at::Tensor packed = qtorch::cpu::huge_page_empty({bytes}, at::kByte, "pack_int8_mm");
  pack_weight(w.data_ptr<int8_t>(), N, K, packed.data_ptr<uint8_t>());
  return packed;
}

// The canonical int8 weight [N, K] back from a packed one (bitwise).
at::Tensor unpack_int8_mm(const at::Tensor& wp, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(N >= 1 && K >= 1, "unpack_int8_mm: bad N=", N, ", K=", K);
  check_int8_packed(wp, N, K);
  at::Tensor w = at::empty({N, K}, wp.options().dtype(at::kChar));
  im::unpack_b(wp.data_ptr<uint8_t>(), N, K, w.data_ptr<int8_t>());
  return w;
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x must be 2-D, got shape ", x_in.sizes());
  const DType xt = kernel_dtype(x_in.scalar_type(), "x", false);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  if (K == 0) return {q, s.fill_(1.0)};
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 18) / K), [&](int64_t b, int64_t e) {
    im::quantize_rows(x.data_ptr(), xt, K, K, b, e, s.data_ptr<float>(), q.data_ptr<int8_t>(),
                      K, nullptr);
  });
  return {q, s};
}

at::Tensor int8_scaled_mm(const at::Tensor& a_in, const at::Tensor& bp, int64_t N,
                                 const at::Tensor& scale_a, const at::Tensor& scale_b,
                                 const std::optional<at::Tensor>& bias,
                                 at::ScalarType out_dtype) {
  check_2d(a_in, "a", at::kChar);
  const DType ot = kernel_dtype(out_dtype, "out_dtype", true);
  const at::Tensor a = a_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1);
  TORCH_CHECK_VALUE(K >= 1 && N >= 0, "int8_scaled_mm: need K >= 1, got K=", K);
  // Exact int32 accumulation needs 128 * 128 * K <= 2^31 - 1 (the op checks it first).
  TORCH_CHECK_VALUE(K <= kMaxExactK, "int8_scaled_mm: K=", K, " exceeds ", kMaxExactK,
                    ", beyond which the int32 accumulation can overflow");
  check_int8_packed(bp, N, K);
  const at::Tensor sa = f32_vector(scale_a, M, "scale_a"), sb = f32_vector(scale_b, N, "scale_b");
  at::Tensor b32;
  if (bias.has_value()) b32 = f32_vector(*bias, N, "bias");
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const int64_t Kp = im::padded_k(K);
  at::Tensor ap = at::empty({M, Kp}, a.options().dtype(at::kByte));
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 20) / Kp), [&](int64_t b, int64_t e) {
    im::pack_a(a.data_ptr<int8_t>(), K, K, b, e, ap.data_ptr<uint8_t>());
  });
  im::Epilogue ep;
  ep.scale_a = sa.data_ptr<float>();
  ep.scale_b = sb.data_ptr<float>();
  ep.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
  ep.out = out.data_ptr();
  ep.ldo = N;
  ep.type = ot;
  run_gemm(ap.data_ptr<uint8_t>(), M, K, bp.data_ptr<uint8_t>(), N, ep);
  return out;
}

}  // namespace

namespace qtorch::cpu::binding {

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& wp, int64_t N,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& smooth) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x must be 2-D, got shape ", x_in.sizes());
  const DType xt = kernel_dtype(x_in.scalar_type(), "x", false);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(K >= 1, "int8_linear: need K >= 1, got K=", K);
  TORCH_CHECK_VALUE(K <= kMaxExactK, "int8_linear: K=", K, " exceeds ", kMaxExactK,
                    ", beyond which the int32 accumulation can overflow");
  check_int8_packed(wp, N, K);
  const at::Tensor sb = f32_vector(w_scale, N, "w_scale");
  at::Tensor b32, sm;
  if (bias.has_value()) b32 = f32_vector(*bias, N, "bias");
  if (smooth.has_value()) sm = f32_vector(*smooth, K, "smooth_scale");
  const float* smp = sm.defined() ? sm.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const int64_t Kp = im::padded_k(K);
  // Fused activation quantization (with SmoothQuant's x / s, when smooth is given): rows are quantized straight into packed A (u8, +128),
  // held in per-thread scratch at decode sizes (scratch.h).
  at::Tensor ap_hold, sa_hold;
  uint8_t* ap = qtorch::cpu::temp<uint8_t>(0, M * Kp, at::kByte, ap_hold);
  float* sa = qtorch::cpu::temp<float>(1, M, at::kFloat, sa_hold);
  // Rows per task >= 2^18 / K: the quantizer streams ~3 elements/cycle, so smaller shares
  // cost less serially than a second fork/join (which, on a loaded machine, can cost a
  // scheduler quantum when a worker is descheduled).
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 18) / Kp), [&](int64_t b, int64_t e) {
    im::quantize_rows(x.data_ptr(), xt, K, K, b, e, sa, nullptr, 0, ap, smp);
  });
  im::Epilogue ep;
  ep.scale_a = sa;
  ep.scale_b = sb.data_ptr<float>();
  ep.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
  ep.out = out.data_ptr();
  ep.ldo = N;
  ep.type = xt;
  run_gemm(ap, M, K, wp.data_ptr<uint8_t>(), N, ep);
  return out;
}

// The same two on a canonical weight w_q s8 [N, K], packed for this call only (into this
// thread's scratch when it fits): an op keeps nothing between calls, a quantized module keeps
// its packed weight instead (csrc/cpu/linear_packed.cpp).
at::Tensor pack_for_call(const at::Tensor& w_q, at::Tensor& hold) {
  check_2d(w_q, "w_q", at::kChar);
  const at::Tensor w = w_q.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t bytes = im::packed_b_bytes(N, K);
  uint8_t* bp = qtorch::cpu::temp<uint8_t>(qtorch::cpu::kPackSlot, bytes, at::kByte, hold);
  pack_weight(w.data_ptr<int8_t>(), N, K, bp);
  return qtorch::cpu::temp_tensor(bp, bytes, at::kByte, hold);
}

at::Tensor int8_linear_canonical(const at::Tensor& x, const at::Tensor& w_q,
                                 const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& smooth) {
  at::Tensor hold;
  const at::Tensor wp = pack_for_call(w_q, hold);
  return int8_linear(x, wp, w_q.size(0), w_scale, bias, smooth);
}

}  // namespace qtorch::cpu::binding

namespace {

at::Tensor int8_scaled_mm_canonical(const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& scale_a, const at::Tensor& scale_b,
                                    const std::optional<at::Tensor>& bias,
                                    at::ScalarType out_dtype) {
  at::Tensor hold;
  const at::Tensor bp = qtorch::cpu::binding::pack_for_call(b, hold);
  return int8_scaled_mm(a, bp, b.size(0), scale_a, scale_b, bias, out_dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m) {
  m.def(
      "int8_scaled_mm_canonical(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, "
      "Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def(
      "int8_linear_canonical(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, "
      "Tensor? smooth=None) -> Tensor");
  m.def("pack_int8_mm(Tensor w) -> Tensor");
  m.def("unpack_int8_mm(Tensor w_packed, int N, int K) -> Tensor");
  m.def("quantize_int8(Tensor x) -> (Tensor, Tensor)");
  m.def(
      "int8_scaled_mm(Tensor a, Tensor b_packed, int N, Tensor scale_a, Tensor scale_b, "
      "Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def(
      "int8_linear(Tensor x, Tensor w_packed, int N, Tensor w_scale, Tensor? bias, "
      "Tensor? smooth=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) {
  m.impl("pack_int8_mm", &pack_int8_mm);
  m.impl("unpack_int8_mm", &unpack_int8_mm);
  m.impl("quantize_int8", &quantize_int8);
  m.impl("int8_scaled_mm", &int8_scaled_mm);
  m.impl("int8_linear", &qtorch::cpu::binding::int8_linear);
  m.impl("int8_scaled_mm_canonical", &int8_scaled_mm_canonical);
  m.impl("int8_linear_canonical", &qtorch::cpu::binding::int8_linear_canonical);
}
