"""The `cpu` backend: compiled C++ kernels in qtorch._C (ops in the `qtorch_cpu` namespace)."""

from __future__ import annotations

import os

import torch  # noqa: F401  (loads libtorch before the extension)

from qtorch import _C  # ImportError here means "not built"; _backend records why


def status() -> tuple[bool, str]:
    return True, f"C++ CPU kernels, ISA {_C.isa()}"


from qtorch._backend import register_kernel  # noqa: E402
from qtorch._packed import Layout, flat, register_layout  # noqa: E402
from qtorch.quantizers import mse as _mse  # noqa: E402
from qtorch.reference import distillation as _ref_distill  # noqa: E402

_ops = torch.ops.qtorch_cpu

# --- W8A8 (quantize_int8, int8_scaled_mm, int8_linear) ---------------------------------------
# The GEMM takes the weight VNNI-packed (csrc/cpu/kernels/int8_mm.h). Called as an op with a
# canonical weight, it packs per call (the *_canonical bindings, into per-thread scratch when
# it fits); a quantized module keeps the packed weight (the "cpu_w8a8" layout below), so its
# calls pack nothing.


@register_kernel("quantize_int8", "cpu")
def _quantize_int8(x):
    return _ops.quantize_int8(x)


@register_kernel("int8_scaled_mm", "cpu")
def _int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype):
    return _ops.int8_scaled_mm_canonical(a, b, scale_a, scale_b, bias, out_dtype)


@register_kernel("int8_linear", "cpu")
def _int8_linear(x, w_q, w_scale, bias):
    return _ops.int8_linear_canonical(x, w_q, w_scale, bias)


@register_kernel("int8_linear_smooth", "cpu")
def _int8_linear_smooth(x, w_q, w_scale, smooth_scale, bias):
    # x / smooth_scale is computed inside the quantize-rows step of the same kernel.
    return _ops.int8_linear_canonical(x, w_q, w_scale, bias, smooth_scale)


# --- GPTQ's per-column loop (qtorch/quantizers/gptq.py, csrc/cpu/gptq.cpp) -------------------


@register_kernel("gptq_block", "cpu")
def _gptq_block(w1, u1, st, zt, inv_d, q, err, kind):
    _ops.gptq_block_(w1, u1, st, zt, inv_d, q, err, kind)


register_kernel("mse_search", "cpu")(_mse.search_cpu)


# --- weight-only (int8_weight_only_linear, quantize_int4, dequantize_int4,
#     int4_weight_only_linear, the linears' backward) ------------------------------------------
# Weights are packed into 16-channel blocks (csrc/cpu/kernels/weight_only.h) and dequantized inside
# the kernel: per call for an op on canonical buffers, once for a module (layouts below).
# quantize_int4 runs once per weight, so the reference serves it.


@register_kernel("int8_weight_only_linear", "cpu")
def _int8_weight_only_linear(x, w_q, w_scale, bias):
    return _ops.int8_weight_only_linear_canonical(x, w_q, w_scale.float(), bias)


@register_kernel("int8_linear_grad_input", "cpu")
def _int8_linear_grad_input(grad_out, w_q, w_scale):
    """Backward of both int8 linears w.r.t. x: grad_out [M, N] @ (w_q * w_scale[:, None]),
    through the packed-layout backward (one fp32 GEMM per cache-sized column slab of ŵ)."""
    n, k = w_q.shape
    w, s = _ops.pack_int8_weight_only(w_q, w_scale.float())
    return _ops.linear_packed_grad_input(grad_out, w, s, None, "cpu_w8a16", n, k, 0)


@register_kernel("int4_weight_only_linear", "cpu")
def _int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias):
    return _ops.int4_weight_only_linear_canonical(
        x, qweight, scales.float(), zeros, group_size, bias
    )


@register_kernel("dequantize_int4", "cpu")
def _dequantize_int4(qweight, scales, zeros, group_size):
    return _ops.dequantize_int4(qweight, scales.float(), zeros, group_size)


