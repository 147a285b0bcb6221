"""The MovieLens (ml-100k, ml-1m/10m, ml-20m+) and RecBole atomic-file loaders on small files in their formats."""
import numpy as np
import pytest

from fastdin.data import DataFileError, load
from fastdin.data.movielens import GENRES_100K

RATINGS = [  # user, movie, rating, time
    (1, 10, 5, 100), (1, 11, 2, 50), (1, 12, 4, 150), (1, 13, 4, 120), (2, 10, 3, 10), (2, 12, 5, 20),
    (3, 11, 4, 5), (3, 13, 1, 6), (3, 10, 5, 7), (4, 12, 4, 1), (5, 13, 5, 9), (5, 11, 4, 8),
    (6, 10, 1, 3), (6, 11, 5, 4), (7, 12, 4, 30), (7, 10, 2, 31), (8, 13, 5, 2), (8, 12, 3, 1),
]
GENRES = {10: ["Comedy", "Drama"], 11: ["Action"], 12: ["Drama", "War"], 13: ["Horror"]}


def write_100k(folder):
    (folder / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RATINGS))
    lines = []
    for movie, genres in GENRES.items():
        flags = "|".join("1" if g in genres else "0" for g in GENRES_100K)
        lines.append(f"{movie}|Title {movie} (1995)|01-Jan-1995||http://x|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))


def write_1m(folder):
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in RATINGS))
    (folder / "movies.dat").write_bytes("".join(f"{m}::Caf\xe9 {m} (1995)::{'|'.join(g)}\n"
                                                for m, g in GENRES.items()).encode("latin-1"))


def write_20m(folder):
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" +
                                        "".join(f"{u},{m},{r}.0,{t}\n" for u, m, r, t in RATINGS))
    (folder / "movies.csv").write_text("movieId,title,genres\n" +
                                       "".join(f'{m},"Title, {m} (1995)",{"|".join(g)}\n' for m, g in GENRES.items()))


def write_recbole(folder):
    (folder / "ml.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" +
                                     "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RATINGS))
    (folder / "ml.item").write_text("item_id:token\tmovie_title:token_seq\tclass:token_seq\n" +
                                    "".join(f"{m}\tTitle {m}\t{' '.join(g)}\n" for m, g in GENRES.items()))


WRITERS = {"movielens-100k": ("movielens", write_100k), "movielens-1m": ("movielens", write_1m),
           "movielens-20m": ("movielens", write_20m), "recbole": ("recbole", write_recbole)}


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("history", ["positive", "all"])
def test_protocol(tmp_path, kind, history):
    fmt, writer = WRITERS[kind]
    writer(tmp_path)
    loaded = load(fmt, tmp_path, test_fraction=0.4, seed=1, history=history, max_len=2)
    vocab = loaded.vocabulary
    assert loaded.train is not None and loaded.test is not None and len(loaded.train) + len(loaded.test) == len(RATINGS)
    users = {}
    for split, samples in (("train", loaded.train), ("test", loaded.test)):
        for i in range(len(samples)):
            user = int(loaded.user_names.decode("user", [samples.users[i]])[0])
            users.setdefault(user, set()).add(split)
            movie = int(vocab.decode("item", [samples.candidates["item"][i]])[0])
            (rating, time), = [(r, t) for u, m, r, t in RATINGS if u == user and m == movie]
            assert samples.labels[i] == (rating >= 4)
            assert vocab.decode("category", [samples.candidates["category"][i]])[0] == GENRES[movie][0]
            earlier = sorted((t, m) for u, m, r, t in RATINGS if u == user and t < time and (r >= 4 or history == "all"))
            s, n = samples.hist_start[i], samples.hist_len[i]
            hist = [int(x) for x in vocab.decode("item", samples.sequences["hist_items"][s:s + n])]
            assert hist == [m for _, m in earlier][-2:]  # by time, the last max_len
    assert all(len(splits) == 1 for splits in users.values())  # split by user
    assert len(users) == 8


def test_movielens_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="u.data, ratings.dat or ratings.csv"):
        load("movielens", tmp_path)
    write_20m(tmp_path)
    text = (tmp_path / "ratings.csv").read_text().splitlines()
    text[3] = "1,12,four,150"
    (tmp_path / "ratings.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataFileError, match=r"ratings.csv, line 4, column 'rating': expected a number, got 'four'"):
        load("movielens", tmp_path)
    (tmp_path / "ratings.csv").write_text("userId,movieId,timestamp\n1,2,3\n")
    with pytest.raises(DataFileError, match=r"ratings.csv, line 1, column 'rating': missing column"):
        load("movielens", tmp_path)
    (tmp_path / "ratings.csv").write_text("")
    with pytest.raises(DataFileError, match="the file is empty"):
        load("movielens", tmp_path)


def test_100k_genre_flags_checked(tmp_path):
    write_100k(tmp_path)
    lines = (tmp_path / "u.item").read_text(encoding="latin-1").splitlines()
    lines[1] = lines[1][:-1] + "7"
    (tmp_path / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(DataFileError, match=r"u.item, line 2, column 'Western': genre flags must be 0 or 1"):
        load("movielens", tmp_path)


def test_recbole_errors(tmp_path):
    write_recbole(tmp_path)
    (tmp_path / "ml.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t4\tnow\n")
    with pytest.raises(DataFileError, match=r"ml.inter, line 2, column 'timestamp': expected a number"):
        load("recbole", tmp_path)
    (tmp_path / "ml.inter").write_text("user_id\titem_id\n1\t2\n")
    with pytest.raises(DataFileError, match=r"line 1, column 'user_id': header column 'user_id' lacks its type"):
        load("recbole", tmp_path)
    (tmp_path / "ml.inter").write_text("user_id:token\titem_id:token\tlabel:float\ttimestamp:float\n1\t2\t3\t4\n")
    with pytest.raises(DataFileError, match=r"line 2, column 'label': labels must be 0 or 1, got '3'"):
        load("recbole", tmp_path)
    (tmp_path / "ml.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t4\n")
    with pytest.raises(DataFileError, match=r"column 'rating': missing column"):
        load("recbole", tmp_path)


def test_recbole_label_column(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\tlabel:float\ttimestamp:float\n" +
                                      "".join(f"{u}\t{m}\t{int(r >= 4)}\t{t}\n" for u, m, r, t in RATINGS))
    loaded = load("recbole", tmp_path, test_fraction=0.4)
    assert np.isclose(np.concatenate([loaded.train.labels, loaded.test.labels]).mean(),
                      np.mean([r >= 4 for *_, r, _ in [(u, m, r, t) for u, m, r, t in RATINGS]]))
    assert loaded.vocabulary.tokens("category") == ["none"]
