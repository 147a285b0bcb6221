"""Does mini-batch aware regularization curb overfitting? No regularization vs MBA vs full-table L2.

The DIN paper (section 4.1, figure 4) shows that without regularization the test logloss of DIN
rises after the first epoch, as the embeddings of rare ids memorise their few training samples, and
that MBA keeps it down. This script builds that situation from `fastdin.data`'s synthetic clicks:
a large item vocabulary (100 categories x 300 items, Zipf popularity, so most ids are rare), few
training rows (30,000), several epochs. Item ids carry no signal beyond their category, so anything
an item embedding learns beyond its category is memorised noise.

Every variant trains the same model from the same initialisation on the same rows (same seed);
only the regularizer differs: none, MBA for each lambda of --mba-lambdas (the id frequencies are
counted in one pass over the training rows first) and full-table L2 for each of --l2-lambdas. It
prints the test logloss and AUC after every epoch and appends one row per variant and epoch to
bench/results/mba_overfit_<cpu|cuda>.csv, with the CPU/GPU name, torch version, date and command.

    python bench/mba_overfit.py          # about 2 minutes on one CPU thread
"""
import argparse
import datetime
import os
import shlex
import sys
import time

import torch

from fastdin.bench.measure import device_name
from fastdin.data import SyntheticConfig, SyntheticDIN
from fastdin.model import DIN
from fastdin.bench import report
from fastdin.regularization import FullL2Regularizer, MBARegularizer
from fastdin.train import OPTIMIZERS, auto_device, train

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ["date", "device", "device_name", "torch", "command", "seed", "num_items", "train_size", "test_size",
           "batch_size", "optimizer", "lr", "embed_dim", "variant", "lambda", "epoch", "train_loss",
           "test_logloss", "test_auc", "wall_s"]
TEST_BATCH_SIZE = 1024


def lambdas(text: str):
    values = [float(v) for v in text.split(",") if v.strip()]
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"lambdas must be positive numbers, got {text}")
    return values


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mba-lambdas", type=lambdas, default=[0.3, 1.0, 3.0], help="comma-separated")
    parser.add_argument("--l2-lambdas", type=lambdas, default=[1e-3, 1e-2], help="comma-separated")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=30_000)
    parser.add_argument("--test-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-categories", type=int, default=100)
    parser.add_argument("--items-per-category", type=int, default=300)
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--csv", default=None, help="default bench/results/mba_overfit_<device>.csv")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = auto_device() if args.device is None else torch.device(args.device)
    data = SyntheticDIN(SyntheticConfig(num_categories=args.num_categories,
                                        items_per_category=args.items_per_category,
                                        max_history=args.max_history, seed=args.seed))
    train_rows = data.stream("train", args.train_size, args.batch_size)
    test_rows = data.stream("test", args.test_size, TEST_BATCH_SIZE)
    variants = ([("none", None)] + [("mba", lam) for lam in args.mba_lambdas]
                + [("l2", lam) for lam in args.l2_lambdas])
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    common = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "command": command, "seed": args.seed, "num_items": data.num_items - 1, "train_size": args.train_size,
        "test_size": args.test_size, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
        "embed_dim": args.embed_dim,
    }
    print(f"{common['device_name']}, torch {torch.__version__}: {data.num_items - 1} items, "
          f"{args.train_size} train rows x {args.epochs} epochs, {args.test_size} test rows, "
          f"{args.optimizer} lr {args.lr}", flush=True)

    rows = []
    for variant, lam in variants:
        torch.manual_seed(args.seed)  # the same initialisation for every variant
        model = DIN(**data.vocab_sizes(), embed_dim=args.embed_dim)
        start = time.perf_counter()
        if variant == "mba":
            regularizer = MBARegularizer.from_batches(model, train_rows, lam)
        elif variant == "l2":
            regularizer = FullL2Regularizer(model.embedding_tables(), lam)
        else:
            regularizer = None
        result = train(model, train_rows, test_rows, epochs=args.epochs, lr=args.lr, device=device,
                       optimizer=args.optimizer, after_backward=regularizer, progress=False, log=None)
        wall = time.perf_counter() - start
        for epoch in result["epochs"]:
            rows.append({**common, "variant": variant, "lambda": "" if lam is None else lam,
                         "epoch": epoch["epoch"], "train_loss": round(epoch["train_loss"], 5),
                         "test_logloss": round(epoch["test_logloss"], 5), "test_auc": round(epoch["test_auc"], 5),
                         "wall_s": round(wall, 1)})
        label = variant if lam is None else f"{variant} {lam:g}"
        print(f"  {label:<10} test logloss " + "  ".join(f"{r['test_logloss']:.4f}" for r in rows[-args.epochs:])
              + f"   ({wall:.0f} s)", flush=True)

    print_table(rows, args.epochs)
    path = args.csv or os.path.join(RESULTS, f"mba_overfit_{device.type}.csv")
    report.append_csv(path, rows, COLUMNS)
    print(f"appended {len(rows)} rows to {path}")


def print_table(rows, epochs):
    """Test logloss (AUC) per variant and epoch; then, per epoch, whether each MBA run beats none."""
    labels = list(dict.fromkeys((r["variant"], r["lambda"]) for r in rows))
    at = {(r["variant"], r["lambda"], r["epoch"]): r for r in rows}
    print("\ntest logloss (test AUC) after each epoch")
    print(f"{'variant':<12}" + "".join(f"{'epoch ' + str(e):>18}" for e in range(1, epochs + 1)))
    for variant, lam in labels:
        cells = [f"{at[variant, lam, e]['test_logloss']:.4f} ({at[variant, lam, e]['test_auc']:.3f})"
                 for e in range(1, epochs + 1)]
        name = variant if lam == "" else f"{variant} {lam:g}"
        print(f"{name:<12}" + "".join(f"{c:>18}" for c in cells))
    for variant, lam in labels:
        if variant == "mba":
            better = [e for e in range(1, epochs + 1)
                      if at[variant, lam, e]["test_logloss"] < at["none", "", e]["test_logloss"]]
            print(f"MBA lambda {lam:g} has a lower test logloss than no regularization at epochs {better or 'none'}")


if __name__ == "__main__":
    main()
