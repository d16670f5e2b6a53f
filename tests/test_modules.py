"""qtorch.nn quantized linears and qtorch.quantize_ (API.md, "Modules"): swapping, the skip
warning, numerics against qtorch.reference, SQNR against the float layer, state-dict format and
round trips, dtype/device moves, gradients for fine-tuning, torch.compile, every backend."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtorch
from qtorch import reference as R
from qtorch.nn import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from qtorch.testing import assert_close, sqnr
from tests.conftest import device_for, kernel_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIGS = {
    "int8_dynamic": qtorch.Int8DynamicConfig(),
    "int8_weight_only": qtorch.Int8WeightOnlyConfig(),
    "int4_g32": qtorch.Int4WeightOnlyConfig(group_size=32),
    "int4_g64_sym": qtorch.Int4WeightOnlyConfig(group_size=64, symmetric=True),
}
MODULE_FOR = {
    "int8_dynamic": Int8DynamicLinear,
    "int8_weight_only": Int8WeightOnlyLinear,
    "int4_g32": Int4WeightOnlyLinear,
    "int4_g64_sym": Int4WeightOnlyLinear,
}
# Lower bounds on SQNR (dB) of a quantized layer's output against the float layer, for
# Gaussian weights and inputs (K = 256). Expected values: int8 per channel, step = amax/127
# with amax ~ 3σ, noise σ·3/127/√12 -> ~43 dB; W8A8 adds the activation's own error (~40 dB);
# int4 in groups of 32-64, step ~ 4σ/15 (asym) or ~2.3σ/7 (sym) -> ~20-22 dB.
MIN_SQNR = {"int8_dynamic": 35.0, "int8_weight_only": 38.0, "int4_g32": 18.0, "int4_g64_sym": 17.0}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


class MLP(nn.Module):
    """Nested, with a bias-free layer and a non-Linear module in between."""

    def __init__(self, k=128, h=192, n=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(k, h)
        self.act = nn.GELU()
        self.block = nn.ModuleDict({"down": nn.Linear(h, n, bias=False)})
        self.head = nn.Linear(n, 10)

    def forward(self, x):
        return self.head(self.block["down"](self.act(self.up(x))))


def _linear(k, n, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def _quantized(name, k=128, n=48, bias=True, dtype=torch.float32, seed=0):
    lin = _linear(k, n, bias, dtype, seed)
    cfg = CONFIGS[name]
    return lin, MODULE_FOR[name].from_float(lin, **vars(cfg))


def _reference_out(mod, x):
    """The module's result computed by qtorch.reference from its own buffers."""
    x2 = x.reshape(-1, x.shape[-1])
    bias = None if mod.bias is None else mod.bias.detach().to(x.dtype)
    if isinstance(mod, Int8DynamicLinear):
        out = R.int8_linear(x2, mod.qweight, mod.weight_scale, bias)
    elif isinstance(mod, Int8WeightOnlyLinear):
        out = R.int8_weight_only_linear(x2, mod.qweight, mod.weight_scale, bias)
    else:
        out = R.int4_weight_only_linear(
            x2, mod.qweight, mod.scales, mod.zeros, mod.group_size, bias
        )
    return out.reshape(*x.shape[:-1], mod.out_features)


# ------------------------------------------------------------------------------ quantize_


@pytest.mark.parametrize("name", CONFIGS)
def test_quantize_swaps_every_linear_in_place(name):
    model = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer here fits every config: no warning
        out = qtorch.quantize_(model, CONFIGS[name])
    assert out is model
    cls = MODULE_FOR[name]
    assert type(model.up) is cls and type(model.block["down"]) is cls and type(model.head) is cls
    assert isinstance(model.act, nn.GELU)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert (model.up.in_features, model.up.out_features) == (128, 192)
    assert model.block["down"].bias is None


