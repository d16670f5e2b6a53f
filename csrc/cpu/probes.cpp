// Measurement probes for the benchmarks (torch ops in the `qtorch_cpu` namespace): the
// ceilings a kernel's speed is compared with, measured on this machine.
//
//   qtorch_cpu::int8_vnni_peak(iters) -> float: int ops/s of register-only vpdpbusd on every
//       intra-op thread (the VNNI roofline of the W8A8 kernels).
//   qtorch_cpu::stream_read(t) -> int: one streaming read of t's bytes, timed by the caller in
//       the same rounds as a kernel on the same (huge-page) buffers: the DRAM ceiling of a
//       decode-sized GEMM under the same conditions.
//   qtorch_cpu::dram_read_bandwidth(bytes, passes) -> float: bytes/s of the best of `passes`
//       streaming reads of a fresh `bytes` buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>

#include "alloc.h"
#include "cpu_features.h"
#include "kernels/int8_mm.h"

namespace {

// The VNNI peak of this machine, in int ops/s (TOP/s * 1e12): every intra-op thread runs the
// register-only vpdpbusd loop for `iters` iterations; ops of all threads / wall time.
double int8_vnni_peak(int64_t iters) {
  namespace qc = qtorch::cpu;
  TORCH_CHECK(qc::hardware_isa(qc::Family::Int8Mm) == qc::Isa::Avx512,
              "int8_vnni_peak: this CPU has no AVX-512 VNNI");
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  std::atomic<int64_t> ops{0};
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ops += qtorch::cpu::int8_mm::avx512::vnni_spin(iters);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(ops.load()) / s;
}

// Reads `n` 64-bit words on every intra-op thread (contiguous equal shares, 8 independent
// sums so the loop streams at the memory's pace); returns their sum so nothing is elided.
uint64_t read_words(const uint64_t* words, int64_t n) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  std::atomic<uint64_t> sink{0};
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int64_t i1 = n * (t + 1) / nt;
      int64_t i = n * t / nt;
      for (; i + 8 <= i1; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += words[i + j];
      for (; i < i1; ++i) acc[0] += words[i];
      uint64_t s = 0;
      for (uint64_t a : acc) s += a;
      sink += s;
    }
  });
  return sink.load();
}

// A streaming read of t's bytes (whole 64-bit words), as a GEMM at M = 1 streams its packed
// weight: the benches time it on the same huge-page buffers as the kernels, interleaved with
// them, for the bandwidth ceiling under the same conditions. Returns the (wrapping) word sum.
int64_t stream_read(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), "stream_read: t must be a "
                    "contiguous CPU tensor");
  const auto* p = static_cast<const uint64_t*>(t.data_ptr());
  return int64_t(read_words(p, int64_t(t.nbytes() / 8)));
}

// The DRAM streaming-read bandwidth of this machine in bytes/s: a `bytes` buffer allocated as
// the packed weights are (huge_page_empty, alloc.h), touched once, then read `passes`
// times by read_words; best pass.
double dram_read_bandwidth(int64_t bytes, int64_t passes) {
  TORCH_CHECK_VALUE(bytes >= (int64_t(1) << 20) && passes >= 1,
                    "dram_read_bandwidth: need bytes >= 1 MiB and passes >= 1");
  const int64_t huge = int64_t(2) << 20;
  const int64_t alloc = (bytes + huge - 1) / huge * huge;
  at::Tensor buf = qtorch::cpu::huge_page_empty({alloc}, at::kByte, "dram_read_bandwidth");
  void* ptr = buf.data_ptr();
  std::memset(ptr, 1, size_t(alloc));
  double best = 0;
  uint64_t sink = 0;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    sink += read_words(static_cast<const uint64_t*>(ptr), int64_t(alloc / 8));
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(alloc) / sec);
  }
  TORCH_CHECK(sink != 0, "dram_read_bandwidth: read nothing");
  return best;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m) {
  m.def("int8_vnni_peak(int iters) -> float", &int8_vnni_peak);  // no tensors: catch-all
  m.def("stream_read(Tensor t) -> int");
  m.def("dram_read_bandwidth(int bytes, int passes) -> float", &dram_read_bandwidth);
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) { m.impl("stream_read", &stream_read); }
