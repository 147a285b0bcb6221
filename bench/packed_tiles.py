"""The packed backward's tile size on a GPU.

`BLOCK_M_BWD` (kernels/attention_packed.py) is 16 because of sm_90 builds: 16-row tiles spill the
least. Smaller tiles also mean more per-tile work (the row -> user search, the loads of a tile), which
only a GPU can weigh. This times `packed_attention_backward` at the paper shape (B=2048, T=100, D=32,
80/40, sigmoid, bf16) for each tile size, lengths uniform in [1, T] and every length T: CUDA medians
(triton.testing.do_bench), the sizes in rotation, three rounds; and checks that every size gives
the same gradients as the first (a wrong tile size must not pass as a fast one).

Run on a CUDA machine: python bench/packed_tiles.py [--out-dir DIR]; appends to DIR/packed_tiles.csv
(bench/gpu_check.sh does). `--smoke` runs a tiny shape on the CPU under Triton's interpreter: it
checks the script, and times nothing worth keeping (no CSV).
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

from fastdin.bench import report  # noqa: E402
from fastdin.bench.measure import Budget, device_name, rotated_medians_ms  # noqa: E402
from fastdin.kernels import attention_packed as packed  # noqa: E402

PAPER = dict(batch=2048, seq_len=100, dim=32, hidden=(80, 40))
SMOKE = dict(batch=3, seq_len=20, dim=8, hidden=(12, 6))


def make_case(batch, seq_len, dim, hidden, uniform, device, dtype):
    """Inputs, rows and the forward's outputs of one case: the backward's arguments."""
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(batch, dim, generator=gen).to(device, dtype)
    keys = torch.randn(batch, seq_len, dim, generator=gen).to(device, dtype)
    sizes = [4 * dim] + list(hidden) + [1]
    weights = [(torch.randn(o, i, generator=gen) * (2 / i) ** 0.5).to(device) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [(0.1 * torch.randn(o, generator=gen)).to(device) for o in sizes[1:]]
    lengths = (torch.randint(1, seq_len + 1, (batch,), generator=gen) if uniform
               else torch.full((batch,), seq_len)).to(device)
    rows = packed.packed_rows(lengths=lengths)
    out, scores, lse = packed.packed_attention_forward(query, keys, weights, biases, [], rows, "sigmoid", 0.0, False,
                                                       False, False)
    grad_out = torch.randn(batch, dim, generator=gen).to(device, dtype)
    return (grad_out, None, query, keys, weights, biases, [], rows, out, scores, lse, "sigmoid", 0.0, False, False)


def backward(case, block_m):
    return packed.packed_attention_backward(*case, block_m=block_m)


def check_agree(case, sizes):
    """Every tile size's gradients against the first size's, within the compute dtype's rounding."""
    first = backward(case, sizes[0])
    for size in sizes[1:]:
        for i, (got, want) in enumerate(zip(backward(case, size), first)):
            err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
            if not err <= 3e-2:
                raise SystemExit(f"tile size {size}: gradient {i} differs from size {sizes[0]}'s by {err:.2e}")
            if not torch.isfinite(got).all() or want.abs().max() == 0:
                raise SystemExit(f"tile size {size}: gradient {i} is not finite, or zero: nothing to time")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,32,64", help="backward tile sizes (rows), comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the sizes in rotation")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (interpreter), no CSV")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.smoke:
        device, dtype, shape, budget = torch.device("cpu"), torch.float32, SMOKE, Budget(warmup_calls=1, min_run_s=0.01)
    elif torch.cuda.is_available():
        device, dtype, shape, budget = torch.device("cuda"), torch.bfloat16, PAPER, Budget()
    else:
        raise SystemExit("no CUDA device: pass --smoke for a check of the script on the CPU")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    base = dict(date=stamp, gpu=device_name(device), torch=torch.__version__, triton=triton.__version__)
    for uniform in (True, False):
        case = make_case(**shape, uniform=uniform, device=device, dtype=dtype)
        check_agree(case, sizes)
        medians = rotated_medians_ms({size: functools.partial(backward, case, size) for size in sizes}, args.rounds,
                                     device, budget)
        lengths = "uniform in [1, T]" if uniform else "all T"
        fastest = min(medians.values())
        rows = []
        for size, ms in medians.items():
            print(f"packed backward, {lengths}, {size}-row tiles: {ms:.4f} ms ({ms / fastest:.2f}x the fastest)")
            rows.append(dict(base, shape="B{batch} T{seq_len} D{dim} {h} sigmoid".format(
                h="/".join(map(str, shape["hidden"])), **shape), dtype=str(dtype).replace("torch.", ""),
                lengths=lengths, block_m=size, median_ms=round(ms, 5), vs_fastest=round(ms / fastest, 3)))
        if not args.smoke:  # each case as it ends: a timeout keeps what was measured
            report.keep_rows(args.out_dir, "packed_tiles.csv", rows)


if __name__ == "__main__":
    main()