def test_filter_fn_gets_module_and_fqn():
    model = MLP()
    seen = []

    def keep(module, fqn):
        seen.append((type(module), fqn))
        return fqn != "head"

    qtorch.quantize_(model, qtorch.Int8WeightOnlyConfig(), filter_fn=keep)
    assert sorted(seen) == sorted(
        [(nn.Linear, "up"), (nn.Linear, "block.down"), (nn.Linear, "head")]
    )
    assert isinstance(model.up, Int8WeightOnlyLinear)
    assert isinstance(model.block["down"], Int8WeightOnlyLinear)
    assert type(model.head) is nn.Linear


def test_int4_skips_and_names_layers_k_not_divisible_by_group_size():
    model = nn.Sequential()
    model.add_module("fits", nn.Linear(128, 96))  # 128 % 64 == 0
    model.add_module("odd_k", nn.Linear(96, 40))  # 96 % 64 != 0
    model.add_module("tiny", nn.Linear(40, 8))  # 40 % 64 != 0
    with pytest.warns(UserWarning) as rec:
        qtorch.quantize_(model, qtorch.Int4WeightOnlyConfig(group_size=64))
    assert len(rec) == 1, "one warning for all skipped layers"
    msg = str(rec[0].message)
    assert "odd_k" in msg and "in_features=96" in msg and "group_size=64" in msg
    assert "tiny" in msg and "fits" not in msg
    assert isinstance(model.fits, Int4WeightOnlyLinear)
    assert type(model.odd_k) is nn.Linear and type(model.tiny) is nn.Linear
    assert model(torch.randn(2, 128)).shape == (2, 8)


def test_multihead_attention_out_proj_is_left_alone():
    # nn.MultiheadAttention reads out_proj.weight directly; swapping it would break forward.
    layer = nn.TransformerEncoderLayer(
        d_model=64, nhead=4, dim_feedforward=128, batch_first=True, dropout=0.0
    ).eval()
    x = torch.randn(2, 5, 64)
    ref = layer(x)
    with pytest.warns(UserWarning, match="self_attn.out_proj"):
        qtorch.quantize_(layer, qtorch.Int8WeightOnlyConfig())
    assert isinstance(layer.linear1, Int8WeightOnlyLinear)
    assert isinstance(layer.linear2, Int8WeightOnlyLinear)
    # In eval mode the encoder layer's native fast path reads linear1.weight, which quantized
    # modules do not have (they hold no float weight): switch the fast path off.
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert sqnr(ref, layer(x)) > 30
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def test_root_linear_returns_the_quantized_module():
    lin = _linear(64, 8)
    q = qtorch.quantize_(lin, qtorch.Int8DynamicConfig())
    assert isinstance(q, Int8DynamicLinear)


def test_shared_linear_is_quantized_once_and_stays_shared():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    qtorch.quantize_(model, qtorch.Int8WeightOnlyConfig())
    assert isinstance(model[0], Int8WeightOnlyLinear) and model[0] is model[2]


class TiedLM(nn.Module):
    """An embedding whose weight the LM head shares, as tie_word_embeddings makes it."""

    def __init__(self, vocab=96, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.body = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.body(self.embed(ids)))


def test_quantizing_a_tied_head_names_the_tie_in_a_warning():
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"lm_head\.weight was tied to embed\.weight"):
        qtorch.quantize_(model, qtorch.Int8WeightOnlyConfig())
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert model.embed.weight.dtype == torch.float32  # the embedding keeps the float weight


