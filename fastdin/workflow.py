"""Train, evaluate and score DIN on data files: what `fastdin train/evaluate/predict --data ...` run.

A checkpoint (`torch.save`d dict, read back by `DIN.from_checkpoint`) holds the model's state dict
and config, the vocabulary, how the data was loaded ({"format", "options"}: the loader's options,
with the column map for "csv"), the epoch, the optimizers' states and the validation AUC of that
epoch. `fastdin train --save` writes it at the best epoch by validation AUC; `--resume` continues
from it with the same vocabulary and split.
"""
import dataclasses
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from fastdin import data as fdata
from fastdin.data.columns import ColumnMap
from fastdin.data.samples import LoadedData, Samples
from fastdin.data.vocabulary import Vocabulary
from fastdin.evaluate import evaluate, predict
from fastdin.model import DIN
from fastdin.train import train

CHECKPOINT_VERSION = 1


def loader_options(fmt: str, schema: Optional[Union[str, Path]] = None, **options) -> Dict[str, object]:
    """The options a loader gets (None values dropped), with a csv column map read into a dict."""
    out = {k: v for k, v in options.items() if v is not None}
    if fmt == "csv":
        if schema is None:
            raise ValueError("--data csv needs --schema FILE: the column map (see fastdin.data.columns)")
        out["schema"] = dataclasses.asdict(ColumnMap.from_file(schema))
    elif schema is not None:
        raise ValueError(f"--schema is for --data csv; the {fmt} format brings its own columns")
    return out


def load_data(fmt: str, path: Union[str, Path], options: Dict[str, object],
              vocabulary: Optional[Vocabulary] = None) -> LoadedData:
    return fdata.load(fmt, path, vocabulary=vocabulary, **options)


def split_validation(loaded: LoadedData, fraction: float, seed: int):
    """(train, validation): the files' own validation rows, or a random `fraction` of the training users."""
    if loaded.train is None:
        raise ValueError(f"the {loaded.format} data has no training rows")
    if loaded.valid is not None:
        train, valid = loaded.train, loaded.valid
    else:
        train, valid = loaded.train.split_users(fraction, seed)
    if len(train) < 2:
        raise ValueError(f"{len(train)} training rows are left after holding out the validation users; "
                         f"lower --valid-fraction (now {fraction})")
    if len(np.unique(valid.labels)) < 2:
        raise ValueError(f"the {len(valid)} validation rows hold only one label, so they give no AUC; "
                         f"raise --valid-fraction (now {fraction}) or give the files a valid split")
    return train, valid


