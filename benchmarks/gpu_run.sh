#!/usr/bin/env bash
# The one script to run on a GPU machine (written for an H200; any sm_80+ works): build the
# CUDA extension, run the cuda-backend tests against the references, compute-sanitizer on the
# kernels, benchmarks, compile/SASS check. Everything lands under $OUT (default ./gpu_out);
# copy what matters into benchmarks/results/ and commit it.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh            # full run (about 10 minutes)
#   QUICK=1 bash benchmarks/gpu_run.sh                  # fewer benchmark shapes
#
# Steps keep going after a failure; $OUT/summary.txt lists each step's exit status and time.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
PY="${PYTHON:-python}"

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record status and time
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/$name.log"
  timeout --signal=TERM "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" | tee -a "$SUMMARY"
  tail -5 "$OUT/$name.log"
  return 0
}

# torch's cpp_extension locates CUDA through CUDA_HOME; take the toolkit nvcc reports.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  top="$(nvcc -v -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
  [ -n "$top" ] && export CUDA_HOME="$(cd "$top" && pwd -P)"
fi

step machine 60 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; nvcc --version; git log --oneline -1"

# 1. build (qtorch._C and qtorch._C_cuda; setup.py builds the CUDA one when torch has CUDA)
step build 900 env QTORCH_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
step backends 60 "$PY" -c "import torch, qtorch, qtorch._backend as b; print(b.backend_status()); assert 'cuda' in qtorch.available_backends()"

# 2. correctness on CUDA tensors: the cuda-specific tests, then every public op on every
#    backend (tests/test_ops.py parametrizes over the available backends, cuda included)
step test_cuda 900 "$PY" -m pytest -q -x -rs tests/test_cuda_kernels.py -k "not compile_check" --junitxml="$OUT/test_cuda.xml"
step test_ops 900 "$PY" -m pytest -q -rs tests/test_ops.py -k "cuda" --junitxml="$OUT/test_ops.xml"

# 3. compute-sanitizer: out-of-bounds / misaligned accesses (memcheck), shared-memory races
#    (racecheck: the cp.async ring and the block reductions), uninitialized reads (initcheck)
# (a small subset: the sanitizers slow kernels down 10-100x)
SAN_K="quantize_int8_exact or (int8_scaled_mm_exact and 17-33-129) or (int8_linear_exact and 65-200-257) or (int4 and 5-96-17) or (int4 and 1-4096-4096) or (int4 and 100-384-70) or (distillation_loss and 3-37)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck initcheck; do
    step "san_$tool" 600 compute-sanitizer --tool "$tool" --error-exitcode 99 \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py -k "$SAN_K"
  done
else
  echo "compute-sanitizer not on PATH: skipped" | tee -a "$SUMMARY"
fi

# 4. benchmarks (vs torch._int_mm, bf16 matmul, the Triton backend, the reference loss)
step bench 900 "$PY" benchmarks/bench_cuda.py ${QUICK:+--quick} --json "$OUT/bench_cuda.json"

# 5. the compile check as CI runs it (registers, spills, IMMA/HMMA counts)
step cuda_check 900 bash .ci/cuda_check.sh "$OUT/cuda_check_build"

echo "--- summary ($OUT)"
cat "$SUMMARY"
