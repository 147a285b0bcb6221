"""Generic CSV/Parquet rows through a column map; the BARS and DIEN loaders read their files with it.

A column map (a dict, or a JSON/YAML file given as `fastdin train --data csv --schema FILE`):

```yaml
label: clicked                     # 0/1
user: user_id                      # optional: for GAUC and the split by user
candidates: {item: item_id, category: cate_id}
sequences:                         # each shares the embedding of its target candidate
  hist_items: {column: item_history, target: item}
  hist_categories: {column: cate_history, target: category}
sparse: {gender: gender}           # user and context fields, one id per row
multi_hot: {tags: {column: tags, pooling: mean}}
dense: [price, age]
sep: "^"                           # inside history and multi-hot strings (Parquet lists need none)
max_len: 100                       # keep the last max_len behaviours
embed_dim: 16
embed_dims: {item: 32}             # per field, where the math allows (a sequence takes its target's)
```

Ids are tokens: they are encoded to 1..n per field (a sequence uses its target's vocabulary), 0 is
padding and what an id never seen while fitting becomes. Files are read in chunks of `chunk_rows`
rows. Every check names the file, the line (CSV, with the header as line 1) or row (Parquet) and
the column.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from fastdin.data.errors import DataFileError, require_file
from fastdin.data.samples import Samples
from fastdin.data.vocabulary import Vocabulary, as_tokens
from fastdin.schema import DenseField, FeatureSchema, MultiHotField, SequenceField, SparseField, read_mapping


@dataclass
class ColumnMap:
    label: str
    candidates: Dict[str, str]
    sequences: Dict[str, Dict[str, str]]
    user: Optional[str] = None
    sparse: Dict[str, str] = field(default_factory=dict)
    multi_hot: Dict[str, Dict[str, str]] = field(default_factory=dict)
    dense: List[str] = field(default_factory=list)
    sep: str = "^"
    max_len: Optional[int] = None
    embed_dim: int = 16
    embed_dims: Dict[str, int] = field(default_factory=dict)
    # how to read a CSV: the field delimiter, and the column names when the file has no header
    delimiter: str = ","
    names: Optional[List[str]] = None

    def __post_init__(self):
        if not self.candidates or not self.sequences:
            raise ValueError("a column map needs candidates and sequences (at least one of each)")
        for name, spec in self.sequences.items():
            if not isinstance(spec, dict) or "column" not in spec or "target" not in spec:
                raise ValueError(f"sequence {name!r} must be a mapping with 'column' and 'target', got {spec!r}")
        for name, spec in self.multi_hot.items():
            if not isinstance(spec, dict) or "column" not in spec:
                raise ValueError(f"multi-hot field {name!r} must be a mapping with 'column' (and 'pooling'), got {spec!r}")
        if not self.sep:
            raise ValueError("sep must be a non-empty string")

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ColumnMap":
        data = read_mapping(path)
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{path}: {error}") from None

    def columns(self) -> List[str]:
        cols = [self.label, *self.candidates.values(), *(s["column"] for s in self.sequences.values()),
                *self.sparse.values(), *(m["column"] for m in self.multi_hot.values()), *self.dense]
        return cols + ([self.user] if self.user else [])

    def vocab_of(self, name: str) -> str:
        """The vocabulary a field encodes with (a sequence: its target's)."""
        return self.sequences[name]["target"] if name in self.sequences else name

    def schema(self, vocabulary: Vocabulary, padding: str = "right") -> FeatureSchema:
        dim = lambda name: self.embed_dims.get(name)  # noqa: E731
        return FeatureSchema(
            candidates=[SparseField(n, vocabulary.size(n), dim(n)) for n in self.candidates],
            sequences=[SequenceField(n, s["target"]) for n, s in self.sequences.items()],
            sparse=[SparseField(n, vocabulary.size(n), dim(n)) for n in self.sparse],
            multi_hot=[MultiHotField(n, vocabulary.size(n), dim(n), m.get("pooling", "sum"))
                       for n, m in self.multi_hot.items()],
            dense=[DenseField(c) for c in self.dense],
            embed_dim=self.embed_dim, padding=padding,
        )


class _Where:
    """Names a row of one file: its line in a CSV (header = line 1, when there is one) or its row in Parquet."""

    def __init__(self, path: Path, first_line: int, parquet: bool):
        self.path, self.first_line, self.parquet = path, first_line, parquet

    def error(self, message: str, row: Optional[int] = None, column: Optional[str] = None) -> DataFileError:
        if row is None:
            return DataFileError(self.path, message, column=repr(column) if column else None)
        if self.parquet:
            return DataFileError(self.path, message, row=row + 1, column=repr(column) if column else None)
        return DataFileError(self.path, message, line=self.first_line + row, column=repr(column) if column else None)


def _chunks(path: Path, spec: ColumnMap, chunk_rows: int) -> Iterator[Tuple[pd.DataFrame, _Where]]:
    """The file in DataFrames of at most chunk_rows rows, with the row numbering of each."""
    parquet = path.suffix.lower() in (".parquet", ".pq")
    wanted = spec.columns()
    if parquet:
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
            raise DataFileError(path, f"not a Parquet file: {error}") from None
        have = handle.schema_arrow.names
        missing = [c for c in dict.fromkeys(wanted) if c not in have]
        if missing:
            raise DataFileError(path, f"missing column {missing[0]!r}; the file has {have}", column=repr(missing[0]))
        seen = 0
        for piece in handle.iter_batches(batch_size=chunk_rows, columns=list(dict.fromkeys(wanted))):
            frame = piece.to_pandas()
            yield frame, _Where(path, seen, True)
            seen += len(frame)
        return
    header = None if spec.names else "infer"
    reader = pd.read_csv(path, sep=spec.delimiter, header=0 if header else None, names=spec.names, dtype=str,
                         keep_default_na=False, chunksize=chunk_rows, engine="c", quoting=3 if spec.delimiter == "\t" else 0)
    first_line = 2 if header else 1
    try:
        for frame in reader:
            missing = [c for c in dict.fromkeys(wanted) if c not in frame.columns]
            if missing:
                raise DataFileError(path, f"missing column {missing[0]!r}; the header has {list(frame.columns)}",
                                    line=1 if header else None, column=repr(missing[0]))
            yield frame, _Where(path, first_line, False)
            first_line += len(frame)
    except pd.errors.ParserError as error:
        # pandas says e.g. "Expected 6 fields in line 7, saw 8"
        raise DataFileError(path, f"malformed CSV: {error}") from None
    except pd.errors.EmptyDataError:
        raise DataFileError(path, "the file is empty") from None


def _labels(values: pd.Series, where: _Where, column: str) -> np.ndarray:
    if not pd.api.types.is_numeric_dtype(values):
        text = values.astype(str).str.strip()
        ok = text.isin(["0", "1", "0.0", "1.0"])
        if not ok.all():
            row = int(np.flatnonzero(~ok.to_numpy())[0])
            raise where.error(f"labels must be 0 or 1, got {values.iloc[row]!r}", row, column)
        return text.str.startswith("1").to_numpy(np.float32)
    array = values.to_numpy()
    ok = (array == 0) | (array == 1)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise where.error(f"labels must be 0 or 1, got {array[row].item()!r}", row, column)
    return array.astype(np.float32)


def _ids(values: pd.Series, where: _Where, column: str) -> np.ndarray:
    tokens = as_tokens(values.to_numpy())
    empty = (tokens == "") | (tokens == "nan") | (tokens == "None")
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise where.error("missing id", row, column)
    return tokens


def _sequences(values: pd.Series, sep: str, where: _Where, column: str) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens of all rows concatenated, per-row counts) of a delimited-string or list column."""
    array = values.to_numpy()
    if len(array) and not isinstance(array[0], str) and hasattr(array[0], "__len__"):
        bad = [i for i, v in enumerate(array) if v is None or isinstance(v, str) or not hasattr(v, "__len__")]
        if bad:
            raise where.error(f"expected a list of ids, got {array[bad[0]]!r}", bad[0], column)
        counts = np.fromiter((len(v) for v in array), np.int64, len(array))
        tokens = as_tokens(np.concatenate([np.asarray(v) for v in array])) if counts.sum() else np.array([], object)
    else:
        text = values.astype(str)
        nonempty = (text != "").to_numpy()
        counts = np.where(nonempty, text.str.count(re.escape(sep)).to_numpy() + 1, 0).astype(np.int64)
        joined = sep.join(text[nonempty].tolist())
        tokens = np.array(joined.split(sep), dtype=object) if joined else np.array([], object)
    empty = tokens == ""
    if empty.any():
        row = int(np.searchsorted(np.cumsum(counts), np.flatnonzero(empty)[0], side="right"))
        raise where.error(f"malformed history {array[row]!r}: an empty id between separators {sep!r}", row, column)
    return tokens, counts


def read_rows(path: Union[str, Path], spec: ColumnMap, vocabulary: Vocabulary, fit: bool,
              chunk_rows: int = 1_000_000, user_names: Optional[Vocabulary] = None) -> Samples:
    """Samples from a CSV or Parquet file; `fit` adds the file's ids to the vocabulary first.

    The users (no model input unless also a sparse field) are encoded with `user_names`, which always grows.
    """
    path = require_file(path)
    users_vocab = Vocabulary() if user_names is None else user_names
    parts: Dict[str, list] = {k: [] for k in ("labels", "users", "hist_len")}
    cand = {n: [] for n in spec.candidates}
    seqs = {n: [] for n in spec.sequences}
    sparse = {n: [] for n in spec.sparse}
    multi = {n: [] for n in spec.multi_hot}
    dense = {c: [] for c in spec.dense}
    rows = 0
    for frame, where in _chunks(path, spec, chunk_rows):
        tokens = {}
        for name, column in [*spec.candidates.items(), *spec.sparse.items()]:
            tokens[name] = _ids(frame[column], where, column)
        counts = None
        seq_tokens = {}
        for name, s in spec.sequences.items():
            seq_tokens[name], c = _sequences(frame[s["column"]], spec.sep, where, s["column"])
            if counts is not None and not np.array_equal(c, counts):
                row = int(np.flatnonzero(c != counts)[0])
                first = next(iter(spec.sequences.values()))["column"]
                raise where.error(f"history of {c[row]} ids, but {first!r} has {counts[row]} in this row",
                                  row, s["column"])
            counts = c
        multi_tokens = {name: _sequences(frame[m["column"]], spec.sep, where, m["column"])
                        for name, m in spec.multi_hot.items()}
        labels = _labels(frame[spec.label], where, spec.label)
        for column in spec.dense:
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float32)
            if np.isnan(values).any():
                row = int(np.flatnonzero(np.isnan(values))[0])
                raise where.error(f"expected a number, got {frame[column].iloc[row]!r}", row, column)
            dense[column].append(values[:, None])
        if fit:  # one fit per vocabulary, so that a chunk's new ids are sorted together
            new: Dict[str, list] = {}
            for name, t in [*tokens.items(), *seq_tokens.items(), *((n, t) for n, (t, _) in multi_tokens.items())]:
                new.setdefault(spec.vocab_of(name), []).append(t)
            for name, pieces in new.items():
                vocabulary.fit(name, *pieces)
        for name in spec.candidates:
            cand[name].append(vocabulary.encode(name, tokens[name]))
        for name in spec.sparse:
            sparse[name].append(vocabulary.encode(name, tokens[name]))
        for name, t in seq_tokens.items():
            seqs[name].append(vocabulary.encode(spec.vocab_of(name), t))
        for name, (t, c) in multi_tokens.items():
            multi[name].append((vocabulary.encode(name, t), c))
        if spec.user:
            user_tokens = _ids(frame[spec.user], where, spec.user)
            users_vocab.fit("user", user_tokens)
            parts["users"].append(users_vocab.encode("user", user_tokens))
        else:
            parts["users"].append(np.zeros(len(frame), np.int64))
        parts["labels"].append(labels)
        parts["hist_len"].append(counts)
        rows += len(frame)
    if rows == 0:
        raise DataFileError(path, "the file holds no rows")
    hist_len = np.concatenate(parts["hist_len"])
    hist_start = np.concatenate([[0], np.cumsum(hist_len)[:-1]]).astype(np.int64)
    samples = Samples(
        {n: np.concatenate(v) for n, v in cand.items()}, {n: np.concatenate(v) for n, v in seqs.items()},
        hist_start, hist_len, np.concatenate(parts["labels"]), np.concatenate(parts["users"]),
        {n: np.concatenate(v) for n, v in sparse.items()},
        {n: _pad_multi_hot(v) for n, v in multi.items()},
        {c: np.concatenate(v) for c, v in dense.items()},
    )
    return samples.truncate(spec.max_len) if spec.max_len else samples


def _pad_multi_hot(pieces) -> np.ndarray:
    counts = np.concatenate([c for _, c in pieces])
    values = np.concatenate([v for v, _ in pieces])
    width = max(int(counts.max()) if len(counts) else 0, 1)
    out = np.zeros((len(counts), width), np.int64)
    column = np.arange(len(values)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[np.repeat(np.arange(len(counts)), counts), column] = values
    return out
