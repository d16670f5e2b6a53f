// Torch binding of the weight-only kernels (csrc/cpu/kernels/weight_only.h): schemas in the
// `qtorch_cpu` namespace, argument checks that keep every kernel access in bounds, buffer
// allocation and threading (at::parallel_for over 16-column weight blocks).
//
//   qtorch_cpu::pack_int4_weight_only(qweight u8 [N, K/2], scales f32 [N, G], zeros u8 [N, G],
//       group_size) -> [w u8 [int4_packed_bytes], scale f32 [Nb*G*16], zero u8 [Nb*G*16]]
//       Every int4 entry point also takes float32 zeros (zero_point="float", API.md): the
//       packed zero is then f32 [Nb*G*16] and the kernels read it instead of the byte.
//   qtorch_cpu::pack_int8_weight_only(w_q s8 [N, K], w_scale f32 [N])
//       -> [w s8 [int8_packed_bytes], scale f32 [Nb*16]]
//   qtorch_cpu::unpack_int4_weight_only / unpack_int8_weight_only(packed..., N, K[, group_size])
//       -> the canonical buffers, bitwise what was packed
//       A quantized module packs once and keeps the result (qtorch/nn/linear.py); an op on
//       canonical buffers packs per call. The weight buffer is 2 MiB aligned and madvise(MADV_HUGEPAGE)d: streaming it through 4 KiB
//       pages costs a TLB miss every 4 KiB, which halves the DRAM bandwidth a core sees here.
//   qtorch_cpu::int4_weight_only_linear(x [M, K] f32/f16/bf16, w, scale, zero_packed, N, K,
//       group_size, bias [N]?) -> [M, N] x.dtype
//   qtorch_cpu::int8_weight_only_linear(x [M, K] f32/f16/bf16, w, scale, N, K, bias [N]?)
//       -> [M, N] x.dtype
//   qtorch_cpu::dequantize_int4(qweight, scales, zeros, group_size) -> fp32 [N, K]
//   qtorch_cpu::int4_linear_grad_input(grad_out [M, N] f32/f16/bf16, qweight, scales, zeros,
//       group_size) -> [M, K] grad_out.dtype (the int4 backward, dequantizing per call in
//       cache-sized column slabs)
//
// Activation numerics: fp32 x runs as is (fp32 FMA); bf16 x runs natively on AVX-512
// (vdpbf16ps: exact bf16 x small-integer products, fp32 accumulation) and is widened exactly to
// fp32 elsewhere; fp16 x is widened exactly to fp32. Nothing is rounded below the input's
// precision; the fp32 result (+ bias in fp32) is rounded once to x.dtype, as the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <type_traits>

#include "alloc.h"
#include "bindings.h"
#include "kernels/weight_only.h"
#include "scratch.h"

namespace wm = qtorch::cpu::weight_only;
using qtorch::cpu::DType;

namespace {

void check_tensor(const at::Tensor& t, const char* what, at::ScalarType dt, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, what, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, what, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, " must be a CPU tensor");
}

// A 1-D tensor of `n` elements, 2 MiB aligned and huge-page backed once it spans one (alloc.h).
at::Tensor alloc_aligned(int64_t n, at::ScalarType dt) {
  return qtorch::cpu::huge_page_empty({n}, dt, "pack_weight_only");
}

// Calls f with zeros' data as const uint8_t* (integer zero points) or const float* (float
// zero points, zero_point="float"): each kernel taking zeros has an overload for both.
template <class F>
decltype(auto) with_zeros(const at::Tensor& z, F&& f) {
  if (z.scalar_type() == at::kFloat) return f(z.data_ptr<float>());
  return f(z.data_ptr<uint8_t>());
}

