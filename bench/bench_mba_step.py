"""Time one training step with a large embedding table: MBA vs full-table L2 vs no regularization.

A step is: embedding lookup of a batch of ids (one candidate and a padded history per sample),
a sum-pool and logistic loss (mean-reduced), backward, the regularizer, and an SGD step. Only
the table is large, so the step time is the embedding's cost and what each regularizer adds.
With dense gradients the backward and the SGD step already touch the whole table; with
`sparse=True` gradients they touch only the batch's rows, and that is where full-table L2
(O(table) per step) and MBA (O(unique ids) per step) differ the most.

CPU: `torch.utils.benchmark.Timer` medians (and minima: on a shared machine the minimum is the
least disturbed) after warm-up steps. CUDA: `triton.testing.do_bench` medians and minima, and the fused Triton kernel (`backend="triton"`, dense gradients) as one more variant.
Rows are printed and appended to bench/results/mba_step_<cpu|cuda>.csv.

    python bench/bench_mba_step.py                 # 1M x 64 table on the CPU
    python bench/bench_mba_step.py --device cuda   # adds the mba-triton variant
"""
import argparse
import datetime
import itertools
import os
import platform

import torch
import torch.utils.benchmark as torch_benchmark
from torch import nn

from fastdin.bench import report
from fastdin.regularization import FullL2Regularizer, MBARegularizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ["date", "device", "device_name", "torch", "triton", "threads", "rows", "dim", "batch", "ids_per_sample",
           "unique_ids", "grad", "variant", "median_ms", "min_ms", "measurements", "regularizer_ms"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_batches(args, device, count=4):
    """Ids drawn log-uniformly over the table (a heavy head and a long tail, as real item ids),
    with the history past each sample's random length padded by id 0."""
    batches = []
    for _ in range(count):
        ids = torch.exp(torch.rand(args.batch, args.ids_per_sample) * torch.log(torch.tensor(args.rows - 1.0)))
        ids = ids.long().clamp(1, args.rows - 1)
        lengths = torch.randint(1, args.ids_per_sample + 1, (args.batch, 1))
        ids = ids * (torch.arange(args.ids_per_sample) < lengths)
        labels = torch.randint(0, 2, (args.batch,)).float()
        batches.append((ids.to(device), labels.to(device)))
    return batches


class Lookup(nn.Module):
    """The smallest model with DIN's hook interface: one table, sum-pooled, a linear head."""

    def __init__(self, rows, dim, sparse):
        super().__init__()
        self.table = nn.Embedding(rows, dim, padding_idx=0, sparse=sparse)
        self.head = nn.Linear(dim, 1)

    def embedding_tables(self):
        return {"table": self.table}

    def batch_ids(self, batch):
        return {"table": batch[0]}

    def forward(self, batch):
        return self.head(self.table(batch[0]).sum(1)).squeeze(-1)


def regularizer_for(variant, model, counts, lam):
    if variant == "none":
        return None
    if variant == "full-l2":
        return FullL2Regularizer(model.embedding_tables(), lam)
    backend = "triton" if variant == "mba-triton" else "reference"
    return MBARegularizer(model.embedding_tables(), {"table": counts}, lam, backend=backend)


def median_ms(step, device, args):
    """(median ms, min ms, number of CPU measurements) of one call of step, after warm-up calls."""
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize(device)
        median, low = triton.testing.do_bench(step, warmup=25, rep=args.rep_ms, quantiles=[0.5, 0.0])
        return median, low, ""
    timer = torch_benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=args.min_run_s)
    return measurement.median * 1e3, min(measurement.times) * 1e3, len(measurement.times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--ids-per-sample", type=int, default=51, help="one candidate plus a history of 50")
    parser.add_argument("--grads", default="dense,sparse", help="comma-separated: dense, sparse")
    parser.add_argument("--lam", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing")
    parser.add_argument("--min-run-s", type=float, default=2.0, help="CPU: timed seconds per variant")
    parser.add_argument("--rep-ms", type=int, default=200, help="CUDA: do_bench repetition time per variant")
    parser.add_argument("--csv", default=None, help="default bench/results/mba_step_<device>.csv")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    batches = make_batches(args, device)
    unique = sum(torch.unique(ids[ids != 0]).numel() for ids, _ in batches) / len(batches)
    # Synthetic counts: the step time does not depend on their values.
    counts = torch.randint(0, 1000, (args.rows,), device=device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""

    rows = []
    for grad in args.grads.split(","):
        variants = ["none", "mba", "full-l2"]
        if device.type == "cuda" and grad == "dense" and triton_version:
            variants.append("mba-triton")
        for variant in variants:
            torch.manual_seed(0)
            model = Lookup(args.rows, args.dim, sparse=grad == "sparse").to(device)
            regularizer = regularizer_for(variant, model, counts, args.lam)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            stream = itertools.cycle(batches)

            def step():
                batch = next(stream)
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch[1])
                loss.backward()
                if regularizer is not None:
                    regularizer(model, batch)
                optimizer.step()

            ms, min_ms, measurements = median_ms(step, device, args)
            regularizer_ms = ""
            if regularizer is not None:  # the hook alone, on a fixed gradient: less noisy than a whole step
                batch = batches[0]
                optimizer.zero_grad(set_to_none=True)
                nn.functional.binary_cross_entropy_with_logits(model(batch), batch[1]).backward()
                weight = model.table.weight
                fixed_grad = weight.grad

                def regularize_only():
                    weight.grad = fixed_grad  # a sparse grad is replaced, not grown; a dense one drifts (harmless)
                    regularizer(model, batch)

                regularizer_ms = round(median_ms(regularize_only, device, args)[0], 4)
            rows.append({
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
                "triton": triton_version, "threads": torch.get_num_threads() if device.type == "cpu" else "",
                "rows": args.rows, "dim": args.dim, "batch": args.batch, "ids_per_sample": args.ids_per_sample,
                "unique_ids": round(unique), "grad": grad, "variant": variant, "median_ms": round(ms, 4),
                "min_ms": round(min_ms, 4),
                "measurements": measurements, "regularizer_ms": regularizer_ms,
            })
            print(f"{grad:>6}  {variant:<10}  step {ms:10.3f} ms  regularizer {regularizer_ms} ms", flush=True)
            del model, regularizer, optimizer

    print(f"\n{rows[0]['device_name']}, torch {torch.__version__}, table {args.rows} x {args.dim}, "
          f"batch {args.batch} x {args.ids_per_sample} ids (~{round(unique)} unique non-padding)")
    print(f"{'grad':>6}  {'variant':<10}  {'step ms':>10}  {'vs none':>8}  {'regularizer ms':>14}")
    for row in rows:
        base = next(r["median_ms"] for r in rows if r["grad"] == row["grad"] and r["variant"] == "none")
        print(f"{row['grad']:>6}  {row['variant']:<10}  {row['median_ms']:10.3f}  {row['median_ms'] / base:7.2f}x"
              f"  {row['regularizer_ms']:>14}")

    path = args.csv or os.path.join(RESULTS, f"mba_step_{device.type}.csv")
    report.append_csv(path, rows, COLUMNS)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
