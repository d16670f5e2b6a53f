"""Activation-aware channel scaling before quantization (Int4WeightOnlyConfig(awq=True);
qtorch/quantizers/awq.py, qtorch/calibrate.py _fold): the search, the folds into a norm or the
rows of the layer before, the checks that reject folds that would change the model, and the
model being put back when quantize_ fails."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtorch
from qtorch import calibrate
from qtorch.quantizers import awq
from qtorch.quantizers.grid import Grid

D = 64


class RMSNorm(nn.Module):
    def __init__(self, d: int, plus_one: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.plus_one = plus_one  # Gemma's form: x * (1 + w), which 1/s cannot be folded into

    def forward(self, x):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return n * (1 + self.weight) if self.plus_one else n * self.weight


class PreLN(nn.Module):
    """A Llama-like block: norm -> q/k/v, attention, o; norm -> gate/up, SiLU-gated, down.
    `up_first` calls up before gate (the latest layer before down is then gate, through a
    SiLU: a fold there must be rejected)."""

    def __init__(self, d: int = D, up_first: bool = False, plus_one: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d, plus_one), RMSNorm(d, plus_one)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o = nn.Linear(d, d)
        self.gate, self.up = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.up_first = up_first

    def forward(self, h):
        x = self.norm1(h)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8, -1) @ self.v(x)
        h = h + self.o(a)
        x = self.norm2(h)
        if self.up_first:
            u = self.up(x)
            g = self.gate(x)
        else:
            g = self.gate(x)
            u = self.up(x)
        return h + self.down(F.silu(g) * u)


class PostLN(nn.Module):
    """BERT's order: the norm's output is both the next layers' input and the residual."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        return self.norm(h + self.down(F.gelu(self.up(h))))


class Net(nn.Module):
    def __init__(self, make, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(make() for _ in range(layers))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, RMSNorm):  # salient channels, as real activations have
                    hot = torch.rand(D, generator=g) < 0.1
                    m.weight.copy_(torch.where(hot, 8.0, 1.0) * (0.5 + torch.rand(D, generator=g)))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _data(n: int = 4, seed: int = 10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 24, D, generator=g) for _ in range(n)]


def _quantize(model, algorithm="rtn", awq_=True, data=None):
    """quantize_ with awq, returning the (group names, producer, s) the calibration scaled."""
    seen = []
    orig = calibrate._Calibration._build

    def spy(self):
        seen.extend(self.awq_scaled)
        return orig(self)

    calibrate._Calibration._build = spy
    try:
        qtorch.quantize_(
            model,
            qtorch.Int4WeightOnlyConfig(32, algorithm=algorithm, awq=awq_),
            calibration_data=_data() if data is None else data,
        )
    finally:
        calibrate._Calibration._build = orig
    return seen


@pytest.mark.parametrize("algorithm", ["rtn", "mse", "gptq"])
def test_awq_lowers_the_model_error(algorithm):
    fp = Net(PreLN).eval()
    x = torch.cat(_data(2, seed=99))
    ref = fp(x)
    errs = {}
    for use in (False, True):
        m = copy.deepcopy(fp)
        if use:
            _quantize(m, algorithm)
        else:
            qtorch.quantize_(
                m, qtorch.Int4WeightOnlyConfig(32, algorithm=algorithm), calibration_data=_data()
            )
        errs[use] = ((m(x) - ref).norm() / ref.norm()).item()
    # GPTQ already weighs the salient channels through H: AWQ's gain on top is smaller
    assert errs[True] < (0.97 if algorithm == "gptq" else 0.9) * errs[False], errs


def test_awq_folds_where_exact_and_keeps_the_float_function():
    fp = Net(PreLN).eval()
    m = copy.deepcopy(fp)
    scaled = _quantize(m)
    producers = {names: prod for names, prod, _ in scaled}
    for i in range(2):
        p = f"layers.{i}."
        assert producers[f"{p}q, {p}k, {p}v"] == f"{p}norm1"
        assert producers[f"{p}gate, {p}up"] == f"{p}norm2"
        assert producers[f"{p}down"] == f"{p}up"
        assert producers[f"{p}o"] == f"{p}v"
    # the same folds applied by hand to the float model: the same norms, the same function
    f = copy.deepcopy(fp)
    mods = dict(f.named_modules())
    with torch.no_grad():
        for names, prod, s in scaled:
            for n in names.split(", "):
                mods[n].weight.mul_(s)
            pm = mods[prod]
            if isinstance(pm, RMSNorm):
                pm.weight.div_(s)
            else:
                pm.weight.div_(s[:, None])
                if pm.bias is not None:
                    pm.bias.div_(s)
    x = torch.cat(_data(2, seed=99))
    torch.testing.assert_close(f(x), fp(x), rtol=1e-4, atol=1e-5)
    for i in range(2):
        for n in ("norm1", "norm2"):
            torch.testing.assert_close(
                getattr(m.layers[i], n).weight, getattr(f.layers[i], n).weight, rtol=0, atol=0
            )
    # the scaled layers' storage is canonical: it loads into a plain RTN model
    plain = copy.deepcopy(fp)
    qtorch.quantize_(plain, qtorch.Int4WeightOnlyConfig(32))
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(plain(x), m(x), rtol=0, atol=0)


def test_awq_rejects_a_fold_through_a_nonlinearity():
    m = Net(lambda: PreLN(D, up_first=True)).eval()
    producers = {names: prod for names, prod, _ in _quantize(m)}
    # down's latest producer is gate (through SiLU): rejected, up (linear in its rows) kept
    assert producers["layers.0.down"] == "layers.0.up"


