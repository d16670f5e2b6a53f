"""One quantized model run three ways: eager, `torch.compile(fullgraph=True)`, and
`torch.export` + AOTInductor (`aoti_compile_and_package` / `aoti_load_package`).

`variants(model, x)` returns an `Impl` per way that could be built and called (kind
"baseline" for eager, "qtorch" for the compiled ones), and (name, error) for a way that failed
(the exception's type and first line), so a driver prints a row for each either way. Each
variant runs under `torch.inference_mode()` (its `scope`, entered outside the timed window).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from qtorch.bench.types import Impl

EAGER, COMPILED, EXPORTED = "eager", "torch.compile", "export+AOTInductor"


def w8a8_model(layers: int = 60, dims: tuple[int, int] = (576, 1536), seed: int = 0):
    """`layers` nn.Linear alternating dims[0] -> dims[1] and back (SmolLM2-135M's FFN sizes by
    default), quantized in place with Int8DynamicConfig (W8A8), in eval mode."""
    import qtorch

    torch.manual_seed(seed)
    a, b = dims
    mods = [nn.Linear(a, b) if i % 2 == 0 else nn.Linear(b, a) for i in range(layers)]
    return qtorch.quantize_(nn.Sequential(*mods).eval(), qtorch.Int8DynamicConfig())


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def variants(model: nn.Module, x: torch.Tensor, workdir: str | None = None) -> list:
    """[Impl or (name, error)] for eager, compiled and exported `model` on input `x`; the
    AOTInductor package is written under `workdir` (default: a fresh temporary directory,
    kept as long as the Impl lives)."""
    out: list = []
    with torch.inference_mode():
        out.append(_impl(EAGER, "baseline", lambda: model(x)))
    try:
        compiled = torch.compile(model, fullgraph=True)
        with torch.inference_mode():
            compiled(x)  # compiles here, not in the timing loop
        out.append(_impl(COMPILED, "qtorch", lambda: compiled(x)))
    except Exception as e:  # noqa: BLE001  (any failure is a row of the report, not a crash)
        out.append((COMPILED, _error(e)))
    try:
        tmp = tempfile.TemporaryDirectory() if workdir is None else None
        root = Path(workdir or tmp.name)
        with torch.no_grad():
            ep = torch.export.export(model, (x,))
        path = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(root / f"model_M{x.shape[0]}.pt2")
        )
        runner = torch._inductor.aoti_load_package(path)
        with torch.inference_mode():
            runner(x)

        def exported(tmp=tmp):  # the package directory lives as long as the row
            return runner(x)

        impl = _impl(EXPORTED, "qtorch", exported)
        impl.note = f"package {path}"
        out.append(impl)
    except Exception as e:  # noqa: BLE001
        out.append((EXPORTED, _error(e)))
    return out


def _impl(name: str, kind: str, fn) -> Impl:
    def run():
        with torch.inference_mode():
            return fn()

    return Impl(name, kind, "torch", run, 0, "fp32", body=fn, scope=torch.inference_mode)


def max_abs_diff(a: torch.Tensor, b) -> float:
    b = b[0] if isinstance(b, tuple | list) else b
    return (a.float() - b.float()).abs().max().item()
