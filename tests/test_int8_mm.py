"""The W8A8 int8 ops (quantize_int8, int8_scaled_mm, int8_linear): every backend's kernels
against `qtorch.reference` (tests/test_ops.py runs the public ops on every backend as well).

cpu (csrc/cpu/int8_mm.cpp, kernels/int8_mm_*.cpp), on every kernel ISA this CPU runs (forced
with `qtorch._C.set_isa`). The kernels compute the reference's operations in the reference's
order (true division in the quantizer, exact int32 dot products, fp32 epilogue
`float(d) * scale_a * scale_b + bias` rounded once), so every comparison is bitwise
(`torch.equal`), not a tolerance. Shapes: M = 1 (decode), M past the 6-row tile with tails,
N = 1 and N not a multiple of the 64-channel panel, K = 1 and K not a multiple of the 4-k
group; fp32/fp16/bf16.

triton (kernels/int8_mm.py), under TRITON_INTERPRET=1 on CPU (tests/conftest.py switches the
interpreter on when no GPU exists) or compiled on a CUDA device: M = 1, K and N that are not
multiples of any block, several K blocks per row. Integer accumulation is checked for exact
equality; float results use the per-dtype tolerances of `qtorch.testing` (the interpreter
casts fp32 to bf16 by truncation, so bf16 outputs can differ from torch's round-to-nearest by
one bf16 ulp, well inside 1.6e-2).

cuda (csrc/cuda/int8_mm.cu; skipped without a CUDA device and a built qtorch._C_cuda): shapes
at and around the tile edges (M = 1, 16/17, 64/65, 128/129; N and K not multiples of the
tiles; K not a multiple of 16); results must match the reference exactly.
"""

import pytest
import torch

import qtorch
from qtorch import _backend, ops
from qtorch import reference as R
from qtorch.testing import assert_close, device_for
from tests.conftest import TRITON_RUNS, cpu_kernels, cuda_kernels, triton_kernels

if TRITON_RUNS:
    from qtorch._kernels import int8_mm as K8

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0, device="cpu"):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=device, dtype=dtype)


def _randint8(*shape, seed, lo=-128, hi=128, device="cpu"):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8).to(device)


# ------------------------------------------------------------------------------------- cpu

# (M, N, K): K = 1/3/5 pad the 4-k group; N = 1/17/65/130 leave panel tails; M = 7/13 leave
# 6-row tile tails; (64, 128, 256) is all full tiles.
SHAPES = [
    (1, 1, 1),
    (1, 130, 333),
    (2, 17, 3),
    (7, 65, 5),
    (8, 70, 36),
    (13, 64, 100),
    (6, 1, 64),
    (64, 128, 256),
    (33, 200, 129),
]


def _weight(n, k, seed):
    w_q, w_scale = R.quantize_int8(_randn(n, k, seed=seed, scale=0.05))
    return w_q, w_scale


@cpu_kernels
def test_cpu_backend_serves_the_int8_ops():
    for op in ("quantize_int8", "int8_scaled_mm", "int8_linear"):
        assert _backend.resolve(op, torch.device("cpu"))[0] == "cpu"


