"""Calibrated weight quantizers (API.md "Calibrated quantization"): algorithm="mse" and
"gptq" on the fixed grids, quantize_(..., calibration_data=), and the float-zero-point math
(checked against API.md's formulas directly, on the canonical buffers)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qtorch
from qtorch import ops
from qtorch.quantizers import gptq, grid, mse, quantize_weight
from qtorch.quantizers.grid import Grid

CONFIG_CLASSES = (
    qtorch.Int4WeightOnlyConfig,
    qtorch.Int8WeightOnlyConfig,
    qtorch.Int8DynamicConfig,
)
GRIDS = [
    Grid("int8"),
    Grid("int4_sym", 32),
    Grid("int4", 32),
    Grid("int4", 128),
    Grid("int4_float", 32),
    Grid("int4_float", 64),
]


def correlated_inputs(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(m, k, generator=g) @ mix + 0.1 * torch.randn(m, k, generator=g)
    return x * (1 + 4 * torch.rand(k, generator=g) ** 4)


def weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :: max(1, k // 7)] *= 4  # outliers that stretch the RTN ranges
    return w


def _api_int4(w, gs, kind):
    """ŵ by API.md's formulas (int zeros, symmetric, float zeros), written out here."""
    n, k = w.shape
    g = w.float().reshape(n, k // gs, gs)
    if kind == "int4_sym":
        amax = g.abs().amax(-1, keepdim=True)
        s = torch.where(amax == 0, torch.ones_like(amax), amax / 7)
        q = torch.clamp(torch.round(g / s), -8, 7) + 8
        return ((q - 8) * s).reshape(n, k)
    if kind == "int4":
        lo = g.amin(-1, keepdim=True).clamp(max=0)
        hi = g.amax(-1, keepdim=True).clamp(min=0)
        s = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 15)
        z = torch.clamp(torch.round(-lo / s), 0, 15)
        q = torch.clamp(torch.round(g / s) + z, 0, 15)
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        s = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 15)
        z = -lo / s
        q = torch.clamp(torch.round(g / s + z), 0, 15)
    return ((q - z) * s).reshape(n, k)


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_algorithm_field_default_and_bad_values(cls):
    assert cls().algorithm == "rtn"
    for alg in ("rtn", "mse", "gptq"):
        assert cls(algorithm=alg).algorithm == alg
    for bad in ("foo", "GPTQ", None, 3):
        with pytest.raises(ValueError, match="algorithm"):
            cls(algorithm=bad)


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_gptq_without_calibration_data_names_it(cls):
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="calibration_data"):
        qtorch.quantize_(model, cls(algorithm="gptq"))
    assert isinstance(model[0], nn.Linear)  # untouched


def test_data_free_configs_ignore_calibration_data():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(64, 32))
    b = copy.deepcopy(a)
    qtorch.quantize_(a, qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="mse"))
    qtorch.quantize_(
        b,
        qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="mse"),
        calibration_data=[torch.randn(4, 64)],
    )
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


# ------------------------------------------------------------------------ grid and MSE


@pytest.mark.parametrize("gs,symmetric", [(32, False), (128, False), (64, True)])
def test_rtn_on_the_grid_is_the_reference(gs, symmetric):
    w = weight(48, 256)
    g = grid.grid_for("int4", gs, symmetric)
    got = quantize_weight(g, w, "rtn")
    want = ops.quantize_int4(w, gs, symmetric)
    for name, t in zip(("qweight", "scales", "zeros"), want):
        assert torch.equal(got[name], t), name
    q, s = ops.quantize_int8(w)
    got = quantize_weight(Grid("int8"), w, "rtn")
    assert torch.equal(got["qweight"], q) and torch.equal(got["weight_scale"], s)


@pytest.mark.parametrize("kind", ["int4", "int4_sym", "int4_float"])
def test_rtn_storage_dequantizes_by_the_api_formulas(kind):
    w = weight(16, 128)
    g = Grid(kind, 32)
    bufs = quantize_weight(g, w, "rtn")
    assert bufs["qweight"].dtype == torch.uint8 and bufs["qweight"].shape == (16, 64)
    assert bufs["scales"].dtype == torch.float32 and bufs["scales"].shape == (16, 4)
    assert bufs["zeros"].dtype == (torch.float32 if kind == "int4_float" else torch.uint8)
    torch.testing.assert_close(
        grid.from_storage(g, bufs), _api_int4(w, 32, kind), rtol=0, atol=1e-6
    )


