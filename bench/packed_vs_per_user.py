"""Packed rows against the per-user kernels: one training step on a GPU.

The dispatch sends a case to the packed-rows kernels where they fit (`packed_gap` in
fastdin/ops/attention_packed.py). The seed shape gets there only on a GPU with wgmma: its bound lies
over an H200's shared memory, and its build lies 2% under. Its packed backward still spills about
6 KB per thread, and the per-user one about 9 KB. Which path is faster is measured only here.

This times a training step: forward and backward through `functional.attention_pool`, backend
"triton", bf16 keys and fp32 weights, lengths uniform in [1, T]. It runs at the paper shape and the
seed shape, once with the dispatch as it is and once with the per-user kernels forced. Each path
gets CUDA medians (triton.testing.do_bench), in rotation, three rounds. First it checks that both
paths give the same output and gradients. A path the GPU refuses is named in the `ran` column.

Run on a CUDA machine: python bench/packed_vs_per_user.py [--out-dir DIR]. It appends to
DIR/packed_vs_per_user.csv (bench/gpu_check.sh does). `--smoke` runs a tiny shape on the CPU under
Triton's interpreter. That checks the script and writes no CSV.
"""
import argparse
import contextlib
import datetime
import functools
import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit function is defined

import torch  # noqa: E402
import triton  # noqa: E402

from fastdin import functional  # noqa: E402
from fastdin.bench import report  # noqa: E402
from fastdin.bench.measure import Budget, device_name, rotated_medians_ms  # noqa: E402
from fastdin.ops import attention_packed  # noqa: E402

SHAPES = {"paper": dict(batch=2048, seq_len=100, dim=32, hidden=(80, 40), activation="sigmoid"),
          "seed": dict(batch=1024, seq_len=200, dim=64, hidden=(256, 128, 64), activation="prelu")}
SMOKE = {"smoke": dict(batch=3, seq_len=20, dim=8, hidden=(12, 6), activation="prelu")}
PATHS = ("dispatch", "per-user forced")


def make_case(batch, seq_len, dim, hidden, activation, device, dtype):
    """(query, keys, lengths, weights, biases, slopes, output gradient); the float leaves need grad."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dt).requires_grad_()

    query, keys = leaf(batch, dim, dt=dtype), leaf(batch, seq_len, dim, dt=dtype)
    sizes = [4 * dim] + list(hidden) + [1]
    weights = [leaf(o, i, scale=(2 / i) ** 0.5) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [leaf(o, scale=0.1) for o in sizes[1:]]
    slopes = [torch.full((1,), 0.25, device=device, requires_grad=True) for _ in hidden] if activation == "prelu" else None
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=gen).to(device)
    grad_out = torch.randn(batch, dim, generator=gen).to(device, dtype)
    return query, keys, lengths, weights, biases, slopes, grad_out


@contextlib.contextmanager
def path_forced(path):
    """The per-user kernels for every case (the packed kernels' gap says so), or the dispatch as is."""
    original = attention_packed.packed_gap
    if path == "per-user forced":
        attention_packed.packed_gap = lambda *args: "per-user kernels forced by bench/packed_vs_per_user.py"
    try:
        yield
    finally:
        attention_packed.packed_gap = original


def training_step(case, activation):
    """[out, *gradients of every float leaf] of the loss out . grad_out."""
    query, keys, lengths, weights, biases, slopes, grad_out = case
    out = functional.attention_pool(query, keys, weights, biases, activation=activation, act_params=slopes,
                                    lengths=lengths, backend="triton")
    leaves = [query, keys, *weights, *biases, *(slopes or [])]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def forced_step(case, activation, path):
    with path_forced(path):
        return training_step(case, activation)


def what_ran(case, activation):
    """The kernels the dispatch gives this case: packed rows, or the per-user kernels and why."""
    query, keys, _, weights, _, slopes, _ = case
    gap = attention_packed.packed_gap(keys, weights, activation, slopes)
    return "packed rows" if gap is None else f"per-user kernels ({gap})"


def check_agree(case, activation):
    """Both paths' output and gradients within the compute dtype's rounding of each other."""
    results = {path: forced_step(case, activation, path) for path in PATHS}
    for i, (got, want) in enumerate(zip(*results.values())):
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
        if not err <= 3e-2 or not torch.isfinite(got).all():
            raise SystemExit(f"result {i}: the paths differ by {err:.2e}, or it is not finite")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the two paths in rotation")
    parser.add_argument("--shapes", default="paper,seed", help="of " + ", ".join(SHAPES))
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (interpreter), no CSV")
    args = parser.parse_args()
    if args.smoke:
        device, dtype, shapes, budget = torch.device("cpu"), torch.float32, SMOKE, Budget(warmup_calls=1, min_run_s=0.01)
    elif torch.cuda.is_available():
        device, dtype, budget = torch.device("cuda"), torch.bfloat16, Budget()
        shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    else:
        raise SystemExit("no CUDA device: pass --smoke for a check of the script on the CPU")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    base = dict(date=stamp, gpu=device_name(device), torch=torch.__version__, triton=triton.__version__)
    for name, shape in shapes.items():
        activation = shape["activation"]
        case = make_case(**shape, device=device, dtype=dtype)
        check_agree(case, activation)  # a refused packed program is found (and recorded) here
        ran = {}
        for path in PATHS:
            with path_forced(path):
                ran[path] = what_ran(case, activation)
        medians = rotated_medians_ms({path: functools.partial(forced_step, case, activation, path) for path in PATHS},
                                     args.rounds, device, budget)
        per_user = medians["per-user forced"]
        rows = []
        for path, ms in medians.items():
            print(f"{name}: training step, {path} ({ran[path]}): {ms:.4f} ms ({per_user / ms:.2f}x the per-user kernels)")
            rows.append(dict(base, case=name, shape="B{batch} T{seq_len} D{dim} {h} {activation}".format(
                h="/".join(map(str, shape["hidden"])), **shape), dtype=str(dtype).replace("torch.", ""),
                lengths="uniform in [1, T]", path=path, ran=ran[path], median_ms=round(ms, 5),
                speedup_vs_per_user=round(per_user / ms, 3)))
        if not args.smoke:  # each case as it ends: a timeout keeps what was measured
            report.keep_rows(args.out_dir, "packed_vs_per_user.csv", rows)


if __name__ == "__main__":
    main()