@cpu_kernels
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (4, 1000), (17, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_quantize_int8(isa, dtype, shape):
    x = _randn(*shape, seed=sum(shape), dtype=dtype, scale=3.0)
    x.view(-1, shape[-1])[0] = 0  # an all-zero row: scale 1, q 0
    if shape[-1] >= 2 and x.view(-1, shape[-1]).shape[0] > 1:
        x.view(-1, shape[-1])[1, :2] = torch.tensor([127.0, 63.5], dtype=dtype)  # a .5 tie
    with qtorch.use_backend("cpu"):
        q, s = ops.quantize_int8(x)
    rq, rs = R.quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(s, rs)
    assert torch.equal(q, rq)


@cpu_kernels
@pytest.mark.parametrize("m,n,k", SHAPES + [(3, 70, 4099)])
def test_cpu_int8_scaled_mm_exact_int32(isa, m, n, k):
    """Exact int32 accumulation, through the binding's int32 test hook, including the extreme
    -128 * -128 products and |sums| far beyond fp32's 2^24 (K = 4099)."""
    a, b = _randint8(m, k, seed=m + k), _randint8(n, k, seed=n + 2 * k)
    a[0] = -128
    b[0] = -128
    exact = a.int() @ b.int().T
    out = torch.ops.qtorch_cpu.int8_scaled_mm(
        a, torch.ops.qtorch_cpu.pack_int8_mm(b), n, torch.ones(m), torch.ones(n), None, torch.int32
    )
    assert out.dtype == torch.int32
    assert torch.equal(out, exact)


@cpu_kernels
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_cpu_int8_scaled_mm_exact_through_public_op(isa, m, n, k):
    """Same check through qtorch.ops with scale 1 and values small enough (|a|, |b| <= 15,
    K <= 333) that every sum is exact in fp32."""
    a, b = _randint8(m, k, seed=m, lo=-15, hi=16), _randint8(n, k, seed=n + 1, lo=-15, hi=16)
    with qtorch.use_backend("cpu"):
        out = ops.int8_scaled_mm(a, b, torch.ones(m), torch.ones(n), out_dtype=torch.float32)
    assert torch.equal(out, (a.int() @ b.int().T).float())


@cpu_kernels
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_cpu_int8_scaled_mm(isa, m, n, k, out_dtype, with_bias):
    seed = m * 100 + n + k
    a, b = _randint8(m, k, seed=seed), _randint8(n, k, seed=seed + 1)
    sa = torch.rand(m, generator=_gen(seed + 2)) * 0.01 + 1e-4
    sb = torch.rand(n, generator=_gen(seed + 3)) * 0.01 + 1e-4
    bias = _randn(n, seed=seed + 4) if with_bias else None
    with qtorch.use_backend("cpu"):
        out = ops.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    ref = R.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert torch.equal(out, ref)


@cpu_kernels
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_cpu_int8_linear(isa, m, n, k, dtype, with_bias):
    seed = m * 100 + n + k
    w_q, w_scale = _weight(n, k, seed)
    x = _randn(m, k, seed=seed + 1, dtype=dtype)
    bias = _randn(n, seed=seed + 2, dtype=dtype) if with_bias else None
    with qtorch.use_backend("cpu"):
        out = ops.int8_linear(x, w_q, w_scale, bias)
    ref = R.int8_linear(x, w_q, w_scale, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.equal(out, ref)


@cpu_kernels
def test_cpu_int8_linear_leading_dims_and_noncontiguous(isa):
    w_q, w_scale = _weight(70, 48, seed=5)
    x = _randn(2, 48, 3, 5, seed=6).permute(0, 2, 3, 1)  # [2, 3, 5, 48], non-contiguous
    assert not x.is_contiguous()
    with qtorch.use_backend("cpu"):
        out = ops.int8_linear(x, w_q, w_scale)
    ref = R.int8_linear(x.reshape(-1, 48), w_q, w_scale).reshape(2, 3, 5, 70)
    assert out.shape == (2, 3, 5, 70)
    assert torch.equal(out, ref)


@cpu_kernels
def test_cpu_an_op_keeps_nothing_between_calls():
    """An op called with a canonical weight packs it per call, so a change to the weight by
    any route (here `.data`, which no version counter sees) shows in the next call; the
    quantized modules keep their packed layout instead (tests/test_packed.py)."""
    w_q, w_scale = _weight(65, 40, seed=7)
    x = _randn(3, 40, seed=8)
    with qtorch.use_backend("cpu"):
        y1 = ops.int8_linear(x, w_q, w_scale)
        w_q.data.neg_()
        y2 = ops.int8_linear(x, w_q, w_scale)
    assert torch.equal(y1, R.int8_linear(x, -w_q, w_scale))
    assert torch.equal(y2, R.int8_linear(x, w_q, w_scale))


@cpu_kernels
@pytest.mark.parametrize("n, k", [(1, 1), (17, 3), (65, 130), (130, 333), (70, 4099)])
def test_cpu_packing_and_backward_are_the_same_on_every_isa(isa, n, k):
    """The packed weight is the same bytes on every ISA (the scalar definition's), and so is
    the quantized module's backward w.r.t. x, which dequantizes the packed weight one slab of
    ŵ at a time (K = 4099: many slabs and a 3-column tail one): bitwise, and within fp32
    rounding of grad @ ŵ with the reference's ŵ."""
    from qtorch import _C

    w_q, w_scale = _weight(n, k, seed=n + k)
    grad = _randn(5, n, seed=k)

    def run():
        packed = torch.ops.qtorch_cpu.pack_int8_mm(w_q)
        gx = torch.ops.qtorch_cpu.linear_packed_grad_input(
            grad, packed, w_scale, None, "cpu_w8a8", n, k, 0
        )
        return packed, gx

    packed, gx = run()
    _C.set_isa("scalar")
    try:
        packed_s, gx_s = run()
    finally:
        _C.set_isa(isa)
    assert torch.equal(packed, packed_s)
    assert torch.equal(gx, gx_s)
    assert_close(gx, grad @ (w_q.float() * w_scale[:, None]), torch.float32)


@cpu_kernels
def test_cpu_binding_rejects_a_mismatched_packed_weight():
    w_q, w_scale = _weight(65, 40, seed=9)
    packed = torch.ops.qtorch_cpu.pack_int8_mm(w_q)
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="packed weight"):
        torch.ops.qtorch_cpu.int8_linear(x, packed, 66, torch.ones(66), None)
    with pytest.raises(ValueError, match="packed weight"):
        torch.ops.qtorch_cpu.int8_linear(torch.randn(2, 44), packed, 65, w_scale, None)
    with pytest.raises(TypeError, match="x must be"):
        torch.ops.qtorch_cpu.int8_linear(x.double(), packed, 65, w_scale, None)


@cpu_kernels
def test_cpu_measurement_helpers():
    """The benches' ceilings: stream_read really reads every word (its sum is the words'
    wrapping sum), and the probes return plausible rates (positive, finite)."""
    t = torch.arange(1, 1 + 8 * 1001, dtype=torch.int64)  # an odd number of 8-word strips
    assert torch.ops.qtorch_cpu.stream_read(t) == int(t.sum())
    u8 = torch.full((4096 * 3 + 8,), 1, dtype=torch.uint8)
    want = (u8.numel() // 8) * 0x0101010101010101 % 2**64  # uint64 wrap, returned as int64
    assert torch.ops.qtorch_cpu.stream_read(u8) == (want - 2**64 if want >= 2**63 else want)
    bw = torch.ops.qtorch_cpu.dram_read_bandwidth(4 << 20, 2)
    assert 1e8 < bw < 1e13
    with pytest.raises(ValueError, match="bytes"):
        torch.ops.qtorch_cpu.dram_read_bandwidth(1024, 1)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.qtorch_cpu.stream_read(torch.zeros(8, 8, dtype=torch.int64).t())


# ---------------------------------------------------------------------------------- triton

DEV = device_for("triton")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# (M, K): K = 4100 > MAX_ONE_BLOCK takes the two-sweep path.
QUANT_SHAPES = [(1, 1), (3, 17), (5, 300), (2, 4100)]


@triton_kernels
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", QUANT_SHAPES)
def test_triton_quantize_int8_matches_reference_exactly(m, k, dtype):
    x = _randn(m, k, dtype=dtype, seed=m * k, scale=3.0, device=DEV)
    x[0, 0] = 0.0
    q, s = K8.quantize_int8(x)
    q_ref, s_ref = R.quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)  # same IEEE division, same round-half-even


@triton_kernels
def test_triton_quantize_int8_ties_round_half_even_and_zero_rows():
    # amax = 127 -> scale 1, so x / scale hits exact .5 ties.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.0], [0.0] * 7], device=DEV)
    q, s = K8.quantize_int8(x)
    assert s.tolist() == [1.0, 1.0]
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 127], [0] * 7]


