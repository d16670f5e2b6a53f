#!/usr/bin/env bash
# C++ kernel tests under AddressSanitizer + UBSan, without libtorch.
#
# Every csrc/cpu/tests/test_*.cpp is linked with all torch-free kernel sources
# (csrc/cpu/kernels/*.cpp + csrc/cpu/cpu_features.cpp); files named *_avx512.cpp / *_avx2.cpp
# get the ISA flags setup.py gives them (csrc/cpu/kernels/isa_flags.txt). Each test binary then
# runs once per kernel ISA, forced with QTORCH_CPU_ISA=scalar|avx2|avx512 (every kernel family
# capped there, and at what the CPU runs it at). Any sanitizer report aborts the run
# (-fno-sanitize-recover=all); the script exits non-zero on any failure.
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
FLAGS_TABLE=csrc/cpu/kernels/isa_flags.txt

# The flags of an ISA file (*_avx2.cpp, *_avx512.cpp) from the table; none for the others.
isa_flags() {
  local name
  name=$(basename "$1")
  [[ $(uname -m) == x86_64 ]] || return 0
  [[ $name == *_avx2.cpp || $name == *_avx512.cpp ]] || return 0
  awk -v f="$name" '$1 == f { $1 = ""; print; found = 1 } END { exit !found }' "$FLAGS_TABLE" ||
    { echo "cpp_tests: $1 has no flags in $FLAGS_TABLE" >&2; return 1; }
}

mkdir -p "$BUILD_DIR/obj"
# Kernel objects, compiled once and shared by every test binary (rebuilt when the source,
# any header or the flags table, is newer than the object).
objs=()
for src in csrc/cpu/cpu_features.cpp csrc/cpu/kernels/*.cpp; do
  obj="$BUILD_DIR/obj/$(echo "${src%.cpp}" | tr / _).o"
  if [[ ! -f $obj || $src -nt $obj || $FLAGS_TABLE -nt $obj ||
        -n $(find csrc/cpu -name '*.h' -newer "$obj" | head -1) ]]; then
    flags=$(isa_flags "$src")
    # shellcheck disable=SC2086
    $CXX $CXXFLAGS $flags -c "$src" -o "$obj"
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
