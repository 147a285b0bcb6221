"""The data-file parts of the command line: `fastdin train --data FORMAT --path PATH`, `fastdin evaluate`,
`fastdin predict` (registered in fastdin.cli)."""
import argparse
import json
from pathlib import Path

import torch

from fastdin.data import FORMATS
from fastdin.data.errors import DataFileError

DATA_FORMATS = ("synthetic",) + FORMATS


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The `fastdin train` flags for data files."""
    g = p.add_argument_group("data files (see fastdin.data for each format's files and protocol)")
    g.add_argument("--data", choices=DATA_FORMATS, default="synthetic",
                   help="synthetic: the planted-interest generator; else the format of --path")
    g.add_argument("--path", type=Path, help="the data file or folder of --data")
    g.add_argument("--schema", type=Path, metavar="FILE", help="for --data csv: the column map (JSON or YAML)")
    g.add_argument("--valid-fraction", type=_fraction, default=0.1,
                   help="share of the training users held out for validation (unless the files bring valid rows)")
    g.add_argument("--patience", type=_positive, metavar="N",
                   help="stop after N epochs without a better validation AUC (None: run every epoch)")
    g.add_argument("--max-len", type=_positive, metavar="T", help="keep the last T behaviours of each history "
                   "(None: the format's own, 100; taobao 200; amazon all)")
    g.add_argument("--resume", type=Path, metavar="CKPT", help="continue from a checkpoint written by --save")


def _check_out(parser, flag: str, path) -> None:
    if path is not None and not path.parent.is_dir():
        parser.error(f"{flag} {path}: the folder {path.parent} does not exist")


def run_train_files(args: argparse.Namespace, device: torch.device) -> int:
    from fastdin.workflow import loader_options, train_on_files

    if args.path is None:
        args.parser.error(f"--data {args.data} needs --path")
    for flag, value in (("--mba-lambda", args.mba_lambda), ("--l2", args.l2), ("--user-features", args.user_features)):
        if value:  # synthetic-only flags: refused rather than silently ignored
            args.parser.error(f"{flag} is for the synthetic data; it does not combine with --data {args.data} yet")
    for flag, path in (("--save", args.save), ("--metrics-out", args.metrics_out)):
        _check_out(args.parser, flag, path)
    try:
        options = loader_options(args.data, args.schema, seed=args.seed, max_len=args.max_len)
        model_kwargs = dict(embed_dim=args.embed_dim, pooling=args.pooling, backend=args.backend,
                            sparse_embeddings=args.sparse_embeddings)
        out = train_on_files(args.data, args.path, options=options, model_kwargs=model_kwargs, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                             valid_fraction=args.valid_fraction, patience=args.patience, seed=args.seed,
                             save=args.save, resume=args.resume, device=device, threads=args.threads,
                             progress=not args.no_progress)
    except (DataFileError, FileNotFoundError, ValueError) as error:
        print(f"fastdin train: {error}")
        return 2
    metrics = out["metrics"]
    print(f"best epoch {metrics['best_epoch']}: validation AUC {metrics['valid_auc']:.4f}")
    if "test" in metrics:
        _print_metrics("test", metrics["test"])
    if args.save is not None:
        print(f"saved the best epoch's model to {args.save}")
    if args.metrics_out is not None:
        args.metrics_out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote the metrics to {args.metrics_out}")
    return 0


def _print_metrics(split: str, metrics) -> None:
    gauc = f", GAUC {metrics['gauc']:.4f}" if "gauc" in metrics else ""
    print(f"{split}: AUC {metrics['auc']:.4f}{gauc}, logloss {metrics['logloss']:.4f} ({metrics['rows']} rows)")


def _add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="a model saved by fastdin train --save")
    p.add_argument("--data", choices=FORMATS, help="the format of --path (default: the one the model was trained on)")
    p.add_argument("--path", type=Path, required=True, help="the data file or folder")
    p.add_argument("--schema", type=Path, metavar="FILE", help="for --data csv: the column map (default: the training one)")
    p.add_argument("--split", choices=("test", "train", "valid", "all"), default="test",
                   help="which rows of the format's protocol (a single csv file has only 'all')")
    p.add_argument("--batch-size", type=_positive, default=4096)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_positive, default=1, help="CPU threads for torch")


def _loaded(args):
    from fastdin.workflow import checkpoint_data

    torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine (try --device cpu)")
    model, loaded = checkpoint_data(args.checkpoint, args.path, args.data, args.schema)
    split = args.split
    if split == "test" and loaded.test is None:
        split = "all"  # one file: all its rows
    return model.to(args.device), loaded, loaded.split(split), split


def _score_rows(args, command: str, score):
    """(loaded, rows, split, score(model, rows)) for the checkpoint and files; None after a one-line error."""
    try:
        model, loaded, rows, split = _loaded(args)
        return loaded, rows, split, score(model, rows, batch_size=args.batch_size, device=args.device)
    except (DataFileError, FileNotFoundError, ValueError) as error:
        print(f"fastdin {command}: {error}")
        return None


def add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="AUC, GAUC and logloss of a saved model on data files",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_checkpoint_arguments(p)
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the metrics as JSON")
    p.set_defaults(run=run_evaluate, parser=p)


def run_evaluate(args: argparse.Namespace) -> int:
    from fastdin.evaluate import evaluate

    _check_out(args.parser, "--out", args.out)
    done = _score_rows(args, "evaluate", evaluate)
    if done is None:
        return 2
    _, _, split, metrics = done
    _print_metrics(split, metrics)
    if args.out is not None:
        args.out.write_text(json.dumps({"split": split, **metrics}, indent=2) + "\n")
        print(f"wrote the metrics to {args.out}")
    return 0


def add_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="click probabilities of a saved model for the rows of data files",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_checkpoint_arguments(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="scores.csv or scores.parquet: user, candidate fields, label, score per row")
    p.set_defaults(run=run_predict, parser=p)


def run_predict(args: argparse.Namespace) -> int:
    from fastdin.evaluate import predict
    from fastdin.workflow import score_table, write_scores

    _check_out(args.parser, "--out", args.out)
    if args.out.suffix.lower() not in (".csv", ".parquet", ".pq"):
        args.parser.error(f"--out must end in .csv or .parquet, got {args.out}")
    done = _score_rows(args, "predict", predict)
    if done is None:
        return 2
    loaded, rows, split, scores = done
    write_scores(score_table(loaded, rows, scores), args.out)
    print(f"wrote {len(scores)} scores ({split} rows) to {args.out}")
    return 0
