"""Amazon reviews (McAuley's 2014 release) with the DIN authors' protocol (their build_dataset.py).

Files: `reviews_<Category>_5.json` (one JSON object per line: reviewerID, asin, unixReviewTime) and
`meta_<Category>.json` (one object per line: asin, categories; the 2014 meta files are Python
literals rather than strict JSON, and both are read). As in DIN's preprocessing:

- an item's category is the last entry of its last category path (`categories[-1][-1]`);
- each user's reviews are sorted by time; review i >= 1 gives a positive row with the history of
  reviews 0..i-1 (all of them), and a negative row with the same history whose candidate is drawn
  uniformly from the items the user never reviewed;
- the user's last review (and its negative) is the test pair; the earlier ones are training rows.
  Users with a single review give no row.

Lines are read one at a time; a bad line stops the load with the file, line and field named.
"""
import ast
import json
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np

from fastdin.data.behaviours import category_of_items, encode_log, negatives_not_in, time_order
from fastdin.data.errors import DataFileError, require_file
from fastdin.data.samples import LoadedData, Samples, two_field_schema, user_ranks
from fastdin.data.vocabulary import Vocabulary


def _records(path: Path) -> Iterator[Tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                try:  # the 2014 meta files hold Python dict literals
                    record = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise DataFileError(path, "not a JSON object (nor a Python dict literal)", line=number) from None
            if not isinstance(record, dict):
                raise DataFileError(path, f"expected an object, got {type(record).__name__}", line=number)
            yield number, record


def _field(path: Path, number: int, record: dict, key: str):
    if key not in record:
        raise DataFileError(path, f"the record has no {key!r} (it has {sorted(record)})", line=number, column=key)
    return record[key]


def read_reviews(path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reviewerID, asin, unixReviewTime) arrays of a reviews_*.json file."""
    path = require_file(path)
    users, items, times = [], [], []
    for number, record in _records(path):
        users.append(str(_field(path, number, record, "reviewerID")))
        items.append(str(_field(path, number, record, "asin")))
        time = _field(path, number, record, "unixReviewTime")
        if isinstance(time, bool) or not isinstance(time, (int, float)):
            raise DataFileError(path, f"unixReviewTime must be a number, got {time!r}", line=number, column="unixReviewTime")
        times.append(int(time))
    if not users:
        raise DataFileError(path, "the file holds no review")
    return np.array(users, dtype=object), np.array(items, dtype=object), np.array(times, dtype=np.int64)


def read_meta(path: Union[str, Path], wanted: Optional[set] = None) -> Dict[str, str]:
    """asin -> category (the last entry of the last category path) of a meta_*.json file."""
    path = require_file(path)
    category = {}
    for number, record in _records(path):
        asin = str(_field(path, number, record, "asin"))
        if wanted is not None and asin not in wanted:
            continue
        paths = _field(path, number, record, "categories")
        if not (isinstance(paths, list) and paths and isinstance(paths[-1], list) and paths[-1]):
            raise DataFileError(path, f"categories must be a non-empty list of category paths, got {paths!r}",
                                line=number, column="categories")
        category[asin] = str(paths[-1][-1])
    if not category:
        raise DataFileError(path, "the file holds no item of the reviews")
    return category


def find_files(path: Union[str, Path], category: Optional[str] = None) -> Tuple[Path, Path]:
    """(reviews, meta) in a folder: reviews_<Category>_5.json and meta_<Category>.json."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a folder with reviews_<Category>_5.json and meta_<Category>.json")
    pattern = f"reviews_{category}_5.json" if category else "reviews_*_5.json"
    found = sorted(path.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one file {pattern}, found {[p.name for p in found]}")
    name = found[0].name[len("reviews_"):-len("_5.json")]
    meta = path / f"meta_{name}.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: no such file (the meta file of {found[0].name})")
    return found[0], meta


def load(path: Union[str, Path], vocabulary: Optional[Vocabulary] = None, seed: int = 0,
         category: Optional[str] = None, max_len: Optional[int] = None, **_) -> LoadedData:
    """Train and test rows of the DIN protocol from a folder with the reviews and meta files."""
    reviews, meta = find_files(path, category)
    users, items, times = read_reviews(reviews)
    item_category = read_meta(meta, set(items.tolist()))
    missing = sorted(set(items.tolist()) - set(item_category))
    if missing:
        raise DataFileError(meta, f"{len(missing)} reviewed items have no meta record, e.g. {missing[:3]}")
    categories = np.array([item_category[i] for i in items], dtype=object)
    vocabulary, user_names, users, items, categories = encode_log(vocabulary, users, items, categories)
    order = time_order(users, times)
    users, items, categories = users[order], items[order], categories[order]
    start, rank = user_ranks(users)
    count = np.bincount(users)[users]
    rows = np.flatnonzero(rank >= 1)  # a row per review after the first
    num_items = vocabulary.size("item")
    rng = np.random.default_rng(seed)
    negatives = negatives_not_in(users[rows], users, items, num_items, rng)
    # (with a checkpoint's vocabulary, a negative that this file never reviews gets category 0)
    category_table = category_of_items(num_items, items, categories)
    n = len(rows)
    both = np.concatenate([rows, rows])
    candidates = {"item": np.concatenate([items[rows], negatives]),
                  "category": np.concatenate([categories[rows], category_table[negatives]])}
    samples = Samples(candidates, {"hist_items": items, "hist_categories": categories},
                      hist_start=start[both], hist_len=rank[both],
                      labels=np.concatenate([np.ones(n, np.float32), np.zeros(n, np.float32)]), users=users[both])
    if max_len is not None:
        samples = samples.truncate(max_len)
    is_test = np.concatenate([rank[rows] == count[rows] - 1] * 2)
    return LoadedData(samples.subset(~is_test), samples.subset(is_test), vocabulary, two_field_schema(vocabulary),
                      "amazon", {"seed": seed, "category": category, "max_len": max_len}, user_names=user_names)
