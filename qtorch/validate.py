"""`qtorch validate`: every available backend against `qtorch.reference`.

Each case runs the op through `qtorch.ops` with the backend forced (`use_backend`) and
compares with the reference function called directly. Pass criteria are those of the tests:
the output dtype's tolerance (`qtorch.testing`) relative to the output's magnitude; int8
quantization may differ from the reference by one step in rare ties (API.md), nothing more.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from qtorch import _backend, ops
from qtorch import reference as R
from qtorch.testing import device_for, int8_tie_tolerance, max_errors, sqnr, tolerances

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Row:
    backend: str
    op: str
    case: str
    dtype: str
    abs_err: float
    rel_err: float
    sqnr_db: float
    ok: bool


def _close(out, ref, dtype) -> bool:
    atol, rtol = tolerances(dtype)
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    return bool(torch.allclose(out.double(), ref.double(), atol=atol * scale, rtol=rtol))


def _one_step(q, q_ref) -> bool:
    """int8 codes equal up to one step, in at most 0.1% of entries (rounding ties)."""
    diff = (q.int() - q_ref.int()).abs()
    return bool(diff.max().item() <= 1) and bool((diff > 0).float().mean().item() <= 1e-3)


def _cases(quick: bool):
    ms = (1, 7, 33) if quick else (1, 2, 7, 16, 33, 128)
    kns = ((64, 19), (256, 1)) if quick else ((1, 1), (37, 19), (128, 130), (256, 1), (384, 96))
    return ms, kns


def _run_backend(backend: str, quick: bool, gen: torch.Generator):
    dev = device_for(backend)
    rows: list[Row] = []

    def add(op, case, dtype, out, ref, ok=None):
        a, r = max_errors(ref, out)
        s = sqnr(ref, out)
        if ok is None:
            ok = _close(out, ref, dtype) and not (math.isnan(a))
        rows.append(Row(backend, op, case, str(dtype).replace("torch.", ""), a, r, s, bool(ok)))

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dtype)

    ms, kns = _cases(quick)
    with _backend.use_backend(backend):
        for m, (k, n), dtype in itertools.product(ms, kns, DTYPES):
            case = f"M={m} K={k} N={n}"
            x = randn(m, k, dtype=dtype)
            w = randn(n, k)
            q_ref, s_ref = R.quantize_int8(x)
            q, s = ops.quantize_int8(x)
            add(
                "quantize_int8",
                case,
                torch.float32,
                s,
                s_ref,
                ok=_one_step(q, q_ref) and _close(s, s_ref, torch.float32),
            )
            wq, ws = R.quantize_int8(w)
            bias = randn(n, dtype=dtype)
            ref = R.int8_scaled_mm(q_ref, wq, s_ref, ws, bias.float(), dtype)
            add(
                "int8_scaled_mm",
                case,
                dtype,
                ops.int8_scaled_mm(q_ref, wq, s_ref, ws, bias, dtype),
                ref,
            )
            ref = R.int8_linear(x, wq, ws, bias)
            out = ops.int8_linear(x, wq, ws, bias)
            # A tie rounded the other way in x's quantization moves one product by one step.
            tie = int8_tie_tolerance(s_ref, ws) * 1.01
            add(
                "int8_linear",
                case,
                dtype,
                out,
                ref,
                ok=_close(out, ref, dtype)
                or bool(((out.double() - ref.double()).abs() <= tie).all()),
            )
            add(
                "int8_weight_only_linear",
                case,
                dtype,
                ops.int8_weight_only_linear(x, wq, ws, bias),
                R.int8_weight_only_linear(x, wq, ws, bias),
            )
            sm = torch.rand(k, generator=gen).to(dev) + 0.25  # SmoothQuant's divisor of x
            ref = R.int8_linear_smooth(x, wq, ws, sm, bias)
            out = ops.int8_linear_smooth(x, wq, ws, sm, bias)
            tie = int8_tie_tolerance(R.quantize_int8(x.float() / sm)[1], ws) * 1.01
            add(
                "int8_linear_smooth",
                case,
                dtype,
                out,
                ref,
                ok=_close(out, ref, dtype)
                or bool(((out.double() - ref.double()).abs() <= tie).all()),
            )
        for m, (k, n), gs, sym, dtype in itertools.product(
            ms[:2] if quick else ms,
            ((128, 19), (256, 1), (512, 33)),
            (32, 128),
            (False, True),
            DTYPES,
        ):
            if k % gs:
                continue
            case = f"M={m} K={k} N={n} g={gs}{' sym' if sym else ''}"
            w = randn(n, k, dtype=dtype)
            ref_q = R.quantize_int4(w, gs, sym)
            got_q = ops.quantize_int4(w, gs, sym)
            ok = all(
                torch.equal(a.cpu(), b.cpu())
                for a, b in zip(got_q[:1] + got_q[2:], ref_q[:1] + ref_q[2:])
            )
            add(
                "quantize_int4",
                case,
                torch.float32,
                got_q[1],
                ref_q[1],
                ok=ok and _close(got_q[1], ref_q[1], torch.float32),
            )
            if not sym:  # float zero points (zero_point="float"): the int4 ops on both kinds
                fq = R.quantize_int4(w, gs, False, "float")
                xf = randn(m, k, dtype=dtype)
                add(
                    "int4_weight_only_linear",
                    case + " float-zero",
                    dtype,
                    ops.int4_weight_only_linear(xf, *fq, gs),
                    R.int4_weight_only_linear(xf, *fq, gs),
                )
            add(
                "dequantize_int4",
                case,
                torch.float32,
                ops.dequantize_int4(*ref_q, gs),
                R.dequantize_int4(*ref_q, gs),
            )
            x = randn(m, k, dtype=dtype)
            bias = randn(n, dtype=dtype)
            add(
                "int4_weight_only_linear",
                case,
                dtype,
                ops.int4_weight_only_linear(x, *ref_q, gs, bias),
                R.int4_weight_only_linear(x, *ref_q, gs, bias),
            )
        for (m, v), div, dtype in itertools.product(
            ((1, 7), (9, 1000)) if quick else ((1, 7), (9, 1000), (33, 4099)),
            ("kl", "reverse_kl", "jsd"),
            DTYPES,
        ):
            case = f"M={m} V={v} {div}"
            st = (randn(m, v) * 3).to(dtype)
            te = (randn(m, v) * 3).to(dtype)
            labels = torch.randint(0, v, (m,), generator=gen).to(dev)
            labels[::3] = -100
            kw = dict(temperature=2.0, alpha=0.7, divergence=div, beta=0.3)
            ref_l, ref_g = R.distillation_loss(st, te, labels, 2.0, 0.7, div, 0.3, -100, True)
            s_req = st.clone().requires_grad_(True)
            out = ops.distillation_loss(s_req, te, labels, reduction="sum", **kw)
            out.backward()
            add("distillation_loss", case, torch.float32, out.reshape(1), ref_l.sum().reshape(1))
            add("distillation_loss.grad", case, dtype, s_req.grad, ref_g)
        for (m, h, v), dtype in itertools.product(((1, 16, 9), (37, 64, 1000)), DTYPES):
            case = f"M={m} H={h} V={v}"
            hs, ws_ = randn(m, h, dtype=dtype), randn(v, h, dtype=dtype) * 0.2
            ht, wt = randn(m, h + 3, dtype=dtype), randn(v, h + 3, dtype=dtype) * 0.2
            labels = torch.randint(0, v, (m,), generator=gen).to(dev)
            ref = R.fused_linear_distillation_loss(hs, ws_, ht, wt, labels, None, None, None, 8)
            hr, wr = hs.clone().requires_grad_(True), ws_.clone().requires_grad_(True)
            out = ops.fused_linear_distillation_loss(
                hr, wr, ht, wt, labels, chunk_size=8, reduction="sum"
            )
            out.backward()
            add(
                "fused_linear_distillation_loss",
                case,
                torch.float32,
                out.reshape(1),
                ref[0].sum().reshape(1),
            )
            add("fused_linear_distillation_loss.grad_w", case, dtype, wr.grad, ref[2])
    return rows


def run_validate(backends=None, quick: bool = False, verbose: bool = False) -> int:
    avail = _backend.available_backends()
    chosen = backends or [b for b in avail if b != "reference"] or ["reference"]
    for b in chosen:
        if b not in avail:
            print(
                f"backend {b!r} is not available: {_backend.backend_status().get(b, (0, 'unknown'))[1]}"
            )
            return 2
    gen = torch.Generator().manual_seed(0)
    all_rows: list[Row] = []
    for b in chosen:
        all_rows += _run_backend(b, quick, gen)
    print(
        f"{'backend':<10} {'op':<38} {'dtype':<9} {'cases':>5} {'max abs err':>12} {'max rel err':>12} {'min SQNR dB':>12}  result"
    )
    groups: dict[tuple, list[Row]] = {}
    op_order: dict[str, int] = {}
    for r in all_rows:
        op_order.setdefault(r.op, len(op_order))
        groups.setdefault((r.backend, r.op, r.dtype), []).append(r)
    dtype_order = {"float32": 0, "float16": 1, "bfloat16": 2}
    groups = dict(
        sorted(
            groups.items(),
            key=lambda kv: (kv[0][0], op_order[kv[0][1]], dtype_order.get(kv[0][2], 3)),
        )
    )
    failed = 0
    for (b, op, dt), rs in groups.items():
        bad = [r for r in rs if not r.ok]
        failed += len(bad)
        min_sqnr = min(r.sqnr_db for r in rs)
        print(
            f"{b:<10} {op:<38} {dt:<9} {len(rs):>5} {max(r.abs_err for r in rs):>12.3e} "
            f"{max(r.rel_err for r in rs):>12.3e} {min_sqnr:>12.1f}  {'ok' if not bad else 'MISMATCH'}"
        )
        if verbose or bad:
            for r in rs if verbose else bad:
                print(
                    f"    {r.case:<32} abs {r.abs_err:.3e} rel {r.rel_err:.3e} "
                    f"SQNR {r.sqnr_db:.1f} dB {'ok' if r.ok else 'MISMATCH'}"
                )
    print(f"\n{len(all_rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
