"""Column-map loaders on small files in their real formats: generic CSV/Parquet, BARS, DIEN."""
import json

import numpy as np
import pytest
import torch

from fastdin import DIN
from fastdin.data import DataFileError, Vocabulary, load

BARS_HEADER = "label,user_id,item_id,cate_id,item_history,cate_history\n"
BARS_TRAIN = [("1", "u1", "i5", "c1", "i1^i2^i3", "c1^c2^c1"), ("0", "u1", "i9", "c3", "i1^i2", "c1^c2"),
              ("1", "u2", "i2", "c2", "i4", "c3"), ("0", "u3", "i1", "c1", "", "")]
BARS_TEST = [("1", "u4", "i3", "c1", "i2^i77", "c2^c9"), ("0", "u2", "i5", "c1", "i4^i2", "c3^c2")]


def write_bars(folder, train=BARS_TRAIN, test=BARS_TEST):
    for name, rows in (("train.csv", train), ("test.csv", test)):
        (folder / name).write_text(BARS_HEADER + "".join(",".join(r) + "\n" for r in rows))
    return folder


def history(samples, i, name="hist_items"):
    s, n = samples.hist_start[i], samples.hist_len[i]
    return samples.sequences[name][s:s + n].tolist()


def test_bars(tmp_path):
    loaded = load("bars", write_bars(tmp_path))
    vocab = loaded.vocabulary
    assert vocab.tokens("item") == ["i1", "i2", "i3", "i4", "i5", "i9"]  # fitted on train.csv only
    assert loaded.train.labels.tolist() == [1, 0, 1, 0] and len(loaded.test) == 2
    assert vocab.decode("item", history(loaded.train, 0)).tolist() == ["i1", "i2", "i3"]
    assert vocab.decode("category", history(loaded.train, 0, "hist_categories")).tolist() == ["c1", "c2", "c1"]
    assert history(loaded.train, 3) == []
    assert history(loaded.test, 0) == [vocab.encode("item", ["i2"])[0], 0]  # i77 is unknown: 0
    batch = next(iter(loaded.train.batches(4)))
    assert batch["hist_items"].shape == (4, 3) and batch["lengths"].tolist() == [3, 2, 1, 0]
    model = DIN(schema=loaded.schema, attention_hidden=(4,), mlp_hidden=(4,))
    assert model(batch).shape == (4,)


def test_dien(tmp_path):
    rows = [("0", "A1", "b1", "Books", "b2\x02b3", "Books\x02Music"), ("1", "A1", "b4", "Music", "b2", "Books")]
    (tmp_path / "local_train_splitByUser").write_text("".join("\t".join(r) + "\n" for r in rows))
    (tmp_path / "local_test_splitByUser").write_text("\t".join(rows[0]) + "\n")
    loaded = load("dien", tmp_path, max_len=1)
    vocab = loaded.vocabulary
    assert vocab.decode("item", history(loaded.train, 0)).tolist() == ["b3"]  # the last max_len
    assert vocab.decode("category", history(loaded.train, 0, "hist_categories")).tolist() == ["Music"]
    assert loaded.train.labels.tolist() == [0, 1] and len(loaded.test) == 1
    bad = "\t".join(rows[0][:4] + ("b2\x02b3", "Books")) + "\n"
    (tmp_path / "local_train_splitByUser").write_text(bad)
    with pytest.raises(DataFileError, match=r"local_train_splitByUser, line 1, column 'category_history': history of 1 ids"):
        load("dien", tmp_path)


COLUMN_MAP = {
    "label": "clicked", "user": "uid", "candidates": {"item": "ad", "shop": "shop"},
    "sequences": {"hist_ad": {"column": "ads", "target": "item"}, "hist_shop": {"column": "shops", "target": "shop"}},
    "sparse": {"gender": "gender"}, "multi_hot": {"tags": {"column": "tags", "pooling": "mean"}},
    "dense": ["price"], "sep": "|", "embed_dim": 4, "embed_dims": {"item": 6},
}
ROWS = [
    {"clicked": 1, "uid": "x", "ad": 7, "shop": "s1", "ads": "3|4", "shops": "s1|s2", "gender": "f", "tags": "t1|t2", "price": 1.5},
    {"clicked": 0, "uid": "y", "ad": 3, "shop": "s2", "ads": "", "shops": "", "gender": "m", "tags": "t2", "price": 0.5},
    {"clicked": 1, "uid": "x", "ad": 4, "shop": "s2", "ads": "7", "shops": "s1", "gender": "f", "tags": "", "price": 2.0},
]


def write_csv(path, rows=ROWS):
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_parquet(path, rows=ROWS):
    import pandas as pd

    frame = pd.DataFrame(rows)
    for column in ("ads", "shops", "tags"):  # Parquet holds real lists
        frame[column] = [s.split("|") if s else [] for s in frame[column]]
    frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_generic(tmp_path, kind):
    path = (write_csv if kind == "csv" else write_parquet)(tmp_path / f"clicks.{kind}")
    (tmp_path / "map.json").write_text(json.dumps(COLUMN_MAP))
    loaded = load("csv", path, schema=tmp_path / "map.json")
    rows, vocab = loaded.train, loaded.vocabulary
    assert loaded.test is None and len(rows) == 3
    assert vocab.tokens("item") == ["3", "4", "7"]  # the ads and their histories share one vocabulary
    assert vocab.decode("item", history(rows, 0, "hist_ad")).tolist() == ["3", "4"]
    assert rows.multi_hot["tags"].tolist() == [vocab.encode("tags", ["t1", "t2"]).tolist(),
                                               [vocab.encode("tags", ["t2"])[0], 0], [0, 0]]
    assert rows.dense["price"][:, 0].tolist() == [1.5, 0.5, 2.0]
    assert rows.users[0] == rows.users[2] != rows.users[1]
    schema = loaded.schema
    assert schema.behaviour_dim == 6 + 4 and [f.name for f in schema.sparse] == ["gender"]
    model = DIN(schema=schema, attention_hidden=(4,), mlp_hidden=(4,))
    assert model(rows.batch(np.arange(3))).shape == (3,)


