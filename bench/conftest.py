"""`pytest bench/`: pytest-benchmark runs of the suite's cases (see test_benchmarks.py)."""
import torch

from fastdin.bench.cases import select_cases


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="the design shapes, bf16 and torch.compile on the CPU too (always on with CUDA)")


def full_run(config) -> bool:
    return config.getoption("--bench-full") or torch.cuda.is_available()


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cases = select_cases(quick=not full_run(metafunc.config))
        metafunc.parametrize("bench_case", cases, ids=[c.key for c in cases])
