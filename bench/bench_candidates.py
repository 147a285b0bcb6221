"""One user x N candidates on the CPU: `DIN.score_candidates` against the naive expand-and-copy.

naive: the user's row repeated N times (`Tensor.repeat`, a copy) with the candidates as "item" and
"category", then `model(batch)`; the reference attention then builds the [N, T, 4D] concat.
score_candidates: `fastdin.serving` (no copy of the history; the key term of the folded first
layer computed once; candidates in chunks).

Time: one thread, warm-up calls, then `--repeats` rounds that call every (N, method) once in turn
(interleaved, so that a busy machine disturbs all alike); median and minimum per case, and the
speedup of the medians within this run. Memory: for each (N, method) a fresh child process resets
its peak-RSS mark (/proc/self/clear_refs), makes one call and reports VmHWM after minus VmRSS before:
the peak resident memory the call added (torch's CPU allocations are not visible to tracemalloc).
Rows are printed and appended to bench/results/candidates_cpu.csv.

    python bench/bench_candidates.py                     # N = 100, 1000, 4000, T = 500, D = 64, 80/40
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from fastdin import DIN
from fastdin.bench import report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ["date", "device_name", "torch", "threads", "seq_len", "length", "dim", "attention_hidden",
           "activation", "candidates", "method", "median_ms", "min_ms", "repeats", "speedup_median",
           "peak_rss_delta_mib", "rel_diff"]
METHODS = ("naive", "score_candidates")
NUM_ITEMS, NUM_CATEGORIES = 100_000, 1_000


def device_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def build(args):
    torch.manual_seed(0)
    model = DIN(NUM_ITEMS, NUM_CATEGORIES, embed_dim=args.embed_dim, attention_hidden=tuple(args.hidden),
                attention_activation=args.activation).eval()
    length = args.length or args.seq_len
    user = {"hist_items": torch.randint(1, NUM_ITEMS, (1, args.seq_len)),
            "hist_categories": torch.randint(1, NUM_CATEGORIES, (1, args.seq_len)), "lengths": torch.tensor([length])}
    return model, user


def candidates(num: int):
    g = torch.Generator().manual_seed(num)
    return torch.randint(1, NUM_ITEMS, (num,), generator=g), torch.randint(1, NUM_CATEGORIES, (num,), generator=g)


def naive(model, user, items, categories):
    num = items.shape[0]
    batch = {name: t.repeat(num, *([1] * (t.dim() - 1))) for name, t in user.items()}
    return model(dict(batch, item=items, category=categories))


def call(method: str, model, user, items, categories):
    with torch.no_grad():
        if method == "naive":
            return naive(model, user, items, categories)
        return model.score_candidates(user, items, categories)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args) -> None:
    """One call in this fresh process; prints the peak RSS it added, in MiB."""
    torch.set_num_threads(1)
    model, user = build(args)
    items, categories = candidates(args.memory_child_n)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    before = _status_kib("VmRSS")
    call(args.memory_child, model, user, items, categories)
    print(json.dumps({"peak_rss_delta_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory(method: str, num: int) -> float:
    argv = [a for a in sys.argv[1:] if a != "--no-csv"]
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--memory-child", method,
                          "--memory-child-n", str(num)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_delta_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--seq-len", type=int, default=500, help="history length T")
    parser.add_argument("--length", type=int, default=0, help="the user's valid behaviours (default T)")
    parser.add_argument("--embed-dim", type=int, default=32, help="per table; behaviours are D = 2 x this")
    parser.add_argument("--hidden", type=int, nargs="+", default=[80, 40], help="attention MLP sizes")
    parser.add_argument("--activation", default="sigmoid", help="attention MLP activation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child-n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)

    torch.set_num_threads(1)
    model, user = build(args)
    inputs = {n: candidates(n) for n in args.candidates}
    diffs = {}
    for n, (items, categories) in inputs.items():  # warm-up, and the two agree
        want, got = (call(m, model, user, items, categories) for m in METHODS)
        diffs[n] = ((got - want).norm() / want.norm()).item()
    times = {(n, m): [] for n in args.candidates for m in METHODS}
    for _ in range(args.repeats):
        for n, (items, categories) in inputs.items():
            for m in METHODS:
                start = time.perf_counter()
                call(m, model, user, items, categories)
                times[n, m].append((time.perf_counter() - start) * 1e3)

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for n in args.candidates:
        naive_median = statistics.median(times[n, "naive"])
        for m in METHODS:
            median = statistics.median(times[n, m])
            rows.append({
                "date": date, "device_name": device_name(), "torch": torch.__version__, "threads": 1,
                "seq_len": args.seq_len, "length": args.length or args.seq_len, "dim": 2 * args.embed_dim,
                "attention_hidden": "/".join(map(str, args.hidden)), "activation": args.activation,
                "candidates": n, "method": m, "median_ms": median, "min_ms": min(times[n, m]),
                "repeats": args.repeats, "speedup_median": naive_median / median,
                "peak_rss_delta_mib": peak_memory(m, n), "rel_diff": diffs[n],
            })
    for r in rows:
        print(f"N={r['candidates']:>5} {r['method']:<17} median {r['median_ms']:9.1f} ms  min {r['min_ms']:9.1f} ms  "
              f"speedup {r['speedup_median']:5.2f}x  peak RSS +{r['peak_rss_delta_mib']:7.1f} MiB  "
              f"rel diff {r['rel_diff']:.1e}")
    if not args.no_csv:
        path = os.path.join(RESULTS, "candidates_cpu.csv")
        report.append_csv(path, rows, COLUMNS)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