def test_keeping_a_tied_head_in_float_keeps_the_tie_without_a_warning():
    model = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qtorch.quantize_(
            model, qtorch.Int8WeightOnlyConfig(), filter_fn=lambda mod, fqn: fqn != "lm_head"
        )
    assert isinstance(model.body, Int8WeightOnlyLinear)
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weight_attribute_is_a_clear_error_not_a_copy(name):
    """Code written for nn.Linear that reads or assigns `.weight` (weight tying, resizing,
    merging) must fail loudly: a float copy that it wrote into would be silently ignored."""
    mod = qtorch.quantize_(nn.Linear(64, 32), CONFIGS[name])
    with pytest.raises(AttributeError, match=r"no float `weight`.*\.dequantize\(\)"):
        _ = mod.weight
    assert getattr(mod, "weight", None) is None and not hasattr(mod, "weight")
    with pytest.raises(AttributeError, match="no float `weight`"):
        mod.weight = nn.Parameter(torch.zeros(32, 64))
    assert "weight" not in dict(mod.named_parameters())


def test_configs_are_frozen_and_checked():
    cfg = qtorch.Int4WeightOnlyConfig()
    assert (cfg.group_size, cfg.symmetric) == (128, False)
    with pytest.raises(Exception, match="cannot assign"):
        cfg.group_size = 64
    with pytest.raises(ValueError, match="group_size"):
        qtorch.Int4WeightOnlyConfig(group_size=48)
    with pytest.raises(TypeError, match="group_size"):
        qtorch.Int4WeightOnlyConfig(group_size=64.0)
    with pytest.raises(TypeError, match="symmetric"):
        qtorch.Int4WeightOnlyConfig(symmetric="yes")
    with pytest.raises(TypeError, match="config"):
        qtorch.quantize_(MLP(), "int8")
    assert qtorch.Int8DynamicConfig() == qtorch.Int8DynamicConfig()


