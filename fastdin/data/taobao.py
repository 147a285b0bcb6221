"""Taobao's UserBehavior.csv (user, item, category, behavior, timestamp; no header) with MIMN's protocol.

As MIMN's preprocessing (taobao_prepare.py) does:

- each user's behaviours (all types) are sorted by time; the last one is the target and the earlier
  ones (the last `max_len` = 200 of them) the history;
- with probability 1/2 the target is replaced by a random item other than it, with that item's
  category, and label 0 (label 1 otherwise);
- the split is by time: users whose last behaviour comes after the 70% quantile of all users' last
  behaviour times are the test users.

One row per user. The file (3.5 GB for the full release) is read in chunks of `chunk_rows` lines into
compact integer arrays.
"""
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from fastdin.data.behaviours import category_of_items, encode_log, time_order
from fastdin.data.errors import DataFileError, require_file
from fastdin.data.samples import LoadedData, Samples, two_field_schema, user_ranks
from fastdin.data.vocabulary import Vocabulary

COLUMNS = ["user", "item", "category", "behavior", "timestamp"]


def read_log(path: Union[str, Path], chunk_rows: int = 5_000_000):
    """(user, item, category, timestamp) int64 arrays of UserBehavior.csv.

    Parsed as integers in C; a file that does not parse so is read again as text to name the bad line.
    """
    path = require_file(path)
    try:
        pieces = [frame for frame in pd.read_csv(path, header=None, usecols=[0, 1, 2, 4], dtype=np.int64,
                                                 chunksize=chunk_rows, engine="c")]
        with open(path) as f:  # the C reader pads short lines with NaN (refused by int64) but not long ones
            columns = f.readline().count(",") + 1
        if pieces and columns == len(COLUMNS):
            whole = pd.concat(pieces, ignore_index=True)
            return tuple(whole[i].to_numpy() for i in (0, 1, 2, 4))
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        pass
    return _read_log_as_text(path, chunk_rows)


def _read_log_as_text(path: Path, chunk_rows: int):
    pieces, line = [], 1
    try:
        reader = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, chunksize=chunk_rows)
        for frame in reader:
            if frame.shape[1] != len(COLUMNS):
                raise DataFileError(path, f"expected {len(COLUMNS)} columns ({', '.join(COLUMNS)}), got {frame.shape[1]}",
                                    line=line)
            ints = {}
            for index, name in enumerate(COLUMNS):
                if name == "behavior":
                    continue
                values = pd.to_numeric(frame[index], errors="coerce")
                bad = values.isna().to_numpy()
                if bad.any():
                    row = int(np.flatnonzero(bad)[0])
                    raise DataFileError(path, f"expected an integer {name}, got {frame[index].iloc[row]!r}",
                                        line=line + row, column=f"{index + 1} ({name})")
                ints[name] = values.to_numpy(np.int64)
            pieces.append(ints)
            line += len(frame)
    except pd.errors.ParserError as error:
        raise DataFileError(path, f"malformed CSV: {error}") from None
    if not pieces:
        raise DataFileError(path, "the file holds no rows")
    return tuple(np.concatenate([p[name] for p in pieces]) for name in ("user", "item", "category", "timestamp"))


def load(path: Union[str, Path], vocabulary: Optional[Vocabulary] = None, seed: int = 0, max_len: int = 200,
         test_quantile: float = 0.7, **_) -> LoadedData:
    path = Path(path)
    if path.is_dir():
        path = path / "UserBehavior.csv"
    users, items, categories, times = read_log(path)
    vocabulary, user_names, users, items, categories = encode_log(vocabulary, users, items, categories)
    order = time_order(users, times)
    users, items, categories, times = users[order], items[order], categories[order], times[order]
    start, rank = user_ranks(users)
    last = np.flatnonzero(np.r_[users[1:] != users[:-1], True])  # each user's last behaviour
    rng = np.random.default_rng(seed)
    num_items = vocabulary.size("item")
    if num_items < 3:
        raise DataFileError(path, "the log needs at least two items to draw a replacement target")
    target, label = items[last].copy(), np.ones(len(last), np.float32)
    replace = rng.random(len(last)) < 0.5
    drawn = rng.integers(1, num_items, size=len(last))
    clash = drawn == target
    while clash[replace].any():  # a replacement differs from the target it replaces
        drawn[clash] = rng.integers(1, num_items, size=int(clash.sum()))
        clash = drawn == target
    target[replace], label[replace] = drawn[replace], 0.0
    category_table = category_of_items(num_items, items, categories)
    samples = Samples({"item": target, "category": category_table[target]},
                      {"hist_items": items, "hist_categories": categories},
                      hist_start=start[last], hist_len=rank[last], labels=label, users=users[last]).truncate(max_len)
    last_time = times[last]
    split_time = np.sort(last_time)[int(len(last_time) * test_quantile)] if len(last_time) > 1 else np.inf
    is_test = last_time > split_time
    return LoadedData(samples.subset(~is_test), samples.subset(is_test), vocabulary, two_field_schema(vocabulary),
                      "taobao", {"seed": seed, "max_len": max_len, "test_quantile": test_quantile},
                      user_names=user_names)
