"""The `cpu` backend's weight-only kernels (csrc/cpu/wo_mm.cpp, kernels/wo_mm_*.cpp) against
`qtorch.reference`, on every kernel ISA this CPU runs (forced with `qtorch._C.set_isa`):
W4A16 over group sizes 32/64/128/256, symmetric and asymmetric zeros, W8A16 with odd K; shapes
with M = 1 and M past the row tiles, N not a multiple of the 16-channel block, fp32/fp16/bf16
activations, with and without bias; plus the once-per-weight repack cache and the binding's
argument checks."""

import pytest
import torch

import qtorch
from qtorch import _backend, ops
from qtorch import reference as R
from qtorch.ops import weight_only as wo_ops  # the backward helpers are internal ops
from qtorch.testing import assert_close

_C = pytest.importorskip("qtorch._C", reason="qtorch._C (the C++ CPU kernels) is not built")
from qtorch.backends import cpu as CPU  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K-groups): M = 1 (decode), 3 (AVX-512 small-M tiles), 9 and 17 (row tiles of 8 / 4
# plus a tail); N = 1, 17, 70 (block tails); K = groups * group_size.
INT4_SHAPES = [(1, 1, 1), (1, 70, 3), (3, 17, 2), (9, 70, 1), (17, 33, 2), (2, 16, 4)]
# (M, N, K) for int8: K odd (padded k pair), K = 1, K not a multiple of anything.
INT8_SHAPES = [(1, 1, 1), (1, 70, 333), (3, 17, 64), (9, 70, 129), (17, 33, 7), (5, 16, 1000)]


@pytest.fixture(params=["avx512_vnni", "avx2", "scalar"])
def isa(request):
    """Force one kernel ISA for the test (skipped where the CPU lacks it), then restore."""
    before = _C.isa()
    got = _C.set_isa(request.param)
    try:
        if got != request.param:
            pytest.skip(f"CPU has no {request.param} (best: {got})")
        yield got
    finally:
        _C.set_isa(before)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("m,n,groups", INT4_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_weight_only_linear(isa, dtype, m, n, groups, group_size, symmetric):
    k = groups * group_size
    seed = m * 1000 + n * 10 + groups
    w = _randn(n, k, seed=seed, scale=0.05)
    qweight, scales, zeros = R.quantize_int4(w, group_size, symmetric)
    x = _randn(m, k, seed=seed + 1, dtype=dtype)
    bias = _randn(n, seed=seed + 2, dtype=dtype) if seed % 2 else None
    assert _backend.resolve("int4_weight_only_linear", x.device)[0] == "cpu"
    with qtorch.use_backend("cpu"):
        out = ops.int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias)
    ref = R.int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("m,n,k", INT8_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_weight_only_linear(isa, dtype, m, n, k):
    seed = m * 1000 + n * 10 + k
    w_q, w_scale = R.quantize_int8(_randn(n, k, seed=seed, scale=0.05))
    x = _randn(m, k, seed=seed + 1, dtype=dtype)
    bias = _randn(n, seed=seed + 2, dtype=dtype) if seed % 2 else None
    assert _backend.resolve("int8_weight_only_linear", x.device)[0] == "cpu"
    with qtorch.use_backend("cpu"):
        out = ops.int8_weight_only_linear(x, w_q, w_scale, bias)
    ref = R.int8_weight_only_linear(x, w_q, w_scale, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_large_tiles(isa, dtype):
    """3-D activations through the op, and M = 40 (several row tiles, L2 chunks of blocks)."""
    w = _randn(130, 512, seed=7, scale=0.05)
    qweight, scales, zeros = R.quantize_int4(w, 128, False)
    w_q, w_scale = R.quantize_int8(w)
    x = _randn(2, 20, 512, seed=8, dtype=dtype)
    with qtorch.use_backend("cpu"):
        out4 = ops.int4_weight_only_linear(x, qweight, scales, zeros, 128)
        out8 = ops.int8_weight_only_linear(x, w_q, w_scale)
    ref4 = R.int4_weight_only_linear(x.reshape(40, 512), qweight, scales, zeros, 128)
    ref8 = R.int8_weight_only_linear(x.reshape(40, 512), w_q, w_scale)
    assert out4.shape == (2, 20, 130) and out8.shape == (2, 20, 130)
    assert_close(out4.reshape(40, 130), ref4, dtype)
    assert_close(out8.reshape(40, 130), ref8, dtype)


def test_fp32_path_is_fp32_accurate(isa):
    """fp32 activations: nothing is rounded below fp32 (no hidden bf16), so the error is a
    few fp32 ulps of the row's magnitude, far below bf16 resolution."""
    w = _randn(64, 1024, seed=3, scale=0.05)
    qweight, scales, zeros = R.quantize_int4(w, 64, False)
    w_q, w_scale = R.quantize_int8(w)
    x = _randn(5, 1024, seed=4)
    ref4 = x.double() @ R.dequantize_int4(qweight, scales, zeros, 64).double().T
    ref8 = x.double() @ (w_q.double() * w_scale.double()[:, None]).T
    with qtorch.use_backend("cpu"):
        out4 = ops.int4_weight_only_linear(x, qweight, scales, zeros, 64)
        out8 = ops.int8_weight_only_linear(x, w_q, w_scale)
    for out, ref in ((out4, ref4), (out8, ref8)):
        assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_repack_once_per_weight_and_after_inplace_change():
    w = _randn(40, 256, seed=11, scale=0.05)
    qweight, scales, zeros = R.quantize_int4(w, 64, True)
    w_q, w_scale = R.quantize_int8(w)
    p4 = CPU._wo_int4_weight(qweight, scales, zeros, 64)
    assert CPU._wo_int4_weight(qweight, scales, zeros, 64) is p4
    p8 = CPU._wo_int8_weight(w_q, w_scale)
    assert CPU._wo_int8_weight(w_q, w_scale) is p8
    # An in-place change of any of the tensors gives a fresh packing (and a correct result).
    x = _randn(3, 256, seed=12)
    qweight[0].fill_(0x77)
    scales.mul_(2)
    w_q[1].neg_()
    assert CPU._wo_int4_weight(qweight, scales, zeros, 64) is not p4
    assert CPU._wo_int8_weight(w_q, w_scale) is not p8
    with qtorch.use_backend("cpu"):
        out4 = ops.int4_weight_only_linear(x, qweight, scales, zeros, 64)
        out8 = ops.int8_weight_only_linear(x, w_q, w_scale)
    assert_close(out4, R.int4_weight_only_linear(x, qweight, scales, zeros, 64), torch.float32)
    assert_close(out8, R.int8_weight_only_linear(x, w_q, w_scale), torch.float32)


def test_binding_rejects_mismatched_buffers():
    """The raw ops check what the kernels would otherwise read out of bounds."""
    w = _randn(20, 128, seed=5)
    qweight, scales, zeros = R.quantize_int4(w, 64, False)
    pw, ps, pz = torch.ops.qtorch_cpu.wo_pack_int4(qweight, scales, zeros, 64)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="packed weight"):
        torch.ops.qtorch_cpu.wo_int4_linear(x, pw[:-1], ps, pz, 20, 128, 64, None)
    with pytest.raises(ValueError, match="x must have shape"):
        torch.ops.qtorch_cpu.wo_int4_linear(torch.randn(2, 64), pw, ps, pz, 20, 128, 64, None)
    with pytest.raises(ValueError, match="packed scale"):
        torch.ops.qtorch_cpu.wo_int4_linear(x, pw, ps, pz, 20, 128, 32, None)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.qtorch_cpu.wo_int4_linear(x, pw, ps, pz, 20, 128, 64, torch.zeros(3))
    with pytest.raises(TypeError, match="packed zero"):
        torch.ops.qtorch_cpu.wo_int4_linear(x, pw, ps, ps, 20, 128, 64, None)
    with pytest.raises(ValueError, match="scales must have shape"):
        torch.ops.qtorch_cpu.wo_pack_int4(qweight, scales[:, :1], zeros, 64)
    with pytest.raises(TypeError, match="w_q"):
        torch.ops.qtorch_cpu.wo_pack_int8(torch.zeros(3, 4), torch.ones(3))
    w_q, w_scale = R.quantize_int8(w)
    p8, s8 = torch.ops.qtorch_cpu.wo_pack_int8(w_q, w_scale)
    with pytest.raises(ValueError, match="packed weight"):
        torch.ops.qtorch_cpu.wo_int8_linear(x[:, :126].contiguous(), p8, s8, 20, 126, None)
    with pytest.raises(TypeError, match="x must be"):
        torch.ops.qtorch_cpu.wo_int8_linear(x.double(), p8, s8, 20, 128, None)


def test_kernel_name_reported():
    name = torch.ops.qtorch_cpu.wo_kernel_name("bfloat16")
    assert isinstance(name, str) and name


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("n", [1, 17, 64])
def test_dequantize_int4_is_the_reference_bitwise(group_size, n):
    """The C++ dequantization computes the reference's (q - zero) * scale with the same two
    fp32 operations, so it is bitwise equal."""
    k = 2 * 256
    qw = R.quantize_int4(_randn(n, k, seed=n), group_size, False)
    with qtorch.use_backend("cpu"):
        deq = ops.dequantize_int4(*qw, group_size)
    assert torch.equal(deq, R.dequantize_int4(*qw, group_size))
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.qtorch_cpu.dequantize_int4(*qw, 48)
    with pytest.raises(ValueError, match="scales must have shape"):
        torch.ops.qtorch_cpu.dequantize_int4(qw[0], qw[1][:, :1], qw[2], group_size)


# (M, N, K): M on both sides of the slab-width steps (32, 256), K from one group (64) to
# values that are not a multiple of the slab width (64/128/256), N = 1 and odd.
INT4_GRAD_SHAPES = [(1, 1, 64), (1, 17, 2 * 160), (3, 64, 512), (32, 33, 448), (33, 9, 192),
                    (256, 5, 320), (257, 31, 576)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", INT4_GRAD_SHAPES)
def test_int4_grad_input_slabs_vs_reference(dtype, m, n, k):
    """The int4 backward (dequantize a column slab, then the slab's fp32 GEMM) against the
    reference's dequantize-then-matmul: the same fp32 math, only the GEMM's blocking differs."""
    from qtorch.reference.weight_only import int4_linear_grad_input

    gs = 64 if k % 64 == 0 else 32
    qw = R.quantize_int4(_randn(n, k, seed=k), gs, False)
    g = _randn(m, n, seed=m + n, dtype=dtype)
    with qtorch.use_backend("cpu"):
        gx = wo_ops.int4_linear_grad_input(g, *qw, gs)
    assert gx.dtype == dtype and gx.shape == (m, k)
    assert_close(gx, int4_linear_grad_input(g, *qw, gs))
    # non-contiguous grad_out and leading dims go through the op's reshaping
    g3 = _randn(2, n, m, seed=5, dtype=dtype).transpose(1, 2)
    with qtorch.use_backend("cpu"):
        gx3 = wo_ops.int4_linear_grad_input(g3, *qw, gs)
    assert_close(gx3, int4_linear_grad_input(g3.reshape(-1, n), *qw, gs).reshape(2, m, k))


def test_int4_grad_input_binding_checks():
    qw = R.quantize_int4(_randn(8, 64, seed=0), 32, False)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.qtorch_cpu.int4_grad_input(torch.randn(2, 7), *qw, 32)
    with pytest.raises(TypeError, match="grad_out must be float32"):
        torch.ops.qtorch_cpu.int4_grad_input(torch.randn(2, 8).double(), *qw, 32)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.qtorch_cpu.int4_grad_input(torch.randn(2, 8), *qw, 48)
