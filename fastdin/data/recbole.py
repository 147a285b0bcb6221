"""RecBole's atomic files: `<name>.inter` (and `<name>.item` for the category), tab-separated.

The header names each column with its type (`user_id:token`, `rating:float`, `class:token_seq`).
Rows become DIN rows with the MovieLens protocol (`fastdin.data.movielens.rating_rows`): the label is
`label:float` where the file has one, else rating >= `threshold`; histories by timestamp; split by
user. The category is the first token of `category_field` in the .item file (ml-100k: `class`, the
genres); without an .item file every item has one category.

RecBole ships ml-100k in this format inside its wheel (`recbole/dataset_example/ml-100k/`).
"""
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from fastdin.data.errors import DataFileError, require_file
from fastdin.data.movielens import TEST_FRACTION, rating_rows
from fastdin.data.samples import LoadedData
from fastdin.data.vocabulary import Vocabulary


def read_atomic(path: Path) -> pd.DataFrame:
    """An atomic file with its columns named without their types (user_id:token -> user_id)."""
    path = require_file(path)
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except pd.errors.ParserError as error:
        raise DataFileError(path, f"malformed atomic file: {error}") from None
    for column in frame.columns:
        if ":" not in column:
            raise DataFileError(path, f"header column {column!r} lacks its type (name:token, name:float, ...)",
                                line=1, column=repr(column))
    frame.columns = [c.split(":")[0] for c in frame.columns]
    if frame.empty:
        raise DataFileError(path, "the file holds no rows")
    return frame


def _column(path: Path, frame: pd.DataFrame, name: str, number: bool = False):
    if name not in frame.columns:
        raise DataFileError(path, f"missing column {name!r}; the header has {list(frame.columns)}", line=1,
                            column=repr(name))
    if not number:
        return frame[name].to_numpy(object)
    values = pd.to_numeric(frame[name], errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFileError(path, f"expected a number, got {frame[name].iloc[row]!r}", line=row + 2, column=repr(name))
    return values.to_numpy()


def find(path: Path, ext: str) -> Optional[Path]:
    if path.is_file():
        path = path.parent
    files = sorted(path.glob(f"*.{ext}"))
    if len(files) > 1:
        raise FileNotFoundError(f"{path}: more than one .{ext} file: {[f.name for f in files]}")
    return files[0] if files else None


def load(path: Union[str, Path], vocabulary: Optional[Vocabulary] = None, seed: int = 0, max_len: int = 100,
         test_fraction: float = TEST_FRACTION, history: str = "positive", threshold: float = 4.0,
         category_field: str = "class", **_) -> LoadedData:
    path = Path(path)
    inter_path = find(path, "inter")
    if inter_path is None:
        raise FileNotFoundError(f"{path}: no RecBole .inter file")
    inter = read_atomic(inter_path)
    users = _column(inter_path, inter, "user_id")
    items = _column(inter_path, inter, "item_id")
    times = _column(inter_path, inter, "timestamp", number=True)
    if "label" in inter.columns:
        labels = _column(inter_path, inter, "label", number=True)
        if not np.isin(labels, [0, 1]).all():
            row = int(np.flatnonzero(~np.isin(labels, [0, 1]))[0])
            raise DataFileError(inter_path, f"labels must be 0 or 1, got {inter['label'].iloc[row]!r}", line=row + 2,
                                column="'label'")
    else:
        labels = (_column(inter_path, inter, "rating", number=True) >= threshold).astype(np.float32)
    item_path = find(path, "item")
    categories = np.full(len(items), "none", dtype=object)
    if item_path is not None:
        item_frame = read_atomic(item_path)
        ids = _column(item_path, item_frame, "item_id")
        first = pd.Series(_column(item_path, item_frame, category_field)).str.split(" ").str[0].replace("", "none")
        category = dict(zip(ids, first))
        categories = np.array([category.get(i, "none") for i in items.tolist()], dtype=object)
    return rating_rows(users, items, categories, labels.astype(np.float32), times.astype(np.int64), vocabulary,
                       history, max_len, test_fraction, seed, "recbole",
                       {"threshold": threshold, "category_field": category_field})
