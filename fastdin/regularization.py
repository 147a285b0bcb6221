"""Mini-batch aware regularization (DIN paper, section 4.1) and plain full-table L2.

Both regularizers are gradient hooks called as `regularizer(model, batch)` after `loss.backward()`
and before `optimizer.step()` (the training loop's `after_backward`). They add their term to the
embedding tables' `.grad` under `torch.no_grad()`; the loss value is not changed.

The paper's SGD update for an embedding row j, with mini-batch B_m, learning rate η:

    w_j ← w_j − η [ (1/|B_m|) Σ_{(x,y) ∈ B_m} ∂L(x,y)/∂w_j + λ (α_mj / n_j) w_j ]

where α_mj = 1 if feature j occurs in B_m (else 0) and n_j is the number of occurrences of j in
the whole training data. With a mean-reduced loss, `.grad` after backward is the first term;
`MBARegularizer` adds the second for exactly the rows with α_mj = 1. Plain SGD
(`torch.optim.SGD`, no momentum, no weight decay) then computes `w -= lr * grad`, which is the
paper's update *exactly*. With momentum the term enters the momentum buffer like any gradient.

Adaptive optimizers (Adagrad, Adam, SparseAdam) see the term as part of the gradient, so it is
rescaled by their per-coordinate step size, the same as Adam's coupled L2 `weight_decay` (not
AdamW's decoupled decay). That is a frequency-weighted L2 penalty on the visited rows rather than
the paper's SGD step. The term only touches rows the batch already looked up, so a sparse
optimizer still updates (and keeps state for) only those rows.
"""
from typing import Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastdin.functional import BACKENDS, choose_backend, default_backend


def _check_lambda(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a real number, got {type(lam).__name__}")
    if not lam >= 0 or lam == float("inf"):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return float(lam)


def _check_tables(tables) -> Dict[str, nn.Embedding]:
    if not isinstance(tables, Mapping):
        raise TypeError(f"tables must be a mapping of name to nn.Embedding, got {type(tables).__name__}")
    for name, table in tables.items():
        if not isinstance(table, nn.Embedding):
            raise TypeError(f"tables[{name!r}] must be an nn.Embedding, got {type(table).__name__}")
    return dict(tables)


def _check_ids(name: str, ids) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"ids of table {name!r} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids of table {name!r} must be an integer tensor, got dtype {ids.dtype}")
    return ids.reshape(-1)


def count_frequencies(batches: Iterable, model, padding_idx: Optional[int] = 0,
                      progress: bool = False) -> Dict[str, Tensor]:
    """Count n_j, the occurrences of every id of every embedding table, in one pass over batches.

    model gives the tables (`model.embedding_tables()`, name -> nn.Embedding) and the ids each
    batch looks up (`model.batch_ids(batch)`, name -> int tensor), as `fastdin.DIN` does. Every
    occurrence counts (an id twice in a batch counts twice); the padding id is not counted.
    Returns name -> int64 tensor [num_embeddings] on the table's device. The cost per batch is
    O(ids in the batch), not O(table size).
    """
    tables = _check_tables(model.embedding_tables())
    counts = {name: torch.zeros(t.num_embeddings, dtype=torch.int64, device=t.weight.device)
              for name, t in tables.items()}
    for batch in tqdm(batches, desc="counting ids", unit="batch", disable=not progress):
        for name, ids in model.batch_ids(batch).items():
            if name not in counts:
                raise ValueError(f"batch_ids gave ids for {name!r}, which is not among the tables {sorted(counts)}")
            ids = _check_ids(name, ids).to(counts[name].device, torch.int64)
            if ids.numel():
                low, high = torch.aminmax(ids)
                if low.item() < 0 or high.item() >= counts[name].numel():
                    raise ValueError(f"ids of table {name!r} must lie in [0, {counts[name].numel()}), "
                                     f"got values in [{low.item()}, {high.item()}]")
            counts[name].index_add_(0, ids, torch.ones_like(ids))
    if padding_idx is not None:
        for table_counts in counts.values():
            if padding_idx < table_counts.numel():
                table_counts[padding_idx] = 0  # cheaper than filtering padding out of every batch
    return counts


