"""`qtorch bench`: a tiny run through `run()` gives schema-valid JSON, the peers time the same
job as qtorch, the roofline cache, the timing loop, argument errors, peak-RSS child, plots."""

from __future__ import annotations

import argparse
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

import qtorch
from qtorch import bench
from qtorch.bench import cases, report, roofline, timing
from qtorch.bench.cases import LINEAR_OPS, OPS, Shape, build
from qtorch.testing import assert_close, sqnr

ROOT = Path(__file__).resolve().parents[1]
FAKE_ROOF = {
    "fp32_tflops": 0.1,
    "bf16_tflops": 0.2,
    "int8_tops": 0.4,
    "int8_path": "fake",
    "bandwidth_gbps": 20.0,
    "device": "cpu",
    "threads": 1,
}
# One tiny shape that every op accepts: K=64 is a multiple of the int4 group size 64;
# distillation: 4 tokens, vocab 128; fused: hidden 64 (teacher 96), vocab 128.
TINY = ["4,64,128,96"]


def _parse(argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture
def fake_roofline(tmp_path, monkeypatch):
    """An isolated roofline cache whose measurement is instant and counted."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def fake_measure(device="cpu"):
        calls.append(device)
        return dict(FAKE_ROOF, device=device)

    monkeypatch.setattr(roofline, "measure_peaks", fake_measure)
    return calls


def _tiny_run(tmp_path, extra=(), backends=("reference",)):
    out = tmp_path / "run.json"
    args = _parse(
        [
            "--shapes",
            *TINY,
            "--target-time",
            "0.002",
            "--threads",
            "1",
            "--json",
            str(out),
            "--backend",
            *backends,
            *extra,
        ]
    )
    rc = bench.run(args)
    return rc, json.loads(out.read_text())


# ------------------------------------------------------------------------------- whole run


def test_tiny_run_gives_schema_valid_json(tmp_path, fake_roofline, capsys):
    rc, doc = _tiny_run(tmp_path)
    assert rc == 0
    assert report.validate(doc) == []
    # every op ran: qtorch reference row + plain-PyTorch baseline row at least
    for op in OPS:
        kinds = {r["kind"] for r in doc["rows"] if r["op"] == op}
        assert {"qtorch", "baseline"} <= kinds, op
    for r in doc["rows"]:
        assert r["threads"] == 1 and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["speedup_vs_baseline"] == pytest.approx(
            next(b for b in doc["rows"] if b["op"] == r["op"] and b["impl"] == r["baseline"])[
                "median_s"
            ]
            / r["median_s"]
        )
        assert r["roofline_pct"] is not None and r["roofline_pct"] > 0
    lin = next(r for r in doc["rows"] if r["op"] == "int8_linear" and r["kind"] == "qtorch")
    assert lin["flop"] == 2 * 4 * 64 * 128 and lin["unit"] == "TOP/s"
    assert lin["weight_bytes"] == 128 * 64 + 4 * 128  # int8 weight + fp32 scales
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["qtorch"] == qtorch.__version__
    assert doc["roofline"]["int8_path"] == "fake" and fake_roofline == ["cpu"]
    assert doc["command"].startswith("qtorch bench --backend reference --shapes 4,64,128,96")
    text = capsys.readouterr().out
    assert "== int8_linear" in text and "qtorch:reference" in text and "wall time" in text
    assert "vs peer: fastest installed peer's median / this median (>1: this is faster)" in text


def test_default_backends_skip_the_triton_interpreter(tmp_path, fake_roofline):
    """Default backends: every available one for the device except Triton's CPU interpreter;
    an op without a kernel in a backend is listed as skipped, a failing kernel makes rc 1."""
    out = tmp_path / "d.json"
    rc = bench.run(
        _parse(
            [
                "--op",
                "quantize_int8",
                "--shapes",
                "3,64,0",
                "--target-time",
                "0.002",
                "--json",
                str(out),
            ]
        )
    )
    doc = json.loads(out.read_text())
    assert "triton" not in doc["backends"]
    assert set(doc["backends"]) == {b for b in qtorch.available_backends() if b != "triton"}
    assert rc == (1 if doc["failures"] else 0)
    ran = {r["impl"] for r in doc["rows"]} | {s["impl"] for s in doc["skipped"]}
    assert {f"qtorch:{b}" for b in doc["backends"]} <= ran


def test_validate_catches_broken_rows(tmp_path, fake_roofline):
    _, doc = _tiny_run(tmp_path, ["--op", "int8_linear"])
    assert len(doc["rows"]) >= 3
    bad = json.loads(json.dumps(doc))
    del bad["rows"][0]["median_s"]
    bad["rows"][1]["kind"] = "mystery"
    bad["rows"][2]["p20_s"] = bad["rows"][2]["p80_s"] * 2
    errs = report.validate(bad)
    assert any("missing 'median_s'" in e for e in errs)
    assert any("mystery" in e for e in errs)
    assert any("p20_s <= median_s" in e for e in errs)


def test_plot_writes_one_png_per_op(tmp_path, fake_roofline):
    pytest.importorskip("matplotlib")
    rc, doc = _tiny_run(
        tmp_path, ["--op", "int8_linear", "dequantize_int4", "--plot", str(tmp_path / "fig.png")]
    )
    assert rc == 0
    for op in ("int8_linear", "dequantize_int4"):
        png = tmp_path / f"fig_{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_tables_renders_markdown(tmp_path, fake_roofline, capsys):
    _, doc = _tiny_run(tmp_path, ["--op", "int8_linear"])
    capsys.readouterr()
    make_tables = runpy.run_path(str(ROOT / "benchmarks" / "make_tables.py"))
    assert make_tables["main"]([str(tmp_path / "run.json")]) == 0
    md = capsys.readouterr().out
    assert doc["command"] in md
    assert "| M=4 K=64 N=128 |" in md and "qtorch:reference" in md


# ---------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "argv",
    [
        ["--shapes", "1,2"],  # M,K,N needs three numbers
        ["--shapes", "1,x,3"],
        ["--shapes", "1,-2,3"],
        ["--op", "no_such_op"],
        ["--backend", "tpu"],
        ["--threads", "0"],
        ["--dtype", "int8"],
    ],
)
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unavailable_backend_is_exit_2_naming_it(monkeypatch, capsys, fake_roofline):
    from qtorch import _backend

    monkeypatch.setattr(_backend, "available_backends", lambda: ["reference"])
    assert bench.run(_parse(["--backend", "cpu", "--quick"])) == 2
    assert "'cpu' is not available" in capsys.readouterr().err


def test_bad_target_time_is_exit_2(capsys, fake_roofline):
    assert bench.run(_parse(["--target-time", "-1", "--backend", "reference"])) == 2
    assert "--target-time" in capsys.readouterr().err


def test_plot_without_matplotlib_says_so(monkeypatch, capsys, fake_roofline):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.run(_parse(["--plot", "x.png", "--backend", "reference"])) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_shape_that_does_not_fit_an_op_is_skipped_not_fatal(tmp_path, fake_roofline):
    rc, doc = _tiny_run(tmp_path, ["--op", "int4_weight_only_linear", "--shapes", "2,48,16"])
    assert rc == 0 and doc["rows"] == []
    assert "multiple of 32" in doc["skipped"][0]["reason"]


# ------------------------------------------------------- peers and baselines: the same job


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_linear_peers_compute_the_same_result(op):
    """Peers get the same quantized weights, so they match the reference to a few ulps
    (exact-int paths) or the activation-quantization error (fbgemm quantizes x per tensor);
    the float baseline differs by the weight-quantization error only."""
    built = build(op, Shape(5, 128, 96), torch.float32, "cpu", ["reference"])
    names = {i.name for i in built.impls}
    assert "qtorch:reference" in names and any(i.kind == "baseline" for i in built.impls)
    with torch.no_grad():
        ref = next(i for i in built.impls if i.name == "qtorch:reference").fn()
        for impl in built.impls:
            db = sqnr(ref, impl.fn())
            if impl.kind == "baseline":
                # int8: ~40 dB, int4 (asymmetric 4-bit groups): ~20 dB of quantization noise
                assert db > (14 if "int4" in op else 30), (impl.name, db)
            elif impl.name == "fbgemm:dynamic_linear":
                assert db > 30, (impl.name, db)
            else:
                assert db > 70, (impl.name, db)
    if op == "int4_weight_only_linear" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        assert "torch:_weight_int4pack_mm_for_cpu" in names  # the zero-point conversion ran


@pytest.mark.parametrize("op", ["distillation_loss", "fused_linear_distillation_loss"])
def test_eager_distillation_baseline_matches_the_reference(op):
    shape = Shape(6, 0, 50) if op == "distillation_loss" else Shape(6, 16, 50, K2=24)
    built = build(op, shape, torch.float32, "cpu", ["reference"])
    base = next(i for i in built.impls if i.kind == "baseline").fn()
    ours = next(i for i in built.impls if i.name == "qtorch:reference").fn()
    assert len(base) == len(ours)
    for b, o in zip(base, ours, strict=True):
        assert_close(o, b)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3)])
def test_liger_fused_jsd_peer_is_the_same_loss(temperature, alpha):
    """Liger-Kernel's LigerFusedLinearJSDLoss, with qtorch's settings converted
    (peers.liger_jsd_kwargs: no T² factor in Liger), gives the loss and the student gradients
    of qtorch's JSD loss (ignored tokens included); then the case's Liger rows time that job."""
    pytest.importorskip("liger_kernel.chunked_loss")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    from qtorch.bench import peers

    g = torch.Generator().manual_seed(0)
    m, h, ht, v = 37, 16, 24, 300
    hs = torch.randn(m, h, generator=g).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g) * 0.3).requires_grad_(True)
    th, wt = torch.randn(m, ht, generator=g), torch.randn(v, ht, generator=g) * 0.3
    labels = torch.randint(0, v, (m,), generator=g)
    labels[::6] = -100
    liger = LigerFusedLinearJSDLoss(
        compiled=False, chunk_size=8, **peers.liger_jsd_kwargs(temperature, alpha, 0.5)
    )
    got = liger(hs, ws, th, wt, labels)
    got_g = torch.autograd.grad(got, (hs, ws))
    want = qtorch.ops.fused_linear_distillation_loss(
        hs,
        ws,
        th,
        wt,
        labels,
        chunk_size=8,
        divergence="jsd",
        beta=0.5,
        temperature=temperature,
        alpha=alpha,
    )
    want_g = torch.autograd.grad(want, (hs, ws))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        peers.liger_jsd_kwargs(1.0, 0.5, 0.0)
    built = build(
        "fused_linear_distillation_loss",
        Shape(6, 16, 50, K2=24),
        torch.float32,
        "cpu",
        ["reference"],
        True,
        cases.Options(divergence="jsd"),
    )
    by = {i.name: i for i in built.impls}
    assert "liger:FusedLinearJSDLoss" in by, built.skipped
    ours = by["qtorch:reference"].fn()
    for a, b in zip(by["liger:FusedLinearJSDLoss"].fn(), ours, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("quant", ["w8a16", "w4a16"])
def test_fused_case_quantized_teacher_rows(quant):
    """Options.teacher_quant adds rows whose teacher head is a qtorch module made from the
    case's teacher weight; their grads are close to those of the float teacher head."""
    built = build(
        "fused_linear_distillation_loss",
        Shape(6, 16, 50, K2=64),
        torch.float32,
        "cpu",
        ["reference"],
        False,
        cases.Options(teacher_quant=(quant,)),
    )
    by = {i.name: i for i in built.impls}
    got, want = by[f"qtorch:reference {quant} teacher"].fn(), by["qtorch:reference"].fn()
    for a, b in zip(got, want, strict=True):
        assert sqnr(b, a) > (15 if quant == "w4a16" else 30)


def test_reference_row_only_where_cheap():
    small = build("int8_linear", Shape(1, 64, 64), torch.float32, "cpu", ["reference", "cpu"])
    assert "qtorch:reference" in {i.name for i in small.impls}
    if "cpu" in qtorch.available_backends():
        big = cases._reference_is_cheap("int8_linear", Shape(16, 4096, 11008))
        assert big is False


needs_cpu = pytest.mark.skipif(
    "cpu" not in qtorch.available_backends(), reason="qtorch._C (the cpu backend) is not built"
)


@pytest.mark.parametrize("op", list(cases.MODULE_FOR))
def test_linear_qtorch_row_is_the_module_on_the_op_rows_weights(op):
    """qtorch:<b> of a linear case is the qtorch.nn module loaded with the canonical weights
    the op row gets: both compute the same output (exactly: the same kernel, the same
    weights); the op row and the kernel-binding row are there with Options asking."""
    backends = ["reference"] + (["cpu"] if "cpu" in qtorch.available_backends() else [])
    opt = cases.Options(bias=True, kernel_rows=True)
    built = build(op, Shape(3, 128, 96), torch.float32, "cpu", backends, False, opt)
    by = {i.name: i for i in built.impls}
    assert by["qtorch:reference"].note == f"qtorch.nn.{cases.MODULE_FOR[op]}"
    assert "qtorch:reference:op" not in by  # nothing to pack: the module runs exactly the op
    if "cpu" not in backends:
        return
    assert by["qtorch:cpu"].note == f"qtorch.nn.{cases.MODULE_FOR[op]}"
    with torch.no_grad():
        mod, op_out, kern = (
            by[n].fn() for n in ("qtorch:cpu", "qtorch:cpu:op", "qtorch:cpu:kernel")
        )
        ref = by["qtorch:reference"].fn()
    torch.testing.assert_close(mod, op_out, rtol=0, atol=0)
    torch.testing.assert_close(kern, op_out, rtol=0, atol=0)
    assert sqnr(ref, mod) > 70  # and the bias reached every row
    assert all(
        i.weight_bytes == by["qtorch:cpu"].weight_bytes for i in built.impls if i.kind == "qtorch"
    )


def test_weight_copies_compute_the_same_job():
    """A cold copy of each implementation (built on cloned weights) gives the same output as
    the implementation itself, from storage of its own."""
    built = build(
        "int4_weight_only_linear",
        Shape(2, 64, 32),
        torch.float32,
        "cpu",
        qtorch.available_backends()[:2],
        True,
        cases.Options(bias=True),
    )
    copied = [i for i in built.impls if i.copy is not None]
    assert {i.kind for i in copied} >= {"qtorch", "baseline"}
    with torch.no_grad():
        for impl in copied:
            with impl.scope():  # a body runs in its scope (the qtorch backend), as timed
                out = impl.copy()()
            torch.testing.assert_close(out, impl.fn(), rtol=0, atol=0)


def test_options_roundtrip_through_json():
    opt = cases.Options(bias=True, chunk_sizes=(None, 64), dense_dtypes=("float32",))
    assert cases.Options.of(json.loads(json.dumps(opt.as_dict()))) == opt
    assert cases.Options.of(None) == cases.Options()


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_the_one_eager_baseline_matches_the_reference_for_every_divergence(divergence):
    from qtorch import reference as R
    from qtorch.bench.baselines import eager_distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    labels = torch.tensor([1, -100, 3, 39, 0])
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.4)
    loss, _ = R.distillation_loss(s, t, labels, compute_grad=False, **kw)
    keep = labels != -100
    assert_close(eager_distillation_loss(s, t, labels, **kw), loss[keep].sum() / keep.sum())
    loss_nl, _ = R.distillation_loss(s, t, None, compute_grad=False, **kw)
    assert_close(eager_distillation_loss(s, t, None, **kw), loss_nl.mean())


