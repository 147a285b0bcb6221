"""Scoring rows with a trained DIN: `predict` (click probabilities) and `evaluate` (AUC, GAUC, logloss).

```python
from fastdin import DIN
from fastdin.data import Vocabulary, load
from fastdin.evaluate import evaluate, predict

model = DIN.from_checkpoint("model.pt")               # written by `fastdin train --save model.pt`
data = load("movielens", "ml-1m", vocabulary=Vocabulary.from_dict(model.vocabulary))
print(evaluate(model, data.test))                     # {"auc", "gauc", "logloss", "rows", "users"}
scores = predict(model, data.test)                    # numpy [N], in the rows' order
```

Both take `Samples` (a loader's split) or any iterable of batches (a list, a torch DataLoader
yielding dicts); GAUC needs the user of each row, which `Samples` carry (batches may carry a
"user" tensor).
"""
from typing import Dict, Iterable, Mapping, Union

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import Tensor, nn

from fastdin.data.samples import Samples

Batches = Union[Samples, Iterable[Mapping[str, Tensor]]]


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """The DIN paper's GAUC: per-user AUC weighted by the user's number of impressions (rows).

    Users whose rows all carry one label have no AUC and are left out, of the sum and of the weights,
    as in the DIN authors' code. Returns NaN when no user has both labels.
    """
    labels, scores, users = np.asarray(labels), np.asarray(scores, dtype=np.float64), np.asarray(users)
    if not len(labels) == len(scores) == len(users):
        raise ValueError(f"labels, scores and users must have one entry per row, got {len(labels)}, "
                         f"{len(scores)} and {len(users)}")
    order = np.argsort(users, kind="stable")
    users_sorted = users[order]
    bounds = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1], True])
    total, weight = 0.0, 0
    for begin, end in zip(bounds[:-1], bounds[1:]):
        y = labels[order[begin:end]]
        if y.min() == y.max():
            continue
        total += roc_auc_score(y, scores[order[begin:end]]) * (end - begin)
        weight += end - begin
    return total / weight if weight else float("nan")


def _batches(data: Batches, batch_size: int):
    return data.batches(batch_size) if isinstance(data, Samples) else data


@torch.no_grad()
def _score(model: nn.Module, data: Batches, batch_size: int, device, keep_labels: bool):
    """(probabilities, labels, users) in one pass over the batches (a shuffling DataLoader stays aligned)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, labels, users = [], [], []
    try:
        for batch in _batches(data, batch_size):
            probs.append(torch.sigmoid(model({k: v.to(device) for k, v in batch.items()})).double().cpu())
            if keep_labels:
                if "label" not in batch:
                    raise ValueError("evaluation needs a 'label' in every batch")
                labels.append(batch["label"].cpu().numpy())
                users.append(batch["user"].cpu().numpy() if "user" in batch else None)
    finally:
        model.train(was_training)
    probs = torch.cat(probs).numpy() if probs else np.zeros(0)
    if isinstance(data, Samples):
        return probs, data.labels, data.users
    users = None if not users or any(u is None for u in users) else np.concatenate(users)
    return probs, (np.concatenate(labels) if labels else np.zeros(0)), users


def predict(model: nn.Module, data: Batches, batch_size: int = 4096,
            device: Union[str, torch.device, None] = None) -> np.ndarray:
    """Click probabilities (float64 numpy [N]) of the model, in eval mode, in the order of the rows."""
    return _score(model, data, batch_size, device, keep_labels=False)[0]


def evaluate(model: nn.Module, data: Batches, batch_size: int = 4096,
             device: Union[str, torch.device, None] = None) -> Dict[str, float]:
    """{"auc", "gauc", "logloss", "rows", "users"} of the model on the rows (labels 0/1, both present).

    "gauc" and "users" only where the users of the rows are known.
    """
    probs, labels, users = _score(model, data, batch_size, device, keep_labels=True)
    if len(np.unique(labels)) < 2:
        raise ValueError("evaluation needs rows of both labels to compute an AUC")
    out = {"auc": float(roc_auc_score(labels, probs)), "logloss": float(log_loss(labels, probs, labels=[0, 1])),
           "rows": int(len(labels))}
    if users is not None:
        out["gauc"] = float(gauc(labels, probs, users))
        out["users"] = int(len(np.unique(users)))
    return out
