"""README performance tables from `qtorch bench --json` files.

    python benchmarks/make_tables.py                      # every benchmarks/results/*.json
    python benchmarks/make_tables.py run.json --op int8_linear

Prints markdown: per file, the machine, versions, the command that produced it, then one table
per (op, dtype) with every implementation of every shape. Nothing here is measured: the
numbers are exactly those in the JSON (schema: docs/bench_json_schema.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _t(s):
    if s is None:
        return "-"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def _mib(v):
    return None if v is None else v / 2**20


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def _x(v):
    return "-" if v is None else f"{v:.2f}×"


def render(doc: dict, source: str, ops: list[str] | None = None) -> str:
    m, v = doc["machine"], doc["versions"]
    commit = (v.get("commit") or "unknown")[:10] + (" (dirty)" if v.get("dirty") else "")
    out = [
        f"### `{source}`",
        "",
        f"{m['cpu_model']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']['name']}" if m.get("gpu") else "")
        + (f", load average {m['load_avg_1m']:.1f}" if m.get("load_avg_1m") is not None else "")
        + f"; torch {v['torch']}, qtorch {v['qtorch']} @ {commit}; {doc['created']}",
        "",
        f"Produced by: `{doc['command']}`",
    ]
    roof = doc.get("roofline")
    if roof:
        out += [
            "",
            f"Roofline (measured): fp32 {roof['fp32_tflops']:.3f} TFLOP/s, bf16 "
            f"{roof['bf16_tflops']:.3f} TFLOP/s, int8 {roof['int8_tops']:.3f} TOP/s, "
            f"{roof['bandwidth_gbps']:.1f} GB/s",
        ]
    blocks: OrderedDict = OrderedDict()
    for r in doc["rows"]:
        if ops and r["op"] not in ops:
            continue
        blocks.setdefault((r["op"], r["dtype"]), []).append(r)
    for (op, dtype), rows in blocks.items():
        mem = any(r.get("peak_mem_bytes") is not None for r in rows)
        read = any(r.get("read_pct") is not None for r in rows)
        out += [
            "",
            f"**{op}** ({dtype}{', cold weights' if any(r['cold'] for r in rows) else ''})",
            "",
            "| shape | implementation | median | p20–p80 | TFLOP/s or TOP/s | GB/s | % roofline "
            + ("| % of read " if read else "")
            + "| vs PyTorch | vs best peer |"
            + (" peak MiB |" if mem else ""),
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
            + (" ---: |" if read else "")
            + " ---: | ---: |"
            + (" ---: |" if mem else ""),
        ]
        for r in rows:
            gbps = r["weight_gbps"] if r["weight_gbps"] is not None else r["gbps"]
            name = f"**{r['impl']}**" if r["kind"] == "qtorch" else r["impl"]
            out.append(
                f"| {r['shape_text']} | {name} | {_t(r['median_s'])} | "
                f"{_t(r['p20_s'])}–{_t(r['p80_s'])} | {_f(r['tflops'], '.3f')} | "
                f"{_f(gbps, '.1f')} | {_f(r['roofline_pct'], '.0f')} | "
                + (f"{_f(r.get('read_pct'), '.0f')} | " if read else "")
                + f"{_x(r['speedup_vs_baseline'])} | {_x(r['speedup_vs_best_peer'])} |"
                + (f" {_f(_mib(r.get('peak_mem_bytes')), '.1f')} |" if mem else "")
            )
    out += [
        "",
        "GB/s counts weight bytes for ops with a weight, all bytes otherwise; "
        "speedups are medians of the same run (> 1: faster). A % roofline above 100 means "
        "the data came from cache (weights smaller than the LLC; `--cold` rotates weight "
        "copies so they come from DRAM) or the measured peaks were low (a busy machine); "
        "% of read compares a row's weight rate with a plain streaming read of the weight "
        "bytes in the same rounds; peak MiB is memory beyond the inputs (CPU: peak RSS in a "
        "child process).",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="bench JSON files (default: benchmarks/results/*.json)")
    p.add_argument("--op", nargs="+", help="only these ops")
    args = p.parse_args(argv)
    files = [Path(f) for f in args.files] or sorted(RESULTS.glob("*.json"))
    if not files:
        print(f"no JSON files given and none in {RESULTS}", file=sys.stderr)
        return 1
    parts = []
    for f in files:
        doc = json.loads(f.read_text())
        try:
            source = str(f.resolve().relative_to(RESULTS.parent.parent))
        except ValueError:
            source = str(f)
        parts.append(render(doc, source, args.op))
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