def test_float_zeros_round_trip_a_q4_1_weight_exactly():
    """w = d·q + m per group of 32, q in 0..15 with both ends used: float zeros, RTN, g32."""
    gen = torch.Generator().manual_seed(0)
    n, k = 8, 128
    d = torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 1e-3
    m = torch.randn(n, k // 32, 1, generator=gen) * 0.02
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).reshape(n, k)
    g = grid.grid_for("int4", 32, zero_point="float")
    bufs = quantize_weight(g, w, "rtn")
    torch.testing.assert_close(grid.from_storage(g, bufs), w, rtol=0, atol=2e-7)
    # the integer-zero grid cannot: its range must contain 0
    err_int = (
        (grid.from_storage(Grid("int4", 32), quantize_weight(Grid("int4", 32), w, "rtn")) - w)
        .abs()
        .max()
    )
    assert err_int > 1e-4


def _group_errors(g: Grid, w, bufs):
    n, k = w.shape
    gs = g.group_of(k)
    return ((grid.from_storage(g, bufs) - w) ** 2).reshape(n, k // gs, gs).sum(-1)


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: f"{g.kind}-{g.group_size}")
def test_mse_is_never_worse_than_rtn_for_any_group(g):
    w = weight(64, 256)
    rtn = _group_errors(g, w, quantize_weight(g, w, "rtn"))
    got = _group_errors(g, w, quantize_weight(g, w, "mse"))
    assert (got <= rtn).all()
    if g.kind != "int8":  # int8's fine grid: clipping these outliers rarely pays
        assert got.sum() < 0.99 * rtn.sum()  # and it does find better ranges
    if g.kind == "int4":  # integer zero points on the grid
        z = quantize_weight(g, w, "mse")["zeros"]
        assert z.dtype == torch.uint8 and int(z.max()) <= 15


def test_mse_candidates_include_rtn_exactly():
    """An all-equal-magnitude group (no shrinking helps) keeps RTN's scale and zero."""
    w = torch.tensor([[-1.0, 1.0] * 16])
    g = Grid("int4", 32)
    s, z = mse.search(g, w)
    want = ops.quantize_int4(w, 32)
    assert torch.equal(s, want[1]) and torch.equal(z.to(torch.uint8), want[2])


# -------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: f"{g.kind}-{g.group_size}")
def test_gptq_output_error_below_rtn(g):
    n, k = 64, 256
    w, x = weight(n, k), correlated_inputs(1024, k)
    h = x.T @ x
    ref = x @ w.T

    def out_err(bufs):
        return (x @ grid.from_storage(g, bufs).T - ref).norm().item()

    rtn, ours = out_err(quantize_weight(g, w, "rtn")), out_err(quantize_weight(g, w, "gptq", h))
    assert ours < 0.85 * rtn, (ours, rtn)
    # the variants of the algorithm work too, each better than RTN
    for kw in ({"act_order": False}, {"use_mse": False}, {"block_size": 32}):
        q, s, z = gptq.quantize(g, w, h, **kw)
        assert out_err(grid.to_storage(g, q, s, z)) < rtn, kw


def test_gptq_handles_dead_input_channels():
    n, k = 16, 64
    w, x = weight(n, k), correlated_inputs(256, k)
    x[:, 5] = 0
    q, s, z = gptq.quantize(Grid("int4", 32), w, x.T @ x)
    assert torch.isfinite(s).all() and q.min() >= 0 and q.max() <= 15


# ---------------------------------------------------------------------------- quantize_


