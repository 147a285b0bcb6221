"""CPU: fastdin's attention pooling (backend "torch", packed rows) against DeepCTR-Torch 0.3.0.

Two measures, both on one thread, lengths uniform in [1, T] or skewed (mean about T/4):
- the layer: `AttentionPooling` against DeepCTR-Torch's `AttentionSequencePoolingLayer` loaded with
  the same weights, B=256 T=100 D=32, hidden 80/40 sigmoid, inference (no grad) and training
  (forward + backward to the inputs and every weight);
- a DIN training step: fastdin's `DIN` against DeepCTR-Torch's `DIN` of the same sizes (item and
  category embeddings of 16, so behaviours of D=32; attention 80/40 sigmoid; top MLP 200/80 ReLU;
  Adam; forward, log loss, backward, optimizer step).

The implementations of one measure are timed in interleaved repeats (each repeat times every
implementation for `--iters` calls, in a rotating order), so load from other jobs on a shared
machine falls on all of them alike. Reported: the median time per call over the repeats, the 25th
and 75th percentiles as the spread, and the speedup as the median of the per-repeat ratios. Each
is given twice: by the wall clock ("wall") and by this thread's CPU time ("cpu", which leaves out
the time the thread waited for a core while other jobs ran; on a busy shared machine it is the
steadier of the two). The CSV records the load average at the start.

    pip install --no-deps deepctr-torch==0.3.0 requests   # (requests needs urllib3, idna, certifi, charset_normalizer)
    python bench/bench_cpu_attention.py                   # appends to bench/results/cpu_attention.csv
    python bench/bench_cpu_attention.py --repeats 5 --iters 3 --no-csv   # a quick look
"""
import argparse
import datetime
import os
import statistics

import torch
import torch.nn.functional as F

from fastdin import DIN, AttentionPooling
from fastdin.bench import report
from fastdin.bench.cases import DeepCTRAttention
from fastdin.bench.measure import device_name, interleaved_times

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ["date", "device_name", "torch", "deepctr_torch", "threads", "load_avg_1min", "clock", "measure", "lengths", "mean_length",
           "batch", "seq_len", "dim", "hidden", "mode", "impl", "median_ms", "p25_ms", "p75_ms",
           "speedup_vs_deepctr", "speedup_p25", "speedup_p75", "repeats", "iters", "rel_err"]


def draw_lengths(kind: str, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """uniform: in [1, T]; skewed: 1 + a geometric draw of mean T/4 - 1, capped at T (mean about T/4)."""
    if kind == "uniform":
        return torch.randint(1, seq_len + 1, (batch,), generator=generator)
    p = 1.0 / (seq_len / 4)
    u = torch.rand(batch, generator=generator).clamp_min(1e-12)
    geometric = torch.floor(torch.log(u) / torch.log(torch.tensor(1 - p))).long()
    return (1 + geometric).clamp(max=seq_len)


def quantiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def layer_steps(args, lengths_kind: str, generator: torch.Generator):
    B, T, D = args.batch, args.seq_len, args.dim
    ours = AttentionPooling(D, args.hidden, "sigmoid", backend="torch")
    theirs = DeepCTRAttention(ours)
    lengths = draw_lengths(lengths_kind, B, T, generator)
    valid = torch.arange(T) < lengths.unsqueeze(1)
    keys = torch.randn(B, T, D, generator=generator) * valid.unsqueeze(-1)  # padding: zero embeddings
    query = torch.randn(B, D, generator=generator)
    grad_out = torch.randn(B, D, generator=generator)
    with torch.no_grad():
        err = ((ours(query, keys, lengths) - theirs(query, keys, lengths)).norm() / theirs(query, keys, lengths).norm()).item()
    modules = {"fastdin": ours, "deepctr": theirs}
    steps = {}
    for mode in ("inference", "training"):
        for name, module in modules.items():
            if mode == "inference":
                def step(module=module):
                    with torch.no_grad():
                        module(query, keys, lengths)
            else:
                q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
                params = [q, k] + list(module.parameters())

                def step(module=module, q=q, k=k, params=params):
                    torch.autograd.grad((module(q, k, lengths) * grad_out).sum(), params)
            steps[(mode, name)] = step
    return steps, lengths, err


def deepctr_din(args):
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN as DeepCTRDIN

    E, T = args.dim // 2, args.seq_len
    columns = [
        SparseFeat("item", args.items, embedding_dim=E), SparseFeat("category", args.categories, embedding_dim=E),
        VarLenSparseFeat(SparseFeat("hist_item", args.items, embedding_dim=E, embedding_name="item"), maxlen=T,
                         length_name="seq_length"),
        VarLenSparseFeat(SparseFeat("hist_category", args.categories, embedding_dim=E, embedding_name="category"),
                         maxlen=T, length_name="seq_length"),
    ]
    return DeepCTRDIN(columns, ["item", "category"], dnn_hidden_units=(200, 80), dnn_activation="relu",
                      att_hidden_size=tuple(args.hidden), att_activation="sigmoid", device="cpu")


def din_steps(args, lengths_kind: str, generator: torch.Generator):
    B, T = args.batch, args.seq_len
    lengths = draw_lengths(lengths_kind, B, T, generator)
    valid = torch.arange(T) < lengths.unsqueeze(1)
    batch = {
        "item": torch.randint(1, args.items, (B,), generator=generator),
        "category": torch.randint(1, args.categories, (B,), generator=generator),
        "hist_items": torch.randint(1, args.items, (B, T), generator=generator) * valid,
        "hist_categories": torch.randint(1, args.categories, (B, T), generator=generator) * valid,
        "lengths": lengths,
    }
    labels = torch.randint(0, 2, (B,), generator=generator).float()
    ours = DIN(args.items, args.categories, embed_dim=args.dim // 2, attention_hidden=args.hidden,
               mlp_hidden=(200, 80), mlp_activation="relu", backend="torch")
    theirs = deepctr_din(args)
    index = theirs.feature_index  # DeepCTR-Torch takes one float tensor of all features, by column ranges
    x = torch.zeros(B, max(end for _, end in index.values()))
    for name, value in (("item", batch["item"][:, None]), ("category", batch["category"][:, None]),
                        ("hist_item", batch["hist_items"]), ("hist_category", batch["hist_categories"]),
                        ("seq_length", lengths[:, None])):
        start, end = index[name]
        x[:, start:end] = value.float()
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-3)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-3)

    def step_ours():
        loss = F.binary_cross_entropy_with_logits(ours(batch), labels)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_theirs():
        loss = F.binary_cross_entropy(theirs(x).squeeze(-1), labels)
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()

    return {("training", "fastdin"): step_ours, ("training", "deepctr"): step_theirs}, lengths