@needs_cpu
def test_read_ceiling_row_and_read_pct():
    from qtorch.bench import ceiling

    impl = ceiling.read_ceiling(64, 128)
    assert impl.kind == "ceiling" and impl.name == ceiling.NAME
    assert impl.weight_bytes >= 64 * 128 and isinstance(impl.fn(), int)
    assert impl.copy is not None and impl.copy() is not impl.body
    # a row streaming twice the bytes in twice the time runs at the read's rate: 100 %
    assert ceiling.read_pct(2e6, 2.0, 1e6, 1.0) == pytest.approx(100.0)
    assert ceiling.read_pct(1e6, 2.0, 1e6, 1.0) == pytest.approx(50.0)


@needs_cpu
def test_cold_run_rotates_weights_and_reports_percent_of_read(
    tmp_path, fake_roofline, capsys, monkeypatch
):
    """--cold: rows with a weight are rotated over copies (cold, copies > 1 where the weight
    is small), the streaming-read row runs in the same rounds, and every row with a weight
    gets read_pct against it; the table has a %read column."""
    # 64 KiB of copies instead of 128 MiB: a few copies of the tiny weights, not a thousand
    monkeypatch.setattr(timing, "cold_bytes_for", lambda device: 64 << 10)
    rc, doc = _tiny_run(
        tmp_path, ["--op", "int8_linear", "quantize_int8", "--cold"], backends=("cpu",)
    )
    assert rc == 0 and report.validate(doc) == []
    lin = [r for r in doc["rows"] if r["op"] == "int8_linear"]
    ceil = next(r for r in lin if r["kind"] == "ceiling")
    assert ceil["impl"] == "read:stream_read" and ceil["read_pct"] == pytest.approx(100.0)
    assert ceil["flop"] is None and ceil["speedup_vs_baseline"] is None
    for r in lin:
        assert r["cold"] and 2 <= r["copies"] <= 8 and r["read_pct"] > 0
    assert {r["impl"] for r in lin} >= {"qtorch:cpu", "qtorch:cpu:op", "torch:F.linear(float32)"}
    quant = [r for r in doc["rows"] if r["op"] == "quantize_int8"]
    assert quant and all(not r["cold"] and r["copies"] is None for r in quant)
    assert "%read" in capsys.readouterr().out


