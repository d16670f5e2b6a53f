"""int4 with float zero points (API.md "Calibrated quantization", zero_point="float"): the
reference's grid, a Q4_1-style weight round-tripping exactly, every backend's int4 kernels
(ops on canonical buffers and the modules' packed layouts) against the reference, and the
modules' state dicts / safetensors round trips."""

import io

import pytest
import torch
from torch import nn

import qtorch
from qtorch import ops
from qtorch import reference as R
from qtorch.reference.weight_only import unpack_int4
from qtorch.testing import assert_close, device_for
from tests.conftest import cpu_kernels, kernel_backends


def _q4_1_weight(n, k, seed, gs=32):
    """w = d · q + m per group of gs (GGUF Q4_1), q in 0..15 with both ends used in every
    group, d > 0 and m of either sign: what SmolLM2's checkpoint was made from."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // gs, gs), generator=g).float()
    q[..., 0], q[..., 1] = 0.0, 15.0
    d = torch.rand(n, k // gs, 1, generator=g) * 0.02 + 1e-3
    m = torch.randn(n, k // gs, 1, generator=g) * 0.05
    return (d * q + m).reshape(n, k), q.reshape(n, k).to(torch.uint8)


def test_reference_float_zero_grid():
    """The formulas of API.md, one group worked by hand: range [lo, hi] of the group itself
    (not widened to 0), zero = -lo / scale unrounded."""
    w = torch.linspace(0.5, 2.0, 32).reshape(1, 32)  # all positive: int zeros would widen to 0
    qw, sc, z = R.quantize_int4(w, 32, False, "float")
    assert z.dtype == torch.float32 and z.shape == (1, 1) and sc.shape == (1, 1)
    scale = torch.tensor((2.0 - 0.5) / 15, dtype=torch.float32)
    torch.testing.assert_close(sc[0, 0], scale, rtol=0, atol=0)
    torch.testing.assert_close(z[0, 0], -torch.tensor(0.5) / scale, rtol=0, atol=0)
    q = unpack_int4(qw)
    assert q.min().item() == 0 and q.max().item() == 15
    # constant group: scale 1, zero = -lo
    qw, sc, z = R.quantize_int4(torch.full((1, 32), 0.25), 32, False, "float")
    assert sc.item() == 1.0 and z.item() == -0.25
    torch.testing.assert_close(R.dequantize_int4(qw, sc, z, 32), torch.full((1, 32), 0.25))


@pytest.mark.parametrize("backend", kernel_backends())
def test_q4_1_weight_round_trips_exactly(backend):
    """A Q4_1-style weight (w = d·q + m per group of 32, q in 0..15, both ends used): float
    zero points at g32 recover every code q exactly and ŵ = w to fp32 rounding."""
    w, q = _q4_1_weight(48, 256, seed=1)
    dev = device_for(backend)
    with qtorch.use_backend(backend):
        qw, sc, z = ops.quantize_int4(w.to(dev), 32, zero_point="float")
        assert z.dtype == torch.float32
        assert torch.equal(unpack_int4(qw).cpu(), q)
        w_hat = ops.dequantize_int4(qw, sc, z, 32).cpu()
    torch.testing.assert_close(w_hat, w, rtol=0, atol=2e-7)
    # the integer-zero grid cannot: its range must contain 0
    qi, si, zi = R.quantize_int4(w, 32, False)
    assert (R.dequantize_int4(qi, si, zi, 32) - w).abs().max() > 1e-3


def test_bad_zero_point():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="zero_point"):
        ops.quantize_int4(w, 32, True, "float")
    with pytest.raises(ValueError, match="zero_point"):
        ops.quantize_int4(w, 32, False, "half")
    with pytest.raises(ValueError, match="symmetric"):
        qtorch.Int4WeightOnlyConfig(symmetric=True, zero_point="float")
    with pytest.raises(ValueError, match="zero_point"):
        qtorch.Int4WeightOnlyConfig(zero_point="fp")
    qw, sc, z = R.quantize_int4(w, 32, False, "float")
    with pytest.raises(TypeError, match="zeros"):
        ops.dequantize_int4(qw, sc, z.double(), 32)


SHAPES = [(1, 1, 32), (3, 17, 64), (9, 70, 96), (17, 33, 256)]  # (M, N, K)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gs", [32, 64])
def test_int4_ops_float_zeros_every_backend(backend, dtype, gs):
    """int4_weight_only_linear / dequantize_int4 / the backward on float zeros agree with the
    reference, on odd shapes, every dtype."""
    dev = device_for(backend)
    for i, (m, n, k) in enumerate(SHAPES):
        if k % gs:
            continue
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(i)) + 0.3
        qw, sc, z = R.quantize_int4(w, gs, False, "float")
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + i)).to(dtype)
        bias = torch.randn(n).to(dtype)
        ref = R.int4_weight_only_linear(x, qw, sc, z, gs, bias)
        with qtorch.use_backend(backend):
            args = [t.to(dev) for t in (qw, sc, z)]
            out = ops.int4_weight_only_linear(x.to(dev), *args, gs, bias.to(dev))
            deq = ops.dequantize_int4(*args, gs)
            xg = x.to(dev).requires_grad_()
            ops.int4_weight_only_linear(xg, *args, gs).sum().backward()
        assert out.dtype == dtype and out.shape == (m, n)
        assert_close(out.cpu(), ref, dtype)
        torch.testing.assert_close(deq.cpu(), R.dequantize_int4(qw, sc, z, gs))
        gref = (torch.ones(m, n) @ R.dequantize_int4(qw, sc, z, gs)).to(dtype)
        assert_close(xg.grad.cpu(), gref, dtype)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_module_float_zeros_every_backend(backend, dtype):
    """A float-zero Int4WeightOnlyLinear (its packed layout where the backend has one) equals
    the reference on its canonical buffers; its backward too."""
    dev = device_for(backend)
    lin = nn.Linear(96, 37, dtype=dtype)
    with qtorch.use_backend(backend):
        mod = qtorch.nn.Int4WeightOnlyLinear.from_float(
            lin.to(dev), group_size=32, zero_point="float"
        )
        x = torch.randn(5, 3, 96, dtype=dtype, device=dev, requires_grad=True)
        out = mod(x)
        out.float().sum().backward()
    sd = mod.state_dict()
    assert sd["zeros"].dtype == torch.float32 and sd["zeros"].shape == (37, 3)
    c = {k: v.cpu() for k, v in sd.items()}
    ref = R.int4_weight_only_linear(
        x.detach().cpu().reshape(15, 96), c["qweight"], c["scales"], c["zeros"], 32, c["bias"]
    ).reshape(5, 3, 37)
    assert_close(out.detach().cpu(), ref, dtype)
    gref = torch.ones(15, 37) @ R.dequantize_int4(c["qweight"], c["scales"], c["zeros"], 32)
    assert_close(x.grad.cpu(), gref.reshape(5, 3, 96).to(dtype), dtype)
    assert "float zero points" in repr(mod)


def test_float_zero_state_dict_round_trips(tmp_path):
    """quantize_ with zero_point="float": zeros float32 in the state dict; it loads into the
    same architecture quantized with the same config (identical outputs), through torch.save /
    torch.load(weights_only=True) and safetensors; and into an empty module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    x = torch.randn(4, 64)
    cfg = qtorch.Int4WeightOnlyConfig(group_size=32, zero_point="float")
    qtorch.quantize_(model, cfg)
    want = model(x)
    sd = model.state_dict()
    assert sd["0.zeros"].dtype == torch.float32 and sd["2.zeros"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    qtorch.quantize_(other, cfg)
    other.load_state_dict(loaded)
    torch.testing.assert_close(other(x), want, rtol=0, atol=0)
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "m.safetensors"
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    third = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    qtorch.quantize_(third, cfg)
    third.load_state_dict(st.load_file(str(path)))
    torch.testing.assert_close(third(x), want, rtol=0, atol=0)
    # an empty module made with integer zero points takes the checkpoint's float zeros
    empty = qtorch.nn.Int4WeightOnlyLinear(64, 64, group_size=32)
    empty.load_state_dict({k[2:]: v for k, v in loaded.items() if k.startswith("0.")})
    assert empty.zeros.dtype == torch.float32 and empty.zero_point == "float"
    torch.testing.assert_close(empty(x), model[0](x), rtol=0, atol=0)


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_float_zeros_every_isa(isa, dtype):
    """The C++ int4 kernels read float32 packed zeros on each ISA (block tails, M tiles)."""
    for i, (m, n, k) in enumerate([(1, 17, 64), (3, 33, 128), (9, 70, 64)]):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(i)) - 0.2
        qw, sc, z = R.quantize_int4(w, 32, False, "float")
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(50 + i)).to(dtype)
        with qtorch.use_backend("cpu"):
            mod = qtorch.nn.Int4WeightOnlyLinear(
                k, n, bias=False, group_size=32, zero_point="float"
            )
            mod.load_state_dict({"qweight": qw, "scales": sc, "zeros": z})
            out_mod = mod(x)
            out_op = ops.int4_weight_only_linear(x, qw, sc, z, 32)
        ref = R.int4_weight_only_linear(x, qw, sc, z, 32)
        assert_close(out_mod, ref, dtype)
        assert_close(out_op, ref, dtype)
