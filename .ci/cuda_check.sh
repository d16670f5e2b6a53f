#!/usr/bin/env bash
# Compile check of the CUDA kernels for machines without a GPU (CI). It proves the device code
# builds for Ampere and Hopper without torch, does not spill registers, and that the hot loops
# really run on tensor cores (IMMA for int8, HMMA for fp16/bf16). It does NOT run anything.
#
#   .ci/cuda_check.sh [build_dir]
#
# Steps:
#   1. nvcc -gencode sm_80 -gencode sm_90a -Xptxas -v on every csrc/cuda/*.cu (no torch headers);
#   2. per kernel and arch: registers, spill bytes; any spill in a kernel fails the check;
#   3. SASS via cuobjdump (from the Triton wheel when not on PATH): IMMA count must be > 0 in
#      every int8_mm_kernel instance, HMMA > 0 in every weight_only_kernel (W4A16 / W8A16)
#      instance;
#   4. the torch binding: built with `python setup.py build_ext` only when $QTORCH_CUDA_PYTHON
#      (default: python) has a CUDA build of torch; otherwise skipped, with a message.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-${TMPDIR:-/tmp}/qtorch_cuda_check}"
mkdir -p "$BUILD"
NVCC="${NVCC:-nvcc}"
PY="${QTORCH_CUDA_PYTHON:-python}"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda_check: nvcc not found; nothing to check" >&2
  exit 2
fi
CUOBJDUMP="$(command -v cuobjdump || true)"
if [ -z "$CUOBJDUMP" ]; then
  CUOBJDUMP="$(python -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)"
fi
if [ ! -x "$CUOBJDUMP" ]; then
  echo "cuda_check: cuobjdump not found (neither on PATH nor in the triton wheel)" >&2
  exit 2
fi

echo "== nvcc: $("$NVCC" --version | tail -1)"
echo "== cuobjdump: $CUOBJDUMP"
FLAGS=(-std=c++20 -O3 --expt-relaxed-constexpr
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
       -Xptxas -v -I "$ROOT/csrc/cuda")

for cu in "$ROOT"/csrc/cuda/*.cu; do
  name="$(basename "$cu" .cu)"
  echo "== compiling $name.cu"
  "$NVCC" "${FLAGS[@]}" -c "$cu" -o "$BUILD/$name.o" 2> "$BUILD/$name.ptxas.log" || {
    cat "$BUILD/$name.ptxas.log" >&2
    echo "cuda_check: FAILED to compile $name.cu" >&2
    exit 1
  }
  for arch in sm_80 sm_90a; do
    "$CUOBJDUMP" -sass -arch "$arch" "$BUILD/$name.o" > "$BUILD/$name.$arch.sass"
  done
done

python - "$BUILD" <<'EOF'
import glob, os, re, subprocess, sys
from collections import Counter

build = sys.argv[1]
def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))

def short(d):
    d = re.sub(r"qtorch_cuda::\(anonymous namespace\)::", "", d)
    d = d.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return re.sub(r"\(.*\)$", "", d)

rows, failures = [], []
for log in sorted(glob.glob(os.path.join(build, "*.ptxas.log"))):
    unit = os.path.basename(log).split(".")[0]
    text = open(log).read()
    # ptxas -v: "Compiling entry function 'X' for 'sm_80'" ... "N bytes spill stores, M bytes
    # spill loads" ... "Used R registers"
    blocks = re.split(r"ptxas info\s*: Compiling entry function ", text)[1:]
    props = {}
    for b in blocks:
        m = re.match(r"'([^']+)' for '(sm_\w+)'", b)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", b)
        regs = re.search(r"Used (\d+) registers", b)
        props[(m.group(1), m.group(2))] = (int(regs.group(1)) if regs else -1,
                                           int(spill.group(1)) + int(spill.group(2)) if spill else 0)
    # SASS: per "Function : X" section, count instruction mnemonics of interest.
    counts = {}
    for arch in ("sm_80", "sm_90a"):
        sass = open(os.path.join(build, f"{unit}.{arch}.sass")).read()
        for sec in re.split(r"\n\s*Function : ", sass)[1:]:
            fname = sec.split("\n", 1)[0].strip()
            ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", sec)
            c = Counter(o.split(".")[0] for o in ops)
            counts[(fname, arch)] = c
    names = demangle(sorted({k[0] for k in props}))
    for (fn, arch), (regs, spill) in sorted(props.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        c = counts.get((fn, arch), Counter())
        dn = short(names[fn])
        rows.append((unit, dn, arch, regs, spill, c["IMMA"], c["HMMA"], c["LDSM"], c["LDGSTS"],
                     sum(c.values())))
        if spill:
            failures.append(f"{dn} [{arch}]: {spill} bytes of register spills")
        if "int8_mm_kernel" in dn and c["IMMA"] == 0:
            failures.append(f"{dn} [{arch}]: no IMMA in SASS")
        if "weight_only_kernel" in dn and c["HMMA"] == 0:
            failures.append(f"{dn} [{arch}]: no HMMA in SASS")

hdr = ("unit", "kernel", "arch", "regs", "spill B", "IMMA", "HMMA", "LDSM", "LDGSTS", "instrs")
w = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
fmt = "  ".join(f"{{:<{x}}}" if i < 3 else f"{{:>{x}}}" for i, x in enumerate(w))
print(fmt.format(*hdr))
for r in rows:
    print(fmt.format(*r))
if failures:
    print("\ncuda_check: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print(f"\ncuda_check: {len(rows)} kernel instances compiled for sm_80 + sm_90a, no spills, "
      "IMMA in every int8 GEMM, HMMA in every weight-only (W4A16/W8A16) GEMM")
EOF

# ---- the torch binding -------------------------------------------------------------------------
# torch's cpp_extension finds CUDA through CUDA_HOME; nvcc may be a wrapper on PATH, so take
# the toolkit root nvcc itself reports.
if [ -z "${CUDA_HOME:-}" ]; then
  top="$("$NVCC" -v -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
  [ -n "$top" ] && export CUDA_HOME="$(cd "$top" && pwd -P)"
fi
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "== building qtorch._C_cuda against torch $("$PY" -c 'import torch; print(torch.__version__)') ($PY)"
  BIND_BUILD="$BUILD/ext"
  mkdir -p "$BIND_BUILD"
  (cd "$ROOT" && QTORCH_BUILD_CPU=0 QTORCH_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
     "$PY" setup.py build_ext --build-temp "$BIND_BUILD/tmp" --build-lib "$BIND_BUILD/lib" \
     > "$BIND_BUILD/build.log" 2>&1) || { tail -40 "$BIND_BUILD/build.log" >&2; echo "cuda_check: binding build FAILED" >&2; exit 1; }
  so="$(ls "$BIND_BUILD"/lib/qtorch/_C_cuda*.so)"
  ls -l "$so"
  # Loading needs no GPU: it resolves every symbol and registers the qtorch_cuda ops.
  "$PY" - "$so" <<'PYEOF'
import sys, torch
torch.ops.load_library(sys.argv[1])
for name in ("quantize_int8", "int8_scaled_mm", "int8_linear", "int4_weight_only_linear",
             "int8_weight_only_linear", "distillation_loss"):
    print("  ", getattr(torch.ops.qtorch_cuda, name).default._schema)
PYEOF
  echo "cuda_check: binding compiled, linked and loaded; its ops are registered (nothing ran on a GPU)"
else
  echo "== binding: SKIPPED ($PY has no CUDA build of torch; set QTORCH_CUDA_PYTHON to one)"
fi
