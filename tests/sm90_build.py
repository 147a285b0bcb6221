"""Build the Triton kernels of a `fastdin.kernels` module for sm_90 (H100/H200) on a machine without a GPU.

The Triton interpreter accepts programs that the GPU compiler rejects, and it cannot tell how much
shared memory or how many registers a program needs. Here a launcher runs on CPU tensors while the
module's @triton.jit kernels are swapped for stubs that record each launch. Each recorded launch is
then bound and specialised by Triton's own binder, as a real launch is (argument types, 16-byte
alignment, divisibility by 16), and compiled for sm_90 with Triton's compiler and the ptxas that
ships with the wheel. Nothing runs on a device, so the inputs need no values.

`--arch 80` (or 89, ...) builds for another GPU instead: an A100 or an L4 lowers the products to
mma.sync, not wgmma, and needs other amounts of shared memory.
The interpreter replaces @triton.jit functions with its own, so this must run with TRITON_INTERPRET
off, and the tests call it in a subprocess (`run_in_subprocess`):

    python tests/sm90_build.py MODULE:FUNCTION

FUNCTION returns {case id: call that launches kernels}. The script prints a
table to stderr and one JSON line to stdout: {"cases": {case: {kernel: build or {"error": ...}}},
"seconds": {case: compile seconds}}, or {"unavailable": reason} where this triton cannot build for sm_90.
With `--csv PATH` it also appends the table to a CSV (bench/results/sm90_builds.csv keeps them).
"""
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional

H200_SHARED_BYTES = 232448  # the most shared memory one block may use on an H100/H200 (227 KiB)


class Launch(NamedTuple):
    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


class Build(NamedTuple):
    shared: int  # bytes of shared memory per block (Triton's metadata)
    registers: int  # per thread, from ptxas -v
    spill_stores: int  # bytes, from ptxas -v
    spill_loads: int
    wgmma: int = 0  # wgmma.mma_async instructions in the PTX (sm_90 warpgroup MMAs)
    mma_sync: int = 0  # mma.sync instructions (the older, warp-level MMAs)


def toolchain_missing() -> Optional[str]:
    """None when this triton can build for sm_90 here, else why it cannot."""
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        if knobs.runtime.interpret:
            return "TRITON_INTERPRET is on: the interpreter replaces the @triton.jit kernels"
        make_backend(GPUTarget("cuda", 90, 32))
        knobs.nvidia.ptxas.path  # noqa: B018 (raises when no ptxas is found)
        knobs.nvidia.dump_ptxas_log  # noqa: B018 (_ptxas_usage reads Triton's own ptxas log through it)
    except Exception as error:  # an import, backend or tool lookup failure: all mean "cannot build"
        return f"triton cannot build for sm_90 here: {type(error).__name__}: {error}"
    return None


def capture_launches(call: Callable[[], object]) -> List[Launch]:
    """Every kernel launch made while `call()` runs; nothing is launched."""
    from fastdin.bench.measure import kernels_replaced

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

    with kernels_replaced(lambda name, kernel: Recorder(kernel)):
        call()
    return launches


def _ptxas_usage(backend, ptx: str, options, arch: int) -> Build:
    """(registers, spill bytes) from the `ptxas -v` log of Triton's own ptxas step on the PTX it made
    (its flags, e.g. --regAllocOptLevel=2 in 3.7); shared is filled in by the caller."""
    from triton import knobs

    log, dumping = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(ptx, {}, options, arch)
    finally:
        knobs.nvidia.dump_ptxas_log = dumping
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = re.search(r"Used (\d+) registers", text)
    return Build(0, int(registers.group(1)), int(spills.group(1)), int(spills.group(2)))


_BUILT: Dict[str, Build] = {}  # by kernel and specialisation: cases often repeat a launch