// Canonical int4 storage (API.md): qweight u8 [N, K/2], scales f32 [N, G], zeros u8 or f32
// [N, G], G = K / gs. Returns {N, K, G}.
std::array<int64_t, 3> check_int4_canonical(const at::Tensor& qweight, const at::Tensor& scales,
                                            const at::Tensor& zeros, int64_t gs) {
  check_tensor(qweight, "qweight", at::kByte, 2);
  check_tensor(scales, "scales", at::kFloat, 2);
  check_tensor(zeros, "zeros", zeros.scalar_type() == at::kFloat ? at::kFloat : at::kByte, 2);
  TORCH_CHECK_VALUE(gs == 32 || gs == 64 || gs == 128 || gs == 256,
                    "group_size must be 32, 64, 128 or 256, got ", gs);
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK_VALUE(K % gs == 0, "K=", K, " must be a multiple of group_size=", gs);
  const int64_t G = K / gs;
  TORCH_CHECK_VALUE(scales.size(0) == N && scales.size(1) == G, "scales must have shape [", N,
                    ", ", G, "], got ", scales.sizes());
  TORCH_CHECK_VALUE(zeros.size(0) == N && zeros.size(1) == G, "zeros must have shape [", N,
                    ", ", G, "], got ", zeros.sizes());
  return {N, K, G};
}

// pack_int8 with the 16-channel blocks split over threads, in tasks of at least 256 KiB of
// packed weight (a small weight stays on one thread).
void pack_int8_parallel(const int8_t* w_q, const float* w_scale, int64_t N, int64_t K,
                        int8_t* w_out, float* scale_out) {
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 18) / (wm::kBlock * wm::int8_padded_k(K)));
  at::parallel_for(0, wm::num_blocks(N), grain, [&](int64_t b, int64_t e) {
    wm::pack_int8_blocks(w_q, w_scale, N, K, b, e, w_out, scale_out);
  });
}

std::vector<at::Tensor> pack_int4_weight_only(const at::Tensor& qweight,
                                              const at::Tensor& scales, const at::Tensor& zeros,
                                              int64_t gs) {
  const auto dims = check_int4_canonical(qweight, scales, zeros, gs);
  const int64_t N = dims[0], K = dims[1];
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  at::Tensor w = alloc_aligned(wm::int4_packed_bytes(N, K), at::kByte);
  at::Tensor ps = alloc_aligned(wm::int4_meta_floats(N, K, gs), at::kFloat);
  at::Tensor pz = alloc_aligned(wm::int4_meta_floats(N, K, gs), z.scalar_type());
  with_zeros(z, [&](auto zp) {
    using Z = std::remove_const_t<std::remove_pointer_t<decltype(zp)>>;
    wm::pack_int4(q.data_ptr<uint8_t>(), s.data_ptr<float>(), zp, N, K, gs,
                  w.data_ptr<uint8_t>(), ps.data_ptr<float>(), pz.data_ptr<Z>());
  });
  return {w, ps, pz};
}

// ŵ[n0:n1, k0:k1] = (q - zero) * scale in fp32 into dst (row stride ldd), bitwise the
// reference's: one subtraction (exact for integer zero points), one rounded multiply. k0, k1
// even. Z: uint8_t or float zero points.
template <class Z>
void dequant_block(const uint8_t* qp, const float* sp, const Z* zp, int64_t K, int64_t G,
                   int64_t gs, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* dst,
                   int64_t ldd) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = qp + n * (K / 2);
    float* wr = dst + (n - n0) * ldd;  // column k0
    for (int64_t g = k0 / gs; g * gs < k1; ++g) {
      const float sc = sp[n * G + g], zf = float(zp[n * G + g]);
      const int64_t a = std::max(k0, g * gs) / 2, b = std::min(k1, (g + 1) * gs) / 2;
      for (int64_t i = a; i < b; ++i) {  // even k in the low nibble
        wr[2 * i - k0] = (float(qr[i] & 0xF) - zf) * sc;
        wr[2 * i + 1 - k0] = (float(qr[i] >> 4) - zf) * sc;
      }
    }
  }
}

