"""MovieLens as the DIN paper used it: rating >= 4 is a click (label 1), the rest label 0.

Files (the GroupLens releases, by folder content):

- ml-100k: `u.data` (user, item, rating, timestamp; tab-separated) and `u.item` (pipe-separated,
  latin-1; the 19 genre flags give the category: the first genre flagged);
- ml-1m, ml-10m: `ratings.dat` (`user::movie::rating::timestamp`) and `movies.dat`
  (`movie::title::Genre|Genre`; the first genre is the category);
- ml-20m, ml-25m, ml-32m: `ratings.csv` and `movies.csv` (with headers; the same genres).

The protocol: each user's ratings are sorted by time, and every rating is a row whose history is the
user's earlier positively rated movies (rating >= 4, the last `max_len`), since the paper predicts
"whether the user will rate a movie above 3 from the historical behaviours"; with history="all" it is
every earlier rated movie. The split is by user: a random `test_fraction` of the users (the paper's
38,493 of 138,493) are the test users.
"""
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from fastdin.data.behaviours import encode_log, time_order
from fastdin.data.errors import DataFileError, require_file
from fastdin.data.samples import LoadedData, Samples, two_field_schema
from fastdin.data.vocabulary import Vocabulary

TEST_FRACTION = 38_493 / 138_493
GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western"]


def _numbers(path: Path, frame: pd.DataFrame, columns, first_line: int) -> dict:
    out = {}
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataFileError(path, f"expected a number, got {frame[column].iloc[row]!r}", line=first_line + row,
                                column=repr(column))
        out[column] = values.to_numpy()
    return out


def _read(path: Path, sep: str, names, header: bool, encoding: str = "utf-8") -> pd.DataFrame:
    path = require_file(path)
    try:
        frame = pd.read_csv(path, sep=sep, header=0 if header else None, names=None if header else names, dtype=str,
                            keep_default_na=False, engine="python" if len(sep) > 1 else "c", encoding=encoding,
                            quotechar='"' if header else None, quoting=0 if header else 3)
    except pd.errors.ParserError as error:
        raise DataFileError(path, f"malformed file: {error}") from None
    except pd.errors.EmptyDataError:
        raise DataFileError(path, "the file is empty") from None
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise DataFileError(path, f"missing column {missing[0]!r}; the header has {list(frame.columns)}", line=1,
                            column=repr(missing[0]))
    if frame.empty:
        raise DataFileError(path, "the file holds no rows")
    return frame


RATING_DTYPES = {"user": np.int64, "movie": np.int64, "rating": np.float64, "timestamp": np.int64}


def _read_ratings(path: Path, sep: str, header: bool) -> dict:
    """user, movie, rating, timestamp arrays of a ratings file; parsed as numbers in C when they are.

    A file whose ids are not all integers is read again as text (ids kept as tokens), and a rating or
    time that is not a number is reported with its line.
    """
    path = require_file(path)
    names = list(RATING_DTYPES)
    try:
        if sep == "::":  # "1::1193::5::978300760": read as ':'-separated, every other field is empty
            frame = pd.read_csv(path, sep=":", header=None, usecols=[0, 2, 4, 6], names=["user", "a", "movie", "b",
                                "rating", "c", "timestamp"], dtype=RATING_DTYPES, engine="c")
        elif header:  # by the header's names, so that another column order is read right too
            frame = pd.read_csv(path, sep=sep, usecols=["userId", "movieId", "rating", "timestamp"], engine="c",
                                dtype={"userId": np.int64, "movieId": np.int64, "rating": np.float64,
                                       "timestamp": np.int64}).rename(columns={"userId": "user", "movieId": "movie"})
        else:
            frame = pd.read_csv(path, sep=sep, header=None, names=names, dtype=RATING_DTYPES, engine="c")
        if len(frame):
            return {c: frame[c].to_numpy() for c in names}
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        pass  # read as text below, which names the bad line and column
    column_names = ["userId", "movieId", "rating", "timestamp"] if header else names
    frame = _read(path, sep, column_names, header).rename(columns={"userId": "user", "movieId": "movie"})
    numbers = _numbers(path, frame, ["rating", "timestamp"], 2 if header else 1)
    return {"user": frame["user"].to_numpy(object), "movie": frame["movie"].to_numpy(object), **numbers}


