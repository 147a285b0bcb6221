"""The training loop: binary cross-entropy with Adam, SGD or Adagrad; test AUC and logloss after each epoch."""
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


OPTIMIZERS = ("adam", "sgd", "adagrad")


def make_optimizers(model: nn.Module, lr: float, name: str = "adam") -> List[torch.optim.Optimizer]:
    """The optimizers of `train`: one, or two for Adam with sparse embedding gradients.

    "sgd" is plain SGD (no momentum, no weight decay): with `MBARegularizer` it is the paper's exact
    update. SGD and Adagrad take sparse gradients (`nn.Embedding(sparse=True)`) as they are. Adam
    does not, so the weights of sparse embeddings go to `SparseAdam` and the rest to `Adam`; every
    gradient those weights receive must then stay sparse (`FullL2Regularizer` makes it dense).
    SparseAdam also differs from Adam in two details: a row absent from the batch does not move
    (Adam moves it by its momentum), and eps is added before the bias correction.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "sgd":
        return [torch.optim.SGD(model.parameters(), lr=lr)]
    if name == "adagrad":
        return [torch.optim.Adagrad(model.parameters(), lr=lr)]
    sparse = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse]
    optimizers = [torch.optim.Adam(dense, lr=lr)] if dense else []
    if sparse:
        optimizers.append(torch.optim.SparseAdam(list(sparse.values()), lr=lr))
    return optimizers


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
    optimizer: str = "adam",
    after_backward: Optional[Callable[[nn.Module, Batch], None]] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = print,
    threads: Union[int, str, None] = "auto",
    on_epoch: Optional[Callable[[Dict[str, float], nn.Module, List[torch.optim.Optimizer]], bool]] = None,
    start_epoch: int = 1,
    optimizer_state: Optional[List[dict]] = None,
    eval_name: str = "test",
) -> Dict[str, object]:
    """Train `model` and evaluate it on the test batches after every epoch.

    train_batches and test_batches must be re-iterable: a list, `SyntheticDIN.stream`,
    `fastdin.data.Samples.batches`, or a torch `DataLoader` whose batches are dicts of tensors (its
    default collate makes them from a Dataset of per-row dicts). Each batch has a float "label"; the
    model maps a batch to logits.

    threads: torch CPU threads while training. "auto" (the default) uses 1 on a CPU device and
    restores torch's setting afterwards: DIN's per-batch ops are small, and on a small or busy CPU
    more threads were seen to run several times slower (the CLI's `--threads` defaults to 1 for the
    same reason). An int sets that many; None leaves torch's setting alone.

    on_epoch(record, model, optimizers), if given, runs after each epoch's evaluation (record as in
    "epochs" below); returning True stops the training (early stopping). start_epoch and
    optimizer_state (the optimizers' state dicts) resume a run. eval_name names the
    evaluated batches in the log ("validation" when they are a validation split).
    after_backward(model, batch) runs after `loss.backward()` and before the optimizer step, with
    the batch on the device (e.g. to add a regularizer's gradient). optimizer: "adam", "sgd" or
    "adagrad" (see `make_optimizers`).

    Returns {"test_auc", "test_logloss": after the last epoch, "train_loss": the mean loss of each
    epoch, "epochs": per epoch {"epoch", "train_loss", "test_auc", "test_logloss"},
    "wall_time_s", "device"}.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if not 1 <= start_epoch <= epochs:
        raise ValueError(f"start_epoch must lie in [1, epochs] = [1, {epochs}], got {start_epoch}")
    device = auto_device() if device is None else torch.device(device)
    model.to(device)
    optimizers = make_optimizers(model, lr, optimizer)
    if optimizer_state is not None:
        if len(optimizer_state) != len(optimizers):
            raise ValueError(f"optimizer_state holds {len(optimizer_state)} states for {len(optimizers)} optimizers")
        for opt, state in zip(optimizers, optimizer_state):
            opt.load_state_dict(state)
    if threads == "auto":
        threads = 1 if device.type == "cpu" else None
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _train_epochs(model, train_batches, test_batches, epochs, device, optimizers, after_backward,
                             progress, log, on_epoch, start_epoch, eval_name)
    finally:
        torch.set_num_threads(previous_threads)


def _train_epochs(model, train_batches, test_batches, epochs, device, optimizers, after_backward, progress, log,
                  on_epoch, start_epoch, eval_name):
    per_epoch: List[Dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        loss_sum, rows = 0.0, 0
        bar = tqdm(train_batches, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            batch = to_device(batch, device)
            loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
            model.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model, batch)
            for opt in optimizers:
                opt.step()
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
                f"{eval_name} AUC {metrics['auc']:.4f}, {eval_name} logloss {metrics['logloss']:.4f}")
        if on_epoch is not None and on_epoch(per_epoch[-1], model, optimizers):
            break
    return {
        "test_auc": per_epoch[-1]["test_auc"],
        "test_logloss": per_epoch[-1]["test_logloss"],
        "train_loss": [e["train_loss"] for e in per_epoch],
        "epochs": per_epoch,
        "wall_time_s": time.perf_counter() - start,
        "device": str(device),
    }