// The whole ŵ [N, K] in fp32, rows in parallel (the reference's tensor-op version makes ~7
// passes over [N, K] fp32, this makes one).
at::Tensor dequantize_int4(const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t gs) {
  const auto dims = check_int4_canonical(qweight, scales, zeros, gs);
  const int64_t N = dims[0], K = dims[1], G = dims[2];
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  at::Tensor w = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  with_zeros(z, [&](auto zp) {
    at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K, 1)),
                     [&](int64_t n0, int64_t n1) {
      dequant_block(qp, sp, zp, K, G, gs, n0, n1, 0, K, wp + n0 * K, K);
    });
  });
  return w;
}

// Backward of the W4A16 linear w.r.t. x: grad_out [M, N] @ ŵ [N, K] -> [M, K] in
// grad_out.dtype, fp32 math as the reference (grad_out widened exactly, the same ŵ, an fp32
// GEMM, one rounding at the end). ŵ is never built whole: each task dequantizes a column slab
// ŵ[:, k0:k0+kc] into a per-task buffer (N x kc fp32) and runs the slab's GEMM from it while
// it is cache-resident, writing its own columns of the result.
// Against dequantize-then-matmul this skips an [N, K] fp32 tensor (64 MiB at 4096^2: fresh
// pages, one write and one read of DRAM) per backward call. Each output element is still one
// fp32 BLAS dot over all of n, as in the reference's single matmul (bitwise equal in the tests
// with this torch's BLAS, which is not a contract: the tests allow fp32 rounding).
at::Tensor int4_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& qweight,
                                  const at::Tensor& scales, const at::Tensor& zeros, int64_t gs) {
  const auto dims = check_int4_canonical(qweight, scales, zeros, gs);
  const int64_t N = dims[0], K = dims[1], G = dims[2];
  const auto dt = grad_out.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "grad_out must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(1) == N,
                    "grad_out must have shape [M, ", N, "], got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.device().is_cpu(), "grad_out must be a CPU tensor");
  const at::Tensor g = qtorch::cpu::f32_contiguous(grad_out);
  const int64_t M = g.size(0);
  at::Tensor out = at::empty({M, K}, g.options());
  if (M == 0 || K == 0) return out.to(dt);
  if (N == 0) return out.zero_().to(dt);
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  // Slab width: narrow slabs keep the buffer in L2 (N x 64 fp32 = 1 MiB at N = 4096), which
  // pays while dequantizing dominates (small M); wider ones give the GEMM a better shape once
  // it dominates. 4096^2 g128, 2 threads, vs dequantize-then-matmul: kc = 64 is 7.3x at M = 1
  // and 4.5x at M = 16 but 0.96x at M = 1024, where kc = 256 is 1.11x.
  const int64_t kc = std::min<int64_t>(K, M <= 32 ? 64 : M <= 256 ? 128 : 256);
  const int64_t slabs = (K + kc - 1) / kc;
  at::parallel_for(0, slabs, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor buf = at::empty({N, kc}, g.options());
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * kc, w = std::min(kc, K - k0);
      with_zeros(z, [&](auto zp) {
        dequant_block(qp, sp, zp, K, G, gs, 0, N, k0, k0 + w, buf.data_ptr<float>(), kc);
      });
      at::Tensor dst = out.narrow(1, k0, w);
      at::mm_out(dst, g, buf.narrow(1, 0, w));
    }
  });
  return out.to(dt);
}

// The canonical buffers back from a packed int4 weight (bitwise): [qweight u8 [N, K/2],
// scales f32 [N, G], zeros u8 [N, G]].
std::vector<at::Tensor> unpack_int4_weight_only(const at::Tensor& w, const at::Tensor& scale,
                                                const at::Tensor& zero, int64_t N, int64_t K,
                                                int64_t gs) {
  qtorch::cpu::binding::check_int4_packed(w, scale, zero, N, K, gs);
  const int64_t G = K / gs;
  at::Tensor q = at::empty({N, K / 2}, w.options().dtype(at::kByte));
  at::Tensor s = at::empty({N, G}, w.options().dtype(at::kFloat));
  at::Tensor z = at::empty({N, G}, w.options().dtype(zero.scalar_type()));
  with_zeros(zero, [&](auto zp) {
    using Z = std::remove_const_t<std::remove_pointer_t<decltype(zp)>>;
    wm::unpack_int4(w.data_ptr<uint8_t>(), scale.data_ptr<float>(), zp, N, K, gs,
                    q.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<Z>());
  });
  return {q, s, z};
}

