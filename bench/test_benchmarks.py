"""The suite's cases under pytest-benchmark, one group per case, mode and dtype, so that
`pytest bench/ --benchmark-autosave` then `--benchmark-compare` sets commits side by side.

On a CPU this runs small shapes, fp32, fastdin (its PyTorch path), eager and DeepCTR-Torch, in seconds; `--bench-full`
(implied on CUDA) runs the design shapes, bf16 and torch.compile too. The suite
(`python -m fastdin.bench`) is the place for the full figures: ceilings, throughput, memory.
"""
import pytest
import torch

from fastdin.bench.cases import IMPLS, MODES, Workload, deepctr_available

from .conftest import full_run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_case(benchmark, request, bench_case, dtype, mode, impl):
    full = full_run(request.config)
    if not full and (dtype == "bf16" or impl == "compile"):
        pytest.skip("bf16 and torch.compile on the CPU only with --bench-full")
    work = Workload(bench_case, dtype, DEVICE)
    if not work.applies(impl):
        pytest.skip(f"{impl} has no version of {bench_case.key}")
    if impl == "deepctr" and not deepctr_available():
        pytest.skip("deepctr_torch is not installed")
    step = work.step(work.implementation(impl), mode)

    def timed():
        step()
        if DEVICE.type == "cuda":  # the work is asynchronous: time it to its end
            torch.cuda.synchronize()

    benchmark.group = f"{bench_case.key} [{bench_case.shape}] {mode} {dtype}"
    benchmark.extra_info.update(backend=work.backend(mode) if impl == "fastdin" else impl,
                                gflop=work.flops(mode) / 1e9, mbytes=work.bytes(mode) / 1e6)
    benchmark.pedantic(timed, warmup_rounds=3, rounds=20 if full else 5, iterations=1)
