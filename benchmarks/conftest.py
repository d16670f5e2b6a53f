"""pytest-benchmark suites over the same cases as `qtorch bench` (qtorch/bench/cases.py).

    pytest benchmarks/ --benchmark-only                       # quick shapes
    pytest benchmarks/ --benchmark-only --qtorch-full-shapes  # the default `qtorch bench` set
    pytest benchmarks/bench_roofline.py --benchmark-only --benchmark-json out.json

Files are named `bench_*.py`. A suite asks for the `bench_case` fixture and times one
implementation of one case, e.g.

    @pytest.mark.bench_op("int8_linear")  # bench_shape: every shape of the op
    @pytest.mark.parametrize("impl", ["qtorch:cpu", "torch:F.linear(float32)",
                                      "fbgemm:dynamic_linear"])
    def test_int8_linear(bench_case, bench_shape, impl):
        bench_case("int8_linear", impl, bench_shape)

The `bench_op` marker parametrizes `bench_shape` with the quick or full shape list. Unlike `qtorch bench`,
pytest-benchmark times implementations one after another, not interleaved: use `qtorch bench`
for ratios, these suites for history/regression tracking (`--benchmark-compare`).
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--qtorch-full-shapes",
        action="store_true",
        help="use the full default shape set of `qtorch bench` (default: --quick's)",
    )


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
    config.addinivalue_line(
        "markers",
        "bench_op(op): parametrize the `bench_shape` argument with the op's "
        "`qtorch bench` shapes (quick, or full with --qtorch-full-shapes)",
    )


def pytest_generate_tests(metafunc):
    """`bench_shape` + @pytest.mark.bench_op(op): one test per shape of that op."""
    marker = metafunc.definition.get_closest_marker("bench_op")
    if marker is None or "bench_shape" not in metafunc.fixturenames:
        return
    from qtorch.bench.cases import shapes_for

    shapes = shapes_for(marker.args[0], quick=not full_shapes(metafunc.config))
    metafunc.parametrize("bench_shape", shapes, ids=[s.text(marker.args[0]) for s in shapes])


def full_shapes(config) -> bool:
    return (
        bool(config.getoption("--qtorch-full-shapes", False))
        or os.environ.get("QTORCH_BENCH_FULL") == "1"
    )


@pytest.fixture(scope="session")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def bench_dtype(bench_device) -> torch.dtype:
    return torch.bfloat16 if bench_device == "cuda" else torch.float32


@pytest.fixture
def bench_case(benchmark, bench_device, bench_dtype):
    """bench_case(op, impl, shape, dtype=None): build the case, time `impl` with
    pytest-benchmark, record flop/bytes/shape in extra_info; skip (with the bench's reason)
    when that implementation does not exist here (backend without a kernel, peer not
    installed)."""
    import qtorch
    from qtorch.bench.cases import build

    def run(op, impl, shape, dtype=None):
        dtype = dtype or bench_dtype
        backends = [
            b
            for b in qtorch.available_backends()
            if b == "reference" or b == bench_device or (b == "triton" and bench_device == "cuda")
        ]
        built = build(op, shape, dtype, bench_device, backends)
        found = {i.name: i for i in built.impls}
        if impl not in found:
            why = dict(built.skipped).get(impl, "not an implementation of this case here")
            pytest.skip(f"{impl}: {why}")
        it = found[impl]
        fn = it.body  # timed inside its scope (the qtorch backend), as qtorch bench does
        if bench_device == "cuda":

            def fn():
                it.body()
                torch.cuda.synchronize()

        benchmark.extra_info.update(
            op=op,
            impl=impl,
            kind=it.kind,
            shape=shape.as_dict(),
            dtype=str(dtype),
            flop=built.flop,
            bytes=built.other_bytes + it.weight_bytes,
            weight_bytes=it.weight_bytes,
        )
        with it.scope():
            return benchmark(fn)

    return run