// [w_q s8 [N, K], w_scale f32 [N]] back from a packed int8 weight (bitwise).
std::vector<at::Tensor> unpack_int8_weight_only(const at::Tensor& w, const at::Tensor& scale,
                                                int64_t N, int64_t K) {
  qtorch::cpu::binding::check_int8wo_packed(w, scale, N, K);
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor s = at::empty({N}, w.options().dtype(at::kFloat));
  wm::unpack_int8(w.data_ptr<int8_t>(), scale.data_ptr<float>(), N, K, q.data_ptr<int8_t>(),
                  s.data_ptr<float>());
  return {q, s};
}

std::vector<at::Tensor> pack_int8_weight_only(const at::Tensor& w_q,
                                              const at::Tensor& w_scale) {
  check_tensor(w_q, "w_q", at::kChar, 2);
  check_tensor(w_scale, "w_scale", at::kFloat, 1);
  const int64_t N = w_q.size(0), K = w_q.size(1);
  TORCH_CHECK_VALUE(w_scale.size(0) == N, "w_scale must have shape [", N, "], got ",
                    w_scale.sizes());
  const at::Tensor q = w_q.contiguous(), s = w_scale.contiguous();
  at::Tensor w = alloc_aligned(wm::int8_packed_bytes(N, K), at::kChar);
  at::Tensor ps = alloc_aligned(wm::num_blocks(N) * wm::kBlock, at::kFloat);
  pack_int8_parallel(q.data_ptr<int8_t>(), s.data_ptr<float>(), N, K, w.data_ptr<int8_t>(),
                     ps.data_ptr<float>());
  return {w, ps};
}

// x as the kernel takes it: bf16 stays bf16 where the ISA has vdpbf16ps, everything else is
// widened (exactly) to fp32; `kp` columns, zero-padded past K.
std::pair<at::Tensor, DType> kernel_activations(const at::Tensor& x, int64_t kp) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor");
  const bool native_bf16 = x.scalar_type() == at::kBFloat16 && wm::supports_act(DType::BF16);
  const at::ScalarType kt = native_bf16 ? at::kBFloat16 : at::kFloat;
  const DType act = native_bf16 ? DType::BF16 : DType::F32;
  const int64_t K = x.size(1);
  if (kp == K) {
    if (x.scalar_type() == kt && x.is_contiguous()) return {x, act};
    return {x.to(kt).contiguous(), act};
  }
  at::Tensor xp = at::zeros({x.size(0), kp}, x.options().dtype(kt));
  xp.narrow(1, 0, K).copy_(x);
  return {xp, act};
}

at::Tensor col_bias_f32(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N,
                    "], got ", bias->sizes());
  return qtorch::cpu::f32_contiguous(*bias);
}

// Splits the weight blocks over threads. Each thread streams a contiguous run of blocks (a
// contiguous range of the packed buffer), which is what a DRAM-bound decode wants.
template <class F>
void for_blocks(int64_t M, int64_t N, int64_t K, F&& fn) {
  const int64_t Nb = wm::num_blocks(N);
  // Keep tiny problems on one thread: a block is 16 * K MACs per row.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, 16 * K * M));
  at::parallel_for(0, Nb, grain, [&](int64_t b, int64_t e) { fn(b, e); });
}

