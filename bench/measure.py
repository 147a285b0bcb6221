"""Timing, peak memory and the device's ceilings, measured the same way for every implementation.

CUDA: `triton.testing.do_bench` medians (CUDA events; it flushes the L2 cache between repeats, so
inputs that fit in the cache do not flatter a case). CPU: `torch.utils.benchmark.Timer` medians
after explicit warm-up calls. Peak memory is only measured on CUDA, where the caching allocator
reports it; on the CPU it is left empty rather than guessed.
"""
import contextlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.utils.benchmark as torch_benchmark

from fastdin.kernels.launch import tf32_matmuls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Budget:
    """How long to measure: warm-up calls, then at least `min_run_s` of timed calls (CPU), or
    do_bench's warm-up and repeat times in ms (CUDA)."""

    warmup_calls: int = 3
    min_run_s: float = 0.5
    bench_warmup_ms: int = 25
    bench_rep_ms: int = 100


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            return models[0]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def interleaved_times(steps: Dict[str, Callable[[], object]], repeats: int, iters: int = 1, warmup: int = 0):
    """({name: [wall seconds per call, one per repeat]}, the same in CPU seconds of this thread), CPU
    only. Each repeat runs every step `iters` times, in a rotating order, so load from other jobs on a
    shared machine falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(iters):
                steps[name]()
            cpu[name].append((time.thread_time() - start_cpu) / iters)
            wall[name].append((time.perf_counter() - start) / iters)
    return wall, cpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotated_medians_ms(calls: Dict[str, Callable[[], object]], rounds: int, device: torch.device,
                       budget: Budget) -> Dict[str, float]:
    """{name: the median over `rounds` of median_ms(call)}: each round times every call, in a rotating
    order, so drift (clocks, temperature, other jobs) falls on all of them alike."""
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(median_ms(calls[name], device, budget))
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn: Callable[[], object], device: torch.device, budget: Budget) -> float:
    """Median wall time of one call of fn, in milliseconds."""
    for _ in range(budget.warmup_calls):  # compilation, autotuning and allocator growth stay out
        fn()
    synchronize(device)
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=budget.bench_warmup_ms, rep=budget.bench_rep_ms,
                                             return_mode="median"))
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=budget.min_run_s).median * 1e3


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Memory one call allocates at its peak beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def copy_bandwidth_gbps(device: torch.device, nbytes: int, budget: Budget) -> float:
    """Device copy bandwidth: bytes read plus bytes written per second, for one large copy."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, budget)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, size: int, dtype: torch.dtype, budget: Budget) -> float:
    """Dense matrix-product rate on random (never zero) square operands."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, budget)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def measure_ceilings(device: torch.device, dtypes, quick: bool, budget: Budget) -> Dict[str, float]:
    """The ceilings of this run: copy GB/s, and TFLOP/s of a matmul per dtype name.

    On CUDA each dtype gets its own matmul rate (bf16 on the tensor cores; fp32 without TF32, the
    precision fastdin keeps for fp32). On the CPU the fp32 rate stands for every dtype.
    """
    if device.type == "cuda":
        copy_bytes, size = (2**28, 4096) if quick else (2**30, 8192)
    else:
        copy_bytes, size = (2**24, 512) if quick else (2**26, 1024)
    ceilings = {"copy_gbps": copy_bandwidth_gbps(device, copy_bytes, budget)}
    tf32 = tf32_matmuls()  # read as the kernels read it: the legacy getter raises after torch's new API
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if device.type == "cuda":
            for name in dtypes:
                ceilings[f"matmul_tflops_{name}"] = matmul_tflops(device, size, DTYPES[name], budget)
        else:
            fp32 = matmul_tflops(device, size, torch.float32, budget)
            ceilings.update({f"matmul_tflops_{name}": fp32 for name in dtypes})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return ceilings


@contextlib.contextmanager
def kernels_replaced(stub: Callable[[str, object], object]):
    """Every @triton.jit function of the imported fastdin.kernels modules, compiled or interpreted,
    replaced by stub(name, function) while the block runs: a launch `kernel[grid](...)` then reaches
    the stub (helpers are replaced too; launchers never index them)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("fastdin.kernels.")]
    kernels = [(m, name, k) for m in modules for name, k in vars(m).items()
               if isinstance(k, (JITFunction, InterpretedFunction))]
    try:
        for m, name, kernel in kernels:
            setattr(m, name, stub(name, kernel))
        yield
    finally:
        for m, name, kernel in kernels:
            setattr(m, name, kernel)