# (M, N, K): blocks under the interpreter are 32×64×64, so these cover one and several blocks
# with ragged edges in every dimension.
MM_SHAPES = [(1, 1, 1), (1, 70, 100), (37, 65, 130), (64, 64, 64), (16, 33, 300)]


@triton_kernels
@pytest.mark.parametrize("m,n,k", MM_SHAPES)
def test_triton_int8_scaled_mm_int32_accumulation_is_exact(m, n, k):
    # Unit scales: the output is the int32 accumulator itself; |acc| <= 127² · 300 < 2^24,
    # so it is exact in fp32 and must equal the integer matmul bit for bit.
    a = _randint8(m, k, seed=1, lo=-127, device=DEV)
    b = _randint8(n, k, seed=2, lo=-127, device=DEV)
    ones_m = torch.ones(m, device=DEV)
    ones_n = torch.ones(n, device=DEV)
    out = K8.int8_scaled_mm(a, b, ones_m, ones_n, None, torch.float32)
    exact = (a.cpu().int() @ b.cpu().int().T).float()
    assert torch.equal(out.cpu(), exact)


@triton_kernels
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("m,n,k", MM_SHAPES)
def test_triton_int8_scaled_mm_epilogue(m, n, k, out_dtype):
    a = _randint8(m, k, seed=3, lo=-127, device=DEV)
    b = _randint8(n, k, seed=4, lo=-127, device=DEV)
    # Scales of a real quantization (amax / 127) keep fp16 outputs in range.
    sa = (torch.rand(m, generator=_gen(5)) * 0.05 + 0.01).to(DEV)
    sb = (torch.rand(n, generator=_gen(6)) * 0.05 + 0.01).to(DEV)
    bias = _randn(n, seed=7, device=DEV).to(out_dtype)
    for bs in (None, bias):
        out = K8.int8_scaled_mm(a, b, sa, sb, bs, out_dtype)
        ref = R.int8_scaled_mm(a, b, sa, sb, bs, out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, n)
        assert_close(out, ref, out_dtype)