def test_vocabulary_round_trip(tmp_path):
    loaded = load("bars", write_bars(tmp_path))
    saved = json.loads(json.dumps(loaded.vocabulary.to_dict()))
    again = Vocabulary.from_dict(saved)
    assert again == loaded.vocabulary
    assert again.encode("item", ["i3", "zzz"]).tolist() == [3, 0]
    assert again.decode("item", [3, 0]).tolist() == ["i3", None]
    # a reload with the saved vocabulary encodes exactly as the first load
    reloaded = load("bars", tmp_path, vocabulary=again)
    for split in ("train", "test"):
        a, b = loaded.split(split), reloaded.split(split)
        assert np.array_equal(a.candidates["item"], b.candidates["item"])
        assert np.array_equal(a.sequences["hist_items"], b.sequences["hist_items"])
    # ints and strings of the same id encode alike
    v = Vocabulary()
    v.fit("item", np.array([3, 10]))
    assert v.encode("item", ["3", "10"]).tolist() == v.encode("item", np.array([3.0, 10.0])).tolist() == [2, 1]


def bars_error(tmp_path, train, words):
    write_bars(tmp_path, train=train)
    with pytest.raises(DataFileError, match=words):
        load("bars", tmp_path)


def test_bars_bad_files(tmp_path):
    bad_label = BARS_TRAIN[:2] + [("2",) + BARS_TRAIN[2][1:]]
    bars_error(tmp_path, bad_label, r"train.csv, line 4, column 'label': labels must be 0 or 1, got '2'")
    malformed = BARS_TRAIN[:1] + [BARS_TRAIN[1][:4] + ("i1^^i2", "c1^c2^c3")]
    bars_error(tmp_path, malformed, r"train.csv, line 3, column 'item_history': malformed history 'i1\^\^i2'")
    unequal = BARS_TRAIN[:2] + [BARS_TRAIN[2][:5] + ("c3^c1",)]
    bars_error(tmp_path, unequal, r"train.csv, line 4, column 'cate_history': history of 2 ids, but 'item_history' has 1")
    missing_id = [BARS_TRAIN[0][:2] + ("",) + BARS_TRAIN[0][3:]]
    bars_error(tmp_path, missing_id, r"train.csv, line 2, column 'item_id': missing id")
    (tmp_path / "train.csv").write_text("label,user_id,item_id,item_history,cate_history\n1,u,i,a,b\n")
    with pytest.raises(DataFileError, match=r"train.csv, line 1, column 'cate_id': missing column 'cate_id'"):
        load("bars", tmp_path)
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(DataFileError, match=r"train.csv: the file is empty"):
        load("bars", tmp_path)
    (tmp_path / "train.csv").write_text(BARS_HEADER)
    with pytest.raises(DataFileError, match=r"train.csv: the file holds no rows"):
        load("bars", tmp_path)
    (tmp_path / "train.csv").write_text(BARS_HEADER + "1,u1,i5,c1,i1,c1\n1,u1,i5,c1,i1,c1,extra,more\n")
    with pytest.raises(DataFileError, match=r"train.csv: malformed CSV: .*line 3"):
        load("bars", tmp_path)


def test_generic_bad_files(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps(COLUMN_MAP))
    path = write_csv(tmp_path / "c.csv", [dict(ROWS[0]), {**ROWS[1], "price": "cheap"}])
    with pytest.raises(DataFileError, match=r"c.csv, line 3, column 'price': expected a number, got 'cheap'"):
        load("csv", path, schema=tmp_path / "map.json")
    path = write_parquet(tmp_path / "c.parquet", [dict(ROWS[0]), {**ROWS[1], "clicked": 5}])
    with pytest.raises(DataFileError, match=r"c.parquet, row 2, column 'clicked': labels must be 0 or 1, got 5"):
        load("csv", path, schema=tmp_path / "map.json")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataFileError, match="junk.parquet: not a Parquet file"):
        load("csv", tmp_path / "junk.parquet", schema=tmp_path / "map.json")
    with pytest.raises(ValueError, match="needs a column map"):
        load("csv", path)
    (tmp_path / "bad.json").write_text(json.dumps({**COLUMN_MAP, "labels": "x"}))
    with pytest.raises(ValueError, match="bad.json: .*unexpected keyword argument 'labels'"):
        load("csv", path, schema=tmp_path / "bad.json")


def test_torch_dataloader_of_samples(tmp_path):
    """train() takes a torch DataLoader: a Dataset of rows, collated into dict batches."""
    from fastdin.train import train

    loaded = load("bars", write_bars(tmp_path, train=BARS_TRAIN * 8))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(loaded.train)

        def __getitem__(self, i):
            return loaded.train.batch(np.array([i]))

    def collate(rows):  # histories of different lengths: pad per batch through Samples.batch
        return loaded.train.batch(np.array([int(r["_row"]) for r in rows]))

    class Indexed(Rows):
        def __getitem__(self, i):
            return {"_row": i}

    loader = torch.utils.data.DataLoader(Indexed(), batch_size=8, shuffle=True, collate_fn=collate)
    model = DIN(schema=loaded.schema, attention_hidden=(4,), mlp_hidden=(4,))
    out = train(model, loader, loaded.train.batches(16), epochs=1, progress=False, log=None)
    assert len(out["epochs"]) == 1 and np.isfinite(out["train_loss"][0])