// The kernels write an fp32 result. For fp32 x that is the output itself; otherwise it goes to
// (per-thread scratch at decode sizes) and each thread casts its own columns to x.dtype right
// after computing them (while they are in cache), in the same parallel region: no second op.
struct Output {
  at::Tensor out, hold;
  float* y = nullptr;  // [M, N] fp32
  int64_t M = 0, N = 0;
  Output(const at::Tensor& x, int64_t M_, int64_t N_) : M(M_), N(N_) {
    out = at::empty({M, N}, x.options());
    y = x.scalar_type() == at::kFloat ? out.data_ptr<float>()
                                      : qtorch::cpu::temp<float>(2, M * N, at::kFloat, hold);
  }
  // Cast columns of blocks [b, e) (clipped to N) of every row: RNE, as Tensor.to does.
  void cast_blocks(int64_t b, int64_t e) const {
    if (out.scalar_type() == at::kFloat) return;
    const int64_t n0 = b * wm::kBlock, n1 = std::min(N, e * wm::kBlock);
    if (out.scalar_type() == at::kBFloat16) {
      auto* o = out.data_ptr<at::BFloat16>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) o[m * N + n] = at::BFloat16(y[m * N + n]);
    } else {
      auto* o = out.data_ptr<at::Half>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) o[m * N + n] = at::Half(y[m * N + n]);
    }
  }
};

}  // namespace

namespace qtorch::cpu::binding {

void check_int4_packed(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t N, int64_t K, int64_t gs) {
  TORCH_CHECK_VALUE(gs == 32 || gs == 64 || gs == 128 || gs == 256,
                    "group_size must be 32, 64, 128 or 256, got ", gs);
  TORCH_CHECK_VALUE(N >= 1 && K >= 1 && K % gs == 0, "bad N=", N, ", K=", K, " for group_size ",
                    gs);
  check_tensor(w, "packed weight", at::kByte, 1);
  check_tensor(scale, "packed scale", at::kFloat, 1);
  check_tensor(zero, "packed zero", zero.scalar_type() == at::kFloat ? at::kFloat : at::kByte, 1);
  TORCH_CHECK_VALUE(w.numel() == wm::int4_packed_bytes(N, K) && w.is_contiguous(),
                    "packed weight does not match N=", N, ", K=", K);
  TORCH_CHECK_VALUE(scale.numel() == wm::int4_meta_floats(N, K, gs) && scale.is_contiguous() &&
                        zero.numel() == scale.numel() && zero.is_contiguous(),
                    "packed scale/zero do not match N=", N, ", K=", K, ", group_size=", gs);
}

void check_int8wo_packed(const at::Tensor& w, const at::Tensor& scale, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(N >= 1 && K >= 1, "bad N=", N, ", K=", K);
  check_tensor(w, "packed weight", at::kChar, 1);
  check_tensor(scale, "packed scale", at::kFloat, 1);
  TORCH_CHECK_VALUE(w.numel() == wm::int8_packed_bytes(N, K) && w.is_contiguous(),
                    "packed weight does not match N=", N, ", K=", K);
  TORCH_CHECK_VALUE(scale.numel() == wm::num_blocks(N) * wm::kBlock && scale.is_contiguous(),
                    "packed scale does not match N=", N);
}

at::Tensor int4_weight_only_linear(const at::Tensor& x_in, const at::Tensor& w,
                                   const at::Tensor& scale, const at::Tensor& zero_packed,
                                   int64_t N, int64_t K, int64_t gs,
                                   const std::optional<at::Tensor>& bias) {
  check_int4_packed(w, scale, zero_packed, N, K, gs);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) == K, "x must have shape [M, ", K, "], got ",
                    x_in.sizes());
  const int64_t M = x_in.size(0);
  Output out(x_in, M, N);
  if (M == 0) return out.out;
  auto [x, act] = kernel_activations(x_in, K);
  const at::Tensor cb = col_bias_f32(bias, N);
  at::Tensor xsum_hold;
  float* xsum = qtorch::cpu::temp<float>(0, M * (K / gs), at::kFloat, xsum_hold);
  wm::group_sums(x.data_ptr(), act, M, K, K, gs, xsum);
  wm::Int4Weights wt;
  wt.w = w.data_ptr<uint8_t>();
  wt.scale = scale.data_ptr<float>();
  if (zero_packed.scalar_type() == at::kFloat) wt.zero_f = zero_packed.data_ptr<float>();
  else wt.zero = zero_packed.data_ptr<uint8_t>();
  wt.N = N, wt.K = K, wt.gs = gs;
  for_blocks(M, N, K, [&](int64_t b, int64_t e) {
    wm::Problem p;
    p.x = x.data_ptr(), p.act = act, p.M = M, p.ldx = K;
    p.xsum = xsum;
    p.col_bias = cb.defined() ? cb.data_ptr<float>() : nullptr;
    p.y = out.y, p.ldy = N, p.nb0 = b, p.nb1 = e;
    wm::int4_gemm(wt, p);
    out.cast_blocks(b, e);
  });
  return out.out;
}