def test_compiled_variant_that_fails_is_a_row_with_its_error(monkeypatch):
    from qtorch.bench import compiled

    def broken(*a, **k):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch.export, "export", broken)
    model = compiled.w8a8_model(2, (32, 64))
    out = compiled.variants(model, torch.randn(1, 32))
    eager = out[0]
    assert eager.name == compiled.EAGER and eager.fn().shape == (1, 32)
    assert out[1:] == [
        (compiled.COMPILED, "RuntimeError: no compiler here"),
        (compiled.EXPORTED, "RuntimeError: no compiler here"),
    ]


# ------------------------------------------------------------------------- roofline cache


def test_roofline_cache_roundtrip(fake_roofline, tmp_path):
    assert roofline.get_roofline(measure=False, device="cpu") is None
    first = roofline.get_roofline(measure=True, device="cpu")
    assert fake_roofline == ["cpu"]
    path = tmp_path / "cache" / "qtorch" / "roofline.json"
    assert roofline.cache_path() == path and path.exists()
    assert roofline.get_roofline(measure=True, device="cpu") == first  # cached: no re-measure
    assert roofline.get_roofline(measure=False, device="cpu") == first
    assert fake_roofline == ["cpu"]
    roofline.get_roofline(measure=True, device="cpu", refresh=True)
    assert fake_roofline == ["cpu", "cpu"]
    path.write_text("{not json")
    assert roofline.get_roofline(measure=False, device="cpu") is None


