"""Ahead-of-time compilation of every Triton kernel for real GPUs, checked without one.

Runs WITHOUT the interpreter, in its own process (tests/conftest.py turns the interpreter on
when it is unset and no GPU exists, so set it to 0 explicitly):

    TRITON_INTERPRET=0 python -m pytest tests/test_triton_aot.py -v

Each kernel is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
for sm_80 (A100: the Ampere autotune configs) and sm_90 (H100/H200: the Hopper configs), and
the cubin is disassembled with the `cuobjdump` shipped inside the Triton wheel:
  * int8 GEMMs issue integer tensor-core MMAs: IMMA on sm_80; IGMMA (wgmma) on sm_90 for the
    warp-group-sized tiles (BLOCK_M >= 64), IMMA (mma.sync) for the small-M ones;
  * fp16/bf16 weight-only GEMMs issue HMMA on sm_80; HGMMA or HMMA on sm_90, as above;
  * shared memory of every config fits the chip (163 KiB sm_80, 227 KiB sm_90);
   * no config spills registers (stack frame or local memory);
  * the memory-bound kernels (quantize, distillation loss) issue no MMA, and quantize rounds with the hardware FRND instruction (libdevice.rint).
`TRITON_INTERPRET=0 python tests/test_triton_aot.py` prints the per-kernel findings as a table
(committed as benchmarks/results/triton_aot_sass.txt).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="AOT compilation runs without the interpreter: "
    "TRITON_INTERPRET=0 python -m pytest tests/test_triton_aot.py",
)

if os.environ.get("TRITON_INTERPRET") != "1":
    import triton
    from qtorch._kernels import SMEM_LIMIT, distillation, int8_mm, weight_only
    from triton.backends.compiler import GPUTarget

CUOBJDUMP = None
if os.environ.get("TRITON_INTERPRET") != "1":
    CUOBJDUMP = os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
    )

ARCHS = (80, 90)
_MMA = re.compile(r"\b(IMMA|HMMA|IGMMA|HGMMA)\b")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _compile(
    fn,
    args: list[tuple[str, object]],
    cc: int,
    num_warps: int,
    num_stages: int,
    div16: tuple[str, ...] = (),
):
    """Compile `fn` (a @triton.jit function) for sm_`cc`. `args` lists every parameter in
    order as (name, type string), or (name, value) for a tl.constexpr parameter. Pointers and the ints named in
    `div16` get the 16-divisibility hint a real launch gives aligned tensors and sizes."""
    names = fn.arg_names
    assert [a for a, _ in args] == names, f"argument list out of date for {fn.__name__}"
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, kind) in enumerate(args):
        if not fn.params[i].is_constexpr:
            signature[name] = kind
            if kind.startswith("*") or name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = kind
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def _inspect(compiled) -> dict:
    """{mma: {mnemonic: count}, frnd: count, shared, regs, local} of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
        res = subprocess.run(
            [CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    mma: dict[str, int] = {}
    for op in _MMA.findall(sass):
        mma[op] = mma.get(op, 0) + 1
    regs, stack, _shared, local = (int(v) for v in _RES.search(res).groups())
    return {
        "mma": mma,
        "frnd": len(re.findall(r"\bFRND\b", sass)),
        "shared": compiled.metadata.shared,
        "regs": regs,
        "spill": stack + local,
    }


def _configs(module, kernel: str, cc: int):
    table = module.AMPERE_CONFIGS if cc == 80 else module.HOPPER_CONFIGS
    return table[kernel]


def _tile(cfg) -> dict:
    return {k: cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}


# ------------------------------------------------------------------ kernel argument lists


def _int8_mm_args(cfg, out="bf16"):
    return [
        ("a_ptr", "*i8"),
        ("b_ptr", "*i8"),
        ("c_ptr", f"*{out}"),
        ("sa_ptr", "*fp32"),
        ("sb_ptr", "*fp32"),
        ("bias_ptr", "*fp32"),
        ("M", "i32"),
        ("N", "i32"),
        ("K", "i32"),
        ("M_BUCKET", "i32"),
        ("HAS_BIAS", True),
    ] + list(cfg.items())


def _w8a16_args(tile, dt="bf16", split=1):
    out = "fp32" if split > 1 else dt
    return [
        ("x_ptr", f"*{dt}"),
        ("w_ptr", "*i8"),
        ("ws_ptr", "*fp32"),
        ("bias_ptr", f"*{dt}"),
        ("out_ptr", f"*{out}"),
        ("M", "i32"),
        ("N", "i32"),
        ("K", "i32"),
        ("K_PER_SPLIT", "i32"),
        ("M_BUCKET", "i32"),
        ("HAS_BIAS", split == 1),
        ("SPLIT_K", split),
        ("DOT_F32", False),
        ("F32_PRECISION", "tf32x3"),
    ] + list(tile.items())


def _w4a16_args(tile, dt="bf16", split=1, group=128):
    out = "fp32" if split > 1 else dt
    return [
        ("x_ptr", f"*{dt}"),
        ("qw_ptr", "*u8"),
        ("s_ptr", "*fp32"),
        ("z_ptr", "*fp32"),
        ("bias_ptr", f"*{dt}"),
        ("out_ptr", f"*{out}"),
        ("M", "i32"),
        ("N", "i32"),
        ("K", "i32"),
        ("K_PER_SPLIT", "i32"),
        ("M_BUCKET", "i32"),
        ("GROUP_SIZE", group),
        ("HAS_BIAS", split == 1),
        ("SPLIT_K", split),
        ("DOT_F32", False),
        ("F32_PRECISION", "tf32x3"),
    ] + list(tile.items())


_GEMM_DIV16 = ("N", "K", "K_PER_SPLIT")


def _split_decode(cfg: dict) -> tuple[dict, int, int]:
    tile = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    return tile, cfg["num_warps"], cfg["num_stages"]


# ------------------------------------------------------------------------------- the tests


def _cases():
    """[(id, cc, kernel fn, args, num_warps, num_stages, kind)],
    kind in int8 | f16 | f32 | quant | none."""
    cases = []
    for cc in ARCHS:
        for i, c in enumerate(_configs(int8_mm, "_int8_scaled_mm_kernel", cc)):
            cases.append(
                (
                    f"int8_scaled_mm-sm{cc}-cfg{i}",
                    cc,
                    int8_mm._int8_scaled_mm_kernel,
                    _int8_mm_args(_tile(c)),
                    c.num_warps,
                    c.num_stages,
                    "int8",
                )
            )
        for i, c in enumerate(_configs(weight_only, "_w8a16_kernel", cc)):
            for dt in ("bf16", "fp16") if i == 0 else ("bf16",):
                cases.append(
                    (
                        f"w8a16-{dt}-sm{cc}-cfg{i}",
                        cc,
                        weight_only._w8a16_kernel,
                        _w8a16_args(_tile(c), dt),
                        c.num_warps,
                        c.num_stages,
                        "f16",
                    )
                )
        # fp32 activations (tf32x3 dot: 3 TF32 MMAs ~ fp32 accuracy): the fixed fp32 tile and
        # the decode tile.
        for fn, make, decode in (
            (weight_only._w8a16_kernel, _w8a16_args, weight_only._W8A16_DECODE),
            (weight_only._w4a16_kernel, _w4a16_args, weight_only._W4A16_DECODE),
        ):
            for label, cfg, split in (("tile", weight_only._F32_CFG, 1), ("decode", decode, 4)):
                tile, w, s = _split_decode(cfg)
                args = make(tile, "fp32", split=split)
                args[args.index(("DOT_F32", False))] = ("DOT_F32", True)
                cases.append((f"{fn.__name__[1:6]}-fp32-{label}-sm{cc}", cc, fn, args, w, s, "f32"))
        tile, w, s = _split_decode(weight_only._W8A16_DECODE)
        for dt in ("bf16", "fp16"):
            for split in (1, 4):
                cases.append(
                    (
                        f"w8a16-decode-split{split}-{dt}-sm{cc}",
                        cc,
                        weight_only._w8a16_kernel,
                        _w8a16_args(tile, dt, split=split),
                        w,
                        s,
                        "f16",
                    )
                )
        for i, c in enumerate(_configs(weight_only, "_w4a16_kernel", cc)):
            for dt in ("bf16", "fp16") if i == 0 else ("bf16",):
                cases.append(
                    (
                        f"w4a16-{dt}-sm{cc}-cfg{i}",
                        cc,
                        weight_only._w4a16_kernel,
                        _w4a16_args(_tile(c), dt),
                        c.num_warps,
                        c.num_stages,
                        "f16",
                    )
                )
        tile, w, s = _split_decode(weight_only._W4A16_DECODE)
        for dt in ("bf16", "fp16"):
            for split in (1, 4):
                cases.append(
                    (
                        f"w4a16-decode-split{split}-{dt}-sm{cc}",
                        cc,
                        weight_only._w4a16_kernel,
                        _w4a16_args(tile, dt, split=split),
                        w,
                        s,
                        "f16",
                    )
                )
        for dt in ("fp32", "fp16", "bf16"):
            for one, block in ((True, int8_mm.MAX_ONE_BLOCK), (False, 2048)):
                args = [
                    ("x_ptr", f"*{dt}"),
                    ("q_ptr", "*i8"),
                    ("scale_ptr", "*fp32"),
                    ("K", "i32"),
                    ("stride_x", "i32"),
                    ("smooth_ptr", "*fp32"),
                    ("BLOCK_K", block),
                    ("ONE_BLOCK", one),
                    ("INTERPRET", False),
                    ("SMOOTH", False),
                ]
                name = f"quantize_int8-{dt}-{'one' if one else 'two'}pass-sm{cc}"
                cases.append((name, cc, int8_mm._quantize_int8_kernel, args, 8, 1, "quant"))
        block, warps = 4096, 16
        # (dtype, labels + grad + token scale): the fused-linear launch, and a plain
        # forward-only one without labels.
        for dt, full in (("bf16", True), ("fp32", False)):
            for div in range(3):
                args = [
                    ("s_ptr", f"*{dt}"),
                    ("t_ptr", f"*{dt}"),
                    ("lab_ptr", "*i64"),
                    ("loss_ptr", "*fp32"),
                    ("g_ptr", f"*{dt}"),
                    ("scale_ptr", "*fp32"),
                    ("V", "i32"),
                    ("stride_s", "i32"),
                    ("stride_t", "i32"),
                    ("stride_g", "i32"),
                    ("inv_temp", "fp32"),
                    ("temp", "fp32"),
                    ("alpha", "fp32"),
                    ("beta", "fp32"),
                    ("ignore_index", "i32"),
                    ("HAS_LABELS", full),
                    ("COMPUTE_GRAD", full),
                    ("HAS_SCALE", full),
                    ("DIV", div),
                    ("BLOCK_V", block),
                ]
                what = "labels+grad" if full else "nolabels-nograd"
                name = f"distillation-{('kl', 'reverse_kl', 'jsd')[div]}-{dt}-{what}-sm{cc}"
                cases.append((name, cc, distillation._distill_kernel, args, warps, 1, "none"))
    return cases


CASES = _cases() if os.environ.get("TRITON_INTERPRET") != "1" else []


def _check(case) -> dict:
    name, cc, fn, args, warps, stages, kind = case
    div16 = (
        _GEMM_DIV16
        if kind in ("int8", "f16", "f32")
        else ("K", "stride_x", "V", "stride_s", "stride_t", "stride_g")
    )
    info = _inspect(_compile(fn, args, cc, warps, stages, div16))
    assert info["shared"] <= SMEM_LIMIT[cc], (
        f"{name}: {info['shared']} B of shared memory > {SMEM_LIMIT[cc]} B on sm_{cc}"
    )
    # Register spills go to the stack frame / local memory: a config that spills is slower
    # than a smaller tile and does not belong in the autotune list.
    assert info["spill"] == 0, f"{name}: {info['spill']} B of stack/local memory (spills)"
    mma = info["mma"]
    cfg = dict((k, v) for i, (k, v) in enumerate(args) if fn.params[i].is_constexpr)
    big_tile = cfg.get("BLOCK_M", 0) >= 64 and warps >= 4
    if kind == "int8":
        want = ("IGMMA",) if cc == 90 and big_tile else ("IMMA",) if cc == 80 else ("IGMMA", "IMMA")
        assert any(mma.get(w) for w in want), f"{name}: no {'/'.join(want)} in SASS, got {mma}"
        assert not mma.get("HMMA") and not mma.get("HGMMA"), f"{name}: float MMA in an int8 GEMM"
    elif kind == "f16":
        want = ("HGMMA",) if cc == 90 and big_tile else ("HMMA",) if cc == 80 else ("HGMMA", "HMMA")
        assert any(mma.get(w) for w in want), f"{name}: no {'/'.join(want)} in SASS, got {mma}"
    elif kind == "f32":  # TF32 MMAs: HMMA.*.F32.TF32 on sm_80, HGMMA (or HMMA) on sm_90
        want = ("HGMMA", "HMMA") if cc == 90 else ("HMMA",)
        assert any(mma.get(w) for w in want), f"{name}: no {'/'.join(want)} in SASS, got {mma}"
    else:
        assert not mma, f"{name}: unexpected MMA {mma} in a memory-bound kernel"
        if kind == "quant":
            assert info["frnd"] > 0, f"{name}: no FRND (hardware round-half-even) in SASS"
    return info


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_aot_compile_and_sass(case):
    _check(case)


def test_cuobjdump_ships_with_triton():
    assert os.access(CUOBJDUMP, os.X_OK), CUOBJDUMP


if __name__ == "__main__":
    print(f"{'kernel':52s} {'MMA (SASS count)':28s} {'smem KiB':>8s} {'regs':>5s} {'spill':>5s}")
    for case in CASES:
        try:
            info = _check(case)
            ok = ""
        except AssertionError as e:
            info, ok = None, f"FAIL: {e}"
        if info is None:
            print(f"{case[0]:52s} {ok}")
            continue
        mma = ", ".join(f"{k} x{v}" for k, v in sorted(info["mma"].items())) or "-"
        print(
            f"{case[0]:52s} {mma:28s} {info['shared'] / 1024:8.1f} {info['regs']:5d} "
            f"{info['spill']:5d}"
        )