at::Tensor int8_weight_only_linear(const at::Tensor& x_in, const at::Tensor& w,
                                   const at::Tensor& scale, int64_t N, int64_t K,
                                   const std::optional<at::Tensor>& bias) {
  check_int8wo_packed(w, scale, N, K);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) == K, "x must have shape [M, ", K, "], got ",
                    x_in.sizes());
  const int64_t M = x_in.size(0), kp = wm::int8_padded_k(K);
  Output out(x_in, M, N);
  if (M == 0) return out.out;
  auto [x, act] = kernel_activations(x_in, kp);
  const at::Tensor cb = col_bias_f32(bias, N);
  wm::Int8Weights wt;
  wt.w = w.data_ptr<int8_t>();
  wt.scale = scale.data_ptr<float>();
  wt.N = N, wt.K = K;
  for_blocks(M, N, K, [&](int64_t b, int64_t e) {
    wm::Problem p;
    p.x = x.data_ptr(), p.act = act, p.M = M, p.ldx = kp;
    p.col_bias = cb.defined() ? cb.data_ptr<float>() : nullptr;
    p.y = out.y, p.ldy = N, p.nb0 = b, p.nb1 = e;
    wm::int8_gemm(wt, p);
    out.cast_blocks(b, e);
  });
  return out.out;
}

// The same two on canonical buffers, packed for this call only (into this thread's scratch
// when they fit): an op keeps nothing between calls, a quantized module keeps its packed
// weight instead (csrc/cpu/linear_packed.cpp).
at::Tensor int4_weight_only_linear_canonical(const at::Tensor& x, const at::Tensor& qweight,
                                             const at::Tensor& scales, const at::Tensor& zeros,
                                             int64_t gs, const std::optional<at::Tensor>& bias) {
  const auto dims = check_int4_canonical(qweight, scales, zeros, gs);
  const int64_t N = dims[0], K = dims[1];
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  const int64_t wb = wm::int4_packed_bytes(N, K), mf = wm::int4_meta_floats(N, K, gs);
  at::Tensor hw, hs, hz;
  uint8_t* w = qtorch::cpu::temp<uint8_t>(qtorch::cpu::kPackSlot, wb, at::kByte, hw);
  float* ps = qtorch::cpu::temp<float>(qtorch::cpu::kPackSlot + 1, mf, at::kFloat, hs);
  const at::ScalarType zt = z.scalar_type();
  at::Tensor pzt = with_zeros(z, [&](auto zp) {
    using Z = std::remove_const_t<std::remove_pointer_t<decltype(zp)>>;
    Z* pz = qtorch::cpu::temp<Z>(qtorch::cpu::kPackSlot + 2, mf, zt, hz);
    wm::pack_int4(q.data_ptr<uint8_t>(), s.data_ptr<float>(), zp, N, K, gs, w, ps, pz);
    return qtorch::cpu::temp_tensor(pz, mf, zt, hz);
  });
  return int4_weight_only_linear(x, qtorch::cpu::temp_tensor(w, wb, at::kByte, hw),
                                 qtorch::cpu::temp_tensor(ps, mf, at::kFloat, hs), pzt, N, K, gs,
                                 bias);
}

