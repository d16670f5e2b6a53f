"""The types a benchmark case is made of, shared by cases.py (qtorch and the baselines),
peers.py (other libraries) and ceiling.py (the streaming-read ceiling); a module of its own so
none of those imports another for its types.

    Shape    the sizes of one case (meaning per op: cases.py's docstring)
    Options  what a case contains beyond its default rows (benchmarks/ drivers ask for more)
    Impl     one implementation of a case: a zero-argument call, and how to make more copies
    Built    one case: its inputs' cost model and every implementation
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


def clone_weights(weights: dict) -> dict:
    """Fresh storage for every tensor of `weights` (same values, requires_grad kept): one more
    weight copy for cold timing. Non-tensor entries (group size, ...) are shared."""
    return {
        k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
        for k, v in weights.items()
    }


@dataclass(frozen=True)
class Shape:
    M: int
    K: int
    N: int
    label: str = ""
    K2: int | None = None  # teacher hidden size (fused distillation only)

    def as_dict(self) -> dict:
        d = {"M": self.M, "K": self.K, "N": self.N}
        if self.K2 is not None:
            d["K2"] = self.K2
        return d

    def text(self, op: str) -> str:
        if op == "quantize_int8":
            return f"M={self.M} K={self.K}"
        if op == "dequantize_int4":
            return f"N={self.N} K={self.K}"
        if op == "distillation_loss":
            return f"M={self.M} V={self.N}"
        if op == "fused_linear_distillation_loss":
            return f"M={self.M} H={self.K}/{self.K2 or self.K} V={self.N}"
        return f"M={self.M} K={self.K} N={self.N}"


@dataclass(frozen=True)
class Options:
    """Rows a case has besides the defaults. `qtorch bench` uses the defaults (plus
    `read_ceiling` with --cold); the scripts in benchmarks/ ask for the rest. JSON-friendly
    (dtypes by name), so a memory child process can rebuild the same case."""

    bias: bool = False  # linears: a float bias [N] on every implementation
    op_rows: bool = True  # linears: also the op on canonical weights ("qtorch:<b>:op")
    # "qtorch:<b>:kernel" rows, without the op layer: on cpu the C++ binding on a weight
    # packed beforehand (linears, int8_scaled_mm); elsewhere the backend's registered kernel
    # (not for linears off the cpu: their layout belongs to the module)
    kernel_rows: bool = False
    read_ceiling: bool = False  # cpu: stream_read over the weight bytes, the same rounds
    dense_dtypes: tuple[str, ...] = ()  # more F.linear baselines, in these weight dtypes
    chunk_sizes: tuple[int | None, ...] = (None,)  # fused loss: one qtorch row per chunk size
    divergence: str = "kl"  # distillation: kl, reverse_kl or jsd
    temperature: float = 2.0  # distillation: T and alpha (Hinton-style KD with a hard label)
    alpha: float = 0.5
    # fused loss: also rows "qtorch:<b> <q> teacher" whose teacher head is the teacher weight
    # quantized into a qtorch module, q in "w8a16", "w4a16" (int4, group 64)
    teacher_quant: tuple[str, ...] = ()
    reference: str = "cheap"  # qtorch:reference rows "cheap" (only where quick) or "always"
    raw_int_mm: bool = False  # int8_scaled_mm: also torch._int_mm with no epilogue (int32 out)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, d: dict | None) -> Options:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in (d or {}).items()})


@dataclass
class Impl:
    """One implementation of a case.

    `fn` runs one call on the case's inputs, as a user would make it (a qtorch row enters its
    backend scope inside `fn`). The engine times `body` inside `scope()` entered outside the
    timed window, which is the same call without the cost of entering the scope; `copy()`
    makes an independent `body` over fresh copies of the weights (cold timing rotates over
    them, timing/Rotating), None where the implementation has no weight to copy."""

    name: str  # "qtorch:cpu", "torch:F.linear(float32)", "fbgemm:dynamic_linear", ...
    kind: str  # "qtorch" | "baseline" | "peer" | "ceiling"
    backend: str  # qtorch backend name, or the library of a baseline/peer
    fn: Callable[[], object]
    weight_bytes: int  # bytes of the weight in this implementation's storage (0: no weight)
    compute: str  # roofline peak that bounds it: "int8" | "fp32" | "bf16" | "fp16"
    note: str = ""
    body: Callable[[], object] | None = None  # default: fn
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    copy: Callable[[], Callable[[], object]] | None = None

    def __post_init__(self) -> None:
        if self.body is None:
            self.body = self.fn


@dataclass
class Built:
    op: str
    shape: Shape
    dtype: torch.dtype
    device: str
    flop: float | None  # useful arithmetic of one call (None: a memory-bound op, not counted)
    other_bytes: int  # minimum traffic besides the weight: activations in, outputs out
    impls: list[Impl] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (impl name, reason)
    options: Options = field(default_factory=Options)