def test_roofline_cache_is_per_thread_count(fake_roofline):
    threads = torch.get_num_threads()
    roofline.get_roofline(measure=True, device="cpu")
    try:
        torch.set_num_threads(threads + 1)
        assert roofline.get_roofline(measure=False, device="cpu") is None
    finally:
        torch.set_num_threads(threads)


def test_roofline_time_model():
    roof = dict(FAKE_ROOF)  # 0.4 TOP/s int8, 20 GB/s
    t, bound = roofline.roofline_time(roof, flop=4e9, nbytes=1e6, kind="int8")
    assert bound == "compute" and t == pytest.approx(4e9 / 0.4e12)
    t, bound = roofline.roofline_time(roof, flop=1e6, nbytes=2e9, kind="fp32")
    assert bound == "memory" and t == pytest.approx(0.1)
    assert roofline.roofline_time(None, 1.0, 1.0, "fp32") == (None, None)


def test_real_peak_measurements_are_positive():
    """The measuring kernels themselves, at tiny sizes (the cached run uses large ones)."""
    assert 0 < roofline._matmul_peak(torch.float32, 64, "cpu", 2) < math.inf
    assert 0 < roofline._bandwidth(1 << 20, "cpu", 2) < math.inf
    rate, path = roofline._int8_peak(64, "cpu", 2)
    assert rate > 0 and path != "none"