@register_kernel("int4_linear_grad_input", "cpu")
def _int4_linear_grad_input(grad_out, qweight, scales, zeros, group_size):
    """grad_out [M, N] @ ŵ [N, K] in fp32 as the reference, with ŵ dequantized in cache-sized
    column slabs, each followed by its slab's fp32 BLAS GEMM, so the fp32 [N, K] ŵ never
    exists."""
    return _ops.int4_linear_grad_input(grad_out, qweight, scales.float(), zeros, group_size)


# --- layouts owned by the quantized modules (qtorch/_packed.py) -------------------------------
# The C++ kernel of qtorch::linear_packed (csrc/cpu/linear_packed.cpp) serves these directly;
# run / grad_input are for the Python kernel, when a use_backend("cpu") scope is open.


def _run(name):
    def run(x, weight, bias, n, k, group_size):
        return _ops.linear_packed(x, *flat(weight), bias, name, n, k, group_size)

    def grad_input(grad, weight, n, k, group_size):
        return _ops.linear_packed_grad_input(grad, *flat(weight), name, n, k, group_size)

    return run, grad_input


def _unpack_w8a16(weight, n, k, group_size):
    q, s = _ops.unpack_int8_weight_only(weight[0], weight[1], n, k)
    return {"qweight": q, "weight_scale": s}


def _unpack_w4a16(weight, n, k, group_size):
    q, s, z = _ops.unpack_int4_weight_only(weight[0], weight[1], weight[2], n, k, group_size)
    return {"qweight": q, "scales": s, "zeros": z}


register_layout(
    Layout(
        "cpu_w8a8",
        "w8a8",
        "cpu",
        0,
        ("packed_weight", "weight_scale"),
        ("qweight",),
        pack=lambda c, n, k, gs: {"packed_weight": _ops.pack_int8_mm(c["qweight"])},
        unpack=lambda w, n, k, gs: {"qweight": _ops.unpack_int8_mm(w[0], n, k)},
        run=_run("cpu_w8a8")[0],
        grad_input=_run("cpu_w8a8")[1],
    )
)
register_layout(
    Layout(
        "cpu_w8a16",
        "w8a16",
        "cpu",
        1,
        ("packed_weight", "packed_scale"),
        ("qweight", "weight_scale"),
        pack=lambda c, n, k, gs: dict(
            zip(
                ("packed_weight", "packed_scale"),
                _ops.pack_int8_weight_only(c["qweight"], c["weight_scale"]),
            )
        ),
        unpack=_unpack_w8a16,
        run=_run("cpu_w8a16")[0],
        grad_input=_run("cpu_w8a16")[1],
    )
)
register_layout(
    Layout(
        "cpu_w4a16",
        "w4a16",
        "cpu",
        2,
        ("packed_weight", "packed_scale", "packed_zero"),
        ("qweight", "scales", "zeros"),
        pack=lambda c, n, k, gs: dict(
            zip(
                ("packed_weight", "packed_scale", "packed_zero"),
                _ops.pack_int4_weight_only(c["qweight"], c["scales"], c["zeros"], gs),
            )
        ),
        unpack=_unpack_w4a16,
        run=_run("cpu_w4a16")[0],
        grad_input=_run("cpu_w4a16")[1],
    )
)


# --- distillation kernels (distillation_loss, fused_linear_distillation_loss) ---------------
# csrc/cpu/distillation.cpp: one pass per row for the online softmax statistics of s/T, s and
# t/T, then the loss terms and d loss / d s; rows in parallel. The fused-linear op is the one
# chunk loop (qtorch/reference/distillation.py) with fp32 BLAS GEMMs (`LinearHead`) and the
# row kernel writing each chunk's gradient over its logits in place, so [M, V] never exists.


@register_kernel("distillation_loss", "cpu")
def _distillation_loss(
    student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, compute_grad
):
    loss, grad = _ops.distillation_loss(
        student,
        teacher,
        labels,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        compute_grad,
    )
    return loss, grad if compute_grad else None


