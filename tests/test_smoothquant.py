"""SmoothQuant for W8A8 (API.md "Calibrated quantization", Int8DynamicConfig(smoothquant_alpha)):
the scale's definition, the op `int8_linear_smooth` (x / s fused into the per-token activation
quantization) on every backend against the reference, the smoothed module (its packed layout
where the backend has one) against the definition int8_linear(x / s, quantize(W · diag(s))),
quantize_ with calibration data, and the `smooth_scale` buffer's round trips."""

import io

import pytest
import torch
from torch import nn

import qtorch
from qtorch import ops, smoothquant
from qtorch import reference as R
from qtorch.testing import assert_close, device_for, int8_tie_tolerance
from tests.conftest import cpu_kernels, kernel_backends


def _outlier_x(*shape, seed, dtype=torch.float32):
    """Activations with a few large channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., ::7] *= 30.0
    return x.to(dtype)


def _smooth(k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, generator=g) * 4 + 0.1).float()


def _close_int8(out, ref, x, s, w_scale, dtype):
    """Within the dtype's tolerance plus one activation step (API.md allows a kernel one step
    in rare ties)."""
    _, xs = R.quantize_int8(x.float() / s)
    tie = int8_tie_tolerance(xs, w_scale)
    scale = max(ref.abs().max().item(), 1.0)
    atol = tie + torch.finfo(dtype).eps * 4 * scale
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=0)


def test_smooth_scale_definition():
    a = torch.tensor([4.0, 0.0, 1.0, 9.0])
    w = torch.tensor([[1.0, 2.0, 0.0, -3.0], [-2.0, 1.0, 0.0, 1.0]])
    s = smoothquant.smooth_scale(a, w, 0.5)
    # s_k = max|x_k|^α / max|w_k|^(1-α); channels with a zero maximum get 1
    torch.testing.assert_close(s, torch.tensor([4**0.5 / 2**0.5, 1.0, 1.0, 3.0 / 3**0.5]))
    torch.testing.assert_close(smoothquant.smooth_scale(a, w, 1.0)[0], torch.tensor(4.0))
    torch.testing.assert_close(smoothquant.smooth_scale(a, w, 0.0)[3], torch.tensor(1 / 3.0))
    assert s.dtype == torch.float32 and bool((s > 0).all())


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_smooth_op_every_backend(backend, dtype):
    dev = device_for(backend)
    for i, (m, n, k) in enumerate([(1, 1, 1), (1, 33, 70), (5, 17, 129), (19, 64, 300)]):
        x = _outlier_x(m, k, seed=i, dtype=dtype)
        s = _smooth(k, seed=10 + i)
        wq, ws = R.quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(i)))
        bias = torch.randn(n).to(dtype)
        ref = R.int8_linear_smooth(x, wq, ws, s, bias)
        with qtorch.use_backend(backend):
            out = ops.int8_linear_smooth(x.to(dev), wq.to(dev), ws.to(dev), s.to(dev), bias.to(dev))
        assert out.dtype == dtype and out.shape == (m, n)
        _close_int8(out.cpu(), ref, x, s, ws, dtype)
    # leading dims and M = 0
    with qtorch.use_backend(backend):
        x3 = _outlier_x(2, 3, 70, seed=7, dtype=dtype).to(dev)
        s = _smooth(70, 1).to(dev)
        wq, ws = (t.to(dev) for t in R.quantize_int8(torch.randn(9, 70)))
        assert ops.int8_linear_smooth(x3, wq, ws, s).shape == (2, 3, 9)
        assert ops.int8_linear_smooth(x3[:0], wq, ws, s).shape == (0, 3, 9)


def test_int8_linear_smooth_reference_is_the_definition():
    """int8_linear(x / s, quantize(W·diag(s))) with the division in fp32."""
    x = _outlier_x(6, 40, seed=3)
    w = torch.randn(12, 40)
    s = _smooth(40, 4)
    wq, ws = R.quantize_int8(w * s)
    torch.testing.assert_close(
        R.int8_linear_smooth(x, wq, ws, s), R.int8_linear(x / s, wq, ws), rtol=0, atol=0
    )


def test_int8_linear_smooth_checks():
    wq, ws = R.quantize_int8(torch.randn(8, 16))
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="smooth_scale"):
        ops.int8_linear_smooth(x, wq, ws, torch.ones(15))
    with pytest.raises(TypeError, match="smooth_scale"):
        ops.int8_linear_smooth(x, wq, ws, torch.ones(16, dtype=torch.float64))
    with pytest.raises(TypeError, match="smooth_scale"):
        ops.int8_linear_smooth(x, wq, ws, None)


def test_int8_linear_smooth_opcheck_and_compile():
    wq, ws = R.quantize_int8(torch.randn(8, 16))
    s = _smooth(16, 0)
    x = torch.randn(3, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.qtorch.int8_linear_smooth.default, (x, wq, ws, s, b))
    torch.library.opcheck(torch.ops.qtorch.int8_linear_smooth.default, (x.detach(), wq, ws, s))
    fn = torch.compile(lambda x: ops.int8_linear_smooth(x, wq, ws, s, b), fullgraph=True)
    torch.testing.assert_close(fn(x.detach()), ops.int8_linear_smooth(x.detach(), wq, ws, s, b))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoothed_module_equals_definition_every_backend(backend, dtype):
    """The module's forward (packed layout where the backend has one, the C fast path on cpu)
    is int8_linear(x / s, quantize(W · diag(s))) from the definition; its backward is
    (grad @ ŵ_s) / s (straight-through)."""
    dev = device_for(backend)
    lin = nn.Linear(70, 33).to(dtype)
    s = _smooth(70, 5)
    want_q, want_s = R.quantize_int8(lin.weight.detach().float() * s)
    with qtorch.use_backend(backend):
        mod = qtorch.nn.Int8DynamicLinear.from_float(lin.to(dev), smooth_scale=s.to(dev))
        x = _outlier_x(4, 3, 70, seed=6, dtype=dtype).to(dev)
        with torch.no_grad():
            out = mod(x)
        xg = x.clone().requires_grad_()
        mod(xg).float().sum().backward()
    assert torch.equal(mod.qweight.cpu(), want_q) and torch.equal(mod.weight_scale.cpu(), want_s)
    x2 = x.cpu().reshape(12, 70)
    ref = R.int8_linear(x2.float() / s, want_q, want_s, lin.bias.detach().cpu()).to(dtype)
    _close_int8(out.cpu().reshape(12, 33), ref, x2, s, want_s, dtype)
    gref = (torch.ones(12, 33) @ (want_q.float() * want_s[:, None])) / s
    assert_close(xg.grad.cpu().reshape(12, 70), gref.to(dtype), dtype)
    torch.testing.assert_close(mod.dequantize().cpu(), want_q.float() * want_s[:, None] / s)
    assert "smoothquant" in repr(mod)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Dropout(0.1), nn.Linear(48, 16))


def _calib(n=4):
    return [_outlier_x(8, 32, seed=100 + i) for i in range(n)]


def test_quantize_with_smoothquant():
    model = _model()
    data = _calib()
    amax0 = torch.stack([x.abs().amax(0) for x in data]).amax(0)
    h = [model[1](model[0](x)) for x in data]
    amax1 = torch.stack([t.abs().amax(0) for t in h]).amax(0).detach()
    w0, w1 = model[0].weight.detach().clone(), model[3].weight.detach().clone()
    model.train()
    model[2].eval()  # a mixed mode is restored as it was
    qtorch.quantize_(
        model, qtorch.Int8DynamicConfig(smoothquant_alpha=0.5), calibration_data=iter(data)
    )
    assert model.training and not model[2].training and model[0].training
    for lin, amax, w in ((model[0], amax0, w0), (model[3], amax1, w1)):
        assert isinstance(lin, qtorch.nn.Int8DynamicLinear)
        s = smoothquant.smooth_scale(amax, w, 0.5)
        torch.testing.assert_close(lin.smooth_scale, s)
        assert not lin._forward_pre_hooks and not lin._forward_hooks
    assert set(model.state_dict()) == {
        "0.qweight",
        "0.weight_scale",
        "0.smooth_scale",
        "0.bias",
        "3.qweight",
        "3.weight_scale",
        "3.smooth_scale",
        "3.bias",
    }


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_calibration_inputs_tuple_and_dict(kind):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)

        def forward(self, x, y=None):
            return self.a(x) + self.b(y)

    m = Two()
    wa, wb = m.a.weight.detach().clone(), m.b.weight.detach().clone()
    xs = [(_outlier_x(4, 16, seed=i), torch.randn(4, 16)) for i in range(2)]
    data = xs if kind == "tuple" else [{"x": x, "y": y} for x, y in xs]
    qtorch.quantize_(m, qtorch.Int8DynamicConfig(smoothquant_alpha=0.8), calibration_data=data)
    for lin, w, j in ((m.a, wa, 0), (m.b, wb, 1)):
        amax = torch.stack([t[j].abs().amax(0) for t in xs]).amax(0)
        torch.testing.assert_close(lin.smooth_scale, smoothquant.smooth_scale(amax, w, 0.8))


def test_smoothquant_needs_calibration_data_and_bad_alpha():
    with pytest.raises(ValueError, match="calibration_data"):
        qtorch.quantize_(_model(), qtorch.Int8DynamicConfig(smoothquant_alpha=0.5))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="smoothquant_alpha"):
            qtorch.Int8DynamicConfig(smoothquant_alpha=bad)
    with pytest.raises(TypeError):
        qtorch.Int8DynamicConfig(smoothquant_alpha="0.5")
    # data-free configs ignore calibration_data; no smooth_scale key without SmoothQuant
    m = qtorch.quantize_(_model(), qtorch.Int8DynamicConfig(), calibration_data=_calib())
    assert not any(k.endswith("smooth_scale") for k in m.state_dict())


def test_smooth_scale_round_trips(tmp_path):
    """state_dict, torch.load(weights_only=True) and safetensors; into a model quantized with
    the same config (other calibration data) and into empty modules: identical outputs."""
    model = _model().eval()
    cfg = qtorch.Int8DynamicConfig(smoothquant_alpha=0.5)
    qtorch.quantize_(model, cfg, calibration_data=_calib())
    x = _outlier_x(5, 32, seed=9)
    want = model(x)
    sd = model.state_dict()
    assert sd["0.smooth_scale"].dtype == torch.float32 and sd["0.smooth_scale"].shape == (32,)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = _model().eval()
    qtorch.quantize_(other, cfg, calibration_data=_calib(1))
    other.load_state_dict(loaded)
    torch.testing.assert_close(other(x), want, rtol=0, atol=0)
    empty = nn.Sequential(
        qtorch.nn.Int8DynamicLinear(32, 48),
        nn.GELU(),
        nn.Dropout(0.1),
        qtorch.nn.Int8DynamicLinear(48, 16),
    ).eval()
    empty.load_state_dict(loaded)
    torch.testing.assert_close(empty(x), want, rtol=0, atol=0)
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "m.safetensors"
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    third = _model().eval()
    qtorch.quantize_(third, cfg, calibration_data=_calib(2))
    third.load_state_dict(st.load_file(str(path)))
    torch.testing.assert_close(third(x), want, rtol=0, atol=0)


def test_smoothed_module_compiles():
    model = _model().eval()
    qtorch.quantize_(
        model, qtorch.Int8DynamicConfig(smoothquant_alpha=0.5), calibration_data=_calib()
    )
    x = _outlier_x(3, 32, seed=11)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want)


def test_from_float_takes_the_config_fields():
    """from_float(linear, **vars(config)), as quantize_ calls it; smoothquant_alpha needs the
    layer's input statistics (act_absmax), which quantize_ measures from calibration_data."""
    lin = nn.Linear(16, 8)
    plain = qtorch.nn.Int8DynamicLinear.from_float(lin, **vars(qtorch.Int8DynamicConfig()))
    assert "smooth_scale" not in plain._buffers and "smooth_scale" not in plain.state_dict()
    cfg = qtorch.Int8DynamicConfig(smoothquant_alpha=0.5)
    with pytest.raises(ValueError, match="calibration_data"):
        qtorch.nn.Int8DynamicLinear.from_float(lin, **vars(cfg))
    amax = torch.rand(16) + 0.1
    mod = qtorch.nn.Int8DynamicLinear.from_float(lin, **vars(cfg), act_absmax=amax)
    torch.testing.assert_close(mod.smooth_scale, smoothquant.smooth_scale(amax, lin.weight, 0.5))


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_smooth_quantize_every_isa(isa, dtype):
    """The C++ activation quantization with the fused x / s, on each kernel ISA (vector body
    and tail lengths), bitwise the reference's codes: the module's output equals the
    reference exactly up to the fp32 epilogue."""
    for k in (1, 7, 16, 33, 130):
        x = _outlier_x(5, k, seed=k, dtype=dtype)
        s = _smooth(k, seed=k + 1)
        wq, ws = R.quantize_int8(torch.randn(19, k, generator=torch.Generator().manual_seed(k)))
        with qtorch.use_backend("cpu"):
            out = ops.int8_linear_smooth(x, wq, ws, s)
        ref = R.int8_linear_smooth(x, wq, ws, s)
        assert_close(out, ref, dtype)
