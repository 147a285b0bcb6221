"""The `fastdin` command line: `fastdin train`, `evaluate`, `predict`, `info`, `bench`, `export`.

Each subcommand is a function that adds its parser to the subparsers and sets `run` (a function
of the parsed args returning the exit code); add a new one to `SUBCOMMANDS`.
"""
import argparse
import json
import platform
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

import fastdin
from fastdin import cli_data, distributed, functional
from fastdin.data import SyntheticConfig, SyntheticDIN
from fastdin.layers import AttentionPooling
from fastdin.model import DIN, POOLINGS
from fastdin.regularization import FullL2Regularizer, MBARegularizer
from fastdin.train import OPTIMIZERS, auto_device, train


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# fastdin train

TEST_BATCH_SIZE = 1024  # fixed: a stream's rows depend on its batch size, and the test set must not


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train DIN on synthetic click data or data files (--data) and report test AUC and logloss",
        description="Train DIN on synthetic click data with planted user interests (fastdin.data; the defaults "
                    "take under a minute on a 2-core CPU), or on data files: --data FORMAT --path PATH.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pooling", choices=POOLINGS, default="attention",
                   help="attention: DIN; sum: the paper's BaseModel (sum of the history)")
    p.add_argument("--backend", choices=functional.BACKENDS, default="auto",
                   help="auto: Triton kernels on CUDA where they cover the case, else the fast PyTorch path "
                        "(torch; the reference for ops without one); reference: the plain ground truth")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--epochs", type=_positive_int, default=2, help="passes over the training rows")
    p.add_argument("--batch-size", type=_positive_int, default=256,
                   help="training rows per optimizer step (at least 2: Dice's batch statistics)")
    p.add_argument("--lr", type=_positive_float, default=3e-3,
                   help="learning rate (the default suits adam; give sgd and adagrad their own)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="sgd is plain SGD: with --mba-lambda, the paper's exact update")
    p.add_argument("--sparse-embeddings", action="store_true",
                   help="sparse embedding gradients (only the batch's rows); adam then uses SparseAdam for them")
    regularization = p.add_mutually_exclusive_group()
    regularization.add_argument(
        "--mba-lambda", type=_positive_float, metavar="L",
        help="mini-batch aware regularization of the embeddings (DIN paper, 4.1) with lambda L; the id "
             "frequencies are counted in one pass over the training rows first")
    regularization.add_argument("--l2", type=_positive_float, metavar="L",
                                help="plain L2 on the whole embedding tables, every step, with lambda L")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the model's initialisation")
    p.add_argument("--train-size", type=_positive_int, default=80_000, help="training rows per epoch")
    p.add_argument("--test-size", type=_positive_int, default=20_000, help="test rows")
    p.add_argument("--max-history", type=_positive_int, default=SyntheticConfig.max_history,
                   help="longest behaviour history T")
    p.add_argument("--user-features", action="store_true",
                   help="add a user profile id and a dense feature to each row (DIN's optional inputs)")
    p.add_argument("--embed-dim", type=_positive_int, default=16, help="size of the item and category embeddings")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU threads for torch; DIN's small per-batch ops gain little from more, "
                        "and on a busy machine more threads were measured to run several times slower")
    p.add_argument("--save", type=Path, metavar="PATH", help="save the model's state dict and config (torch.save)")
    p.add_argument("--metrics-out", type=Path, metavar="FILE", help="write the final metrics as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli_data.add_data_arguments(p)
    p.set_defaults(run=run_train, parser=p)


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "auto":
        return auto_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def run_train(args: argparse.Namespace) -> int:
    device = _device(args.parser, args.device)
    if args.data != "synthetic":
        return cli_data.run_train_files(args, device)
    for flag, path in (("--save", args.save), ("--metrics-out", args.metrics_out)):
        if path is not None and not path.parent.is_dir():  # fail now, not after the training
            args.parser.error(f"{flag} {path}: the folder {path.parent} does not exist")
    torch.set_num_threads(args.threads)
    if args.backend == "triton" and not functional.triton_runnable(device):
        args.parser.error(f"--backend triton needs a CUDA device and triton installed; the device is {device}")
    if args.l2 is not None and args.sparse_embeddings and args.optimizer == "adam":
        args.parser.error("--l2 makes the embedding gradients dense, which SparseAdam (adam with "
                          "--sparse-embeddings) cannot take; use --optimizer sgd or adagrad, or --mba-lambda")
    if args.batch_size < 2 or args.train_size < 2:
        args.parser.error("--batch-size and --train-size must be at least 2: Dice's batch statistics in "
                          "training need two rows per batch")
    train_size = args.train_size
    if train_size % args.batch_size == 1:
        train_size -= 1
        print(f"note: the last training batch would hold one row, which Dice's batch statistics cannot use: "
              f"training on {train_size} rows per epoch")
    ranks = None  # under torchrun (WORLD_SIZE > 1): this rank of the run (fastdin.distributed)
    if distributed.launched_by_torchrun():
        if args.mba_lambda is not None or args.sparse_embeddings:
            args.parser.error("under torchrun, --mba-lambda (each rank would regularize other rows after the "
                              "gradient all-reduce) and --sparse-embeddings are not supported")
        ranks = distributed.Context(device)
        device = ranks.device
    log = print if ranks is None or ranks.is_main else (lambda *_: None)
    data_config = SyntheticConfig(max_history=args.max_history, seed=args.seed, user_features=args.user_features)
    data = SyntheticDIN(data_config)
    model_config = dict(data.vocab_sizes(), embed_dim=args.embed_dim, pooling=args.pooling, backend=args.backend,
                        sparse_embeddings=args.sparse_embeddings)
    torch.manual_seed(args.seed)
    model = DIN(**model_config)
    train_stream = data.stream("train", train_size, args.batch_size)
    regularizer, regularization = None, {"regularizer": "none", "reg_lambda": None}
    if args.mba_lambda is not None:
        regularizer = MBARegularizer.from_batches(model, train_stream, args.mba_lambda, progress=not args.no_progress)
        regularization = {"regularizer": "mba", "reg_lambda": args.mba_lambda}
    elif args.l2 is not None:
        regularizer = FullL2Regularizer(model.embedding_tables(), args.l2)
        regularization = {"regularizer": "l2", "reg_lambda": args.l2}
    sparse = " (sparse embeddings)" if args.sparse_embeddings else ""
    lam = "" if regularizer is None else f" lambda {regularization['reg_lambda']:g}"
    if ranks is not None:
        model, train_stream = ranks.wrap(model), ranks.shard(train_stream)
    log(f"fastdin train: DIN pooling={args.pooling} backend={args.backend} device={device}, "
          f"{args.train_size} train rows x {args.epochs} epochs, {args.test_size} test rows, "
          f"optimizer {args.optimizer}{sparse}, regularizer {regularization['regularizer']}{lam}")
    try:
        metrics = train(
            model, train_stream, data.stream("test", args.test_size, TEST_BATCH_SIZE),
            epochs=args.epochs, lr=args.lr, device=device, optimizer=args.optimizer,
            after_backward=regularizer, progress=not args.no_progress and log is print, log=log,
            threads=args.threads,
        )
    except NotImplementedError as error:  # backend="triton" where no kernel covers the case
        args.parser.error(str(error))
    metrics.update(pooling=args.pooling, backend=args.backend, seed=args.seed, batch_size=args.batch_size,
                   user_features=args.user_features, train_size=args.train_size, test_size=args.test_size,
                   lr=args.lr, optimizer=args.optimizer, sparse_embeddings=args.sparse_embeddings, **regularization)
    if ranks is not None:
        metrics, model = ranks.reduce_metrics(metrics, model), distributed.unwrap(model)
        if not ranks.is_main:  # checkpoint and metrics come from rank 0 only
            ranks.close()
            return 0
    metrics.setdefault("world_size", 1)
    one_label = " (undefined: the test rows hold one label only)" if metrics["test_auc"] != metrics["test_auc"] else ""
    print(f"test AUC {metrics['test_auc']:.4f}{one_label}, test logloss {metrics['test_logloss']:.4f}, "
          f"wall time {metrics['wall_time_s']:.1f} s")
    if args.save is not None:
        checkpoint = {"state_dict": model.state_dict(), "model_config": model_config,
                      "data_config": vars(data_config), "regularization": regularization}
        if isinstance(regularizer, MBARegularizer):
            # n_j per table: rebuild with MBARegularizer(model.embedding_tables(), mba_counts, lam)
            checkpoint["mba_counts"] = {name: c.cpu() for name, c in regularizer.frequencies().items()}
        torch.save(checkpoint, args.save)
        print(f"saved the model to {args.save}")
    if args.metrics_out is not None:
        # an undefined AUC (nan) is written as null, which JSON has
        text = json.dumps(metrics, indent=2).replace("NaN", "null")
        args.metrics_out.write_text(text + "\n")
        print(f"wrote the metrics to {args.metrics_out}")
    if ranks is not None:
        ranks.close()
    return 0


# ---------------------------------------------------------------------------------------------
# fastdin info


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def _attention_case(activation: str, dtype: torch.dtype, device: torch.device):
    """A small AttentionPooling input set, to ask `attention_kernel_gap` about one case."""
    layer = AttentionPooling(8, (8,), activation).to(device=device, dtype=dtype)
    keys = torch.zeros(2, 3, 8, device=device, dtype=dtype)
    linears = list(layer.mlp.linears) + [layer.score]
    act_params = None
    if activation == "prelu":
        act_params = [a.weight for a in layer.mlp.activations]
    elif activation == "dice":
        act_params = [a.params() for a in layer.mlp.activations]
    return keys, [m.weight for m in linears], act_params


def _auto_choice(device: torch.device, gap: Optional[str], has_torch_path: bool = False,
                 slow_kernel: Optional[str] = None) -> str:
    chosen = functional.choose_backend("auto", device, gap, "info", has_torch_path=has_torch_path,
                                       slow_kernel=slow_kernel)
    if chosen == "triton":
        return "triton"
    if device.type != "cuda":
        return f"{chosen} (no CUDA device)"
    if not functional.HAS_TRITON:
        return f"{chosen} (triton is not installed)"
    return f"{chosen} ({gap or slow_kernel})"


def add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, GPU, and the backend that auto picks on this machine")
    p.set_defaults(run=run_info, parser=p)


def run_info(args: argparse.Namespace) -> int:
    print(f"fastdin {fastdin.__version__}")
    print(f"python  {platform.python_version()}")
    print(f"torch   {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton  {_version('triton')}")
    print(f"numpy   {np.__version__}")
    device = auto_device()
    print(f"GPU     {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'none'}")
    print(f"backend auto on {device} (FASTDIN_BACKEND={functional.default_backend()}):")
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        dtype_name = str(dtype).replace("torch.", "")
        for activation in functional.ACTIVATIONS:
            keys, weights, act_params = _attention_case(activation, dtype, device)
            gap = functional.attention_kernel_gap(keys, weights, activation, act_params)
            choice = _auto_choice(device, gap, True, functional.attention_slow_kernel(keys))
            print(f"  attention_pool {activation:<7} {dtype_name:<8}: {choice}")
        x = torch.zeros(4, 8, device=device, dtype=dtype)
        for training in (True, False):
            gap = functional.dice_kernel_gap(x, training)
            mode = "train" if training else "eval"
            print(f"  dice           {mode:<7} {dtype_name:<8}: {_auto_choice(device, gap)}")
    return 0


# ---------------------------------------------------------------------------------------------
# fastdin bench


def add_bench(subparsers) -> None:
    from fastdin.bench import suite  # imported here: matplotlib and the cases load only for `bench`

    p = subparsers.add_parser("bench", help="time fastdin against eager PyTorch, torch.compile and DeepCTR-Torch",
                              description=suite.__doc__)
    suite.add_arguments(p)
    p.set_defaults(run=suite.run, parser=p)


# ---------------------------------------------------------------------------------------------
# fastdin export


def add_export(subparsers) -> None:
    from fastdin.export import FORMATS

    p = subparsers.add_parser("export", help="export a checkpoint of `fastdin train --save` for serving",
                              description="Export a trained DIN (a checkpoint of `fastdin train --save`) as ONNX, "
                                          "a torch.export program, an AOTInductor package or a TorchScript trace "
                                          "(see fastdin.export).")
    p.add_argument("--checkpoint", type=Path, required=True, help="the file `fastdin train --save` wrote")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", type=Path, required=True, metavar="PATH",
                   help="the artefact to write (.onnx; .pt2 for torch-export and aoti)")
    p.set_defaults(run=run_export, parser=p)


def run_export(args: argparse.Namespace) -> int:
    from fastdin.export import export

    if not args.checkpoint.is_file():
        args.parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if not args.out.parent.is_dir():
        args.parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    saved = torch.load(args.checkpoint, map_location="cpu")
    if not isinstance(saved, dict) or not {"state_dict", "model_config"} <= set(saved):
        args.parser.error(f"--checkpoint {args.checkpoint}: not a checkpoint of `fastdin train --save` "
                          "(a dict with state_dict and model_config)")
    model = DIN(**saved["model_config"])
    model.load_state_dict(saved["state_dict"])
    example = None
    if "data_config" in saved:  # trace with the training data's own batch layout
        data_config = SyntheticConfig(**saved["data_config"])
        example = SyntheticDIN(data_config).batch("test", 0, data_config.max_history + 1)
    export(model, args.format, args.out, example)
    print(f"wrote {args.format} to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------

SUBCOMMANDS = [add_train, cli_data.add_evaluate, cli_data.add_predict, add_info, add_bench, add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdin", description=fastdin.__doc__)
    parser.add_argument("--version", action="version", version=f"fastdin {fastdin.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
