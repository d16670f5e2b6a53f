#!/usr/bin/env bash
# C++ kernel tests under AddressSanitizer + UBSan, without libtorch.
#
# Every csrc/cpu/tests/test_*.cpp is linked with all torch-free kernel sources
# (csrc/cpu/kernels/*.cpp + csrc/cpu/cpu_features.cpp); files named *_avx512.cpp / *_avx2.cpp
# get the same ISA flags as setup.py. Each test binary then runs once per kernel ISA, forced
# with QTORCH_CPU_ISA=scalar|avx2|avx512 (capped at what the CPU has). Any sanitizer report
# aborts the run (-fno-sanitize-recover=all); the script exits non-zero on any failure.
#
# Usage: .ci/cpp_tests.sh [test_name ...]   (default: every test; e.g. `.ci/cpp_tests.sh int8_mm`)
# Env: CXX (default g++), BUILD_DIR (default build/cpp_tests), ISAS (default "scalar avx2 avx512").
set -euo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-g++}
BUILD_DIR=${BUILD_DIR:-build/cpp_tests}
ISAS=${ISAS:-"scalar avx2 avx512"}
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
CXXFLAGS="-O1 -g -std=c++17 -Wall -Icsrc/cpu ${SAN}"
AVX512="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16 -mfma -mf16c"
AVX2="-mavx2 -mfma -mf16c"

isa_flags() {
  case "$1" in
    *_avx512.cpp) [[ $(uname -m) == x86_64 ]] && echo "$AVX512" ;;
    *_avx2.cpp) [[ $(uname -m) == x86_64 ]] && echo "$AVX2" ;;
    *) echo "" ;;
  esac
}

mkdir -p "$BUILD_DIR/obj"
# Kernel objects, compiled once and shared by every test binary (rebuilt when the source,
# or any header, is newer than the object).
objs=()
for src in csrc/cpu/cpu_features.cpp csrc/cpu/kernels/*.cpp; do
  obj="$BUILD_DIR/obj/$(echo "${src%.cpp}" | tr / _).o"
  if [[ ! -f $obj || $src -nt $obj || -n $(find csrc/cpu -name '*.h' -newer "$obj" | head -1) ]]; then
    # shellcheck disable=SC2046
    $CXX $CXXFLAGS $(isa_flags "$src") -c "$src" -o "$obj"
  fi
  objs+=("$obj")
done

if [[ $# -gt 0 ]]; then
  tests=()
  for t in "$@"; do tests+=("csrc/cpu/tests/test_${t#test_}.cpp"); done
else
  tests=(csrc/cpu/tests/test_*.cpp)
fi

status=0
for test in "${tests[@]}"; do
  name=$(basename "${test%.cpp}")
  $CXX $CXXFLAGS "$test" "${objs[@]}" -o "$BUILD_DIR/$name" -lm
  for isa in $ISAS; do
    echo "=== $name  QTORCH_CPU_ISA=$isa"
    start=$(date +%s.%N)
    if QTORCH_CPU_ISA=$isa ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
       UBSAN_OPTIONS=print_stacktrace=1 "$BUILD_DIR/$name"; then
      printf '=== %s %s: passed (%.1f s)\n' "$name" "$isa" "$(echo "$(date +%s.%N) - $start" | bc)"
    else
      echo "=== $name $isa: FAILED"
      status=1
    fi
  done
done
exit $status
