"""Vocabularies: raw ids (any token) to contiguous indices 1..n, with 0 kept for padding and unknowns."""
from typing import Dict, Iterable, List, Mapping

import numpy as np
import pandas as pd


class Vocabulary:
    """One token list per name ("item", "category", "user", ...); index i + 1 is token i.

    Tokens are kept as strings, so a vocabulary saved in a checkpoint (`to_dict`) reads back the same
    on any machine, and the ids of a file encode the same whether pandas read them as ints or strings.
    `encode` maps a token never seen to 0, which DIN treats as padding (a zero embedding).
    """

    def __init__(self, tokens: Mapping[str, Iterable[str]] = ()):
        self._tokens: Dict[str, List[str]] = {}
        self._index: Dict[str, pd.Index] = {}
        # for names whose tokens are all canonical integers: the same index over int64, so that integer
        # ids (most files) are looked up without a conversion to strings
        self._int_index: Dict[str, pd.Index] = {}
        for name, values in dict(tokens).items():
            self._set(name, list(values))

    def _set(self, name: str, tokens: List[str]) -> None:
        self._tokens[name] = tokens
        self._index[name] = pd.Index(tokens, dtype=object)
        ints = _canonical_ints(tokens)
        if ints is None:
            self._int_index.pop(name, None)
        else:
            self._int_index[name] = pd.Index(ints)

    def __contains__(self, name: str) -> bool:
        return name in self._tokens

    def names(self) -> List[str]:
        return list(self._tokens)

    def size(self, name: str) -> int:
        """The embedding table size for `name`: its tokens plus the padding index 0."""
        return len(self._tokens[name]) + 1

    def tokens(self, name: str) -> List[str]:
        return list(self._tokens[name])

    def fit(self, name: str, *values) -> None:
        """Add the tokens of `values` (arrays or Series) not yet in `name`, in sorted order after the existing ones."""
        seen = self._tokens.get(name, [])
        if not values:
            return self._set(name, list(seen))
        arrays = [np.asarray(v) for v in values]
        if all(_integral(a) for a in arrays):  # unique first, then to strings: cheap for long id columns
            unique = np.unique(np.concatenate([a.astype(np.int64) for a in arrays]))
            new = set(unique.astype(str).tolist())
        else:
            # distinct values first, then their tokens: long columns of few distinct strings stay cheap
            new = set(as_tokens(pd.unique(np.concatenate([a.astype(object) for a in arrays]))).tolist())
        self._set(name, seen + sorted(new - set(seen)))

    def encode(self, name: str, values) -> np.ndarray:
        """Indices (int64, 1..n) of the tokens in values; 0 for tokens not in the vocabulary."""
        if name not in self._index:
            raise KeyError(f"the vocabulary has no {name!r}; it has {self.names()}")
        array = np.asarray(values)
        if name in self._int_index and _integral(array):
            return self._int_index[name].get_indexer(array.astype(np.int64)).astype(np.int64) + 1
        codes, uniques = pd.factorize(array.reshape(-1))  # look up each distinct value once
        found = self._index[name].get_indexer(as_tokens(np.asarray(uniques))).astype(np.int64) + 1
        return np.where(codes >= 0, found[np.maximum(codes, 0)], 0).reshape(array.shape)

    def decode(self, name: str, indices) -> np.ndarray:
        """The tokens of indices (0 gives None)."""
        table = np.array([None] + self._tokens[name], dtype=object)
        return table[np.asarray(indices)]

    def to_dict(self) -> Dict[str, List[str]]:
        return {name: list(tokens) for name, tokens in self._tokens.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Iterable[str]]) -> "Vocabulary":
        return cls(data)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "Vocabulary(" + ", ".join(f"{n}: {len(t)}" for n, t in self._tokens.items()) + ")"


def as_tokens(values) -> np.ndarray:
    """values as an object array of str; integral floats (pandas' ints with NaN) lose their '.0'."""
    array = np.asarray(values)
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array))
        if whole.all():
            array = array.astype(np.int64)
    return array.astype(str).astype(object)


def _integral(array: np.ndarray) -> bool:
    """An integer array, or a float array of whole numbers (pandas' ints with NaN)."""
    if array.dtype.kind in "iu":
        return True
    return array.dtype.kind == "f" and bool(np.all(np.isfinite(array) & (array == np.round(array))))


def _canonical_ints(tokens: List[str]):
    """The tokens as int64 when each is the canonical decimal form of an integer ("7", "-3"; not "07"), else None."""
    if not tokens:
        return None
    try:
        ints = np.array([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OverflowError):
        return None
    if ints.astype(str).tolist() != list(tokens):
        return None
    return ints
