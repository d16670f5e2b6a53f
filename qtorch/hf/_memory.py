"""Give back the resident pages of checkpoint tensors that loading is done with.

transformers reads safetensors checkpoints through a private memory map: a tensor taken from
the file is a view of the mapping, and every page read stays resident (it counts in VmRSS and
VmHWM) for as long as the mapping lives, i.e. until loading ends, even after the tensor is
freed. Quantizing on load reads each float weight once, so without this the peak resident
memory would include the whole float checkpoint. After a weight is quantized (or a quantized
buffer copied into memory of its own), `release` drops the pages that lie wholly inside that
tensor's bytes: madvise(MADV_DONTNEED) on a file mapping unmaps them, and a later read of
them, if any, faults them in again from the file.

Only whole pages inside one tensor's bytes are dropped (a page it shares with a neighbouring
tensor stays), only inside mappings of the given checkpoint files, and only on Linux; anywhere
else this does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

from torch import Tensor

_MADV_DONTNEED = 4
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        fn.restype = ctypes.c_int
        _madvise = fn
    return _madvise


def _file_mappings(paths: set[str]) -> list[tuple[int, int]]:
    """[lo, hi) address ranges at which this process maps any of `paths`."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() in paths and "r" in parts[1]:
                lo, hi = parts[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def release(tensors: list[Tensor], paths: set[str]) -> int:
    """Drop the resident pages of each CPU tensor in `tensors` that is a view of a mapping of
    one of `paths` (module docstring). The caller is done with these tensors' values. Returns
    the number of bytes dropped."""
    if not sys.platform.startswith("linux") or not paths or not tensors:
        return 0
    paths = {os.path.realpath(p) for p in paths}
    try:
        maps = _file_mappings(paths)
    except OSError:
        return 0
    if not maps:
        return 0
    page = mmap.PAGESIZE
    dropped = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        lo = storage.data_ptr()
        hi = lo + storage.nbytes()
        if not any(m_lo <= lo and hi <= m_hi for m_lo, m_hi in maps):
            continue
        a = -(-lo // page) * page  # first whole page inside [lo, hi)
        b = hi // page * page
        if b > a and _libc_madvise()(a, b - a, _MADV_DONTNEED) == 0:
            dropped += b - a
    return dropped