# ------------------------------------------------------------------------------- timing


def test_quantiles():
    s = timing.Stats.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.p20, s.p80, s.n) == (3.0, 1.8, 4.2, 5)


def test_percentiles_is_the_linear_interpolated_quantile():
    import statistics

    ts = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 0.5]
    q = statistics.quantiles(ts, n=10, method="inclusive")
    assert timing.percentiles(ts) == pytest.approx((q[1], statistics.median(ts), q[7]))
    assert timing.percentiles([2.0]) == (2.0, 2.0, 2.0)
    assert timing.Stats.of(ts).pcts == timing.percentiles(ts)


def test_time_group_interleaves_in_shuffled_rounds():
    order = []
    fns = {n: (lambda n=n: order.append(n)) for n in "abc"}
    cfg = timing.TimingConfig(target_s=0.0, min_reps=4, max_reps=4, warmup=1, batch_below_s=0.0)
    stats = timing.time_group(fns, "cpu", cfg)
    assert {n: s.n for n, s in stats.items()} == {"a": 4, "b": 4, "c": 4}
    # per implementation: one warm-up call, then the sizing sample (kept as sample 1): a hot
    # sample is an untimed call followed by the timed one
    assert order[:9] == list("aaabbbccc")
    # then 3 rounds, one sample (two calls) of every implementation each, interleaved
    assert len(order) == 9 + 3 * 6
    rounds = [order[9 + 6 * i : 15 + 6 * i] for i in range(3)]
    for r in rounds:
        assert sorted(r) == list("aabbcc") and r[0::2] == r[1::2]
    # the order changes from round to round (seeded: the same every run), so no
    # implementation always goes first or always follows the same one
    firsts = [tuple(r[0::2]) for r in rounds]
    assert len(set(firsts)) > 1 and len({f[0] for f in firsts}) > 1
    order.clear()
    timing.time_group(fns, "cpu", cfg)
    assert [tuple(order[9 + 6 * i : 15 + 6 * i : 2]) for i in range(3)] == firsts


