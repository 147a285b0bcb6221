"""Training throughput of DIN on the CPU with 1 and 2 processes (DDP over gloo), for docs/scaling.md.

Each run spawns `world` processes (torch.multiprocessing, gloo, one thread each), each training on its
own shard of the synthetic stream (`fastdin.distributed.shard`) with Adam, synchronized Dice and DDP
for world > 1, exactly as `fastdin train` under torchrun does. After warm-up steps, `--steps` timed
steps; the rate is world x batch x steps / the slowest rank's wall time. Each world size is run
`--repeats` times, alternating, and the median is kept. With world 2 it also times an all_reduce of
one gradient's worth of float32 (the bytes DDP sends per step), median of 20.

Rows are printed and appended to bench/results/train_scaling_cpu.csv.

    python bench/bench_train_scaling_cpu.py
"""
import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastdin import DIN
from fastdin.bench import measure, report
from fastdin.data import SyntheticConfig, SyntheticDIN
from fastdin.distributed import convert_sync_dice, shard

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ["date", "device_name", "torch", "world_size", "threads_per_rank", "batch_per_rank", "max_history",
           "embed_dim", "steps", "repeats", "rows_per_s_median", "step_ms_median", "parameters", "gradient_mib",
           "allreduce_ms_median"]


def worker(rank, world, init_file, args, out):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = SyntheticDIN(SyntheticConfig(max_history=args.max_history))
    torch.manual_seed(0)
    model = DIN(**data.vocab_sizes(), embed_dim=args.embed_dim)
    parameters = sum(p.numel() for p in model.parameters())
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(convert_sync_dice(model))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = args.warmup + args.steps
    batches = list(shard(data.stream("train", steps * args.batch * world, args.batch), rank, world))

    def step(batch):
        loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for batch in batches[:args.warmup]:
        step(batch)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(batch)
    wall = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    allreduce_ms = None
    if world > 1:
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        flat = torch.zeros(parameters)
        times = []
        for _ in range(20):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            times.append((time.perf_counter() - t0) * 1e3)
        allreduce_ms = statistics.median(times)
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"wall": wall.item(), "parameters": parameters, "allreduce_ms": allreduce_ms}, out)


def run(world, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world, join=True)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="rows per rank per step")
    parser.add_argument("--max-history", type=int, default=30)
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results = {w: [] for w in args.worlds}
    for _ in range(args.repeats):
        for w in args.worlds:  # alternating, so that a busy machine disturbs both alike
            results[w].append(run(w, args))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for w, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        allreduce = [r["allreduce_ms"] for r in runs if r["allreduce_ms"] is not None]
        rows.append({"date": date, "device_name": measure.device_name(torch.device("cpu")), "torch": torch.__version__, "world_size": w,
                     "threads_per_rank": 1, "batch_per_rank": args.batch, "max_history": args.max_history,
                     "embed_dim": args.embed_dim, "steps": args.steps, "repeats": args.repeats,
                     "rows_per_s_median": w * args.batch * args.steps / wall, "step_ms_median": 1e3 * wall / args.steps,
                     "parameters": runs[0]["parameters"], "gradient_mib": runs[0]["parameters"] * 4 / 2**20,
                     "allreduce_ms_median": statistics.median(allreduce) if allreduce else None})
        r = rows[-1]
        print(f"world {w}: {r['rows_per_s_median']:.0f} rows/s, {r['step_ms_median']:.1f} ms/step, "
              f"{r['parameters']} parameters ({r['gradient_mib']:.2f} MiB of gradient)"
              + (f", all_reduce {r['allreduce_ms_median']:.2f} ms" if r["allreduce_ms_median"] else ""))
    report.append_csv(os.path.join(RESULTS, "train_scaling_cpu.csv"), rows, COLUMNS)


if __name__ == "__main__":
    main()
