"""Helpers shared by tests, `qtorch validate`, benchmarks and examples: SQNR, per-dtype
tolerances, agreement with the reference on non-finite results (`assert_matches`), the int8
rounding-tie tolerance, the device a backend runs on, and the peak
resident memory of this process."""

from __future__ import annotations

import math

import torch

# Tolerances for comparing a kernel with the fp32-math reference, per output dtype. A kernel
# that accumulates in fp32 in another order differs from the reference by a few ulps of fp32
# and then rounds once to the output dtype, so the output dtype's resolution dominates.
ATOL_RTOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-10, 1e-10),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for results of `dtype` (scale atol by the output magnitude when needed)."""
    return ATOL_RTOL[dtype]


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(Σ ref² / Σ (ref − approx)²).
    +inf when the two are identical."""
    ref = ref.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def max_errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(max |out − ref|, max |out − ref| / max |ref|), in float64."""
    ref64, out64 = ref.double(), out.double()
    abs_err = (out64 - ref64).abs().max().item() if ref.numel() else 0.0
    denom = ref64.abs().max().item() if ref.numel() else 0.0
    return abs_err, abs_err / denom if denom > 0 else abs_err


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype | None = None,
    scale: float | None = None,
) -> None:
    """out ≈ ref within the tolerance of `dtype` (default out.dtype); atol is relative to
    `scale` (default max |ref|, at least 1) so large-magnitude outputs are judged fairly."""
    dtype = dtype or out.dtype
    atol, rtol = tolerances(dtype)
    if scale is None:
        scale = max(ref.detach().abs().max().item() if ref.numel() else 0.0, 1.0)
    torch.testing.assert_close(out.double(), ref.double(), atol=atol * scale, rtol=rtol)


def assert_matches(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype | None = None,
    scale: float | None = None,
    *,
    exact_nan: bool = False,
) -> None:
    """out agrees with the reference result ref under docs/semantics.md: same shape and dtype,
    non-finite at exactly the positions where ref is (with `exact_nan`, NaN exactly where ref
    is NaN, as the W8A8 ops promise; otherwise NaN vs ±inf may differ by summation order),
    and the finite values within `assert_close`'s tolerance, `scale` defaulting to the
    largest finite |ref|."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"dtype {out.dtype} != reference {ref.dtype}"
    out, ref = out.detach().cpu(), ref.detach().cpu()
    fin_out, fin_ref = torch.isfinite(out), torch.isfinite(ref)
    if not torch.equal(fin_out, fin_ref):
        bad = (fin_out != fin_ref).nonzero()[0].tolist()
        raise AssertionError(
            f"finite where the reference is not (or the other way) at {bad}: "
            f"{out[tuple(bad)].item()} vs reference {ref[tuple(bad)].item()}"
        )
    if exact_nan and not torch.equal(out.isnan(), ref.isnan()):
        bad = (out.isnan() != ref.isnan()).nonzero()[0].tolist()
        raise AssertionError(
            f"NaN mismatch at {bad}: {out[tuple(bad)].item()} vs reference {ref[tuple(bad)].item()}"
        )
    if not bool(fin_ref.any()):
        return
    if scale is None:
        scale = max(ref[fin_ref].double().abs().max().item(), 1.0)
    assert_close(out[fin_ref], ref[fin_ref], dtype=dtype or out.dtype, scale=scale)


def int8_tie_tolerance(x_scale: torch.Tensor, w_scale: torch.Tensor) -> float:
    """How far an int8_linear output may move when one activation code differs by one step.

    API.md lets a kernel quantize x as x * (127 / amax) instead of x / scale, which rounds a
    tie the other way now and then: one code of row m moves by one, so output [m, n] moves by
    scale_x[m] * scale_w[n] * |w_q[n, k]| <= scale_x[m] * scale_w[n] * 127. Returns the largest
    such step over all (m, n), for activation scales x_scale [...] and weight scales
    w_scale [N].
    """
    xs = x_scale.reshape(-1, 1).float()
    ws = w_scale.reshape(1, -1).float().to(xs.device)
    return (xs * ws).abs().max().item() * 127


def device_for(backend: str) -> torch.device:
    """The device whose tensors `backend` serves: CUDA for the cuda backend, and for triton
    when a GPU exists (else its interpreter's CPU tensors); CPU otherwise."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def vm_hwm_kib() -> int:
    """Peak resident set size of this process (VmHWM), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status")


def reset_vm_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where
    that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
