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
        for name, values in dict(tokens).items():
            self._set(name, list(values))

    def _set(self, name: str, tokens: List[str]) -> None:
        self._tokens[name] = tokens
        self._index[name] = pd.Index(tokens)

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
        new = pd.unique(np.concatenate([as_tokens(v) for v in values])) if values else np.array([], dtype=object)
        new = sorted(set(new.tolist()) - set(seen))
        self._set(name, seen + new)

    def encode(self, name: str, values) -> np.ndarray:
        """Indices (int64, 1..n) of the tokens in values; 0 for tokens not in the vocabulary."""
        if name not in self._index:
            raise KeyError(f"the vocabulary has no {name!r}; it has {self.names()}")
        return self._index[name].get_indexer(as_tokens(values)).astype(np.int64) + 1

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
