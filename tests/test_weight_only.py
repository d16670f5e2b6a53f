"""The weight-only ops (int8_weight_only_linear, quantize_int4, dequantize_int4,
int4_weight_only_linear, and the linears' input gradients): every backend's kernels against
`qtorch.reference` (tests/test_ops.py runs the public ops on every backend as well).

cpu (csrc/cpu/weight_only.cpp, kernels/weight_only_*.cpp), on every kernel ISA this CPU runs
(forced with `qtorch._C.set_isa`): W4A16 over group sizes 32/64/128/256, symmetric and asymmetric
zeros, W8A16 with odd K; shapes with M = 1 and M past the row tiles, N not a multiple of the
16-channel block, fp32/fp16/bf16 activations, with and without bias; plus the once-per-weight
repack cache, the int4 backward and the binding's argument checks.

triton (kernels/weight_only.py, and the W4A16 layout the Triton adapter prepares), under
TRITON_INTERPRET=1 on CPU or compiled on a CUDA device: M = 1, K and N that are not multiples
of any block, and the decode (split-K) paths, in fp32/fp16/bf16 at the per-dtype tolerances
of `qtorch.testing`.

cuda (csrc/cuda/weight_only.cu; the GPU tests are skipped without a CUDA device and a built
qtorch._C_cuda): the W4A16 and W8A16 kernels around their tiles (BM 16 | 32 | 64,
BN 256 | 128, K chunk 64), within the per-dtype tolerances; and, on any machine, that the
repacking into mma fragment order (qtorch/backends/_cuda_pack.py, decoded by an emulation of
the kernel's registers) holds the weights.
"""

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
    unpack_int4_weight,
    unpack_int8,
)
from qtorch.ops import weight_only as wo_ops  # the backward helpers are internal ops
from qtorch.reference.weight_only import unpack_int4
from qtorch.testing import assert_close, device_for
from tests.conftest import TRITON_RUNS, cpu_kernels, cuda_kernels, triton_kernels