class Block(nn.Module):
    """A transformer-like block: q/k/v read the same tensor, then o, then an MLP; takes a
    keyword argument as HF layers do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.5)

    def forward(self, h, scale=None):
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8, -1) @ self.v(h)
        h = h + self.drop(self.o(a))
        h = h + self.down(torch.relu(self.up(h)))
        return (h * scale if scale is not None else h,)


class Tiny(nn.Module):
    def __init__(self, d: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 16)

    def forward(self, x, scale=None):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, scale=scale)[0]
        return self.head(h)


def _data(n=4, d=64):
    return [correlated_inputs(2 * 32, d, seed=s).reshape(2, 32, d) for s in range(n)]


def test_gptq_model_error_below_rtn_and_loads_into_a_plain_rtn_model():
    torch.manual_seed(0)
    fp = Tiny().eval()
    data = _data()
    x = torch.cat(_data(2, 64)[1:])
    ref = fp(x)
    errs = {}
    for alg in ("rtn", "mse", "gptq"):
        m = copy.deepcopy(fp)
        qtorch.quantize_(
            m, qtorch.Int4WeightOnlyConfig(group_size=32, algorithm=alg), calibration_data=data
        )
        assert all(not isinstance(mod, nn.Linear) for mod in m.modules())
        errs[alg] = (m(x) - ref).norm().item()
        plain = copy.deepcopy(fp)
        qtorch.quantize_(plain, qtorch.Int4WeightOnlyConfig(group_size=32))
        plain.load_state_dict(m.state_dict())
        torch.testing.assert_close(plain(x), m(x), rtol=0, atol=0)
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.parametrize("cls", [qtorch.Int8WeightOnlyConfig, qtorch.Int8DynamicConfig])
def test_gptq_int8_configs(cls):
    torch.manual_seed(0)
    fp = Tiny().eval()
    x = torch.cat(_data(2)[1:])
    ref = fp(x)
    errs = {}
    for alg in ("rtn", "gptq"):
        m = copy.deepcopy(fp)
        qtorch.quantize_(m, cls(algorithm=alg), calibration_data=_data())
        errs[alg] = (m(x) - ref).norm().item()
        plain = copy.deepcopy(fp)
        qtorch.quantize_(plain, cls())
        plain.load_state_dict(m.state_dict())
        torch.testing.assert_close(plain(x), m(x), rtol=0, atol=0)
    assert errs["gptq"] < errs["rtn"], errs


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("training", [True, False])
def test_quantize_leaves_no_hooks_and_restores_mode(training):
    torch.manual_seed(0)
    m = Tiny()
    m.train(training)
    m.layers[1].eval()  # a mixed state is restored module by module
    modes = {name: mod.training for name, mod in m.named_modules()}
    qtorch.quantize_(
        m, qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq"), calibration_data=_data(2)
    )
    assert _hooks(m) == 0
    assert {name: mod.training for name, mod in m.named_modules() if name in modes} == modes


def test_sequential_each_layer_calibrated_on_quantized_outputs():
    """Two chained layers: the second's GPTQ uses H of the first's quantized outputs."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    fp = copy.deepcopy(m)
    data = [correlated_inputs(128, 64, seed=s) for s in range(3)]
    g = Grid("int4", 32)
    qtorch.quantize_(
        m, qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq"), calibration_data=data
    )
    h0, h1 = torch.zeros(64, 64), torch.zeros(64, 64)
    for b in data:  # H = Σ_batches XᵀX, summed in batch order as the hooks do
        h0.addmm_(b.T, b)
    want0 = quantize_weight(g, fp[0].weight, "gptq", h0)
    w0 = grid.from_storage(g, want0)
    for b in data:
        yb = torch.nn.functional.linear(b, w0, fp[0].bias)
        h1.addmm_(yb.T, yb)
    want1 = quantize_weight(g, fp[1].weight, "gptq", h1)
    for i, want in ((0, want0), (1, want1)):
        got = m[i].state_dict()
        for name, t in want.items():
            torch.testing.assert_close(got[name].float(), t.float(), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_calibration_data_forms(form):
    torch.manual_seed(0)
    fp = Tiny().eval()
    raw = _data(2)
    scale = torch.tensor(0.5)
    data = {
        "tensor": raw,
        "tuple": [(t, scale) for t in raw],
        "dict": [{"x": t, "scale": scale} for t in raw],
    }[form]
    m = copy.deepcopy(fp)
    qtorch.quantize_(
        m, qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq"), calibration_data=iter(data)
    )  # any iterable, used once
    assert all(not isinstance(mod, nn.Linear) for mod in m.modules())


def test_gptq_respects_filter_fn_and_uncalibrated_layers_fall_back():
    torch.manual_seed(0)
    m = Tiny().eval()
    m.unused = nn.Linear(64, 64)  # never called: quantized with mse, named in a warning
    with pytest.warns(UserWarning, match="unused"):
        qtorch.quantize_(
            m,
            qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq"),
            filter_fn=lambda mod, fqn: fqn != "head",
            calibration_data=_data(2),
        )
    assert isinstance(m.head, nn.Linear)
    assert isinstance(m.unused, qtorch.nn.Int4WeightOnlyLinear)
    assert isinstance(m.layers[2].down, qtorch.nn.Int4WeightOnlyLinear)


def test_gptq_on_a_bare_linear_and_a_model_without_blocks():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    data = [correlated_inputs(64, 64, seed=s) for s in range(2)]
    q = qtorch.quantize_(lin, qtorch.Int8WeightOnlyConfig(algorithm="gptq"), calibration_data=data)
    assert isinstance(q, qtorch.nn.Int8WeightOnlyLinear)
    h = torch.zeros(64, 64)
    for b in data:
        h.addmm_(b.T, b)
    want = quantize_weight(Grid("int8"), lin.weight, "gptq", h)
    assert torch.equal(q.state_dict()["qweight"], want["qweight"])


def test_gptq_empty_calibration_data():
    with pytest.raises(ValueError, match="calibration_data"):
        qtorch.quantize_(
            Tiny(),
            qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq"),
            calibration_data=[],
        )


def test_from_float_takes_the_algorithm():
    lin = nn.Linear(128, 16)
    m = qtorch.nn.Int4WeightOnlyLinear.from_float(lin, group_size=32, algorithm="mse")
    want = quantize_weight(Grid("int4", 32), lin.weight, "mse")
    assert torch.equal(m.state_dict()["scales"], want["scales"])
    m8 = qtorch.nn.Int8DynamicLinear.from_float(lin, algorithm="mse")
    assert m8.state_dict()["qweight"].dtype == torch.int8
    with pytest.raises(ValueError, match="calibration"):
        qtorch.nn.Int4WeightOnlyLinear.from_float(lin, group_size=32, algorithm="gptq")


# ------------------------------------------------------------ GPTQ's kernels and the memo


def _block_case(kind: int, b: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(b, n, generator=g)
    a = torch.randn(b + 4, b + 4, generator=g)
    u = gptq.inverse_hessian_factor(a @ a.T + torch.eye(b + 4))[:b, :b].contiguous()
    s = torch.rand(b, n, generator=g) * 0.2 + 0.05
    if kind == 0:
        s = s / 10
    if kind == 2:
        z = torch.randint(0, 16, (b, n), generator=g).float()
    elif kind == 3:
        z = torch.rand(b, n, generator=g) * 15
    else:
        z = torch.zeros(b, n)
    return w, u, s, z, (1 / u.diagonal()).contiguous()


def _cpu_kernel(op):
    from qtorch import _backend

    _backend._load_backends()
    if "cpu" not in _backend.available_backends():
        pytest.skip("the C++ CPU backend is not built")
    return _backend._KERNELS[op]["cpu"]


@pytest.mark.parametrize("kind", range(4), ids=lambda k: grid.KINDS[k])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 65), (64, 129), (128, 1000)])
def test_gptq_block_cpu_kernel_matches_the_reference_bit_for_bit(kind, shape):
    cpu = _cpu_kernel("gptq_block")
    w, u, s, z, inv_d = _block_case(kind, *shape)
    out = []
    for fn in (gptq.gptq_block_reference, cpu):
        w1, q, e = w.clone(), torch.empty(shape), torch.empty(shape)
        fn(w1, u, s, z, inv_d, q, e, kind)
        out.append((w1, q, e))
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    q = out[0][1]
    lo, hi = (-127, 127) if kind == 0 else (0, 15)
    assert q.min() >= lo and q.max() <= hi and torch.equal(q, q.round())


