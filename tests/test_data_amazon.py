"""The Amazon loader on small files in the real format, with the DIN authors' protocol."""
import json

import numpy as np
import pytest

from fastdin.data import DataFileError, load

# user -> [(asin, time)]; u3 has a single review and gives no row
REVIEWS = {"u1": [("a", 3), ("b", 1), ("c", 2), ("d", 5)], "u2": [("b", 7), ("e", 9)], "u3": [("a", 4)],
           "u4": [("c", 1), ("f", 2), ("g", 3)]}
CATEGORY_PATHS = {"a": [["Electronics", "Audio"]], "b": [["Electronics"], ["Electronics", "Cables", "HDMI"]],
                  "c": [["Electronics", "Cameras"]], "d": [["Electronics", "Audio"]], "e": [["Electronics", "TV"]],
                  "f": [["Electronics", "Cameras"]], "g": [["Electronics", "Cables"]], "z": [["Books"]]}


def write(folder, reviews=REVIEWS, meta=CATEGORY_PATHS, name="Electronics"):
    lines = [json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0})
             for u, rs in reviews.items() for a, t in rs]
    (folder / f"reviews_{name}_5.json").write_text("\n".join(lines) + "\n")
    # the 2014 meta files are Python literals (single quotes)
    (folder / f"meta_{name}.json").write_text("".join(repr({"asin": a, "categories": c, "title": "x"}) + "\n"
                                                      for a, c in meta.items()))
    return folder


@pytest.fixture
def loaded(tmp_path):
    return load("amazon", write(tmp_path), seed=3)


def rows(samples, vocabulary):
    """(user index, candidate token, category token, history tokens, label) per row."""
    out = []
    for i in range(len(samples)):
        s, n = samples.hist_start[i], samples.hist_len[i]
        hist = vocabulary.decode("item", samples.sequences["hist_items"][s:s + n]).tolist()
        out.append((samples.users[i], vocabulary.decode("item", [samples.candidates["item"][i]])[0],
                    vocabulary.decode("category", [samples.candidates["category"][i]])[0], hist,
                    samples.labels[i]))
    return out


def user_of(loaded, index):
    return loaded.user_names.decode("user", [index])[0]


def test_protocol(loaded):
    vocab = loaded.vocabulary
    assert vocab.tokens("item") == list("abcdefg") and len(vocab.tokens("category")) == 5
    ordered = {u: [a for a, _ in sorted(rs, key=lambda r: r[1])] for u, rs in REVIEWS.items()}
    for split, samples in (("train", loaded.train), ("test", loaded.test)):
        for user_index, item, category, hist, label in rows(samples, vocab):
            user = user_of(loaded, user_index)
            seq = ordered[user]
            assert user != "u3"
            assert hist == seq[:len(hist)] and len(hist) >= 1  # all earlier reviews, oldest first
            if label == 1:
                assert item == seq[len(hist)]
            else:
                assert item not in seq  # negatives: never reviewed by the user
            assert category == CATEGORY_PATHS[item][-1][-1]  # the last of the last category path
            # the last review is the test pair, the others are training rows
            assert (len(hist) == len(seq) - 1) == (split == "test")
    # one positive and one negative per review after the first
    assert len(loaded.train) == 2 * sum(len(v) - 2 for v in REVIEWS.values() if len(v) > 1)
    assert len(loaded.test) == 2 * 3 and loaded.test.labels.sum() == 3


def test_seeded_and_negatives_vary_with_seed(tmp_path):
    write(tmp_path)
    a, b = load("amazon", tmp_path, seed=1), load("amazon", tmp_path, seed=1)
    assert np.array_equal(a.train.candidates["item"], b.train.candidates["item"])
    drawn = {tuple(load("amazon", tmp_path, seed=s).train.candidates["item"]) for s in range(6)}
    assert len(drawn) > 1


def test_batches_feed_din(loaded):
    from fastdin import DIN

    model = DIN(schema=loaded.schema, attention_hidden=(4,), mlp_hidden=(4,))
    batch = next(iter(loaded.train.batches(4)))
    assert model(batch).shape == (4,)


def test_bad_files(tmp_path):
    write(tmp_path)
    reviews = tmp_path / "reviews_Electronics_5.json"
    lines = reviews.read_text().splitlines()
    reviews.write_text("\n".join(lines[:2] + ['{"reviewerID": "u9", "unixReviewTime": 4}'] + lines[2:]) + "\n")
    with pytest.raises(DataFileError, match=r"reviews_Electronics_5.json, line 3, column asin: the record has no 'asin'"):
        load("amazon", tmp_path)
    reviews.write_text("\n".join(lines[:4] + ["{not json"]) + "\n")
    with pytest.raises(DataFileError, match=r"line 5: not a JSON object"):
        load("amazon", tmp_path)
    reviews.write_text("\n".join(lines[:1] + [lines[1].replace('"unixReviewTime": 1', '"unixReviewTime": "x"')]))
    with pytest.raises(DataFileError, match=r"line 2, column unixReviewTime"):
        load("amazon", tmp_path)
    reviews.write_text("")
    with pytest.raises(DataFileError, match="the file is empty"):
        load("amazon", tmp_path)
    write(tmp_path, meta={k: v for k, v in CATEGORY_PATHS.items() if k != "e"})
    with pytest.raises(DataFileError, match=r"meta_Electronics.json: 1 reviewed items have no meta record, e.g. \['e'\]"):
        load("amazon", tmp_path)
    write(tmp_path, meta={**CATEGORY_PATHS, "a": []})
    with pytest.raises(DataFileError, match=r"meta_Electronics.json, line 1, column categories"):
        load("amazon", tmp_path)
    (tmp_path / "meta_Electronics.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta_Electronics.json"):
        load("amazon", tmp_path)