if TRITON_RUNS:
    from qtorch._kernels import weight_only as KW

    from qtorch.backends import triton as TB


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0, device="cpu"):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------- cpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K-groups): M = 1 (decode), 3 (AVX-512 small-M tiles), 9 and 17 (row tiles of 8 / 4
# plus a tail); N = 1, 17, 70 (block tails); K = groups * group_size.
INT4_SHAPES = [(1, 1, 1), (1, 70, 3), (3, 17, 2), (9, 70, 1), (17, 33, 2), (2, 16, 4)]
# (M, N, K) for int8: K odd (padded k pair), K = 1, K not a multiple of anything.
INT8_SHAPES = [(1, 1, 1), (1, 70, 333), (3, 17, 64), (9, 70, 129), (17, 33, 7), (5, 16, 1000)]


@cpu_kernels
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("m,n,groups", INT4_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_int4_weight_only_linear(isa, dtype, m, n, groups, group_size, symmetric):
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


@cpu_kernels
@pytest.mark.parametrize("m,n,k", INT8_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_int8_weight_only_linear(isa, dtype, m, n, k):
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


@cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_leading_dims_and_large_tiles(isa, dtype):
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


@cpu_kernels
def test_cpu_fp32_path_is_fp32_accurate(isa):
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


@cpu_kernels
def test_cpu_an_op_sees_every_change_of_its_weights():
    """An op packs per call, so a change of any tensor by any route (`.data` here, which no
    version counter sees) gives a correct result on the next call."""
    w = _randn(40, 256, seed=11, scale=0.05)
    qweight, scales, zeros = R.quantize_int4(w, 64, True)
    w_q, w_scale = R.quantize_int8(w)
    x = _randn(3, 256, seed=12)
    with qtorch.use_backend("cpu"):
        ops.int4_weight_only_linear(x, qweight, scales, zeros, 64)
        ops.int8_weight_only_linear(x, w_q, w_scale)
        qweight.data[0].fill_(0x77)
        scales.data.mul_(2)
        w_q.data[1].neg_()
        out4 = ops.int4_weight_only_linear(x, qweight, scales, zeros, 64)
        out8 = ops.int8_weight_only_linear(x, w_q, w_scale)
    assert_close(out4, R.int4_weight_only_linear(x, qweight, scales, zeros, 64), torch.float32)
    assert_close(out8, R.int8_weight_only_linear(x, w_q, w_scale), torch.float32)


@cpu_kernels
def test_cpu_binding_rejects_mismatched_buffers():
    """The raw ops check what the kernels would otherwise read out of bounds."""
    w = _randn(20, 128, seed=5)
    qweight, scales, zeros = R.quantize_int4(w, 64, False)
    pw, ps, pz = torch.ops.qtorch_cpu.pack_int4_weight_only(qweight, scales, zeros, 64)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="packed weight"):
        torch.ops.qtorch_cpu.int4_weight_only_linear(x, pw[:-1], ps, pz, 20, 128, 64, None)
    with pytest.raises(ValueError, match="x must have shape"):
        torch.ops.qtorch_cpu.int4_weight_only_linear(
            torch.randn(2, 64), pw, ps, pz, 20, 128, 64, None
        )
    with pytest.raises(ValueError, match="packed scale"):
        torch.ops.qtorch_cpu.int4_weight_only_linear(x, pw, ps, pz, 20, 128, 32, None)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.qtorch_cpu.int4_weight_only_linear(x, pw, ps, pz, 20, 128, 64, torch.zeros(3))
    with pytest.raises(TypeError, match="packed zero"):  # (u8, or f32 for float zero points)
        torch.ops.qtorch_cpu.int4_weight_only_linear(x, pw, ps, ps.int(), 20, 128, 64, None)
    with pytest.raises(ValueError, match="scales must have shape"):
        torch.ops.qtorch_cpu.pack_int4_weight_only(qweight, scales[:, :1], zeros, 64)
    with pytest.raises(TypeError, match="w_q"):
        torch.ops.qtorch_cpu.pack_int8_weight_only(torch.zeros(3, 4), torch.ones(3))
    w_q, w_scale = R.quantize_int8(w)
    p8, s8 = torch.ops.qtorch_cpu.pack_int8_weight_only(w_q, w_scale)
    with pytest.raises(ValueError, match="packed weight"):
        torch.ops.qtorch_cpu.int8_weight_only_linear(x[:, :126].contiguous(), p8, s8, 20, 126, None)
    with pytest.raises(TypeError, match="x must be"):
        torch.ops.qtorch_cpu.int8_weight_only_linear(x.double(), p8, s8, 20, 128, None)


@cpu_kernels
@pytest.mark.parametrize("n, k", [(1, 1), (17, 3), (33, 130), (130, 333), (70, 4099)])
def test_cpu_int8_packing_and_backward_are_the_same_on_every_isa(isa, n, k):
    """The packed int8 weight is the same bytes on every ISA (the scalar definition's), and so
    is the W8A16 module's backward w.r.t. x, which dequantizes the packed weight one slab of
    ŵ at a time (K = 4099: many slabs and a 3-column tail one): bitwise, and within fp32
    rounding of grad @ ŵ with the reference's ŵ."""
    from qtorch import _C

    w_q, w_scale = R.quantize_int8(_randn(n, k, seed=n + k))
    grad = _randn(5, n, seed=k)

    def run():
        p8, s8 = torch.ops.qtorch_cpu.pack_int8_weight_only(w_q, w_scale)
        gx = torch.ops.qtorch_cpu.linear_packed_grad_input(grad, p8, s8, None, "cpu_w8a16", n, k, 0)
        return p8, s8, gx

    p8, s8, gx = run()
    _C.set_isa("scalar")
    try:
        p8_s, s8_s, gx_s = run()
    finally:
        _C.set_isa(isa)
    assert torch.equal(p8, p8_s) and torch.equal(s8, s8_s)
    assert torch.equal(gx, gx_s)
    assert_close(gx, grad @ (w_q.float() * w_scale[:, None]), torch.float32)


@cpu_kernels
def test_cpu_kernel_name_reported():
    name = torch.ops.qtorch_cpu.weight_only_kernel_name("bfloat16")
    assert isinstance(name, str) and name


@cpu_kernels
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("n", [1, 17, 64])
def test_cpu_dequantize_int4_is_the_reference_bitwise(group_size, n):
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
INT4_GRAD_SHAPES = [
    (1, 1, 64),
    (1, 17, 2 * 160),
    (3, 64, 512),
    (32, 33, 448),
    (33, 9, 192),
    (256, 5, 320),
    (257, 31, 576),
]


@cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", INT4_GRAD_SHAPES)
def test_cpu_int4_grad_input_slabs_vs_reference(dtype, m, n, k):
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


@cpu_kernels
def test_cpu_int4_grad_input_binding_checks():
    qw = R.quantize_int4(_randn(8, 64, seed=0), 32, False)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.qtorch_cpu.int4_linear_grad_input(torch.randn(2, 7), *qw, 32)
    with pytest.raises(TypeError, match="grad_out must be float32"):
        torch.ops.qtorch_cpu.int4_linear_grad_input(torch.randn(2, 8).double(), *qw, 32)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.qtorch_cpu.int4_linear_grad_input(torch.randn(2, 8), *qw, 48)


# ---------------------------------------------------------------------------------- triton

DEV = device_for("triton")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# M <= 16 takes the split-K decode launch (2 splits under the interpreter when K has two
# blocks), M > 16 the tiled one.
WO_SHAPES = [(1, 1, 1), (1, 70, 100), (5, 33, 300), (16, 65, 130), (37, 65, 130)]


@triton_kernels
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k", WO_SHAPES)
def test_triton_int8_weight_only_linear(m, n, k, dtype):
    x = _randn(m, k, dtype=dtype, seed=11, device=DEV)
    w_q, w_s = R.quantize_int8(_randn(n, k, seed=12, device=DEV))
    bias = _randn(n, dtype=dtype, seed=13, device=DEV)
    for bs in (None, bias):
        out = KW.int8_weight_only_linear(x, w_q, w_s, bs)
        ref = R.int8_weight_only_linear(x, w_q, w_s, bs)
        assert out.dtype == dtype and out.shape == (m, n)
        assert_close(out, ref, dtype)


@triton_kernels
def test_triton_int8_weight_only_decode_uses_split_k():
    # Under the interpreter the decode launch splits K whenever it has two blocks, so the
    # decode shapes above run the split path (K = 100 and 300 with 64-wide K blocks).
    split, per = KW.split_k_for(64, 300, 32, 64, DEV)
    assert split >= 2 and per % 64 == 0 and (split - 1) * per < 300 <= split * per


@triton_kernels
@pytest.mark.parametrize("n,k,want_split", [(8192, 8192, 1), (1024, 8192, 5), (64, 256, 1)])
def test_triton_split_k_rule_on_gpu_sizes(monkeypatch, n, k, want_split):
    # The GPU rule (132 SMs, as on an H100/H200): no split when the 32-wide column tiles cover
    # the SMs, else enough splits to cover them, each at least two 128-wide K blocks.
    monkeypatch.setattr(KW, "INTERPRET", False)
    monkeypatch.setattr(KW, "num_sms", lambda device: 132)
    split, per = KW.split_k_for(n, k, 32, 128, DEV)
    assert split == want_split
    assert per % 128 == 0 and (split - 1) * per < k <= split * per


# (M, N, K, group_size, symmetric)
W4_SHAPES = [
    (1, 1, 32, 32, False),
    (1, 70, 256, 64, True),
    (3, 33, 512, 256, False),
    (16, 9, 64, 32, True),
    (37, 65, 256, 128, False),
    (40, 9, 128, 32, False),
]


@triton_kernels
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k,gs,sym", W4_SHAPES)
def test_triton_int4_weight_only_linear(m, n, k, gs, sym, dtype):
    qw, sc, z = R.quantize_int4(_randn(n, k, seed=14, device=DEV), gs, sym)
    x = _randn(m, k, dtype=dtype, seed=15, device=DEV)
    bias = _randn(n, dtype=dtype, seed=16, device=DEV)
    for bs in (None, bias):
        out = TB.int4_weight_only_linear(x, qw, sc, z, gs, bs)
        ref = R.int4_weight_only_linear(x, qw, sc, z, gs, bs)
        assert out.dtype == dtype and out.shape == (m, n)
        assert_close(out, ref, dtype)


@triton_kernels
def test_triton_int4_kernel_layout_is_derived_per_call():
    """The op keeps nothing between calls: a `.data` write into the canonical weight (which no
    version counter sees) shows in the next call."""
    qw, sc, z = R.quantize_int4(_randn(24, 64, seed=17, device=DEV), 32, False)
    x = _randn(2, 64, seed=18, device=DEV)
    first = TB.int4_weight_only_linear(x, qw, sc, z, 32, None)
    sc.data.mul_(2)
    second = TB.int4_weight_only_linear(x, qw, sc, z, 32, None)
    assert_close(second, 2 * first, torch.float32)


# ------------------------------------------------------------------------------------ cuda


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
def test_cuda_int4_pack_is_the_mma_fragment_layout(dtype, n, k, gs, symmetric):
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
def test_cuda_int8_pack_is_the_mma_fragment_layout(n, k):
    """W8A16: the bytes each lane's B registers get, placed by the m16n8k16 fragment layout,
    are the weights; K and N padding holds 0."""
    w_q = torch.randint(-127, 128, (n, k), generator=_gen(n + k), dtype=torch.int8)
    qp = pack_int8(w_q)
    assert qp.dtype == torch.int32 and qp.shape == (-(-k // 64), -(-n // 16), 2, 32, 4)
    got = emulate_int8_fragments(qp)
    assert torch.equal(got[:n, :k], w_q.long())
    assert (got[n:] == 0).all() and (got[:, k:] == 0).all()


@pytest.mark.parametrize("n,k,gs", [(1, 64, 32), (17, 96, 32), (40, 128, 64), (33, 256, 128)])
def test_cuda_packs_unpack_bitwise(n, k, gs):
    """A quantized module on a CUDA device keeps these layouts and gives its canonical buffers
    back from them (state_dict, attribute access): the inverses must be exact."""
    q, s, z = R.quantize_int4(torch.randn(n, k, generator=_gen(n * k)), gs)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(unpack_int4_weight(pack_int4(q, s, z, gs, dtype)[0], n, k), q)
    w_q = torch.randint(-128, 128, (n, k + 3), generator=_gen(n + k), dtype=torch.int8)
    assert torch.equal(unpack_int8(pack_int8(w_q), n, k + 3), w_q)


def test_cuda_int4_pack_rejects_fp32():
    q, s, z = R.quantize_int4(torch.randn(4, 64), 32)
    with pytest.raises(TypeError, match="dtype"):
        pack_int4(q, s, z, 32, torch.float32)


# (M, K, N, group_size) around the int4 tiles (BM 16 | 32 | 64, BN 256 | 128, K chunk 64)
CUDA_INT4_SHAPES = [
    (1, 32, 1, 32),
    (1, 4096, 4096, 128),
    (5, 96, 17, 32),
    (16, 256, 300, 64),
    (17, 512, 257, 128),
    (33, 1024, 130, 256),
    (100, 384, 70, 128),
    (300, 2048, 512, 128),
]


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,gs", CUDA_INT4_SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_int4_weight_only_linear(dtype, m, k, n, gs, symmetric):
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


@cuda_kernels
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
def test_cuda_int8_weight_only_linear(dtype, m, k, n):
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


@cuda_kernels
def test_cuda_int4_fp32_activations_fall_back_to_reference():
    q, s, z = (t.cuda() for t in R.quantize_int4(torch.randn(8, 64), 32))
    x = torch.randn(3, 64, device="cuda")
    with qtorch.use_backend("cuda"):
        out = ops.int4_weight_only_linear(x, q, s, z, 32)
    assert torch.equal(out, R.int4_weight_only_linear(x, q, s, z, 32))
