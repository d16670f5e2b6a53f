"""What a benchmark ran on: machine, versions, commit (recorded in every JSON result)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def os_cpu_count() -> int | None:
    """CPUs this process may run on (the affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def llc_bytes() -> int | None:
    """Size of the last-level cache of CPU 0 (from sysfs), or None where unknown."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = None
    for idx in sorted(base.glob("index*")):
        try:
            level = int((idx / "level").read_text())
            size = (idx / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        val = int(size.rstrip("KMG")) * mult
        if best is None or level > best[0]:
            best = (level, val)
    return best[1] if best else None


def cpu_features() -> dict:
    try:
        from qtorch import _C

        return {"isa_in_use": _C.isa(), **{k: bool(v) for k, v in _C.cpu_features().items()}}
    except ImportError:
        return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def machine_info(device: str) -> dict:
    info = {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "llc_bytes": llc_bytes(),
        "cpu_features": cpu_features(),
        "platform": platform.platform(),
    }
    try:  # the CPU flag says what the chip has, this what torch may use (the OS grants it)
        from qtorch.backends.cpu import amx_usable

        info["amx_usable"] = amx_usable()
    except ImportError:
        pass
    try:
        info["load_avg_1m"] = os.getloadavg()[0]  # how shared the machine was
    except OSError:
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": p.name,
            "capability": f"sm_{p.major}{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return info


def git_commit() -> dict:
    """HEAD of the checkout qtorch is imported from, and whether it had local changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "-uno"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(dirty)}


def versions() -> dict:
    import qtorch

    out = {
        "qtorch": qtorch.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **git_commit(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("triton", "torchao", "liger-kernel"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out