def test_from_float_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8DynamicLinear.from_float(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnlyLinear.from_float(_linear(96, 8), group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnlyLinear.from_float(_linear(96, 8), group_size=48)
    mod = Int8WeightOnlyLinear.from_float(_linear(64, 8))
    with pytest.raises(ValueError, match="K"):
        mod(torch.randn(3, 65))
    with pytest.raises(TypeError, match="x"):
        mod(torch.randn(3, 64, dtype=torch.float64))


# ------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", CONFIGS)
def test_weights_match_reference_quantization(name):
    lin, mod = _quantized(name, k=256, n=40)
    w = lin.weight.detach()
    if isinstance(mod, Int4WeightOnlyLinear):
        q, s, z = R.quantize_int4(w, mod.group_size, mod.symmetric)
        torch.testing.assert_close(mod.scales, s, rtol=1e-6, atol=0)
        assert torch.equal(mod.zeros, z)
        assert torch.equal(mod.qweight, q)
        torch.testing.assert_close(
            mod.dequantize(), R.dequantize_int4(q, s, z, mod.group_size), rtol=0, atol=0
        )
    else:
        q, s = R.quantize_int8(w)
        torch.testing.assert_close(mod.weight_scale, s, rtol=1e-6, atol=0)
        # API.md: a kernel may compute w * (127 / amax); then a rounding tie flips, one step.
        assert (mod.qweight.int() - q.int()).abs().max() <= 1
        assert (mod.qweight != q).float().mean() < 1e-3
        deq = mod.dequantize()
        assert deq.dtype == torch.float32 and deq.shape == (40, 256)
        torch.testing.assert_close(
            deq, mod.qweight.float() * mod.weight_scale[:, None], rtol=0, atol=0
        )
        assert ((deq - q.float() * s[:, None]).abs() <= s[:, None] * 1.0001).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_reference_and_keeps_dtype(name, dtype):
    lin, mod = _quantized(name, k=128, n=48)
    mod.to(dtype)  # the bias follows the model dtype, as in nn.Linear
    for shape in [(5, 128), (2, 3, 128), (128,), (1, 1, 1, 128)]:
        x = _randn(*shape, dtype=dtype, seed=1)
        out = mod(x)
        assert out.dtype == dtype and out.shape == (*shape[:-1], 48)
        assert_close(out, _reference_out(mod, x))
    assert mod(torch.empty(0, 128, dtype=dtype)).shape == (0, 48)


@pytest.mark.parametrize("name", CONFIGS)
def test_sqnr_against_float_layer(name):
    lin, mod = _quantized(name, k=256, n=128)
    x = _randn(64, 256, seed=2)
    with torch.no_grad():
        ref = lin(x)
    out = mod(x)
    db = sqnr(ref, out)
    print(f"\n{name}: SQNR of output vs fp32 nn.Linear = {db:.1f} dB")
    assert db >= MIN_SQNR[name]
    # All of the error is quantization: x (W8A8: its per-token quantize-dequantize) through
    # F.linear with the dequantized weight gives the output up to fp32 rounding.
    x_hat = x
    if name == "int8_dynamic":
        q, s = R.quantize_int8(x)
        x_hat = q.float() * s[:, None]
    assert sqnr(F.linear(x_hat, mod.dequantize(), mod.bias), out) > 80


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CONFIGS)
def test_quantize_half_precision_model(name, dtype):
    # Weights already in fp16/bf16 are quantized from those values (statistics in fp32).
    model = MLP().to(dtype)
    w = model.up.weight.detach().clone()
    qtorch.quantize_(model, CONFIGS[name])
    if isinstance(model.up, Int4WeightOnlyLinear):
        q, s, z = R.quantize_int4(w, model.up.group_size, model.up.symmetric)
        assert torch.equal(model.up.qweight, q) and torch.equal(model.up.zeros, z)
        torch.testing.assert_close(model.up.scales, s, rtol=1e-6, atol=0)
    else:
        q, s = R.quantize_int8(w)
        assert (model.up.qweight.int() - q.int()).abs().max() <= 1
        torch.testing.assert_close(model.up.weight_scale, s, rtol=1e-6, atol=0)
    assert model.up.bias.dtype == dtype
    x = _randn(2, 3, 128, dtype=dtype, seed=12)
    out = model(x)
    assert out.dtype == dtype and out.shape == (2, 3, 10)
    assert_close(model.up(x), _reference_out(model.up, x))


# ---------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_dtypes_shapes(name):
    _, mod = _quantized(name, k=128, n=48)
    sd = mod.state_dict()
    if isinstance(mod, Int4WeightOnlyLinear):
        g = 128 // mod.group_size
        expected = {
            "qweight": (torch.uint8, (48, 64)),
            "scales": (torch.float32, (48, g)),
            "zeros": (torch.uint8, (48, g)),
            "bias": (torch.float32, (48,)),
        }
        if mod.symmetric:
            assert (mod.zeros == 8).all()
    else:
        expected = {
            "qweight": (torch.int8, (48, 128)),
            "weight_scale": (torch.float32, (48,)),
            "bias": (torch.float32, (48,)),
        }
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == expected
    assert isinstance(mod.bias, nn.Parameter) and mod.bias.requires_grad
    assert [n for n, _ in mod.named_parameters()] == ["bias"]


def _fresh_quantized_mlp(name, seed):
    model = MLP(seed=seed)
    qtorch.quantize_(model, CONFIGS[name])
    return model


def _roundtrip(name, save, load):
    model = _fresh_quantized_mlp(name, seed=0)
    x = _randn(4, 7, 128, seed=3)
    expected = model(x)
    sd = load(save(model.state_dict()))
    other = _fresh_quantized_mlp(name, seed=1)  # different weights until loaded
    assert not torch.equal(other(x), expected)
    other.load_state_dict(sd)
    assert torch.equal(other(x), expected)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v) and other.state_dict()[k].dtype == v.dtype