def test_time_group_fixed_rounds_and_scopes():
    import contextlib

    inside = []

    @contextlib.contextmanager
    def scope():
        inside.append(True)
        yield
        inside.pop()

    calls = []
    fns = {"a": lambda: calls.append(bool(inside)), "b": lambda: calls.append(None)}
    cfg = timing.TimingConfig(rounds=3, warmup=0, batch_below_s=0.0)
    stats = timing.time_group(fns, "cpu", cfg, scopes={"a": scope})
    assert stats["a"].n == stats["b"].n == 3
    assert calls.count(True) == 6 and False not in calls  # every call of a ran in its scope


def test_copies_cover_the_cold_bytes():
    mib = 1 << 20
    assert timing.copies(16 * mib) == 8  # 128 MiB in all, four times a 32 MiB L3
    assert timing.copies(200 * mib) == 1  # one weight larger than that streams by itself
    assert timing.copies(100 * mib) == 2
    assert timing.copies(1) == timing.MAX_COPIES
    assert timing.copies(0) == 1
    assert timing.copies(mib, cold_bytes=4 * mib) == 4


def test_cold_timing_rotates_over_weight_copies():
    """Cold: each sample is one pass over every copy (each called once, in turn); an
    implementation without a weight is timed hot; copies have storage of their own."""
    from qtorch.bench.types import Impl

    seen = []

    def make(w):
        return lambda: seen.append(w["t"].data_ptr())

    w0 = {"t": torch.zeros(256)}
    with_weight = Impl(
        "w", "qtorch", "x", make(w0), 1024, "fp32", copy=lambda: make(cases.clone_weights(w0))
    )
    hot = []
    no_weight = Impl("nw", "baseline", "torch", lambda: hot.append(1), 0, "fp32")
    cfg = timing.TimingConfig(cold=True, cold_bytes=4096, rounds=2, warmup=1, batch_below_s=0.0)
    stats, ncopies = timing.time_impls([with_weight, no_weight], "cpu", cfg)
    assert ncopies == {"w": 4, "nw": None}
    assert stats["w"].n == 2 and stats["nw"].n == 2
    assert len(set(seen)) == 4  # four distinct weight storages
    # a warm-up pass, one call that sizes the sample window, two sample passes; the copies
    # are called in turn, so any four consecutive calls touch four different copies
    assert len(seen) == 4 + 1 + 2 * 4
    assert all(len(set(seen[i : i + 4])) == 4 for i in range(len(seen) - 3))
    assert len(hot) == 1 + 2 * 2  # warm-up, then two hot samples of two calls