def test_gptq_block_cpu_kernel_rejects_bad_arguments():
    _cpu_kernel("gptq_block")
    w, u, s, z, inv_d = _block_case(2, 8, 16)
    q, e = torch.empty(8, 16), torch.empty(8, 16)
    op = torch.ops.qtorch_cpu.gptq_block_
    with pytest.raises(TypeError, match="w must be float32"):
        op(w.double(), u, s, z, inv_d, q, e, 2)
    with pytest.raises(ValueError, match="u must have shape"):
        op(w, u[:4], s, z, inv_d, q, e, 2)
    with pytest.raises(ValueError, match="scale must be contiguous"):
        op(w, u, s.t().contiguous().t(), z, inv_d, q, e, 2)
    with pytest.raises(ValueError, match="kind"):
        op(w, u, s, z, inv_d, q, e, 7)


@pytest.mark.parametrize("k", [64, 383, 384, 385, 1000])
def test_gram_panels_give_the_full_product(k):
    from qtorch.calibrate import _gram_, _symmetric

    x = [correlated_inputs(96, k, seed=s) for s in range(3)]
    h = torch.zeros(k, k)
    for xb in x:
        _gram_(h, xb)
    h = _symmetric(h)
    want = sum(xb.double().T @ xb.double() for xb in x)
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: f"{g.kind}-{g.group_size}")
def test_refit_scales_never_raises_a_rows_output_error(g):
    n, k = 48, 256
    w, x = weight(n, k), correlated_inputs(1024, k)
    h = x.T @ x
    q, s, z = gptq.quantize(g, w, h)
    s2 = gptq.refit_scales(g, w, q, s, z, h)
    gs = g.group_of(k)

    def row_err(scale):
        w_hat = ((q.reshape(n, k // gs, gs) - z[..., None]) * scale[..., None]).reshape(n, k)
        return ((x @ (w - w_hat).T) ** 2).sum(0)

    before, after = row_err(s), row_err(s2)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < before.sum()  # it does improve the layer
    changed = (s2 != s).any(-1)
    assert torch.equal(s2[~changed], s[~changed]) and (s2 > 0).all()
    # the refit result is still a canonical grid point: it stores and loads
    w_hat = grid.from_storage(g, grid.to_storage(g, q, s2, z))
    assert torch.isfinite(w_hat).all()


def test_refit_scales_keeps_a_dead_groups_scale():
    g = Grid("int4", 32)
    w, x = weight(8, 64), correlated_inputs(256, 64)
    w[:, :32] = 0  # group 0 of every row, quantized first (no act-order): codes on the zero
    h = x.T @ x
    q, s, z = gptq.quantize(g, w, h, act_order=False)
    assert torch.equal(q[:, :32], z[:, :1].expand(-1, 32))
    s2 = gptq.refit_scales(g, w, q, s, z, h)
    assert torch.equal(s2[:, 0], s[:, 0])


class _InplaceBlock(nn.Module):
    """A block whose finished layers' outputs are modified in place downstream
    (ReLU(inplace=True)), and a norm whose input is rebuilt every pass."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.act = nn.ReLU(inplace=True)

    def forward(self, h):
        y = self.act(self.a(self.norm(h)))  # a's output is overwritten in place
        y = self.act(self.b(y))
        return h + self.c(y)


class _InplaceModel(nn.Module):
    def __init__(self, d: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_InplaceBlock(d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("make", [Tiny, _InplaceModel], ids=["tiny", "inplace"])
def test_memo_gives_the_same_result_as_recomputing(make, monkeypatch):
    """The per-block memo of finished submodules changes nothing but the work: the same
    buffers as with the memo off (budget 0), with hits counted, and none served for a
    module whose output was modified in place downstream."""
    from qtorch import calibrate

    torch.manual_seed(0)
    fp = make().eval()
    cfg = qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq")
    hits = []
    orig_clear = calibrate._Memo.clear

    def clear(self):
        hits.append(self.hits)
        orig_clear(self)

    monkeypatch.setattr(calibrate._Memo, "clear", clear)
    got = {}
    for budget in (0, 1 << 30):
        monkeypatch.setattr(calibrate, "MEMO_BYTES", budget)
        m = copy.deepcopy(fp)
        qtorch.quantize_(m, cfg, calibration_data=_data())
        got[budget] = m.state_dict()
        assert _hooks(m) == 0 and all("forward" not in mod.__dict__ for mod in m.modules())
    assert got[0].keys() == got[1 << 30].keys()
    for key in got[0]:
        torch.testing.assert_close(got[1 << 30][key], got[0][key], rtol=0, atol=0)
    assert sum(hits) > 0


def test_memo_serves_only_equal_unmodified_calls():
    from qtorch.calibrate import _Memo

    memo = _Memo(1 << 20)
    calls = []
    lin = nn.Linear(4, 4)

    def fn(x, scale=1.0):
        calls.append(1)
        return lin(x) * scale

    x = torch.randn(3, 4)
    memo.batch = 0
    with torch.no_grad():
        y = memo.call(lin, fn, (x,), {})
        assert memo.call(lin, fn, (x.clone(),), {}) is y and len(calls) == 1  # equal values
        memo.call(lin, fn, (x + 1,), {})  # other values: recomputed
        assert len(calls) == 2
        y = memo.call(lin, fn, (x,), {"scale": 2.0})
        memo.call(lin, fn, (x,), {"scale": 3.0})  # another keyword value
        assert len(calls) == 4
        y = memo.call(lin, fn, (x,), {})
        y.add_(1)  # the output modified in place: never served again
        assert memo.call(lin, fn, (x,), {}) is not y and len(calls) == 6
        x.mul_(2)  # the recorded input modified in place
        memo.call(lin, fn, (x,), {})
        assert len(calls) == 7
        nan = torch.full((3, 4), float("nan"))
        memo.call(lin, fn, (nan,), {})
        memo.call(lin, fn, (nan.clone(),), {})  # NaN never equals: recomputed
        assert len(calls) == 9
        memo.batch = 1  # another batch: its own entry
        memo.call(lin, fn, (x,), {})
        assert len(calls) == 10
    tiny = _Memo(0)  # no budget: nothing kept
    tiny.batch = 0
    with torch.no_grad():
        tiny.call(lin, fn, (x,), {})
        tiny.call(lin, fn, (x,), {})
    assert len(calls) == 12 and not tiny.entries


def _group_error(g, w, s, z, c=None):
    n, k = w.shape
    gs = g.group_of(k)
    wg = w.double().reshape(n, k // gs, gs)
    d = (
        grid.fake_quant(g, w.reshape(n, k // gs, gs), s[..., None], z[..., None]).double() - wg
    ) ** 2
    if c is not None:
        d = d * c.double().reshape(1, k // gs, gs)
    return d.sum(-1)


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: f"{g.kind}-{g.group_size}")
@pytest.mark.parametrize("shape", [(1, 128), (7, 384), (300, 256)])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_search_cpu_kernel_matches_the_reference(g, shape, weighted):
    """Same float32 operations per candidate; only the order of the sum over a group differs,
    so a choice may differ only between candidates whose errors agree to rounding."""
    _cpu_kernel("mse_search")
    n, k = shape
    w = weight(n, k, seed=n)
    w[0, :5] = 0.0  # a partly empty group
    c = torch.rand(k, generator=torch.Generator().manual_seed(3)) if weighted else None
    ref = mse.search_reference(g, w, c)
    got = mse.search_cpu(g, w, c)
    same = (ref[0] == got[0]) & (ref[1] == got[1])
    assert same.float().mean() >= 0.999
    e_ref, e_got = _group_error(g, w, *ref, c), _group_error(g, w, *got, c)
    torch.testing.assert_close(e_got, e_ref, rtol=1e-5, atol=1e-12)
    # and the dispatching entry point takes the kernel on the CPU
    s, z = mse.search(g, w, c)
    assert torch.equal(s, got[0]) and torch.equal(z, got[1])


def test_mse_search_cpu_kernel_nan_and_bad_arguments():
    _cpu_kernel("mse_search")
    g = Grid("int4", 32)
    w = weight(4, 64)
    w[1, 3] = float("nan")  # group 0 of row 1
    ref, got = mse.search_reference(g, w), mse.search_cpu(g, w)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0, equal_nan=True)
    op = torch.ops.qtorch_cpu.mse_search
    with pytest.raises(ValueError, match="group_size must divide"):
        op(w, None, 48, 2, [1.0])
    with pytest.raises(TypeError, match="w must be float32"):
        op(w.double(), None, 32, 2, [1.0])
    with pytest.raises(ValueError, match="col_weight must have shape"):
        op(w, torch.ones(3), 32, 2, [1.0])
    with pytest.raises(ValueError, match="shrink"):
        op(w, None, 32, 2, [])


def test_gptq_names_a_layer_with_non_finite_weights_or_inputs():
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    data = [correlated_inputs(16, 64, seed=s) for s in range(2)]
    cfg = qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq")
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad[1].weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"weight of 1 holds NaN"):
        qtorch.quantize_(bad, cfg, calibration_data=data)
    data[1][2, 7] = float("inf")
    with pytest.raises(ValueError, match=r"inputs of 0 on the calibration_data"):
        qtorch.quantize_(copy.deepcopy(m), cfg, calibration_data=data)


def test_memo_puts_back_an_instance_forward():
    """accelerate-style hooks replace a module's forward on the instance: calibration wraps
    and then restores that very function."""
    torch.manual_seed(0)
    m = Tiny().eval()
    calls = []
    norm_like = m.layers[1].drop  # a submodule the memo wraps once the block is done
    inner = norm_like.forward

    def wrapper(*a, **kw):
        calls.append(1)
        return inner(*a, **kw)

    norm_like.forward = wrapper
    qtorch.quantize_(
        m, qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq"), calibration_data=_data()
    )
    assert m.layers[1].drop.__dict__["forward"] is wrapper and calls
    assert all("forward" not in mod.__dict__ for mod in m.modules() if mod is not norm_like)
