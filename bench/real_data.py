"""DIN against the sum-pooling BaseModel on real data: MovieLens-100k (RecBole's atomic files).

The ml-100k files ship in the recbole 1.2.1 wheel under recbole/dataset_example/ml-100k/; by
default this script fetches that wheel with `pip download --no-deps` (into --cache) and unpacks
the two files it needs. Or pass --path: a folder with ml-100k.inter/.item, a GroupLens ml-100k
folder (u.data, u.item), or any --data format fastdin loads.

Protocol (fastdin.data.movielens): rating >= 4 is a click, each rating is a row whose history is the
user's earlier liked movies (by time, last 100), the category is the first genre; a random 27.8% of
the users are the test users (the DIN paper's 38,493 of 138,493), and 10% of the training users are
held out for validation. Every variant trains from the same seed on the same rows for --epochs
epochs; the test metrics are those of the epoch with the best validation AUC.

Variants (the DIN paper's table 3 rows): basemodel (sum pooling, PReLU MLP), din (attention, PReLU
MLP), din-dice (attention, Dice MLP). It prints AUC, GAUC, logloss and wall time and appends a row
per variant to bench/results/real_data_<data>_<cpu|cuda>.csv.

    python bench/real_data.py                         # ml-100k, about 10 minutes on one CPU thread
    python bench/real_data.py --data movielens --path ml-20m --epochs 2 --batch-size 1024
"""
import argparse
import datetime
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from fastdin.bench import report
from fastdin.bench.measure import device_name
from fastdin.data import FORMATS
from fastdin.train import auto_device
from fastdin.workflow import train_on_files

RESULTS = Path(__file__).resolve().parent / "results"
WHEEL = "recbole==1.2.1"
MEMBERS = ("recbole/dataset_example/ml-100k/ml-100k.inter", "recbole/dataset_example/ml-100k/ml-100k.item")
VARIANTS = {
    "basemodel": {"pooling": "sum", "mlp_activation": "prelu"},
    "din": {"pooling": "attention", "mlp_activation": "prelu"},
    "din-dice": {"pooling": "attention", "mlp_activation": "dice"},
}
COLUMNS = ["date", "device", "device_name", "torch", "command", "data", "path", "seed", "epochs", "batch_size", "lr",
           "embed_dim", "variant", "best_epoch", "valid_auc", "test_auc", "test_gauc", "test_logloss", "test_rows",
           "train_rows", "wall_s"]


def fetch_ml100k(cache: Path) -> Path:
    """The ml-100k atomic files from the recbole wheel (downloaded once with pip into cache)."""
    folder = cache / "ml-100k"
    if all((folder / Path(m).name).is_file() for m in MEMBERS):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(cache), "-q"], check=True)
        wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in MEMBERS:
            (folder / Path(member).name).write_bytes(wheel.read(member))
    return folder


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=FORMATS, default="recbole")
    p.add_argument("--path", type=Path, help="the data folder (default: ml-100k from the recbole wheel)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fastdin", help="where the wheel goes")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ",".join(VARIANTS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embed-dim", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    device = auto_device() if args.device == "auto" else torch.device(args.device)
    path = args.path if args.path is not None else fetch_ml100k(args.cache)
    name = "ml-100k" if args.path is None else path.name
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    rows = []
    for variant in variants:
        out = train_on_files(
            args.data, path, options={"seed": args.seed},
            model_kwargs=dict(embed_dim=args.embed_dim, **VARIANTS[variant]), epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device, threads=args.threads,
            progress=False, log=lambda line, v=variant: print(f"[{v}] {line}", flush=True))
        m = out["metrics"]
        test = m["test"]
        print(f"[{variant}] best epoch {m['best_epoch']}: test AUC {test['auc']:.4f}, GAUC {test['gauc']:.4f}, "
              f"logloss {test['logloss']:.4f}, {m['wall_time_s']:.0f} s", flush=True)
        rows.append({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "data": args.data, "path": name,
            "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "embed_dim": args.embed_dim, "variant": variant, "best_epoch": m["best_epoch"],
            "valid_auc": round(m["valid_auc"], 5), "test_auc": round(test["auc"], 5),
            "test_gauc": round(test["gauc"], 5), "test_logloss": round(test["logloss"], 5),
            "test_rows": test["rows"], "train_rows": m["train_rows"], "wall_s": float(f"{m['wall_time_s']:.3g}"),
        })
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_path = args.out_dir / f"real_data_{name}_{device.type}.csv"
    report.append_csv(str(out_path), rows, COLUMNS)
    print(f"appended {len(rows)} rows to {out_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
