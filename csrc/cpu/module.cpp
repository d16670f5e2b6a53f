// Python module qtorch._C: importing it registers the CPU kernels as torch ops in the
// `qtorch_cpu` namespace (each kernel file adds its own TORCH_LIBRARY_FRAGMENT), plus a few
// introspection helpers for `qtorch info` and tests.
#include <torch/extension.h>

#include "cpu_features.h"
#include "kernels/distillation.h"
#include "kernels/int8_mm.h"
#include "kernels/weight_only.h"

namespace qc = qtorch::cpu;

namespace qtorch::cpu::packed {
void register_python(pybind11::module_& m);  // linear_packed.cpp
}

static std::map<std::string, bool> cpu_features_dict() {
  const auto& f = qc::features();
  return {{"avx2", f.avx2},           {"fma", f.fma},
          {"f16c", f.f16c},           {"avx512f", f.avx512f},
          {"avx512bw", f.avx512bw},   {"avx512vl", f.avx512vl},
          {"avx512dq", f.avx512dq},   {"avx512_vnni", f.avx512_vnni},
          {"avx512_bf16", f.avx512_bf16}, {"amx_int8", f.amx_int8}};
}

static qc::Family family_of(const std::string& name) {
  for (int i = 0; i < qc::kFamilies; ++i)
    if (name == qc::family_name(static_cast<qc::Family>(i))) return static_cast<qc::Family>(i);
  throw std::invalid_argument(
      "family must be int8_mm, weight_only or distillation, got " + name);
}

// The kernel variant each family's dispatch uses now (after QTORCH_CPU_ISA / set_isa).
static std::map<std::string, std::string> kernels_dict() {
  namespace wo = qc::weight_only;
  std::string w = wo::kernel_name(qc::DType::F32);
  const std::string wb = wo::kernel_name(qc::DType::BF16);
  if (wb != w) w = wb + " for bfloat16 x, " + w + " otherwise";
  return {{"int8_mm", qc::int8_mm::kernel_name()},
          {"weight_only", w},
          {"distillation", qc::distillation::kernel_name()}};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qtorch C++ CPU kernels";
  m.def("cpu_features", &cpu_features_dict, "CPU features seen by cpuid");
  m.def("isa", []() { return std::string(qc::isa_name(qc::max_isa())); },
        "the highest kernel ISA in use by any kernel family: avx512_vnni, avx2 or scalar");
  m.def(
      "isa",
      [](const std::string& family) {
        return std::string(qc::isa_name(qc::isa(family_of(family))));
      },
      "the kernel ISA of one family (int8_mm, weight_only or distillation)");
  m.def("kernels", &kernels_dict, "the kernel variant each family uses, by family");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (name == "avx512_vnni" || name == "avx512") qc::set_isa(qc::Isa::Avx512);
        else if (name == "avx2") qc::set_isa(qc::Isa::Avx2);
        else if (name == "scalar") qc::set_isa(qc::Isa::Scalar);
        else throw std::invalid_argument("isa must be avx512_vnni, avx2 or scalar, got " + name);
        return std::string(qc::isa_name(qc::max_isa()));
      },
      "cap every family's kernel ISA (never above the hardware's); returns isa()");
  qc::packed::register_python(m);
}

TORCH_LIBRARY(qtorch_cpu, m) {
  // Kernel files add their schemas with TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m).
}
