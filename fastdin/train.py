"""The training loop: Adam on binary cross-entropy, test AUC and logloss after each epoch."""
import math
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from torch import Tensor, nn
from tqdm.auto import tqdm

Batch = Mapping[str, Tensor]


def auto_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer of `train`; the one place to change it (e.g. for sparse embedding gradients)."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def to_device(batch: Batch, device: torch.device) -> Dict[str, Tensor]:
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> Dict[str, float]:
    """AUC and logloss of the model's click probabilities on `batches`."""
    was_training = model.training
    model.eval()
    labels, probs = [], []
    for batch in batches:
        batch = to_device(batch, device)
        probs.append(torch.sigmoid(model(batch)).float().cpu())
        labels.append(batch["label"].cpu())
    model.train(was_training)
    y, p = torch.cat(labels).numpy(), torch.cat(probs).numpy().astype(np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("the test data must hold both labels to compute an AUC")
    return {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, p, labels=[0, 1]))}


def train(
    model: nn.Module,
    train_batches: Iterable[Batch],
    test_batches: Iterable[Batch],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    device: Union[str, torch.device, None] = None,
    after_backward: Optional[Callable[[nn.Module, Batch], None]] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = print,
) -> Dict[str, object]:
    """Train `model` and evaluate it on the test batches after every epoch.

    train_batches and test_batches must be re-iterable (a list, or `SyntheticDIN.stream`). Each
    batch is a dict of tensors with a float "label"; the model maps a batch to logits.
    after_backward(model, batch) runs after `loss.backward()` and before the optimizer step, with
    the batch on the device (e.g. to add a regularizer's gradient).

    Returns {"test_auc", "test_logloss": after the last epoch, "train_loss": the mean loss of each
    epoch, "epochs": per epoch {"epoch", "train_loss", "test_auc", "test_logloss"},
    "wall_time_s", "device"}.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    device = auto_device() if device is None else torch.device(device)
    model.to(device)
    optimizer = make_optimizer(model, lr)
    per_epoch: List[Dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum, rows = 0.0, 0
        bar = tqdm(train_batches, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            batch = to_device(batch, device)
            loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model, batch)
            optimizer.step()
            # .item() syncs with the GPU; once per step is cheap next to a DIN step
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the training loss became {loss_value} in epoch {epoch}")
            loss_sum += loss_value * len(batch["label"])
            rows += len(batch["label"])
            bar.set_postfix(loss=f"{loss_sum / rows:.4f}", refresh=False)  # tqdm redraws at its own pace
        metrics = evaluate(model, test_batches, device)
        per_epoch.append({"epoch": epoch, "train_loss": loss_sum / rows,
                          "test_auc": metrics["auc"], "test_logloss": metrics["logloss"]})
        if log is not None:
            log(f"epoch {epoch}/{epochs}: train loss {loss_sum / rows:.4f}, "
                f"test AUC {metrics['auc']:.4f}, test logloss {metrics['logloss']:.4f}")
    return {
        "test_auc": per_epoch[-1]["test_auc"],
        "test_logloss": per_epoch[-1]["test_logloss"],
        "train_loss": [e["train_loss"] for e in per_epoch],
        "epochs": per_epoch,
        "wall_time_s": time.perf_counter() - start,
        "device": str(device),
    }
