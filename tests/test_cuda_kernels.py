"""The `cuda` backend (csrc/cuda/) against `qtorch.reference`.

Three kinds of test:
  * GPU tests (skipped without a CUDA device and a built qtorch._C_cuda): every kernel over
    shapes at and around its tile edges (M = 1, 16/17, 64/65, 128/129; N and K not multiples
    of the tiles; K not a multiple of 16 for int8), fp32/fp16/bf16; int8 results must match
    the reference exactly, float results within qtorch.testing's per-dtype tolerances.
    tests/test_ops.py runs the public ops on the cuda backend as well.
  * CPU tests of what can be checked without a GPU: the int4 repacking into mma fragment
    order (decoded by an emulation of the kernel's registers), the closed-form loss and
    gradient formulas distillation.cu evaluates, and that the backend reports "not built".
  * the compile check (.ci/cuda_check.sh: nvcc for sm_80 + sm_90a, no register spills,
    IMMA / HMMA in the SASS), when nvcc is on PATH.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess

import pytest
import torch

import qtorch
from qtorch import _backend, ops
from qtorch import reference as R
from qtorch.backends._cuda_pack import (
    emulate_int4_fragments,
    emulate_int8_fragments,
    pack_int4,
    pack_int8,
)
from qtorch.reference.weight_only import unpack_int4
from qtorch.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_backend_ready() -> bool:
    return torch.cuda.is_available() and _backend.backend_status()["cuda"][0]


gpu = pytest.mark.skipif(
    not _cuda_backend_ready(), reason="needs a CUDA device and the qtorch._C_cuda extension"
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- CPU-only tests


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n,k,gs,symmetric",
    [
        (1, 32, 32, False),  # one column, K < one 64-wide chunk (padded)
        (17, 96, 32, True),  # N not a multiple of 16, K = 1.5 chunks
        (40, 128, 64, False),
        (33, 256, 128, False),
        (16, 512, 256, True),
    ],
)
def test_int4_pack_is_the_mma_fragment_layout(dtype, n, k, gs, symmetric):
    """Decoding the packed words the way the kernel does (lop3 magic numbers, 16-bit
    (p - (MAGIC + z)) * s) and placing each value where the m16n8k16 B fragment puts it
    rebuilds exactly (q - z) * s rounded as the kernel rounds it; padding decodes to 0."""
    w = torch.randn(n, k, generator=_gen(n * k + gs))
    q, s, z = R.quantize_int4(w, gs, symmetric)
    qp, szp = pack_int4(q, s, z, gs, dtype)
    kp, np_ = -(-k // 64) * 64, -(-n // 16) * 16
    assert qp.dtype == torch.int32 and qp.shape == (kp // 64, np_ // 16, 32, 4)
    assert szp.dtype == torch.int32 and szp.shape == (kp // gs, np_)
    got = emulate_int4_fragments(qp, szp, gs, dtype)
    qv = unpack_int4(q).float().reshape(n, k // gs, gs)
    want = ((qv - z.float()[..., None]).to(dtype) * s.to(dtype)[..., None]).reshape(n, k)
    assert torch.equal(got[:n, :k], want)
    assert (got[n:] == 0).all() and (got[:, k:] == 0).all()
    # and that is the reference's dequantization up to the 16-bit rounding of the scale
    assert_close(got[:n, :k].float(), R.dequantize_int4(q, s, z, gs), dtype=dtype)


@pytest.mark.parametrize("n,k", [(1, 1), (17, 100), (40, 128), (33, 257), (16, 4096)])
def test_int8_pack_is_the_mma_fragment_layout(n, k):
    """W8A16: the bytes each lane's B registers get, placed by the m16n8k16 fragment layout,
    are the weights; K and N padding holds 0."""
    w_q = torch.randint(-127, 128, (n, k), generator=_gen(n + k), dtype=torch.int8)
    qp = pack_int8(w_q)
    assert qp.dtype == torch.int32 and qp.shape == (-(-k // 64), -(-n // 16), 2, 32, 4)
    got = emulate_int8_fragments(qp)
    assert torch.equal(got[:n, :k], w_q.long())
    assert (got[n:] == 0).all() and (got[:, k:] == 0).all()


def test_int4_pack_rejects_fp32():
    q, s, z = R.quantize_int4(torch.randn(4, 64), 32)
    with pytest.raises(TypeError, match="dtype"):
        pack_int4(q, s, z, 32, torch.float32)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_distillation_closed_forms(divergence, temperature, beta):
    """The per-row formulas distillation.cu evaluates (from running sums, no autograd), in
    torch, against the reference's autograd: masked (-inf) teacher entries, an ignored row,
    T != 1, beta at both ends."""
    m, v, alpha, T = 6, 37, 0.7, temperature
    g = _gen(7)
    s = torch.randn(m, v, generator=g) * 3
    t = torch.randn(m, v, generator=g) * 3
    t[:, ::5] = float("-inf")
    labels = torch.randint(0, v, (m,), generator=g)
    labels[1] = -100
    loss_ref, grad_ref = R.distillation_loss(s, t, labels, T, alpha, divergence, beta, -100)

    z, u = s / T, t / T
    log_zz, log_zu = z.logsumexp(-1, keepdim=True), u.logsumexp(-1, keepdim=True)
    log_zs = s.logsumexp(-1, keepdim=True)
    lq, lp = z - log_zz, u - log_zu
    q, p = lq.exp(), lp.exp()
    live = t != float("-inf")
    zero = torch.zeros(())
    if divergence == "kl":  # D = Σ_live p (u - z) + logZ_z - logZ_u;  dD/dz = q - p
        d = torch.where(live, p * (u - z), zero).sum(-1, keepdim=True) + log_zz - log_zu
        soft = q - p
    elif divergence == "reverse_kl":
        # D = Σ_live q (z - u) + (logZ_u - logZ_z) Q,  Q = Σ_live q
        # dD/dz_j = live_j q_j (g_j + 1) - q_j (D + Q),  g = log q - log p
        ql = torch.where(live, q, zero).sum(-1, keepdim=True)
        d = torch.where(live, q * (z - u), zero).sum(-1, keepdim=True) + (log_zu - log_zz) * ql
        soft = torch.where(live, q * ((lq - lp) + 1 - d - ql), -q * (d + ql))
    else:  # dD/dz_j = (1 - β) q_j (log q_j - log m_j - KL(q ‖ m))
        lm = (beta * p + (1 - beta) * q).log()
        kl_pm = torch.where(live, p * (lp - lm), zero).sum(-1, keepdim=True)
        kl_qm = (q * (lq - lm)).sum(-1, keepdim=True)
        d = (beta * kl_pm if beta != 0 else 0) + ((1 - beta) * kl_qm if beta != 1 else 0)
        soft = (1 - beta) * q * (lq - lm - kl_qm) if beta != 1 else torch.zeros_like(q)
    safe = labels.clamp(min=0)
    hard = log_zs.squeeze(-1) - s.gather(1, safe[:, None]).squeeze(1)
    loss = alpha * T * T * d.squeeze(-1) + (1 - alpha) * hard
    grad = alpha * T * soft + (1 - alpha) * (
        (s - log_zs).exp() - torch.nn.functional.one_hot(safe, v)
    )
    valid = labels != -100
    loss = torch.where(valid, loss, zero)
    grad = torch.where(valid[:, None], grad, zero)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("qtorch._C_cuda") is not None, reason="qtorch._C_cuda is built here"
)
def test_backend_reports_not_built():
    with pytest.raises(ImportError):
        importlib.import_module("qtorch.backends.cuda")
    ok, why = _backend.backend_status()["cuda"]
    assert not ok and "_C_cuda" in why
    with pytest.raises(RuntimeError, match="cuda"):
        qtorch.set_backend("cuda")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_compile_check(tmp_path):
    """.ci/cuda_check.sh: every .cu compiles for sm_80 and sm_90a without torch, no kernel
    spills registers, the int8 GEMMs contain IMMA and the int4 GEMMs HMMA."""
    r = subprocess.run(
        ["bash", os.path.join(ROOT, ".ci", "cuda_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "no spills" in r.stdout
    if os.environ.get("QTORCH_CUDA_PYTHON"):  # CI provides a CUDA torch: the binding must build
        assert "binding compiled, linked and loaded" in r.stdout, r.stdout[-4000:]
    for kernel in (
        "int8_mm_kernel",
        "wo_mm_kernel<fp16, false",
        "wo_mm_kernel<bf16, true",
        "quantize_int8_kernel",
        "distill_kernel",
    ):
        assert kernel in r.stdout


# ------------------------------------------------------------------------------------ GPU tests

# (M, K, N) around the int8 tiles (BM 64 | 128, BN 128, BK 64, K padded to 16)
INT8_SHAPES = [
    (1, 1, 1),
    (1, 16, 128),
    (17, 33, 129),
    (64, 64, 127),
    (65, 200, 257),
    (129, 1000, 130),
    (256, 4096, 512),
]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 1), (3, 17), (64, 4096), (129, 1000), (5, 8191)])
def test_quantize_int8_exact(dtype, m, k):
    x = (torch.randn(m, k, generator=_gen(m + k)) * 5).to("cuda", dtype)
    x[0, 0] = 0.5 * x[0, 1]  # a value that may round half-way
    q, s = torch.ops.qtorch_cuda.quantize_int8(x)
    q_ref, s_ref = R.quantize_int8(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)  # IEEE x / scale and rint: exactly the reference


@gpu
def test_quantize_int8_zero_row():
    x = torch.zeros(3, 40, device="cuda")
    q, s = torch.ops.qtorch_cuda.quantize_int8(x)
    assert torch.equal(s, torch.ones(3, device="cuda")) and (q == 0).all()


@gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_scaled_mm_exact(out_dtype, m, k, n, with_bias):
    g = _gen(m * 7 + k * 3 + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).cuda()
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).cuda()
    sa = (torch.rand(m, generator=g) + 0.01).cuda() / 100
    sb = (torch.rand(n, generator=g) + 0.01).cuda() / 100
    bias = torch.randn(n, generator=g).cuda() if with_bias else None
    with qtorch.use_backend("cuda"):
        out = ops.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    ref = R.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    # exact int32 accumulation and the reference's fp32 epilogue order: bit-identical
    assert torch.equal(out, ref)


@gpu
def test_int8_mm_integer_accumulation_is_exact():
    """Unit scales expose the raw int32 sums: extreme values, K = 4096 (|sum| < 2^24)."""
    m, n, k = 130, 129, 4096
    a = torch.full((m, k), -127, dtype=torch.int8, device="cuda")
    b = torch.full((n, k), 127, dtype=torch.int8, device="cuda")
    b[1::2] = -127
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    out = torch.ops.qtorch_cuda.int8_scaled_mm(a, b, ones_m, ones_n, None, torch.float32)
    want = (a.double() @ b.double().T).float()
    assert torch.equal(out, want)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_int8_linear_exact(dtype, m, k, n):
    g = _gen(m + 11 * k + n)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    w_q, w_s = R.quantize_int8(torch.randn(n, k, generator=g))
    w_q, w_s = w_q.cuda(), w_s.cuda()
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    with qtorch.use_backend("cuda"):
        out = ops.int8_linear(x, w_q, w_s, bias)
        out2 = ops.int8_linear(x, w_q, w_s, bias)  # second call: cached padded weight
    ref = R.int8_linear(x, w_q, w_s, bias.float())
    assert torch.equal(out, ref) and torch.equal(out2, ref)


# (M, K, N, group_size) around the int4 tiles (BM 16 | 32 | 64, BN 256 | 128, K chunk 64)
INT4_SHAPES = [
    (1, 32, 1, 32),
    (1, 4096, 4096, 128),
    (5, 96, 17, 32),
    (16, 256, 300, 64),
    (17, 512, 257, 128),
    (33, 1024, 130, 256),
    (100, 384, 70, 128),
    (300, 2048, 512, 128),
]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,gs", INT4_SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_weight_only_linear(dtype, m, k, n, gs, symmetric):
    g = _gen(m + k + n + gs)
    w = torch.randn(n, k, generator=g)
    q, s, z = (t.cuda() for t in R.quantize_int4(w, gs, symmetric))
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    with qtorch.use_backend("cuda"):
        out = ops.int4_weight_only_linear(x, q, s, z, gs, bias)
    ref = R.int4_weight_only_linear(x, q, s, z, gs, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    # ŵ is rounded to x's dtype before the MMA (the reference keeps it fp32): one 16-bit
    # rounding per weight, the same order as a 16-bit matmul's input rounding.
    assert_close(out, ref, dtype=dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 1, 1),
        (1, 4096, 4096),
        (5, 100, 17),
        (16, 256, 300),
        (17, 515, 257),
        (33, 1024, 130),
        (100, 384, 70),
    ],
)
def test_int8_weight_only_linear(dtype, m, k, n):
    g = _gen(m + 3 * k + n)
    w_q, w_s = (t.cuda() for t in R.quantize_int8(torch.randn(n, k, generator=g)))
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    with qtorch.use_backend("cuda"):
        out = ops.int8_weight_only_linear(x, w_q, w_s, bias)
    ref = R.int8_weight_only_linear(x, w_q, w_s, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    # the MMA sees the exact integers; the scale is applied to the fp32 sum
    assert_close(out, ref, dtype=dtype)


@gpu
def test_int4_fp32_activations_fall_back_to_reference():
    q, s, z = (t.cuda() for t in R.quantize_int4(torch.randn(8, 64), 32))
    x = torch.randn(3, 64, device="cuda")
    with qtorch.use_backend("cuda"):
        out = ops.int4_weight_only_linear(x, q, s, z, 32)
    assert torch.equal(out, R.int4_weight_only_linear(x, q, s, z, 32))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("m,v", [(1, 1), (3, 37), (8, 4096), (5, 32003)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_loss(dtype, divergence, m, v, temperature):
    from qtorch.backends import cuda as cb

    g = _gen(m * v)
    s = (torch.randn(m, v, generator=g) * 4).to("cuda", dtype)
    t = (torch.randn(m, v, generator=g) * 4).to("cuda", dtype)
    if v > 4:
        t[:, 1::7] = float("-inf")  # masked vocabulary entries
    labels = torch.randint(0, v, (m,), generator=g).cuda()
    labels[0] = -100
    if m > 2:
        s[0] = float("nan")  # an ignored row leaks nothing
    args = (temperature, 0.6, divergence, 0.4, -100, True)
    loss, grad = cb._distillation_loss(s, t, labels, *args)
    loss_ref, grad_ref = R.distillation_loss(s, t, labels, *args)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, loss_ref, dtype=torch.float32)
    assert_close(grad, grad_ref, dtype=dtype)
    loss_nl, grad_nl = cb._distillation_loss(
        s[1:], t[1:], None, temperature, 1.0, divergence, 0.4, -100, False
    )
    ref_nl, _ = R.distillation_loss(
        s[1:], t[1:], None, temperature, 1.0, divergence, 0.4, -100, False
    )
    assert grad_nl is None
    assert_close(loss_nl, ref_nl, dtype=torch.float32)


@gpu
def test_distillation_bad_label_is_value_error():
    s = torch.randn(2, 10, device="cuda")
    with qtorch.use_backend("cuda"):
        with pytest.raises(ValueError, match="labels"):
            ops.distillation_loss(s, s, torch.tensor([1, 10], device="cuda"))


@gpu
def test_distillation_nonfinite_teacher_poisons_counted_row():
    s = torch.randn(2, 64, device="cuda")
    t = torch.randn(2, 64, device="cuda")
    t[1, 3] = float("nan")
    loss, _ = torch.ops.qtorch_cuda.distillation_loss(s, t, None, 1.0, 1.0, 0, 0.5, -100, False)
    assert torch.isfinite(loss[0]) and not torch.isfinite(loss[1])
