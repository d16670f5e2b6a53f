"""Peak memory of the fused-linear JSD loss (N=4096, H=576, V=49152, fp32, fwd+bwd) with an fp32
or an int4 (g64) teacher head, the student head trained or frozen, at the default chunk and at
chunk_size=64: what the #14 goal "int4 teacher head <= 40% of the fp32 head's" depends on.

    python benchmarks/results/int4_head_memory.py     (output: int4_head_memory.txt)

Each configuration runs in a fresh process (glibc's mmap threshold pinned, as
qtorch.bench.memory does); peak = VmHWM above the RSS before the call, after a warm-up call,
plus the teacher head's resident bytes (the head is an input either way)."""

import gc
import os
import subprocess
import sys

import torch


def child(quant: str, frozen: bool, chunk: int | None) -> None:
    from qtorch import ops
    from qtorch.bench.cases import quantized_teacher_head
    from qtorch.bench.memory import _status_kib
    from qtorch.testing import reset_vm_hwm, vm_hwm_kib

    torch.set_num_threads(2)
    m, h, v = 4096, 576, 49152
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(m, h, generator=g).requires_grad_(True)
    ht = torch.randn(m, h, generator=g)
    ws = (torch.randn(v, h, generator=g) * 0.05).requires_grad_(not frozen)
    wt = torch.randn(v, h, generator=g) * 0.05
    lab = torch.randint(0, v, (m,), generator=g)
    if quant == "int4":
        head = quantized_teacher_head(wt, "w4a16")
        head_bytes = sum(b.numel() * b.element_size() for b in head.buffers())
        del wt
    else:
        head, head_bytes = wt, wt.numel() * wt.element_size()

    def run():
        loss = ops.fused_linear_distillation_loss(
            hs, ws, ht, head, lab, divergence="jsd", chunk_size=chunk
        )
        return torch.autograd.grad(loss, (hs,) if frozen else (hs, ws))

    run()
    gc.collect()
    base = _status_kib("VmRSS")
    reset_vm_hwm()
    run()
    peak = (vm_hwm_kib() - base) / 1024
    print(f"{peak:.0f} {head_bytes / 2**20:.0f}")


def main() -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    print("student head | chunk | fp32 head: peak + head MiB | int4 head: peak + head MiB | ratio")
    for frozen in (False, True):
        for chunk in (None, 64):
            tot = {}
            cells = []
            for quant in ("fp32", "int4"):
                out = subprocess.run(
                    [sys.executable, __file__, quant, str(frozen), str(chunk or 0)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                peak, head = float(out[0]), float(out[1])
                tot[quant] = peak + head
                cells.append(f"{peak:.0f} + {head:.0f} = {peak + head:.0f}")
            print(
                f"{'frozen' if frozen else 'trained'} | {chunk or 'default'} | {cells[0]} | "
                f"{cells[1]} | {tot['int4'] / tot['fp32']:.0%}",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) == 4:
        child(sys.argv[1], sys.argv[2] == "True", int(sys.argv[3]) or None)
    else:
        main()
