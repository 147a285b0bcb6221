"""Encoded DIN rows in memory, and their batches.

`Samples` holds N rows: candidate ids [N] per candidate field, and the histories ragged: one values
array per sequence field and, per row, a start and a length into it. Rows built from one user's
time-ordered behaviours (Amazon, MovieLens, Taobao) all point into that user's one sequence, so
the memory is that of the behaviours, not of N padded histories. Batches are padded on the right
with 0 to the longest history in the batch, with "lengths".
"""
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from fastdin.data.vocabulary import Vocabulary
from fastdin.schema import FeatureSchema


@dataclass
class Samples:
    candidates: Dict[str, np.ndarray]  # candidate field -> [N] int64
    sequences: Dict[str, np.ndarray]  # sequence field -> values [M] int64, shared by the rows
    hist_start: np.ndarray  # [N] int64: the row's history is values[start : start + length]
    hist_len: np.ndarray  # [N] int64
    labels: np.ndarray  # [N] float32, 0 or 1
    users: np.ndarray  # [N] int64: the user of each row (for GAUC and splits); 0 where unknown
    sparse: Dict[str, np.ndarray] = field(default_factory=dict)  # [N] int64
    multi_hot: Dict[str, np.ndarray] = field(default_factory=dict)  # [N, K] int64, 0 = padding
    dense: Dict[str, np.ndarray] = field(default_factory=dict)  # [N, dim] float32

    def __post_init__(self):
        n = len(self.labels)
        for group in (self.candidates, self.sparse, self.multi_hot, self.dense):
            for name, values in group.items():
                if len(values) != n:
                    raise ValueError(f"field {name!r} has {len(values)} rows, the labels {n}")
        if len(self.hist_start) != n or len(self.hist_len) != n or len(self.users) != n:
            raise ValueError("hist_start, hist_len and users must have one entry per row")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def max_history(self) -> int:
        return int(self.hist_len.max()) if len(self) else 0

    def truncate(self, max_len: int) -> "Samples":
        """Keep the last (most recent) `max_len` behaviours of each history."""
        over = np.maximum(self.hist_len - max_len, 0)
        return replace(self, hist_start=self.hist_start + over, hist_len=self.hist_len - over)

    def subset(self, rows: np.ndarray) -> "Samples":
        """The given rows (an index or bool array); the sequence values are shared, not copied."""
        pick = lambda d: {k: v[rows] for k, v in d.items()}  # noqa: E731
        return Samples(pick(self.candidates), self.sequences, self.hist_start[rows], self.hist_len[rows],
                       self.labels[rows], self.users[rows], pick(self.sparse), pick(self.multi_hot), pick(self.dense))

    def split_users(self, fraction: float, seed: int = 0):
        """(rest, held out): about `fraction` of the users, drawn at random, with all their rows held out."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
        users = np.unique(self.users)
        held = np.random.default_rng(seed).random(len(users)) < fraction
        out = np.isin(self.users, users[held])
        return self.subset(~out), self.subset(out)

    def batch(self, rows: np.ndarray) -> Dict[str, Tensor]:
        """The rows as a DIN batch: candidates [B], sequences [B, T] (right-padded with 0), lengths, label, ..."""
        lengths = self.hist_len[rows]
        t = max(int(lengths.max()) if len(rows) else 0, 1)
        positions = np.arange(t)
        valid = positions[None, :] < lengths[:, None]
        index = np.where(valid, self.hist_start[rows][:, None] + positions[None, :], 0)
        out = {name: torch.from_numpy(values[rows]) for name, values in self.candidates.items()}
        for name, values in self.sequences.items():
            hist = values[index] if len(values) else np.zeros(index.shape, np.int64)
            out[name] = torch.from_numpy(np.where(valid, hist, 0))
        out["lengths"] = torch.from_numpy(lengths)
        out["label"] = torch.from_numpy(self.labels[rows])
        for group in (self.sparse, self.multi_hot, self.dense):
            out.update({name: torch.from_numpy(np.ascontiguousarray(values[rows])) for name, values in group.items()})
        return out

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> "SampleBatches":
        return SampleBatches(self, batch_size, shuffle, seed)


class SampleBatches:
    """Re-iterable batches of `Samples`; with shuffle, each pass draws a new order from (seed, pass).

    A shuffled pass leaves out a one-row remainder (Dice in training needs two rows).
    """

    def __init__(self, samples: Samples, batch_size: int, shuffle: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.samples, self.batch_size, self.shuffle, self.seed, self._passes = samples, batch_size, shuffle, seed, 0

    def __len__(self) -> int:
        n = len(self.samples)
        if self.shuffle and n > 1 and n % self.batch_size == 1:
            n -= 1
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Dict[str, Tensor]]:
        n = len(self.samples)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._passes]).permutation(n)
            self._passes += 1
            if n > 1 and n % self.batch_size == 1:
                # a one-row last batch has no batch statistics for Dice; the next pass's order differs
                order = order[:-1]
        else:
            order = np.arange(n)
        for begin in range(0, n, self.batch_size):
            yield self.samples.batch(order[begin:begin + self.batch_size])


@dataclass
class LoadedData:
    """What a loader returns: the protocol's splits, the vocabulary, and the schema DIN is built from."""
    train: Optional[Samples]
    test: Optional[Samples]
    vocabulary: Vocabulary
    schema: FeatureSchema
    format: str
    options: Dict[str, object] = field(default_factory=dict)
    valid: Optional[Samples] = None  # where the files bring their own validation rows
    user_names: Optional[Vocabulary] = None  # decodes Samples.users ("user"), for the predictions' output

    def split(self, name: str) -> Samples:
        if name == "all":
            parts = [s for s in (self.train, self.test) if s is not None]
            return parts[0] if len(parts) == 1 else concat(parts)
        part = getattr(self, name, None) if name in ("train", "valid", "test") else None
        if part is None:
            raise ValueError(f"the {self.format} data has no {name!r} split")
        return part


def concat(parts) -> Samples:
    """The rows of several Samples (with the same fields) one after another."""
    offsets = np.cumsum([0] + [len(next(iter(p.sequences.values()))) for p in parts[:-1]])
    cat = lambda key: {k: np.concatenate([getattr(p, key)[k] for p in parts]) for k in getattr(parts[0], key)}  # noqa: E731
    return Samples(cat("candidates"), cat("sequences"),
                   np.concatenate([p.hist_start + o for p, o in zip(parts, offsets)]),
                   np.concatenate([p.hist_len for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.users for p in parts]), cat("sparse"), cat("multi_hot"), cat("dense"))


def user_ranks(users_sorted: np.ndarray):
    """For rows sorted by user (then time): (index of the user's first row, rank of the row within the user)."""
    n = len(users_sorted)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = users_sorted[1:] != users_sorted[:-1]
    first = np.flatnonzero(new_user)
    group = np.cumsum(new_user) - 1
    start = first[group]
    return start.astype(np.int64), (np.arange(n) - start).astype(np.int64)


def two_field_schema(vocabulary: Vocabulary, padding: str = "right") -> FeatureSchema:
    """The item/category schema of the public DIN data sets, sized by the vocabulary."""
    return FeatureSchema.two_field(vocabulary.size("item"), vocabulary.size("category"), padding=padding)