def _check_counts(name: str, counts, table: nn.Embedding) -> Tensor:
    counts = torch.as_tensor(counts)
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"counts[{name!r}] must hold integer occurrence counts, got dtype {counts.dtype}")
    if tuple(counts.shape) != (table.num_embeddings,):
        raise ValueError(f"counts[{name!r}] must have shape [num_embeddings] = [{table.num_embeddings}], "
                         f"got {list(counts.shape)}")
    if counts.numel() and counts.min().item() < 0:
        raise ValueError(f"counts[{name!r}] must be >= 0, got a minimum of {counts.min().item()}")
    return counts.to(table.weight.device, torch.int64).contiguous()


def mba_kernel_gap(weight: Tensor, sparse: bool) -> Optional[str]:
    """None when the Triton kernel covers this table, else why it does not."""
    if sparse:
        return "the kernel writes a dense gradient in place; sparse gradients use torch's index ops"
    if weight.dtype == torch.float64:
        return "the kernel computes in fp32; float64 tables use torch's index ops"
    return None


class MBARegularizer(nn.Module):
    """Mini-batch aware regularization: adds λ·w_j/n_j to the gradient of each row j in the batch.

    For each table, the distinct ids of the batch (duplicates count once, as α_mj is an indicator;
    the padding id never) get `grad[j] += lam * w[j] / max(n[j], 1)`. Rows absent from the batch
    are untouched. The cost is O(unique ids × dim) per step, never O(table size). An id with
    n_j = 0 (seen in training but not where the counts came from) is treated as n_j = 1: the
    strongest regularization, as for an id seen once, and no division by zero.

    The module docstring explains how this equals the paper's SGD update and what it means for
    Adagrad and Adam. Call it once per optimizer step; the gradient may be dense (`index_add_`
    into `.grad`) or sparse (`nn.Embedding(sparse=True)`: a sparse COO term is added). A table
    with `.grad = None` gets a gradient holding only the term.

    tables: name -> nn.Embedding (`DIN.embedding_tables()`); the regularizer keeps references, not
        copies, and does not register them (so they are not saved twice).
    counts: name -> int tensor [num_embeddings] of n_j for every table (`count_frequencies`).
        They are buffers of the `counts` submodule, so `state_dict()` holds them as
        "counts.<table>". To keep them with a model checkpoint, save `frequencies()` next to the
        model's state dict and rebuild the regularizer from it:
        `torch.save({"model": model.state_dict(), "mba_counts": reg.frequencies()}, path)`, then
        `MBARegularizer(model.embedding_tables(), ckpt["mba_counts"], lam)`. (Or attach it,
        `model.mba = reg`: the counts then join the model's state dict and follow `model.to()`.)
        Counts follow their table to its device on first use.
    lam: λ >= 0. padding_idx: the id never regularized (None: none).
    backend: "auto" and "reference" use torch's index ops (`torch.unique`, `index_add_`).
        "triton" uses the fused kernel in `fastdin.kernels.mba` for dense fp32/fp16/bf16
        gradients: it avoids `torch.unique`'s device sync. It is opt-in because no GPU
        measurement shows it faster yet; `bench/bench_mba_step.py --device cuda` decides.
        None reads FASTDIN_BACKEND.
    """

    def __init__(self, tables: Mapping[str, nn.Embedding], counts: Mapping[str, Tensor], lam: float,
                 padding_idx: Optional[int] = 0, backend: Optional[str] = None):
        super().__init__()
        self.tables = _check_tables(tables)
        self.lam = _check_lambda(lam)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
                                        or padding_idx < 0):
            raise ValueError(f"padding_idx must be an id >= 0 or None, got {padding_idx!r}")
        self.backend, self.padding_idx = backend, padding_idx
        if not isinstance(counts, Mapping):
            raise TypeError(f"counts must be a mapping of table name to counts, got {type(counts).__name__}")
        missing = sorted(set(self.tables) - set(counts))
        if missing:
            raise ValueError(f"counts has no entry for the tables {missing}; give n_j for every table "
                             f"(see count_frequencies)")
        unknown = sorted(set(counts) - set(self.tables))
        if unknown:
            raise ValueError(f"counts has entries for unknown tables {unknown}; the tables are {sorted(self.tables)}")
        self.counts = nn.Module()
        for name, table in self.tables.items():
            self.counts.register_buffer(name, _check_counts(name, counts[name], table))

    @classmethod
    def from_batches(cls, model, batches: Iterable, lam: float, padding_idx: Optional[int] = 0,
                     backend: Optional[str] = None, progress: bool = False) -> "MBARegularizer":
        """Count the frequencies over batches (see `count_frequencies`) and regularize all of model's tables."""
        counts = count_frequencies(batches, model, padding_idx=padding_idx, progress=progress)
        return cls(model.embedding_tables(), counts, lam, padding_idx=padding_idx, backend=backend)

    def frequencies(self) -> Dict[str, Tensor]:
        """name -> n_j (int64 [num_embeddings]) for every table."""
        return dict(self.counts.named_buffers())

    def forward(self, model, batch) -> None:
        """The training-loop hook: regularize the rows that `model.batch_ids(batch)` looks up."""
        self.regularize(model.batch_ids(batch))

    @torch.no_grad()
    def regularize(self, ids: Mapping[str, Tensor]) -> None:
        """Add the term for ids (table name -> int tensor of any shape); tables not named are skipped."""
        for name, table_ids in ids.items():
            if name in self.tables:
                self._regularize_table(name, self.tables[name], _check_ids(name, table_ids))

    def _counts_on(self, name: str, device: torch.device) -> Tensor:
        counts = getattr(self.counts, name)
        if counts.device != device:  # the table moved after the regularizer was built
            counts = counts.to(device)
            setattr(self.counts, name, counts)
        return counts

    def _regularize_table(self, name: str, table: nn.Embedding, ids: Tensor) -> None:
        weight, grad = table.weight, table.weight.grad
        ids = ids.to(weight.device)
        counts = self._counts_on(name, weight.device)
        sparse = grad.is_sparse if grad is not None else table.sparse
        backend = default_backend() if self.backend is None else self.backend
        if backend != "auto":  # "auto" keeps torch's index ops until a GPU benchmark says otherwise
            backend = choose_backend(backend, weight.device, mba_kernel_gap(weight, sparse), "MBARegularizer")
        if backend == "triton":
            from fastdin.kernels.mba import mba_scatter_

            if grad is None:
                weight.grad = grad = torch.zeros_like(weight)
            mba_scatter_(grad, weight, ids, counts, self.lam, self.padding_idx)
            return
        rows = torch.unique(ids)
        if self.padding_idx is not None:
            rows = rows[rows != self.padding_idx]
        compute = torch.promote_types(weight.dtype, torch.float32)
        # index_select, not advanced indexing: several times faster for row gathers on the CPU
        scale = self.lam / counts.index_select(0, rows).clamp_(min=1).to(compute)
        term = weight.index_select(0, rows).to(compute).mul_(scale[:, None]).to(weight.dtype)
        if sparse:
            term = torch.sparse_coo_tensor(rows[None], term, weight.shape, check_invariants=False)
            # Coalesced, the optimizer updates each row once; Adagrad and SparseAdam coalesce anyway.
            weight.grad = (term if grad is None else grad + term).coalesce()
        else:
            if grad is None:
                weight.grad = grad = torch.zeros_like(weight)
            grad.index_add_(0, rows, term)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, tables={sorted(self.tables)}, padding_idx={self.padding_idx}, backend={self.backend}"


class FullL2Regularizer:
    """Plain L2 on whole tables, for comparison: adds λ·w to the gradient of every row, every step.

    Same hook signature as `MBARegularizer`. Equivalent to the optimizer's `weight_decay=λ`
    restricted to the embedding tables. The cost is O(table size) per step. A sparse gradient
    becomes dense (every row now has a gradient), so it suits SGD, Adagrad and Adam but not
    SparseAdam. The padding row is included; it holds zeros in `DIN`, so its term is zero.
    """

    def __init__(self, tables: Mapping[str, nn.Embedding], lam: float):
        self.tables = _check_tables(tables)
        self.lam = _check_lambda(lam)

    @torch.no_grad()
    def __call__(self, model=None, batch=None) -> None:
        for table in self.tables.values():
            weight, grad = table.weight, table.weight.grad
            if grad is None:
                weight.grad = weight.detach() * self.lam
            elif grad.is_sparse:
                weight.grad = grad.to_dense().add_(weight, alpha=self.lam)
            else:
                grad.add_(weight, alpha=self.lam)

    def __repr__(self) -> str:
        return f"FullL2Regularizer(lam={self.lam}, tables={sorted(self.tables)})"