def summarize(timings, measure, lengths_kind, lengths, args, common, err=None):
    rows = []
    for clock, times in zip(("wall", "cpu"), timings):
        rows += _summarize_clock(clock, times, measure, lengths_kind, lengths, args, common, err)
    return rows


def _summarize_clock(clock, times, measure, lengths_kind, lengths, args, common, err):
    rows = []
    for mode in sorted({mode for mode, _ in times}):
        ratios = [d / f for d, f in zip(times[(mode, "deepctr")], times[(mode, "fastdin")])]
        for impl in ("fastdin", "deepctr"):
            p25, med, p75 = quantiles([1e3 * t for t in times[(mode, impl)]])
            row = dict(common, clock=clock, measure=measure, lengths=lengths_kind, mean_length=round(lengths.float().mean().item(), 2),
                       batch=args.batch, seq_len=args.seq_len, dim=args.dim, hidden="/".join(map(str, args.hidden)),
                       mode=mode, impl=impl, median_ms=round(med, 4), p25_ms=round(p25, 4), p75_ms=round(p75, 4),
                       repeats=args.repeats, iters=args.iters, rel_err=None if err is None else f"{err:.1e}")
            if impl == "fastdin":
                r25, rmed, r75 = quantiles(ratios)
                row.update(speedup_vs_deepctr=round(rmed, 3), speedup_p25=round(r25, 3), speedup_p75=round(r75, 3))
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--dim", type=int, default=32, help="behaviour dim D (DIN: 2 x embedding dim)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[80, 40])
    parser.add_argument("--items", type=int, default=10_001)
    parser.add_argument("--categories", type=int, default=101)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats (medians over these)")
    parser.add_argument("--iters", type=int, default=5, help="calls per implementation per repeat")
    parser.add_argument("--measures", nargs="+", default=["layer", "din"], choices=["layer", "din"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=os.path.join(RESULTS, "cpu_attention.csv"))
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import deepctr_torch

    common = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device_name=device_name(torch.device("cpu")), torch=torch.__version__, deepctr_torch=deepctr_torch.__version__,
                  threads=torch.get_num_threads(), load_avg_1min=round(os.getloadavg()[0], 2))
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for lengths_kind in ("uniform", "skewed"):
        if "layer" in args.measures:
            steps, lengths, err = layer_steps(args, lengths_kind, generator)
            rows += summarize(interleaved_times(steps, args.repeats, args.iters, warmup=2), "layer", lengths_kind, lengths, args,
                              common, err)
        if "din" in args.measures:
            steps, lengths = din_steps(args, lengths_kind, generator)
            rows += summarize(interleaved_times(steps, args.repeats, args.iters, warmup=2), "din_step", lengths_kind, lengths, args,
                              common)
    shown = ["clock", "measure", "lengths", "mean_length", "mode", "impl", "median_ms", "p25_ms", "p75_ms",
             "speedup_vs_deepctr", "speedup_p25", "speedup_p75", "rel_err"]
    widths = {c: max(len(c), *(len(report.fmt(r.get(c))) for r in rows)) for c in shown}
    print("  ".join(c.ljust(widths[c]) for c in shown))
    for r in rows:
        print("  ".join(report.fmt(r.get(c)).ljust(widths[c]) for c in shown))
    if not args.no_csv:
        report.append_csv(args.csv, rows, COLUMNS)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