def _chunk_loss(
    s, t, labels, token_scale, temperature, alpha, divergence, beta, ignore_index, compute_grad
):
    loss = _ops.distillation_loss_inplace(
        s, t, labels, token_scale, temperature, alpha, divergence, beta, ignore_index, compute_grad
    )
    return loss, s if compute_grad else None


class _Bf16Head(_ref_distill.LinearHead):
    """A bf16 head whose GEMMs read the bf16 operands directly (oneMKL's
    cblas_gemm_bf16bf16f32 in torch's CPU library, csrc/cpu/gemm_bf16.cpp): fp32 products and
    sums, fp32 results, no widened copy of W. The logits are those of `LinearHead` up to the
    order of the fp32 sums (a product of two bf16 numbers is exact in fp32). The backward
    GEMMs read the chunk's gradient rounded once to bf16 (what a bf16 autograd GEMM, Liger's
    included, reads), written over the teacher's dead logits block when the loop passes it, so
    it costs no memory; grad_weight still accumulates in fp32.
    """

    takes_scratch = True

    def __init__(self, weight, bias, acc):
        super().__init__(weight, bias, acc)
        self.weight = weight
        self._g16 = None  # [chunk, V] bf16, only when the loop gives no scratch block

    def operand(self, h):
        return h.contiguous()

    def logits(self, x, out):
        _ops.mm_bf16_f32_(out, x, self.weight.T, 0.0)
        if self.bias is not None:
            out += self.bias
        return out

    def backward(self, g, x, grad_input, grad_weight, scratch=None):
        n, v = g.shape
        if (
            scratch is not None
            and scratch.dtype == torch.float32
            and scratch.is_contiguous()
            and scratch.numel() >= n * v
        ):
            g16 = scratch.view(-1).view(torch.bfloat16)[: n * v].view(n, v)
        else:
            if self._g16 is None or self._g16.numel() < n * v:
                self._g16 = torch.empty(n * v, dtype=torch.bfloat16)
            g16 = self._g16[: n * v].view(n, v)
        g16.copy_(g)
        if grad_input is not None:
            if self._grad_input_acc is None or self._grad_input_acc.shape[0] < n:
                self._grad_input_acc = g.new_empty((n, self.weight.shape[1]))
            buf = self._grad_input_acc[:n]
            _ops.mm_bf16_f32_(buf, g16, self.weight, 0.0)
            grad_input.copy_(buf)
        if grad_weight is not None:
            _ops.mm_bf16_f32_(grad_weight, g16.T, x, 1.0)


def _bf16_gemm_wanted() -> bool:
    """Whether bf16 heads run `_Bf16Head`: QTORCH_CPU_BF16_GEMM=1 / 0 forces it on / off;
    by default only where the AMX tiles are usable (torch asks the OS for them). Without
    AMX, oneMKL's bf16 GEMM runs slower than an fp32 GEMM on widened slices (at the fused
    loss's shapes on an AVX512-BF16 Xeon without AMX, 2 threads: 132-149 vs 174-227
    GFLOP/s), so the widening `LinearHead` stays."""
    flag = os.environ.get("QTORCH_CPU_BF16_GEMM", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if not _ops.bf16_gemm_available():
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return amx_usable()


def amx_usable() -> bool:
    """Whether torch can use the AMX tiles here (it asks the OS for them, once)."""
    global _AMX
    if _AMX is None:
        init = getattr(torch._C._cpu, "_init_amx", None)
        _AMX = bool(init()) if init is not None else False
    return _AMX


_AMX = None


@register_kernel("fused_linear_distillation_loss", "cpu")
def _fused_linear_distillation_loss(*args):
    h_s, w_s, h_t, w_t = args[:4]
    bf16 = torch.bfloat16
    head = _ref_distill.LinearHead
    if (
        h_s.dtype == w_s.dtype == bf16
        and h_t.dtype == bf16
        and (isinstance(w_t, _ref_distill.ModuleHead) or w_t.dtype == bf16)
        and _bf16_gemm_wanted()
    ):
        head = _Bf16Head
    return _ref_distill.fused_linear_distillation_loss(*args, chunk_loss=_chunk_loss, head=head)