def test_a_long_cold_pass_is_timed_in_windows():
    import time

    calls = []

    def slow(i):
        def run():
            calls.append(i)
            time.sleep(0.002)

        return run

    fns = {"w": timing.Rotating([slow(i) for i in range(10)])}
    cfg = timing.TimingConfig(rounds=3, warmup=1, max_sample_s=0.005)
    assert timing.time_group(fns, "cpu", cfg)["w"].n == 3
    # warm-up pass (10), the sizing call, then samples of at most 0.005 / 0.002 = 2 calls
    assert 10 + 1 + 3 <= len(calls) <= 10 + 1 + 3 * 2
    assert all(len(set(calls[i : i + 10])) == 10 for i in range(len(calls) - 9))


def test_evict_writes_before_each_sample_instead_of_a_hot_call():
    n = []
    cfg = timing.TimingConfig(rounds=3, warmup=1, evict_bytes=1 << 16)
    assert timing.time_group({"a": lambda: n.append(1)}, "cpu", cfg)["a"].n == 3
    assert len(n) == 1 + 3  # warm-up, then one timed call per sample, no untimed call


def test_rotating_cycles():
    out = []
    r = timing.Rotating([lambda i=i: out.append(i) for i in range(3)])
    for _ in range(6):
        r()
    assert len(r) == 3 and sorted(out[:3]) == [0, 1, 2] and out[:3] == out[3:]
    with pytest.raises(ValueError):
        timing.Rotating([])


# ------------------------------------------------------------------------------- memory


def test_peak_rss_in_a_child_process():
    """quantize_int8 of a 2048 x 4096 fp32 x returns 8 MiB of int8 and makes fp32 temporaries
    of 32 MiB: the child sees at least the output and far less than a GiB."""
    from qtorch.bench.memory import cpu_peak_extra

    res = cpu_peak_extra(
        "quantize_int8",
        [Shape(2048, 4096, 0)],
        torch.float32,
        ["reference"],
        ["torch:eager", "qtorch:reference"],
        False,
        1,
    )
    assert "error" not in res, res
    for impl in ("torch:eager", "qtorch:reference"):
        assert 8 << 20 <= res[f"2048,4096,0|{impl}"] < 1 << 30


def test_qtorch_impls_run_under_their_backend():
    """Each qtorch:<b> implementation really dispatches to backend b (not to auto)."""
    from qtorch import _backend

    for b in qtorch.available_backends():
        if b == "triton":
            continue
        probe = cases._in_backend(
            b, lambda: _backend.resolve("quantize_int8", torch.device("cpu"))[0]
        )
        expected = b if b in _backend.kernel_coverage()["quantize_int8"] else "reference"
        assert probe() == expected
    assert _backend.get_backend() == "auto"  # the scope does not leak
    with pytest.raises(RuntimeError):
        cases._in_backend("cuda" if not torch.cuda.is_available() else "nope", lambda: None)


def test_result_headers_say_whether_amx_is_usable(monkeypatch):
    """Machines printing the same CPU model name differ in AMX (torch's bf16 GEMM speed and
    qtorch's default bf16 head follow it): the table header and the JSON machine record say
    which, from the same probe the cpu backend uses."""
    cpu_backend = pytest.importorskip("qtorch.backends.cpu", reason="qtorch._C not built")
    from qtorch.bench import drivers, machine

    for usable in (True, False):
        monkeypatch.setattr(cpu_backend, "_AMX", usable)
        line = drivers.header("x")
        assert ("AMX usable" in line) == usable and ("no AMX" in line) == (not usable)
        assert line.endswith(", x")
        assert machine.machine_info("cpu")["amx_usable"] is usable