at::Tensor int8_weight_only_linear_canonical(const at::Tensor& x, const at::Tensor& w_q,
                                             const at::Tensor& w_scale,
                                             const std::optional<at::Tensor>& bias) {
  check_tensor(w_q, "w_q", at::kChar, 2);
  check_tensor(w_scale, "w_scale", at::kFloat, 1);
  const int64_t N = w_q.size(0), K = w_q.size(1);
  TORCH_CHECK_VALUE(w_scale.size(0) == N, "w_scale must have shape [", N, "], got ",
                    w_scale.sizes());
  const at::Tensor q = w_q.contiguous(), s = w_scale.contiguous();
  const int64_t wb = wm::int8_packed_bytes(N, K), sf = wm::num_blocks(N) * wm::kBlock;
  at::Tensor hw, hs;
  int8_t* w = qtorch::cpu::temp<int8_t>(qtorch::cpu::kPackSlot, wb, at::kChar, hw);
  float* ps = qtorch::cpu::temp<float>(qtorch::cpu::kPackSlot + 1, sf, at::kFloat, hs);
  pack_int8_parallel(q.data_ptr<int8_t>(), s.data_ptr<float>(), N, K, w, ps);
  return int8_weight_only_linear(x, qtorch::cpu::temp_tensor(w, wb, at::kChar, hw),
                                 qtorch::cpu::temp_tensor(ps, sf, at::kFloat, hs), N, K, bias);
}

}  // namespace qtorch::cpu::binding

namespace {

std::string weight_only_kernel_name(const std::string& act) {
  return wm::kernel_name(act == "bfloat16" ? DType::BF16 : DType::F32);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m) {
  m.def(
      "pack_int4_weight_only(Tensor qweight, Tensor scales, Tensor zeros, int group_size) "
      "-> Tensor[]");
  m.def("pack_int8_weight_only(Tensor w_q, Tensor w_scale) -> Tensor[]");
  m.def(
      "unpack_int4_weight_only(Tensor w, Tensor scale, Tensor zero, int N, int K, "
      "int group_size) -> Tensor[]");
  m.def("unpack_int8_weight_only(Tensor w, Tensor scale, int N, int K) -> Tensor[]");
  m.def(
      "int4_weight_only_linear_canonical(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, "
      "int group_size, Tensor? bias) -> Tensor");
  m.def(
      "int8_weight_only_linear_canonical(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias) "
      "-> Tensor");
  m.def("dequantize_int4(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def(
      "int4_linear_grad_input(Tensor grad_out, Tensor qweight, Tensor scales, Tensor zeros, "
      "int group_size) -> Tensor");
  m.def(
      "int4_weight_only_linear(Tensor x, Tensor w, Tensor scale, Tensor zero_packed, int N, "
      "int K, int group_size, Tensor? bias=None) -> Tensor");
  m.def(
      "int8_weight_only_linear(Tensor x, Tensor w, Tensor scale, int N, int K, "
      "Tensor? bias=None) -> Tensor");
  m.def("weight_only_kernel_name(str act) -> str", &weight_only_kernel_name);
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) {
  m.impl("pack_int4_weight_only", &pack_int4_weight_only);
  m.impl("pack_int8_weight_only", &pack_int8_weight_only);
  m.impl("unpack_int4_weight_only", &unpack_int4_weight_only);
  m.impl("unpack_int8_weight_only", &unpack_int8_weight_only);
  m.impl("int4_weight_only_linear_canonical",
         &qtorch::cpu::binding::int4_weight_only_linear_canonical);
  m.impl("int8_weight_only_linear_canonical",
         &qtorch::cpu::binding::int8_weight_only_linear_canonical);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("int4_linear_grad_input", &int4_linear_grad_input);
  m.impl("int4_weight_only_linear", &qtorch::cpu::binding::int4_weight_only_linear);
  m.impl("int8_weight_only_linear", &qtorch::cpu::binding::int8_weight_only_linear);
}