def test_awq_rejects_norms_it_cannot_fold_and_warns_when_nothing_is_scaled():
    # post-LN: the norm's output is also the residual; (1 + w) norms: 1/s does not fold.
    # The first leaves nothing to scale (down's producer is behind a GELU); the second still
    # folds into the rows of v (for o) and up (for down)
    expected = [[], [f"layers.{i}.{n}" for i in range(2) for n in ("v", "up")]]
    for make, want in zip((lambda: PostLN(D), lambda: PreLN(D, plus_one=True)), expected):
        fp = Net(make).eval()
        m = copy.deepcopy(fp)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            scaled = _quantize(m)
        for mod_f, mod_q in zip(fp.modules(), m.modules()):
            if isinstance(mod_f, (nn.LayerNorm, RMSNorm)):
                for name in ("weight", "bias"):
                    if getattr(mod_f, name, None) is not None:
                        torch.testing.assert_close(
                            getattr(mod_q, name), getattr(mod_f, name), rtol=0, atol=0
                        )
        assert sorted(prod for _, prod, _ in scaled) == sorted(want), scaled
        warned = any("awq=True found no layer group" in str(i.message) for i in w)
        assert warned == (not want)
    gelu = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
    with pytest.warns(UserWarning, match="awq=True found no layer group"):
        assert _quantize(gelu, data=[torch.randn(8, D) for _ in range(3)]) == []


def test_awq_puts_the_norms_back_when_quantize_fails():
    fp = Net(PreLN).eval()
    m = copy.deepcopy(fp)
    with torch.no_grad():
        m.layers[1].down.weight[0, 0] = float("nan")
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="NaN"):
        _quantize(m)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0, equal_nan=True)
    assert all(isinstance(mod, nn.Linear) for mod in (m.layers[0].q, m.layers[1].down))


def test_awq_config_checks():
    with pytest.raises(TypeError, match="awq"):
        qtorch.Int4WeightOnlyConfig(32, awq="yes")
    with pytest.raises(ValueError, match="calibration_data"):
        qtorch.quantize_(Net(PreLN), qtorch.Int4WeightOnlyConfig(32, awq=True))
    assert qtorch.Int4WeightOnlyConfig().awq is False


def test_search_scale_is_never_worse_than_no_scaling():
    g = torch.Generator().manual_seed(0)
    k = 128
    x = torch.randn(512, k, generator=g) * torch.where(torch.rand(k, generator=g) < 0.1, 10.0, 1.0)
    w = torch.randn(96, k, generator=g) * 0.05
    h = x.t() @ x
    grid = Grid("int4", 32)
    s, a = awq.search_scale(grid, w, h, x.abs().mean(0))
    assert s is not None and a > 0
    torch.testing.assert_close(torch.log(s).mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    e1 = awq.output_error(grid, w, h)
    es = awq.output_error(grid, w * s, h / s[:, None] / s[None, :])
    assert es < e1
    # the error of the scaled weight is the layer's own output error
    wq = w * s
    n = wq.shape[0]
    from qtorch.quantizers.grid import fake_quant, params_from_range, rtn_range

    sc, z = params_from_range(grid, *rtn_range(grid, wq.reshape(n, 4, 32)))
    wh = fake_quant(grid, wq.reshape(n, 4, 32), sc[..., None], z[..., None]).reshape(n, k)
    direct = ((x @ w.t() - (x / s) @ wh.t()) ** 2).sum()
    torch.testing.assert_close(es, direct, rtol=1e-3, atol=0)
    # no live channel: nothing to scale
    assert awq.search_scale(grid, w, h, torch.zeros(k)) == (None, 0.0)


def test_from_float_takes_the_config_fields_and_refuses_awq():
    import dataclasses

    cfg = qtorch.Int4WeightOnlyConfig(32)
    lin = nn.Linear(D, 8)
    m = qtorch.nn.Int4WeightOnlyLinear.from_float(lin, **dataclasses.asdict(cfg))
    assert isinstance(m, qtorch.nn.Int4WeightOnlyLinear)
    with pytest.raises(ValueError, match="calibration"):
        qtorch.nn.Int4WeightOnlyLinear.from_float(
            lin, **dataclasses.asdict(dataclasses.replace(cfg, awq=True))
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_awq_on_16bit_models(dtype):
    fp = Net(PreLN).eval().to(dtype)
    x = torch.cat(_data(2, seed=99)).to(dtype)
    ref = fp(x).float()
    data = [d.to(dtype) for d in _data()]
    errs = {}
    for use in (False, True):
        m = copy.deepcopy(fp)
        if use:
            producers = [p for _, p, _ in _quantize(m, "gptq", data=data)]
            assert "layers.0.norm1" in producers and "layers.1.up" in producers, producers
            assert m.layers[0].norm1.weight.dtype == dtype
        else:
            qtorch.quantize_(
                m, qtorch.Int4WeightOnlyConfig(32, algorithm="gptq"), calibration_data=data
            )
        errs[use] = ((m(x).float() - ref).norm() / ref.norm()).item()
    assert errs[True] < 0.97 * errs[False], errs


def test_awq_memo_gives_the_same_result_as_recomputing(monkeypatch):
    """The folds change a norm's weight and a stand-in's rows, which the per-block memo of
    finished submodules does not see in their arguments: it must forget those entries. With
    the memo on, the same buffers and norms as with it off (budget 0)."""
    fp = Net(PreLN).eval()
    got = {}
    for budget in (0, 1 << 30):
        monkeypatch.setattr(calibrate, "MEMO_BYTES", budget)
        m = copy.deepcopy(fp)
        assert len(_quantize(m, "gptq")) == 8
        got[budget] = m.state_dict()
    assert got[0].keys() == got[1 << 30].keys()
    for key in got[0]:
        torch.testing.assert_close(got[1 << 30][key], got[0][key], rtol=0, atol=0)