@triton_kernels
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k", MM_SHAPES)
def test_triton_int8_linear(m, n, k, dtype):
    x = _randn(m, k, dtype=dtype, seed=8, device=DEV)
    w_q, w_s = R.quantize_int8(_randn(n, k, seed=9, device=DEV))
    bias = _randn(n, dtype=dtype, seed=10, device=DEV)
    out = K8.int8_linear(x, w_q, w_s, bias)
    ref = R.int8_linear(x, w_q, w_s, bias)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


# ------------------------------------------------------------------------------------ cuda

# (M, K, N) around the int8 tiles (BM 64 | 128, BN 128, BK 64, K padded to 16)
CUDA_INT8_SHAPES = [
    (1, 1, 1),
    (1, 16, 128),
    (17, 33, 129),
    (64, 64, 127),
    (65, 200, 257),
    (129, 1000, 130),
    (256, 4096, 512),
]


@cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 1), (3, 17), (64, 4096), (129, 1000), (5, 8191)])
def test_cuda_quantize_int8_exact(dtype, m, k):
    x = (torch.randn(m, k, generator=_gen(m + k)) * 5).to("cuda", dtype)
    x[0, 0] = 0.5 * x[0, 1]  # a value that may round half-way
    q, s = torch.ops.qtorch_cuda.quantize_int8(x)
    q_ref, s_ref = R.quantize_int8(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)  # IEEE x / scale and rint: exactly the reference


@cuda_kernels
def test_cuda_quantize_int8_zero_row():
    x = torch.zeros(3, 40, device="cuda")
    q, s = torch.ops.qtorch_cuda.quantize_int8(x)
    assert torch.equal(s, torch.ones(3, device="cuda")) and (q == 0).all()


@cuda_kernels
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", CUDA_INT8_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_int8_scaled_mm_exact(out_dtype, m, k, n, with_bias):
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


@cuda_kernels
def test_cuda_int8_mm_integer_accumulation_is_exact():
    """Unit scales expose the raw int32 sums: extreme values, K = 4096 (|sum| < 2^24)."""
    m, n, k = 130, 129, 4096
    a = torch.full((m, k), -127, dtype=torch.int8, device="cuda")
    b = torch.full((n, k), 127, dtype=torch.int8, device="cuda")
    b[1::2] = -127
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    out = torch.ops.qtorch_cuda.int8_scaled_mm(a, b, ones_m, ones_n, None, torch.float32)
    want = (a.double() @ b.double().T).float()
    assert torch.equal(out, want)


@cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", CUDA_INT8_SHAPES)
def test_cuda_int8_linear_exact(dtype, m, k, n):
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
