"""float32 attention on a GPU: the kernels against the torch path, inference and a training step.

With TF32 off (PyTorch's default), `auto` sends fp32 attention on CUDA to the torch path
(`functional.attention_slow_kernel`): the sm_90 builds of the kernels' full-precision products run
at 32 registers and spill 7-11 KB per thread. The builds say so; only a GPU can say by
how much. So this times, at the paper shape (lengths uniform in [1, T], fp32 keys and weights):
- the kernels (backend "triton") with TF32 off, and with TF32 on;
- the torch path (cuBLAS GEMMs on the packed rows) with TF32 off: what `auto` runs;
- the reference (the padded eager math the peers compute) with TF32 off.

Each gets CUDA medians (triton.testing.do_bench) in rotation, three rounds, after a check that the
TF32-off paths agree within fp32 rounding.

Run on a CUDA machine: python bench/fp32_paths.py [--out-dir DIR]. It appends to DIR/fp32_paths.csv
(bench/gpu_check.sh does). `--smoke` runs a tiny shape on the CPU under Triton's interpreter. That
checks the script and writes no CSV.
"""
import argparse
import datetime
import functools
import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit function is defined

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packed_vs_per_user import SHAPES, SMOKE, make_case  # noqa: E402

from fastdin import functional  # noqa: E402
from fastdin.bench import report  # noqa: E402
from fastdin.bench.measure import Budget, device_name, rotated_medians_ms  # noqa: E402
from fastdin.kernels.launch import tf32_matmuls  # noqa: E402

PATHS = {"triton, TF32 off": ("triton", False), "triton, TF32 on": ("triton", True),
         "torch, TF32 off (auto)": ("torch", False), "reference, TF32 off": ("reference", False)}
MODES = ("inference", "training")


def step(case, activation, path, mode):
    """[out, *gradients of every float leaf] (training) or [out] (inference) on one path."""
    backend, tf32 = PATHS[path]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    query, keys, lengths, weights, biases, slopes, grad_out = case
    with torch.set_grad_enabled(mode == "training"):
        out = functional.attention_pool(query, keys, weights, biases, activation=activation, act_params=slopes,
                                        lengths=lengths, backend=backend)
    if mode == "inference":
        return [out]
    leaves = [query, keys, *weights, *biases, *(slopes or [])]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def check_agree(case, activation):
    """The TF32-off paths' output and gradients within 1e-3 of the torch path's (norm-relative: a bias
    gradient sums thousands of fp32 terms that partly cancel)."""
    want = step(case, activation, "torch, TF32 off (auto)", "training")
    for path in ("triton, TF32 off", "reference, TF32 off"):
        for i, (got, ref) in enumerate(zip(step(case, activation, path, "training"), want)):
            err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            if not err <= 1e-3:
                raise SystemExit(f"{path}, result {i}: {err:.2e} from the torch path")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the paths in rotation")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (interpreter), no CSV")
    args = parser.parse_args()
    if args.smoke:
        device, shapes, budget = torch.device("cpu"), SMOKE, Budget(warmup_calls=1, min_run_s=0.01)
    elif torch.cuda.is_available():
        device, shapes, budget = torch.device("cuda"), {"paper": SHAPES["paper"]}, Budget()
    else:
        raise SystemExit("no CUDA device: pass --smoke for a check of the script on the CPU")
    tf32_before = tf32_matmuls()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    base = dict(date=stamp, gpu=device_name(device), torch=torch.__version__, triton=triton.__version__)
    try:
        for name, shape in shapes.items():
            activation = shape["activation"]
            case = make_case(**shape, device=device, dtype=torch.float32)
            check_agree(case, activation)
            for mode in MODES:
                calls = {path: functools.partial(step, case, activation, path, mode) for path in PATHS}
                medians = rotated_medians_ms(calls, args.rounds, device, budget)
                auto = medians["torch, TF32 off (auto)"]
                rows = []
                for path, ms in medians.items():
                    print(f"{name} {mode}: {path}: {ms:.4f} ms ({auto / ms:.2f}x the torch path)")
                    rows.append(dict(base, case=name, mode=mode, shape="B{batch} T{seq_len} D{dim} {h} {activation}".format(
                        h="/".join(map(str, shape["hidden"])), **shape), dtype="float32",
                        lengths="uniform in [1, T]", path=path, median_ms=round(ms, 5),
                        speedup_vs_torch_path=round(auto / ms, 3)))
                if not args.smoke:  # each mode as it ends: a timeout keeps what was measured
                    report.keep_rows(args.out_dir, "fp32_paths.csv", rows)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before


if __name__ == "__main__":
    main()
