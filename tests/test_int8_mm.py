"""The `cpu` backend's W8A8 int8 kernels (csrc/cpu/int8_mm.cpp, kernels/int8_mm_*.cpp) against
`qtorch.reference`, on every kernel ISA this CPU runs (forced with `qtorch._C.set_isa`).

The kernels compute the reference's operations in the reference's order (true division in
the quantizer, exact int32 dot products, fp32 epilogue `float(d) * scale_a * scale_b + bias`
rounded once), so every comparison here is bitwise (`torch.equal`), not a tolerance.
Shapes: M = 1 (decode), M past the 6-row tile with tails, N = 1 and N not a multiple of the
64-channel panel, K = 1 and K not a multiple of the 4-k group; fp32/fp16/bf16."""

import pytest
import torch

import qtorch
from qtorch import _backend, _cache, ops
from qtorch import reference as R

_C = pytest.importorskip("qtorch._C", reason="qtorch._C (the C++ CPU kernels) is not built")
from qtorch.backends import cpu as CPU  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): K = 1/3/5 pad the 4-k group; N = 1/17/65/130 leave panel tails; M = 7/13 leave
# 6-row tile tails; (64, 128, 256) is all full tiles.
SHAPES = [(1, 1, 1), (1, 130, 333), (2, 17, 3), (7, 65, 5), (8, 70, 36), (13, 64, 100), (6, 1, 64),
          (64, 128, 256), (33, 200, 129)]


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


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


def _randint8(*shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def _weight(n, k, seed):
    w_q, w_scale = R.quantize_int8(_randn(n, k, seed=seed, scale=0.05))
    return w_q, w_scale


def test_cpu_backend_serves_the_int8_ops():
    for op in ("quantize_int8", "int8_scaled_mm", "int8_linear"):
        assert _backend.resolve(op, torch.device("cpu"))[0] == "cpu"


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (4, 1000), (17, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_int8(isa, dtype, shape):
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


@pytest.mark.parametrize("m,n,k", SHAPES + [(3, 70, 4099)])
def test_int8_scaled_mm_exact_int32(isa, m, n, k):
    """Exact int32 accumulation, through the binding's int32 test hook, including the extreme
    -128 * -128 products and |sums| far beyond fp32's 2^24 (K = 4099)."""
    a, b = _randint8(m, k, seed=m + k), _randint8(n, k, seed=n + 2 * k)
    a[0] = -128
    b[0] = -128
    exact = a.int() @ b.int().T
    out = torch.ops.qtorch_cpu.int8_scaled_mm_packed(
        a, CPU._int8_vnni_weight(b), n, torch.ones(m), torch.ones(n), None, torch.int32)
    assert out.dtype == torch.int32
    assert torch.equal(out, exact)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_scaled_mm_exact_through_public_op(isa, m, n, k):
    """Same check through qtorch.ops with scale 1 and values small enough (|a|, |b| <= 15,
    K <= 333) that every sum is exact in fp32."""
    a, b = _randint8(m, k, seed=m, lo=-15, hi=16), _randint8(n, k, seed=n + 1, lo=-15, hi=16)
    with qtorch.use_backend("cpu"):
        out = ops.int8_scaled_mm(a, b, torch.ones(m), torch.ones(n), out_dtype=torch.float32)
    assert torch.equal(out, (a.int() @ b.int().T).float())


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_scaled_mm(isa, m, n, k, out_dtype, with_bias):
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


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_linear(isa, m, n, k, dtype, with_bias):
    seed = m * 100 + n + k
    w_q, w_scale = _weight(n, k, seed)
    x = _randn(m, k, seed=seed + 1, dtype=dtype)
    bias = _randn(n, seed=seed + 2, dtype=dtype) if with_bias else None
    with qtorch.use_backend("cpu"):
        out = ops.int8_linear(x, w_q, w_scale, bias)
    ref = R.int8_linear(x, w_q, w_scale, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.equal(out, ref)


def test_int8_linear_leading_dims_and_noncontiguous(isa):
    w_q, w_scale = _weight(70, 48, seed=5)
    x = _randn(2, 48, 3, 5, seed=6).permute(0, 2, 3, 1)  # [2, 3, 5, 48], non-contiguous
    assert not x.is_contiguous()
    with qtorch.use_backend("cpu"):
        out = ops.int8_linear(x, w_q, w_scale)
    ref = R.int8_linear(x.reshape(-1, 48), w_q, w_scale).reshape(2, 3, 5, 70)
    assert out.shape == (2, 3, 5, 70)
    assert torch.equal(out, ref)


def test_prepack_cache_reuse():
    """The VNNI repack runs once per weight tensor and again only after an in-place change."""
    w_q, w_scale = _weight(65, 40, seed=7)
    x = _randn(3, 40, seed=8)
    calls = []
    real = CPU._int8_pack_weight_op

    def counting(w):
        calls.append(1)
        return real(w)

    CPU._int8_pack_weight_op = counting
    try:
        with qtorch.use_backend("cpu"):
            y1 = ops.int8_linear(x, w_q, w_scale)
            y2 = ops.int8_linear(x, w_q, w_scale)
            packed = _cache.packed(w_q, "cpu_int8_vnni", lambda: pytest.fail("not cached"))
            assert len(calls) == 1
            w_q.neg_()  # in place: the cached layout is stale and must be rebuilt
            y3 = ops.int8_linear(x, w_q, w_scale)
            assert len(calls) == 2
    finally:
        CPU._int8_pack_weight_op = real
    assert torch.equal(y1, y2)
    assert packed.dtype == torch.uint8
    assert torch.equal(y3, R.int8_linear(x, w_q, w_scale))


def test_binding_rejects_a_mismatched_packed_weight():
    w_q, w_scale = _weight(65, 40, seed=9)
    packed = torch.ops.qtorch_cpu.int8_pack_weight(w_q)
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="packed weight"):
        torch.ops.qtorch_cpu.int8_linear_packed(x, packed, 66, torch.ones(66), None)
    with pytest.raises(ValueError, match="packed weight"):
        torch.ops.qtorch_cpu.int8_linear_packed(torch.randn(2, 44), packed, 65, w_scale, None)
    with pytest.raises(TypeError, match="x must be"):
        torch.ops.qtorch_cpu.int8_linear_packed(x.double(), packed, 65, w_scale, None)


def test_measurement_helpers():
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
