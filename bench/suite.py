"""`fastdin bench` / `python -m fastdin.bench`: time fastdin against eager, torch.compile and
DeepCTR-Torch on every case, and write a table, a CSV and a plot.

The CLI registers it with `add_arguments(parser)` and `run(args)`.
"""
import argparse
import datetime
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from fastdin import functional
from fastdin.bench import report
from fastdin.bench.cases import IMPLS, MODES, Workload, deepctr_available, relative_error, select_cases
from fastdin.bench.measure import DTYPES, Budget, device_name, measure_ceilings, median_ms, peak_extra_mib

# --quick compiles only these: compiling every case takes minutes on a CPU, and one case proves the path works.
QUICK_COMPILE_CASES = ("attention-sigmoid",)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _names(text: str, allowed: Sequence[str], option: str) -> List[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{option} takes a comma-separated subset of {list(allowed)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes and short timing (CI's smoke run)")
    parser.add_argument("--value-checks", action="store_true",
                        help="keep fastdin's checks of tensor values (lengths in [0, T]) on while timing; each "
                             "costs a device sync on CUDA (default: off, as a tuned training loop runs)")
    parser.add_argument("--cases", default="", help="comma-separated case keys (default: all, see bench/README.md)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated subset of fp32,bf16; bf16 runs under autocast (default: both; fp32 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--max-autotune", action="store_true", help="compile with mode='max-autotune'")
    parser.add_argument("--no-sweep", action="store_true", help="skip the time-versus-T series")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="where the CSV is appended and the PNG written")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new case after this many minutes; what was measured is still reported")
    parser.add_argument("--seed", type=int, default=0)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _budget(quick: bool) -> Budget:
    if quick:
        return Budget(warmup_calls=2, min_run_s=0.05, bench_warmup_ms=10, bench_rep_ms=30)
    return Budget()


def _measure(work: Workload, impl: str, mode: str, args, budget: Budget, reference: torch.Tensor) -> Dict:
    """One row: time, memory and throughput of impl on work in mode."""
    module = work.implementation(impl, args.max_autotune)
    row: Dict = {"impl": impl, "backend": work.backend(mode) if impl == "fastdin" else impl, "note": ""}
    if mode == "inference":
        row["rel_err_vs_eager"] = relative_error(work.reference_output(module), reference)
    step = work.step(module, mode)
    row["ms"] = median_ms(step, work.device, budget)
    row["peak_mib"] = peak_extra_mib(step, work.device)
    flops, nbytes = work.flops(mode), work.bytes(mode)
    seconds = row["ms"] * 1e-3
    row.update(gflop=flops / 1e9, mbytes=nbytes / 1e6, tflops=flops / seconds / 1e12, gbps=nbytes / seconds / 1e9)
    if impl == "fastdin" and "triton" not in row["backend"]:
        row["note"] = f"{row['backend']} path (no kernel runs here)"
    if impl == "deepctr" and work.case.activation == "dice":
        row["note"] = "DeepCTR's Dice takes statistics over all B*T positions"
    return row


def run(args: argparse.Namespace) -> int:
    """Run the suite; returns 0, or 1 when any measurement failed."""
    impls = _names(args.impls, IMPLS, "--impls")
    if args.no_compile:
        impls = [i for i in impls if i != "compile"]
    modes = _names(args.modes, MODES, "--modes")
    dtypes = _names(args.dtypes or ("fp32" if args.quick else "fp32,bf16"), tuple(DTYPES), "--dtypes")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = select_cases(args.quick, [c for c in args.cases.split(",") if c], sweep=not args.no_sweep)
    budget = _budget(args.quick)
    # Every implementation goes through fastdin.functional; its value checks sync with the GPU, so
    # they are off unless asked for, for all implementations alike, and the CSV says which.
    checks_before = functional.set_value_checks(args.value_checks)
    try:
        return _run(args, impls, modes, dtypes, device, cases, budget)
    finally:
        functional.set_value_checks(checks_before)


def _run(args, impls, modes, dtypes, device, cases, budget) -> int:
    name = device_name(device)
    ceilings = measure_ceilings(device, dtypes, args.quick, budget)
    rates = ", ".join(f"{k.split('_')[-1]} matmul {v:.3g} TFLOP/s" for k, v in ceilings.items() if k != "copy_gbps")
    print(f"{name}: ceilings measured now: copy {ceilings['copy_gbps']:.4g} GB/s, {rates}", flush=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": name, "torch": torch.__version__, "triton": triton_version,
            "value_checks": args.value_checks}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, _slug(name) + ("-quick" if args.quick else ""))

    rows, failures = [], 0
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    for case, dtype in tqdm([(c, d) for c in cases for d in dtypes], desc="bench", file=sys.stderr, disable=None):
        if deadline is not None and time.monotonic() > deadline:
            print(f"--max-minutes {args.max_minutes} reached: stopped before {case.key} {dtype}", file=sys.stderr)
            break
        work = Workload(case, dtype, device, args.seed)
        reference = work.reference_output(work.implementation("eager"))
        for mode in modes:
            group = []
            for impl in impls:
                row = dict(meta, case=case.key, shape=case.shape, mode=mode, dtype=dtype,
                           ceiling_tflops=ceilings[f"matmul_tflops_{dtype}"], ceiling_gbps=ceilings["copy_gbps"])
                if not work.applies(impl) or (impl == "compile" and args.quick and case.key not in QUICK_COMPILE_CASES):
                    continue
                if impl == "deepctr" and not deepctr_available():
                    group.append(dict(row, impl=impl, backend="", note="skipped: deepctr_torch is not installed"))
                    continue
                try:
                    row.update(_measure(work, impl, mode, args, budget, reference))
                    row["flops_frac"] = row["tflops"] / row["ceiling_tflops"]
                    row["bw_frac"] = row["gbps"] / row["ceiling_gbps"]
                except Exception as error:  # one broken implementation must not hide the others' numbers
                    failures += 1
                    row.update(impl=impl, backend="", note=f"failed: {type(error).__name__}: {error}"[:200])
                group.append(row)
            _add_speedups(group)
            report.append_csv(stem + ".csv", group)
            rows += group
    print(report.table(rows))
    png = f"{stem}-{'-'.join(dtypes)}{'-sweep' if all(c.sweep for c in cases) else ''}.png"
    report.plot(png, rows, f"fastdin bench on {name}, torch {torch.__version__}, triton {triton_version}, "
                f"{meta['date'][:10]}")
    print(f"appended {stem}.csv; wrote {png}")
    if failures:
        print(f"{failures} measurement(s) failed; see the note column", file=sys.stderr)
    return 1 if failures else 0


def _add_speedups(group: List[Dict]) -> None:
    times = {row["impl"]: row.get("ms") for row in group}
    for row in group:
        if row.get("ms"):
            for base in ("eager", "compile"):
                if times.get(base):
                    row[f"speedup_vs_{base}"] = times[base] / row["ms"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdin.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