@pytest.mark.parametrize("name", CONFIGS)
def test_torch_save_load_weights_only_roundtrip(name):
    def save(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        return buf.getvalue()

    _roundtrip(name, save, lambda b: torch.load(io.BytesIO(b), weights_only=True))


@pytest.mark.parametrize("name", CONFIGS)
def test_safetensors_roundtrip(name):
    st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    _roundtrip(name, st.save, st.load)


def test_state_dict_of_other_group_size_does_not_load():
    a = _fresh_quantized_mlp("int4_g32", seed=0)
    b = MLP()
    qtorch.quantize_(b, qtorch.Int4WeightOnlyConfig(group_size=64))
    with pytest.raises(RuntimeError, match="size mismatch"):
        b.load_state_dict(a.state_dict())


# ------------------------------------------------------------------------ dtype and device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CONFIGS)
def test_to_dtype_keeps_weights_quantized_and_scales_fp32(name, dtype):
    model = _fresh_quantized_mlp(name, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(dtype)
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith("bias"):
            assert after[k].dtype == dtype
        else:  # qweight / weight_scale / scales / zeros: bit-identical
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    x = _randn(3, 128, dtype=dtype, seed=4)
    assert model(x).dtype == dtype
    model.half() if dtype == torch.bfloat16 else model.bfloat16()
    model.float()
    for k, v in before.items():
        if not k.endswith("bias"):
            assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name", CONFIGS)
def test_to_device_moves_buffers_without_casting(name):
    # The meta device exercises the device path of _apply without a GPU.
    model = _fresh_quantized_mlp(name, seed=0)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.to(device="meta", dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert v.device.type == "meta"
        assert v.dtype == (torch.bfloat16 if k.endswith("bias") else dtypes[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CONFIGS)
def test_quantized_on_cpu_gives_same_numbers_on_cuda(name):
    model = _fresh_quantized_mlp(name, seed=0)
    sd_cpu = {k: v.clone() for k, v in model.state_dict().items()}
    x = _randn(4, 128, seed=5)
    with qtorch.use_backend("reference"):
        ref = model(x)
    model.cuda()
    for k, v in model.state_dict().items():
        assert v.is_cuda and torch.equal(v.cpu(), sd_cpu[k])
    out = model(x.cuda())
    assert_close(out.cpu(), ref)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CONFIGS)
def test_grad_wrt_input_and_bias_matches_dequantized_autograd(name, dtype):
    _, mod = _quantized(name, k=128, n=48)
    mod.to(dtype)
    x = _randn(2, 5, 128, dtype=dtype, seed=6).requires_grad_()
    g = _randn(2, 5, 48, dtype=dtype, seed=7)
    mod(x).backward(g)
    assert x.grad.dtype == dtype and mod.bias.grad.dtype == dtype
    # Straight-through: d out / d x = ŵ for every config (W8A8 included).
    x32 = x.detach().float().requires_grad_()
    b32 = mod.bias.detach().float().requires_grad_()
    F.linear(x32, mod.dequantize(), b32).backward(g.float())
    assert_close(x.grad, x32.grad.to(dtype))
    assert_close(mod.bias.grad, b32.grad.to(dtype))
    assert all(b.grad is None for b in mod.buffers())


class LoRA(nn.Module):
    """A frozen (quantized) base layer plus a trainable low-rank update: base(x) + B(A(x))."""

    def __init__(self, base, rank=4):
        super().__init__()
        self.base = base
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.b.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


@pytest.mark.parametrize("name", CONFIGS)
def test_adapter_and_head_train_on_frozen_quantized_backbone(name):
    backbone = MLP(seed=0)
    qtorch.quantize_(backbone, CONFIGS[name])
    backbone.requires_grad_(False)
    # The same network with the dequantized weights in plain fp32 nn.Linear: its gradients
    # are what the quantized backbone's must be (straight-through for W8A8 activations).
    twin = MLP(seed=0)
    for n in ("up", "head"):
        getattr(twin, n).weight.data = getattr(backbone, n).dequantize()
        getattr(twin, n).bias.data = getattr(backbone, n).bias.detach().clone()
    twin.block["down"].weight.data = backbone.block["down"].dequantize()
    twin.requires_grad_(False)

    torch.manual_seed(1)
    backbone.up = LoRA(backbone.up)
    twin.up = LoRA(twin.up)
    twin.up.load_state_dict(backbone.up.state_dict(), strict=False)
    twin.up.a.weight.data.copy_(backbone.up.a.weight)
    twin.up.b.weight.data.copy_(backbone.up.b.weight)
    head, twin_head = nn.Linear(10, 3), nn.Linear(10, 3)
    twin_head.load_state_dict(head.state_dict())

    x = _randn(16, 128, seed=8)
    y = torch.randint(0, 3, (16,), generator=_gen(9))
    loss = F.cross_entropy(head(backbone(x)), y)
    loss.backward()
    F.cross_entropy(twin_head(twin(x)), y).backward()
    trainable = [backbone.up.a.weight, backbone.up.b.weight, head.weight, head.bias]
    twin_trainable = [twin.up.a.weight, twin.up.b.weight, twin_head.weight, twin_head.bias]
    tol = 1e-4 if name != "int8_dynamic" else 5e-2  # W8A8 forward differs from the twin's
    for p, q in zip(trainable, twin_trainable):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * q.grad.abs().max())
    assert all(b.grad is None for b in backbone.buffers())

    # A few SGD steps reduce the loss: the adapter and head learn through quantized layers.
    opt = torch.optim.Adam(trainable, lr=0.05)
    first = loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(head(backbone(x)), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ------------------------------------------------------------------ compile and backends


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = MLP()
    # One compile covers all three module types: a different config per layer.
    qtorch.quantize_(model, CONFIGS["int8_dynamic"], filter_fn=lambda m, n: n == "up")
    qtorch.quantize_(model, CONFIGS["int4_g32"], filter_fn=lambda m, n: n == "block.down")
    qtorch.quantize_(model, CONFIGS["int8_weight_only"])
    compiled = torch.compile(model, fullgraph=True)
    x = _randn(3, 5, 128, seed=10).requires_grad_()
    x_c = x.detach().clone().requires_grad_()
    eager = model(x)
    out = compiled(x_c)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    eager.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(x_c.grad, x.grad, rtol=1e-5, atol=1e-5)


def _backend_params():
    return [pytest.param(b, id=b) for b in kernel_backends()]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("name", CONFIGS)
def test_every_backend_serves_the_modules(name, backend):
    dev = device_for(backend)
    lin, mod = _quantized(name, k=128, n=24)
    # The canonical state dict does not depend on the backend (or device) that quantized it
    # (int8: up to API.md's one-step rounding tie).
    with qtorch.use_backend(backend):
        mod_b = MODULE_FOR[name].from_float(lin.to(dev), **vars(CONFIGS[name]))
    for key, v in mod.state_dict().items():
        vb = mod_b.state_dict()[key].cpu()
        assert vb.dtype == v.dtype and vb.shape == v.shape, key
        if key == "qweight" and v.dtype == torch.int8:
            assert (vb.int() - v.int()).abs().max() <= 1
        else:
            torch.testing.assert_close(vb, v, rtol=1e-6, atol=0)
    mod.to(dev)
    with qtorch.use_backend(backend):
        assert f"backend={backend}" in repr(mod) or "-> reference" in repr(mod)
        for dtype in DTYPES:
            x = _randn(3, 128, dtype=dtype, seed=11).to(dev).requires_grad_()
            out = mod(x)
            assert out.dtype == dtype
            assert_close(out, _reference_out(mod, x.detach()))
            out.float().sum().backward()
            assert_close(x.grad, (torch.ones(3, 24, device=dev) @ mod.dequantize()).to(dtype))


def test_extra_repr_names_bits_group_size_and_backend():
    _, mod = _quantized("int4_g32")
    text = repr(mod)
    assert "bits=4" in text and "group_size=32" in text and "asymmetric" in text
    with qtorch.use_backend("reference"):
        assert "backend=reference" in repr(mod)
    _, mod8 = _quantized("int8_dynamic")
    assert "bits=8" in repr(mod8) and "per-token" in repr(mod8)
