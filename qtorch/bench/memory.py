"""Peak memory of one call.

CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus what was
allocated before the call: the extra memory the op needs beyond its inputs.

CPU: peak RSS in a *fresh child process* (`python -m qtorch.bench.memory`, spec on stdin), so
the parent's allocator history and the benchmark's own buffers do not pollute it (its glibc
mmap threshold pinned, `_child_env`, so freed blocks leave the RSS). The child
builds the case, runs every implementation once (warm: one-time weight repacking is a
resident cost of the layout, not of a call), then per implementation resets the kernel's
high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), makes one call and reads
VmHWM from /proc/self/status. `ru_maxrss` is not used: it cannot be reset, so it would report
the largest of all implementations for each.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys

import torch

from qtorch.testing import reset_vm_hwm, vm_hwm_kib


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def cuda_peak_extra(fn) -> int:
    """Bytes allocated at the peak of one call of `fn`, beyond what was allocated before."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _child_env() -> dict:
    """The child's environment: glibc's mmap threshold pinned at 64 KiB, so every large block
    is mmapped and handed back to the kernel when freed. With glibc's default (a threshold that
    grows to 32 MiB after the first large free) a freed [chunk, V] block may stay resident on
    the heap's free lists or not, depending on what was freed before: the same call measured
    140 or 213 MiB in two runs. Pinned, VmRSS before the call is what is live, and the peak is
    the call's own live bytes at its high point (to the page), the same in every run."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return env


def _child(spec: dict) -> dict:
    from qtorch.bench.cases import Shape, build
    from qtorch.bench.types import Options

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    out = {}
    for sd in spec["shapes"]:
        shape = Shape(sd["M"], sd["K"], sd["N"], K2=sd.get("K2"))
        built = build(
            spec["op"],
            shape,
            dtype,
            "cpu",
            spec["backends"],
            spec["peers"],
            Options.of(spec.get("options")),
        )
        for impl in built.impls:
            if impl.name not in spec["impls"]:
                continue
            impl.fn()  # warm
            gc.collect()
            base = _status_kib("VmRSS")
            if not reset_vm_hwm():
                return {"error": "cannot reset VmHWM (/proc/self/clear_refs not writable)"}
            impl.fn()
            peak = vm_hwm_kib()
            out[f"{shape.M},{shape.K},{shape.N}|{impl.name}"] = max(peak - base, 0) * 1024
        del built
        gc.collect()
    return out


def cpu_peak_extra(
    op: str,
    shapes: list,
    dtype: torch.dtype,
    backends: list[str],
    impls: list[str],
    with_peers: bool,
    threads: int | None,
    timeout_s: float = 600,
    options: dict | None = None,
) -> dict:
    """{"M,K,N|impl": bytes} of peak RSS above the pre-call RSS, measured in one fresh child
    process for this op (the case built with `options`, an `Options.as_dict()`);
    {"error": why} if the child failed."""
    spec = {
        "op": op,
        "shapes": [s.as_dict() for s in shapes],
        "dtype": str(dtype).split(".")[1],
        "backends": backends,
        "impls": impls,
        "peers": with_peers,
        "threads": threads,
        "options": options,
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "qtorch.bench.memory"],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=_child_env(),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"memory child timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["child failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.stdin.read()))))
