"""Builds qtorch._C (C++ CPU kernels) and, where CUDA torch + nvcc exist, qtorch._C_cuda.

ISA-specific translation units are named `*_avx512.cpp` / `*_avx2.cpp` and get their own
-m flags (csrc/cpu/kernels/isa_flags.txt), so one binary runs on any x86-64 and each kernel
family picks its kernels at run time.
QTORCH_BUILD_CUDA=0/1 forces the CUDA extension off/on; QTORCH_BUILD_CPU=0 skips the CPU one.
"""

import glob
import os
import platform
import shutil

from setuptools import find_namespace_packages, setup

ext_modules = []
cmdclass = {}


def _isa_flags(path="csrc/cpu/kernels/isa_flags.txt"):
    """{file name: [flags]} of the ISA translation units."""
    table = {}
    with open(path) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if fields:
                table[fields[0]] = fields[1:]
    return table


def _flags_of(src):
    name = os.path.basename(src)
    if name in ISA_FLAGS:
        return ISA_FLAGS[name]
    if name.endswith(("_avx2.cpp", "_avx512.cpp")):
        raise RuntimeError(f"{src}: an ISA file without flags in csrc/cpu/kernels/isa_flags.txt")
    return []


def _headers(root):
    """The headers under `root` (tests' excepted), for an extension's `depends`."""
    return sorted(
        h
        for ext in ("h", "cuh")
        for h in glob.glob(f"{root}/**/*.{ext}", recursive=True)
        if "/tests/" not in h
    )


def _env_flag(name):
    v = os.environ.get(name)
    return None if v is None or v == "" else v not in ("0", "false", "no")


try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # sdist metadata without torch: pure-Python install
    torch = None

if torch is not None:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    ISA_FLAGS = _isa_flags()

    class QtorchBuildExtension(BuildExtension):
        """BuildExtension with per-source ISA flags (ninja off: it only takes per-target flags)."""

        def build_extension(self, ext):
            if not getattr(self.compiler, "_qtorch_wrapped", False):
                orig = self.compiler._compile

                def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                    extra = list(
                        extra_postargs["cxx"]
                        if isinstance(extra_postargs, dict)
                        else extra_postargs
                    )
                    if x86:
                        extra = extra + _flags_of(src)
                    if isinstance(extra_postargs, dict):
                        extra_postargs = dict(extra_postargs, cxx=extra)
                    else:
                        extra_postargs = extra
                    return orig(obj, src, ext_, cc_args, extra_postargs, pp_opts)

                self.compiler._compile = _compile
                self.compiler._qtorch_wrapped = True
            super().build_extension(ext)

    cmdclass["build_ext"] = QtorchBuildExtension.with_options(use_ninja=False)

    cpu_sources = sorted(
        s for s in glob.glob("csrc/cpu/**/*.cpp", recursive=True) if "/tests/" not in s
    )
    if cpu_sources and _env_flag("QTORCH_BUILD_CPU") is not False:
        if not x86:  # ISA files compile to stubs that report "unsupported" off x86
            pass
        ext_modules.append(
            CppExtension(
                "qtorch._C",
                cpu_sources,
                include_dirs=[os.path.abspath("csrc/cpu")],
                # headers too: build_ext rebuilds only when a listed file is newer than the
                # built module, and the kernels live in headers (kernels/*_impl.h)
                depends=_headers("csrc/cpu"),
                extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++17"]},
                extra_link_args=["-fopenmp"],
            )
        )

    build_cuda = _env_flag("QTORCH_BUILD_CUDA")
    if build_cuda is None:
        build_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    cuda_sources = sorted(
        glob.glob("csrc/cuda/**/*.cu", recursive=True)
        + glob.glob("csrc/cuda/**/*.cpp", recursive=True)
    )
    cuda_sources = [s for s in cuda_sources if "/tests/" not in s]
    if build_cuda and cuda_sources:
        ext_modules.append(
            CUDAExtension(
                "qtorch._C_cuda",
                cuda_sources,
                include_dirs=[os.path.abspath("csrc/cuda")],
                depends=_headers("csrc/cuda"),
                extra_compile_args={
                    # torch >= 2.14 headers require C++20 (the CUDA torch this builds against)
                    "cxx": ["-O3", "-std=c++20"],
                    "nvcc": [
                        "-O3",
                        "-std=c++20",
                        "--expt-relaxed-constexpr",
                        "-gencode",
                        "arch=compute_80,code=sm_80",
                        "-gencode",
                        "arch=compute_90a,code=sm_90a",
                    ],
                },
            )
        )

# `kernels/` is installed as `qtorch._kernels` (package-dir in pyproject.toml).
setup(
    packages=find_namespace_packages(include=["qtorch*"]) + ["qtorch._kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