def read_ratings(path: Path):
    """(user, movie, rating, timestamp) arrays and the movie -> first genre map of a MovieLens folder."""
    if (path / "u.data").is_file():
        ratings = _read_ratings(path / "u.data", "\t", False)
        items = _read(path / "u.item", "|", ["movie", "title", "release", "video", "url", *GENRES_100K], False,
                      encoding="latin-1")
        flags = items[GENRES_100K].to_numpy()
        if not np.isin(flags, ["0", "1"]).all():
            row, col = map(int, np.argwhere(~np.isin(flags, ["0", "1"]))[0])
            raise DataFileError(path / "u.item", f"genre flags must be 0 or 1, got {flags[row, col]!r}", line=row + 1,
                                column=repr(GENRES_100K[col]))
        first = np.where((flags == "1").any(1), (flags == "1").argmax(1), 0)
        genre = dict(zip(items["movie"], np.array(GENRES_100K, dtype=object)[first]))
    elif (path / "ratings.dat").is_file():
        ratings = _read_ratings(path / "ratings.dat", "::", False)
        movies = _read(path / "movies.dat", "::", ["movie", "title", "genres"], False, encoding="latin-1")
        genre = dict(zip(movies["movie"], movies["genres"].str.split("|").str[0]))
    elif (path / "ratings.csv").is_file():
        ratings = _read_ratings(path / "ratings.csv", ",", True)
        movies = _read(path / "movies.csv", ",", ["movieId", "title", "genres"], True)
        genre = dict(zip(movies["movieId"], movies["genres"].str.split("|").str[0]))
    else:
        raise FileNotFoundError(f"{path}: expected a MovieLens folder with u.data, ratings.dat or ratings.csv")
    return ratings["user"], ratings["movie"], ratings["rating"], ratings["timestamp"].astype(np.int64), genre


def rating_rows(users, items, categories, labels, times, vocabulary: Optional[Vocabulary], history: str,
                max_len: int, test_fraction: float, seed: int, fmt: str, options: dict) -> LoadedData:
    """The DIN MovieLens protocol on encoded-or-raw rating rows (shared with the RecBole loader)."""
    if history not in ("positive", "all"):
        raise ValueError(f"history must be 'positive' or 'all', got {history!r}")
    vocabulary, user_names, users, items, categories = encode_log(vocabulary, users, items, categories)
    order = time_order(users, times)
    users, items, categories, labels = users[order], items[order], categories[order], labels[order]
    behaves = labels > 0 if history == "positive" else np.ones(len(labels), bool)
    # history of row i: the user's behaving rows before i. In the array of behaving rows (same order)
    # they are the ones from the user's first up to, not including, the count of behaving rows before i.
    before = np.cumsum(behaves) - behaves  # behaving rows before i, over all users
    new_user = np.r_[True, users[1:] != users[:-1]]
    user_first = np.maximum.accumulate(np.where(new_user, np.arange(len(users)), 0))
    start = before[user_first]
    samples = Samples({"item": items, "category": categories},
                      {"hist_items": items[behaves], "hist_categories": categories[behaves]},
                      hist_start=start.astype(np.int64), hist_len=(before - start).astype(np.int64),
                      labels=labels.astype(np.float32), users=users).truncate(max_len)
    train, test = samples.split_users(test_fraction, seed)
    return LoadedData(train, test, vocabulary, two_field_schema(vocabulary), fmt,
                      {**options, "history": history, "max_len": max_len, "test_fraction": test_fraction, "seed": seed},
                      user_names=user_names)


def load(path: Union[str, Path], vocabulary: Optional[Vocabulary] = None, seed: int = 0, max_len: int = 100,
         test_fraction: float = TEST_FRACTION, history: str = "positive", threshold: float = 4.0, **_) -> LoadedData:
    path = Path(path)
    users, items, ratings, times, genre = read_ratings(path)
    movies, inverse = np.unique(items, return_inverse=True)  # the genre per distinct movie, not per rating
    categories = np.array([genre.get(str(m), "unknown") for m in movies.tolist()], dtype=object)[inverse.reshape(-1)]
    labels = (ratings >= threshold).astype(np.float32)
    return rating_rows(users, items, categories, labels, times, vocabulary, history, max_len, test_fraction, seed,
                       "movielens", {"threshold": threshold})
