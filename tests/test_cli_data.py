"""`fastdin train --data ... --path ...`, `fastdin evaluate`, `fastdin predict` on small files."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from fastdin import DIN
from fastdin.cli import main
from fastdin.data import Vocabulary, load
from fastdin.evaluate import evaluate, predict

from test_data_columns import BARS_TRAIN, COLUMN_MAP, ROWS, write_bars, write_csv
from test_data_movielens import write_recbole

TINY = ["--embed-dim", "4", "--batch-size", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture
def bars(tmp_path):
    rng = np.random.default_rng(0)
    rows = [BARS_TRAIN[i] for i in rng.integers(0, 4, 60)]
    rows = [(r[0], f"u{k % 9}") + r[2:] for k, r in enumerate(rows)]
    folder = tmp_path / "bars"
    folder.mkdir()
    return write_bars(folder, train=rows, test=rows[:20])


def test_train_evaluate_predict(bars, tmp_path, capsys):
    ckpt, metrics_path = tmp_path / "m.pt", tmp_path / "metrics.json"
    assert main(["train", "--data", "bars", "--path", str(bars), "--epochs", "3", "--valid-fraction", "0.3",
                 "--save", str(ckpt), "--metrics-out", str(metrics_path), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "validation AUC" in printed and "test: AUC" in printed and "GAUC" in printed
    metrics = json.loads(metrics_path.read_text())
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == metrics["best_epoch"] and saved["valid_auc"] == metrics["valid_auc"]
    assert saved["data"]["format"] == "bars" and saved["vocabulary"]["item"]

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--path", str(bars), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    model = DIN.from_checkpoint(ckpt)
    loaded = load("bars", bars, vocabulary=Vocabulary.from_dict(model.vocabulary))
    expected = evaluate(model, loaded.test)
    assert written["auc"] == pytest.approx(expected["auc"]) and written["gauc"] == pytest.approx(expected["gauc"])
    assert written["logloss"] == pytest.approx(expected["logloss"])
    assert metrics["test"]["auc"] == pytest.approx(expected["auc"])  # the best epoch's model was saved
    assert f"AUC {expected['auc']:.4f}" in capsys.readouterr().out

    for suffix in ("csv", "parquet"):
        scores = tmp_path / f"scores.{suffix}"
        assert main(["predict", "--checkpoint", str(ckpt), "--path", str(bars), "--out", str(scores)]) == 0
        frame = pd.read_csv(scores) if suffix == "csv" else pd.read_parquet(scores)
        assert list(frame.columns) == ["user", "item", "category", "label", "score"]
        np.testing.assert_allclose(frame["score"].to_numpy(), predict(model, loaded.test), rtol=1e-6)
        assert frame["item"].astype(str).tolist()[:2] == ["i3" if r[2] == "i3" else r[2] for r in
                                                          [line.split(",") for line in
                                                           (bars / "test.csv").read_text().splitlines()[1:3]]]


def test_resume_and_early_stopping(bars, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--data", "bars", "--path", str(bars), "--epochs", "1", "--save", str(ckpt), *TINY]) == 0
    first = torch.load(ckpt, weights_only=True)
    assert first["epoch"] == 1 and len(first["optimizer_state"]) == 1
    assert main(["train", "--data", "bars", "--path", str(bars), "--epochs", "3", "--resume", str(ckpt),
                 "--save", str(ckpt), "--patience", "1", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/3" in printed and "epoch 1/3" not in printed
    assert main(["train", "--data", "bars", "--path", str(bars), "--epochs", "1", "--resume", str(ckpt), *TINY]) == 2
    assert "leaves nothing to resume" in capsys.readouterr().out
    # evaluate and predict report a bad file in one line too
    (bars / "test.csv").write_text("label,user_id,item_id,cate_id,item_history,cate_history\n1,u,i,c,a^,b^\n")
    for command in (["evaluate"], ["predict", "--out", str(tmp_path / "s.csv")]):
        assert main([*command, "--checkpoint", str(ckpt), "--path", str(bars)]) == 2
        assert f"fastdin {command[0]}: " in capsys.readouterr().out
    assert not (tmp_path / "s.csv").exists()


def test_patience_stops_early(bars, tmp_path, capsys):
    metrics_path = tmp_path / "m.json"
    # a learning rate this large makes the validation AUC stall quickly
    assert main(["train", "--data", "bars", "--path", str(bars), "--epochs", "30", "--patience", "2", "--lr", "0.5",
                 "--metrics-out", str(metrics_path), *TINY]) == 0
    metrics = json.loads(metrics_path.read_text())
    ran = len(metrics["epochs"])
    assert ran < 30 and ran - metrics["best_epoch"] == 2


def test_generic_csv_and_recbole(tmp_path, capsys):
    rows = [dict(r, uid=f"u{k % 5}") for k, r in enumerate(ROWS * 12)]
    path = write_csv(tmp_path / "clicks.csv", rows)
    (tmp_path / "map.yaml").write_text(json.dumps(COLUMN_MAP))  # JSON is YAML
    ckpt = tmp_path / "c.pt"
    assert main(["train", "--data", "csv", "--path", str(path), "--schema", str(tmp_path / "map.yaml"),
                 "--epochs", "1", "--save", str(ckpt), "--valid-fraction", "0.4", *TINY]) == 0
    assert main(["evaluate", "--checkpoint", str(ckpt), "--path", str(path)]) == 0
    assert "all: AUC" in capsys.readouterr().out
    folder = tmp_path / "ml"
    folder.mkdir()
    write_recbole(folder)
    assert main(["train", "--data", "recbole", "--path", str(folder), "--epochs", "1", "--valid-fraction", "0.9",
                 *TINY]) == 2
    assert "training rows are left after holding out" in capsys.readouterr().out
    assert main(["train", "--data", "recbole", "--path", str(folder), "--epochs", "1", "--valid-fraction", "0.3",
                 *TINY]) == 0


@pytest.mark.parametrize("argv, words", [
    (["train", "--data", "bars", *TINY], "--data bars needs --path"),
    (["train", "--data", "csv", "--path", "x.csv", *TINY], "needs --schema FILE"),
    (["train", "--data", "bars", "--path", "missing-folder", *TINY], "no such file or folder"),
    (["train", "--data", "bars", "--path", "x", "--mba-lambda", "1", *TINY], "--mba-lambda is for the synthetic data"),
])
def test_train_refuses(argv, words, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    captured = capsys.readouterr()
    assert words in captured.out + captured.err


def test_bad_file_is_one_line(bars, capsys):
    (bars / "train.csv").write_text("label,user_id,item_id,cate_id,item_history,cate_history\n3,u,i,c,,\n")
    assert main(["train", "--data", "bars", "--path", str(bars), *TINY]) == 2
    assert "train.csv, line 2, column 'label': labels must be 0 or 1, got '3'" in capsys.readouterr().out
