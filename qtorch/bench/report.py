"""Rows -> the terminal table, the JSON file (schema: docs/bench_json_schema.md), the plots."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

SCHEMA = "qtorch-bench/1"


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _num(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mib(v):
    return None if v is None else v / 2**20


def format_table(rows: list[dict], roof: dict | None) -> str:
    """One block per (op, dtype): every implementation of every shape, fastest first."""
    out = []
    blocks: OrderedDict = OrderedDict()
    for r in rows:
        blocks.setdefault((r["op"], r["dtype"]), []).append(r)
    mem = any(r.get("peak_mem_bytes") is not None for r in rows)
    read = any(r.get("read_pct") is not None for r in rows)
    head = (
        f"{'shape':<24} {'impl':<36} {'median':>10} {'p20..p80':>19} {'T(FL)OP/s':>9} "
        f"{'GB/s':>7} {'%roof':>6}"
        + (f" {'%read':>6}" if read else "")
        + f" {'vs base':>8} {'vs peer':>8}"
        + (" peak MiB" if mem else "")
    )
    for (op, dtype), rs in blocks.items():
        r0 = rs[0]
        cold = " cold weights (rotated copies)" if any(r["cold"] for r in rs) else ""
        out.append(f"\n== {op}  [{dtype}, {r0['device']}, {r0['threads']} threads{cold}]")
        out.append(head)
        out.append("-" * len(head))
        last = None
        for r in rs:
            shape = r["shape_text"] if r["shape_text"] != last else ""
            last = r["shape_text"]
            band = f"{fmt_time(r['p20_s'])}..{fmt_time(r['p80_s'])}"
            gbps = r["weight_gbps"] if r["weight_gbps"] is not None else r["gbps"]
            roofp = None if r["roofline_pct"] is None else f"{r['roofline_pct']:.0f}"
            mark = "*" if r["kind"] == "qtorch" else " "
            out.append(
                f"{shape:<24} {mark}{r['impl']:<35} {fmt_time(r['median_s']):>10} {band:>19} "
                f"{_num(r['tflops'], '.3f'):>9} {_num(gbps, '.1f'):>7} {roofp or '-':>6}"
                + (f" {_num(r.get('read_pct'), '.0f'):>6}" if read else "")
                + f" {_ratio(r['speedup_vs_baseline']):>8} {_ratio(r['speedup_vs_best_peer']):>8}"
                + (f" {_num(_mib(r.get('peak_mem_bytes')), '.1f'):>8}" if mem else "")
            )
    out.append(
        "\n* qtorch rows.  GB/s: weight bytes / time for ops with a weight, else all "
        "bytes / time.\n%roof: roofline-bound time / measured time "
        "(max(flop / peak, bytes / bandwidth)).  vs base: plain-PyTorch median / this "
        "median;\nvs peer: fastest installed peer's median / this median (>1: this is "
        "faster)."
    )
    if read:
        out.append(
            "%read: this row's weight bytes / time against read:stream_read's (the same "
            "weight bytes read once, in the same rounds): 100 = streams as fast as a plain read."
        )
    if mem:
        out.append(
            "peak MiB: memory of one call beyond its inputs (CPU: peak RSS in a child "
            "process; CUDA: max allocated)."
        )
    if roof:
        out.append(
            f"roofline ({roof.get('threads')} threads, measured {roof.get('measured_at')}): "
            f"fp32 {roof['fp32_tflops']:.3f} TFLOP/s, bf16 {roof['bf16_tflops']:.3f} TFLOP/s, "
            f"int8 {roof['int8_tops']:.3f} TOP/s ({roof.get('int8_path')}), "
            f"{roof['bandwidth_gbps']:.1f} GB/s"
        )
    return "\n".join(out)


def format_skipped(skipped: list[dict]) -> str:
    """Distinct skip reasons, one line each (an impl skipped at many shapes is listed once)."""
    seen: OrderedDict = OrderedDict()
    for s in skipped:
        seen.setdefault((s["op"], s["impl"], s["reason"]), 0)
        seen[(s["op"], s["impl"], s["reason"])] += 1
    lines = [
        f"  {op:<31} {impl:<36} {reason}" + (f"  ({n} shapes)" if n > 1 else "")
        for (op, impl, reason), n in seen.items()
    ]
    return "not run:\n" + "\n".join(lines) if lines else ""


def write_json(path: str, doc: dict) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------------ plots


def plot_paths(path: str, ops: list[str]) -> dict[str, Path]:
    """--plot PATH: a file name (one op: that file; several: NAME_<op>.EXT) or a directory."""
    p = Path(path)
    if p.suffix.lower() in (".png", ".svg", ".pdf"):
        if len(ops) == 1:
            return {ops[0]: p}
        return {op: p.with_name(f"{p.stem}_{op}{p.suffix}") for op in ops}
    return {op: p / f"{op}.png" for op in ops}


def plot(rows: list[dict], roof: dict | None, path: str) -> list[Path]:
    """One figure per op: throughput (TFLOP/s or TOP/s; GB/s for ops without a FLOP count)
    against the x axis of the op (tokens M, or weight size), one line per implementation,
    with the roofline of the qtorch implementation's storage drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qtorch.bench.roofline import compute_peak

    rows = [r for r in rows if r["kind"] != "ceiling"]  # a read, not the op: no throughput
    ops = list(OrderedDict.fromkeys(r["op"] for r in rows))
    written = []
    for op, fpath in plot_paths(path, ops).items():
        rs = [r for r in rows if r["op"] == op]
        # one panel per (dtype, weight shape): within a panel only the x-axis quantity varies
        panels: OrderedDict = OrderedDict()
        for r in rs:
            key = (r["dtype"], r["panel"])
            panels.setdefault(key, []).append(r)
        # one colour per implementation across all panels of the figure
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        color = {
            impl: palette[i % len(palette)]
            for i, impl in enumerate(OrderedDict.fromkeys(r["impl"] for r in rs))
        }
        n = len(panels)
        cols = min(n, 3)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
        for ax, ((dtype, panel), prs) in zip(axes.flat, panels.items(), strict=False):
            use_flop = all(r["tflops"] is not None for r in prs)
            units = {r["unit"] for r in prs}
            ylab = ("T(FL)OP/s" if len(units) > 1 else units.pop()) if use_flop else "GB/s"
            impls = list(OrderedDict.fromkeys(r["impl"] for r in prs))
            for impl in impls:
                pts = sorted(
                    (r["x"], r["tflops"] if use_flop else r["gbps"])
                    for r in prs
                    if r["impl"] == impl
                )
                kind = next(r["kind"] for r in prs if r["impl"] == impl)
                style = "-o" if kind == "qtorch" else ("-s" if kind == "baseline" else "--^")
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    style,
                    label=impl,
                    ms=4,
                    lw=2 if kind == "qtorch" else 1.2,
                    color=color[impl],
                )
            if roof:
                # the roofline of the first qtorch implementation's storage and compute kind
                q = [r for r in prs if r["kind"] == "qtorch"] or prs
                q = [r for r in q if r["impl"] == q[0]["impl"]]
                model = sorted(
                    {(r["x"], r["roofline_s"], r["flop"], r["bytes"]) for r in q if r["roofline_s"]}
                )
                if model:
                    ys = [(f / t / 1e12) if use_flop else (b / t / 1e9) for _, t, f, b in model]
                    ax.plot(
                        [m[0] for m in model],
                        ys,
                        "k--x",
                        lw=1,
                        ms=5,
                        label=f"roofline ({q[0]['impl']})",
                    )
                if use_flop:
                    peak = (compute_peak(roof, q[0]["compute"]) or 0) / 1e12
                    peak_label = f"peak {q[0]['compute']} ({q[0]['unit']})"
                else:
                    peak, peak_label = roof.get("bandwidth_gbps"), "copy bandwidth"
                if peak:
                    ax.axhline(peak, color="gray", ls=":", lw=1, label=peak_label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(prs[0]["x_label"])
            ax.set_ylabel(ylab)
            ax.set_title(f"{panel} [{dtype}]", fontsize=9)
            ax.grid(True, which="both", alpha=0.25)
            ax.legend(fontsize=6.5, loc="best")
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        r0 = rs[0]
        fig.suptitle(f"qtorch bench: {op}  ({r0['device']}, {r0['threads']} threads)", fontsize=11)
        fig.tight_layout()
        fpath.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(fpath, dpi=110)
        plt.close(fig)
        written.append(fpath)
    return written


# ------------------------------------------------------------------------------ validation

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
# The JSON contract (docs/bench_json_schema.md): field -> allowed Python types after json.load.
TOP_FIELDS = {
    "schema": str,
    "created": str,
    "command": str,
    "argv": list,
    "wall_s": _NUM,
    "machine": dict,
    "versions": dict,
    "backends": list,
    "kernel_coverage": dict,
    "timing": dict,
    "roofline": (dict, type(None)),
    "rows": list,
    "skipped": list,
    "failures": list,
}
ROW_FIELDS = {
    "op": str,
    "impl": str,
    "kind": str,
    "backend": str,
    "shape": dict,
    "shape_text": str,
    "shape_label": str,
    "dtype": str,
    "device": str,
    "threads": int,
    "cold": bool,
    "n": int,
    "median_s": _NUM,
    "p20_s": _NUM,
    "p80_s": _NUM,
    "flop": _OPT_NUM,
    "bytes": _NUM,
    "weight_bytes": _NUM,
    "compute": str,
    "unit": str,
    "tflops": _OPT_NUM,
    "gbps": _NUM,
    "weight_gbps": _OPT_NUM,
    "roofline_s": _OPT_NUM,
    "roofline_pct": _OPT_NUM,
    "bound": _OPT_STR,
    "note": str,
    "x": _NUM,
    "x_label": str,
    "panel": str,
    "peak_mem_bytes": _OPT_NUM,
    "mem_kind": _OPT_STR,
    "baseline": _OPT_STR,
    "speedup_vs_baseline": _OPT_NUM,
    "best_peer": _OPT_STR,
    "speedup_vs_best_peer": _OPT_NUM,
    "speedup_vs": dict,
}
# Added within schema 1: checked where present (files written before them lack them).
OPTIONAL_ROW_FIELDS = {
    "copies": (int, type(None)),
    "read_pct": _OPT_NUM,
}
MACHINE_FIELDS = {
    "device": str,
    "cpu_model": str,
    "cpu_count": int,
    "torch_threads": int,
    "cpu_features": dict,
}
VERSION_FIELDS = {
    "qtorch": str,
    "torch": str,
    "python": str,
    "commit": _OPT_STR,
    "dirty": (bool, type(None)),
}
SKIPPED_FIELDS = {"op": str, "impl": str, "shape": dict, "reason": str}
KINDS = ("qtorch", "baseline", "peer", "ceiling")


def validate(doc: dict) -> list[str]:
    """Everything in `doc` (a loaded bench JSON) that breaks the schema; [] when valid."""
    errs = []

    def check(obj, fields, where, optional=False):
        if not isinstance(obj, dict):
            errs.append(f"{where}: expected an object, got {type(obj).__name__}")
            return
        for name, types in fields.items():
            if name not in obj:
                if not optional:
                    errs.append(f"{where}: missing {name!r}")
            elif not isinstance(obj[name], types) or (
                types in (_NUM, _OPT_NUM) and isinstance(obj[name], bool)
            ):
                errs.append(f"{where}.{name}: {type(obj[name]).__name__} not allowed")

    check(doc, TOP_FIELDS, "doc")
    if errs:
        return errs
    if doc["schema"] != SCHEMA:
        errs.append(f"doc.schema: {doc['schema']!r}, expected {SCHEMA!r}")
    check(doc["machine"], MACHINE_FIELDS, "machine")
    check(doc["versions"], VERSION_FIELDS, "versions")
    for i, s in enumerate(doc["skipped"]):
        check(s, SKIPPED_FIELDS, f"skipped[{i}]")
    for i, r in enumerate(doc["rows"]):
        where = f"rows[{i}]"
        check(r, ROW_FIELDS, where)
        check(r, OPTIONAL_ROW_FIELDS, where, optional=True)
        if any(e.startswith(where) for e in errs):
            continue
        if r["kind"] not in KINDS:
            errs.append(f"{where}.kind: {r['kind']!r} not in {KINDS}")
        if not (0 < r["p20_s"] <= r["median_s"] <= r["p80_s"]):
            errs.append(f"{where}: needs 0 < p20_s <= median_s <= p80_s")
        if r["n"] < 1:
            errs.append(f"{where}.n: {r['n']} < 1")
        if not all(k in r["shape"] for k in "MKN"):
            errs.append(f"{where}.shape: needs M, K, N")
    return errs


if __name__ == "__main__":  # re-render a saved run: python -m qtorch.bench.report RUN.json [PLOT]
    import sys

    _doc = json.loads(Path(sys.argv[1]).read_text())
    print(format_table(_doc["rows"], _doc["roofline"]))
    if len(sys.argv) > 2:
        for _p in plot(_doc["rows"], _doc["roofline"], sys.argv[2]):
            print(f"wrote {_p}")