def train_on_files(fmt: str, path: Union[str, Path], *, options: Dict[str, object], model_kwargs: Dict[str, object],
                   epochs: int, batch_size: int, lr: float, optimizer: str = "adam", valid_fraction: float = 0.1,
                   patience: Optional[int] = None, seed: int = 0, save: Optional[Path] = None,
                   resume: Optional[Path] = None, device=None, threads="auto", progress: bool = True,
                   log=print) -> Dict[str, object]:
    """Train DIN on a data set with early stopping on validation AUC; test metrics of the best epoch."""
    previous = torch.load(resume, map_location="cpu", weights_only=True) if resume is not None else None
    vocabulary = Vocabulary.from_dict(previous["vocabulary"]) if previous is not None else None
    if previous is not None:
        fmt, options = previous["data"]["format"], previous["data"]["options"]
    loaded = load_data(fmt, path, options, vocabulary)
    train_rows, valid_rows = split_validation(loaded, valid_fraction, seed)
    if previous is not None:
        model = DIN.from_checkpoint(previous)
    else:
        schema = loaded.schema
        if fmt != "csv" and "embed_dim" in model_kwargs:
            schema = dataclasses.replace(schema, embed_dim=model_kwargs["embed_dim"])
        torch.manual_seed(seed)
        model = DIN(schema=schema, **{k: v for k, v in model_kwargs.items() if k != "embed_dim"})
    model.vocabulary = loaded.vocabulary.to_dict()
    if log:
        log(f"{fmt} {path}: {len(train_rows)} train rows, {len(valid_rows)} validation rows, "
            f"{0 if loaded.test is None else len(loaded.test)} test rows; vocabulary {loaded.vocabulary}")
    best = {"auc": previous["valid_auc"] if previous is not None else -np.inf,
            "epoch": previous["epoch"] if previous is not None else 0, "state": None}
    waited = [0]

    def on_epoch(record, model, optimizers) -> bool:
        if record["test_auc"] > best["auc"]:
            best.update(auc=record["test_auc"], epoch=record["epoch"],
                        state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            waited[0] = 0
            if save is not None:
                torch.save(model.checkpoint(
                    data={"format": fmt, "options": options}, epoch=record["epoch"], valid_auc=record["test_auc"],
                    optimizer_state=[o.state_dict() for o in optimizers], version=CHECKPOINT_VERSION), save)
        else:
            waited[0] += 1
        return patience is not None and waited[0] >= patience

    start_epoch = previous["epoch"] + 1 if previous is not None else 1
    if start_epoch > epochs:
        raise ValueError(f"the checkpoint is at epoch {start_epoch - 1}; --epochs {epochs} leaves nothing to resume")
    history = train(model, train_rows.batches(batch_size, shuffle=True, seed=seed), valid_rows.batches(4096),
                    epochs=epochs, lr=lr, optimizer=optimizer, device=device, progress=progress, log=log,
                    threads=threads, on_epoch=on_epoch, start_epoch=start_epoch,
                    optimizer_state=previous.get("optimizer_state") if previous is not None else None,
                    eval_name="validation")
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    result = {"best_epoch": best["epoch"], "valid_auc": best["auc"], "epochs": history["epochs"],
              "wall_time_s": history["wall_time_s"], "device": history["device"], "format": fmt,
              "train_rows": len(train_rows), "valid_rows": len(valid_rows)}
    if loaded.test is not None:
        result["test"] = evaluate(model, loaded.test, device=device)
    return {"model": model, "metrics": result}


def checkpoint_data(checkpoint: Union[str, Path], path: Union[str, Path], fmt: Optional[str] = None,
                    schema: Optional[Union[str, Path]] = None, options: Optional[Dict[str, object]] = None):
    """(model, loaded data) for a checkpoint and a data path, encoded with the checkpoint's vocabulary.

    The format and loader options default to those the model was trained with (same seed, hence the same
    protocol split); a csv column map may be given anew with `schema`.
    """
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = DIN.from_checkpoint(saved)
    data = saved.get("data", {})
    fmt = fmt or data.get("format")
    if fmt is None:
        raise ValueError(f"{checkpoint}: the checkpoint does not say its data format; pass --data FORMAT")
    opts = dict(data.get("options", {})) if fmt == data.get("format") else {}
    opts.update(options or {})
    if schema is not None:
        opts.update(loader_options(fmt, schema))
    vocabulary = Vocabulary.from_dict(saved["vocabulary"]) if saved.get("vocabulary") else None
    if vocabulary is None:
        raise ValueError(f"{checkpoint}: the checkpoint holds no vocabulary, so file ids cannot be encoded as in training")
    return model, load_data(fmt, path, opts, vocabulary)


def score_table(loaded: LoadedData, rows: Samples, scores: np.ndarray):
    """A DataFrame: user, the candidate fields' tokens, label, score, one line per row in order."""
    import pandas as pd

    out = {}
    if loaded.user_names is not None and "user" in loaded.user_names:
        out["user"] = loaded.user_names.decode("user", rows.users)
    for name, ids in rows.candidates.items():
        out[name] = loaded.vocabulary.decode(name, ids) if name in loaded.vocabulary else ids
    out["label"] = rows.labels
    out["score"] = scores
    return pd.DataFrame(out)


def write_scores(frame, out: Path) -> None:
    if out.suffix.lower() in (".parquet", ".pq"):
        frame.to_parquet(out, index=False)
    elif out.suffix.lower() == ".csv":
        frame.to_csv(out, index=False)
    else:
        raise ValueError(f"--out must end in .csv or .parquet, got {out}")


__all__ = ["checkpoint_data", "evaluate", "predict", "score_table", "train_on_files", "write_scores"]