def compile_launch(launch: Launch, arch: int = 90) -> Build:
    """Compile one recorded launch for sm_90 (or sm_<arch>: 80 for an A100, 89 for an L4) exactly as a
    launch on that GPU would, without running it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    # what JITFunction.run adds before binding
    kwargs = dict(launch.kwargs, debug=kernel.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constants, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = repr((arch, kernel.__name__, signature, constants, attrs, options))
    if key not in _BUILT:
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target,
                                  options=options.__dict__)
        usage = _ptxas_usage(backend, compiled.asm["ptx"], options, target.arch)
        ptx = compiled.asm["ptx"]
        _BUILT[key] = usage._replace(shared=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                                     mma_sync=ptx.count("mma.sync"))
    return _BUILT[key]


def build_launches(call: Callable[[], object], arch: int = 90) -> Dict[str, object]:
    """{kernel name: Build, or the error text when it fails to compile} for every launch `call()` makes.

    A kernel launched again with another specialisation gets `name#2`, `name#3`, ...
    """
    results = {}
    for launch in capture_launches(call):
        name = launch.kernel.__name__
        key, n = name, 1
        while key in results:
            n += 1
            key = f"{name}#{n}"
        try:
            results[key] = compile_launch(launch, arch)
        except Exception as error:  # any compiler or ptxas failure is this launch's result
            results[key] = f"{type(error).__name__}: {str(error)[-3000:]}"
    return results


def run_in_subprocess(cases: str, timeout: float = 900, arch: int = 90) -> dict:
    """Run this script on `cases` ("module:function", importable from tests/) with the interpreter
    off, for sm_<arch>; returns its JSON result. Raises RuntimeError with the child's stderr if it fails."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="0")  # conftest sets it to 1 on a machine without a GPU
    done = subprocess.run([sys.executable, os.path.join(tests, "sm90_build.py"), cases, "--arch", str(arch)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(tests))
    if done.returncode != 0:
        raise RuntimeError(f"sm90_build.py {cases} failed:\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


CSV_COLUMNS = ["date", "target", "triton", "cases", "case", "kernel", "shared", "registers", "spill_stores",
               "spill_loads", "wgmma", "mma_sync", "error"]


def append_csv(path: str, cases: str, results: dict, arch: int = 90) -> None:
    """One row per case and kernel of `results` (main's "cases"), appended to the CSV at path."""
    import datetime

    import triton

    from fastdin.bench.report import append_csv as append

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = [dict(date=stamp, target="sm_90a" if arch == 90 else f"sm_{arch}", triton=triton.__version__, cases=cases, case=case, kernel=kernel,
                 **build) for case, kernels in results.items() for kernel, build in kernels.items()]
    append(path, rows, CSV_COLUMNS)


def main(argv: List[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build a module's kernels for sm_90 without a GPU.")
    parser.add_argument("cases", help="MODULE:FUNCTION, importable from tests/")
    parser.add_argument("--csv", help="also append the builds to this CSV")
    parser.add_argument("--arch", type=int, default=90, help="the GPU's compute capability: 90 (default), 80, 89, ...")
    args = parser.parse_args(argv)
    # before the case module imports conftest, whose default turns the interpreter on where no GPU is
    os.environ.setdefault("TRITON_INTERPRET", "0")
    module_name, function_name = args.cases.split(":")
    reason = toolchain_missing()
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return
    cases = getattr(importlib.import_module(module_name), function_name)()
    results, seconds = {}, {}
    for case, call in cases.items():
        start = time.perf_counter()
        # the compiler prints failures to stdout too: keep stdout for the one JSON line
        with contextlib.redirect_stdout(sys.stderr):
            builds = build_launches(call, args.arch)
        seconds[case] = round(time.perf_counter() - start, 2)
        results[case] = {k: b._asdict() if isinstance(b, Build) else {"error": b} for k, b in builds.items()}
        for kernel, b in builds.items():
            usage = (f"shared {b.shared:6d} B  registers {b.registers:3d}  spills {b.spill_stores}/{b.spill_loads} B"
                     f"  wgmma {b.wgmma}  mma.sync {b.mma_sync}"
                     if isinstance(b, Build) else "FAILED: " + b.splitlines()[0])
            print(f"{case:40s} {kernel:26s} {usage}", file=sys.stderr)
    if args.csv:
        append_csv(args.csv, args.cases, results, args.arch)
    print(json.dumps({"cases": results, "seconds": seconds}))


def builds_or_skip(target: str, arch: int = 90) -> dict:
    """The builds of run_in_subprocess(target) by case, or a pytest skip saying why sm_90 cannot be built here."""
    import pytest

    result = run_in_subprocess(target, arch=arch)
    if "unavailable" in result:
        pytest.skip(result["unavailable"])
    return result["cases"]


if __name__ == "__main__":
    main(sys.argv[1:])
