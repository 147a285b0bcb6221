import json

import pytest
import torch

import fastdin
from fastdin import MBARegularizer, count_frequencies, functional
from fastdin.cli import TEST_BATCH_SIZE, main
from fastdin.data import SyntheticConfig, SyntheticDIN
from fastdin.model import DIN
from fastdin.train import evaluate

TINY = ["--train-size", "600", "--test-size", "300", "--batch-size", "200", "--max-history", "6",
        "--embed-dim", "4", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("pooling, extra", [("attention", []), ("sum", ["--user-features"])])
def test_train_writes_metrics_and_model(tmp_path, capsys, pooling, extra):
    metrics_path, model_path = tmp_path / "metrics.json", tmp_path / "model.pt"
    code = main(["train", *TINY, *extra, "--epochs", "2", "--pooling", pooling, "--seed", "3",
                 "--metrics-out", str(metrics_path), "--save", str(model_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2: train loss" in printed and "test AUC" in printed and "test logloss" in printed
    metrics = json.loads(metrics_path.read_text())
    assert 0 <= metrics["test_auc"] <= 1 and metrics["test_logloss"] > 0
    assert len(metrics["train_loss"]) == 2 and metrics["wall_time_s"] > 0
    assert (metrics["pooling"], metrics["device"], metrics["backend"], metrics["seed"]) == (pooling, "cpu", "auto", 3)

    # the saved model rebuilds from its config and reproduces the reported test metrics
    saved = torch.load(model_path)
    model = DIN(**saved["model_config"])
    model.load_state_dict(saved["state_dict"])
    data = SyntheticDIN(SyntheticConfig(**saved["data_config"]))
    again = evaluate(model, data.stream("test", 300, TEST_BATCH_SIZE), torch.device("cpu"))
    assert again["auc"] == pytest.approx(metrics["test_auc"], abs=1e-9)
    assert again["logloss"] == pytest.approx(metrics["test_logloss"], rel=1e-6)


def test_info(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    for name in ("fastdin", "python", "torch", "triton", "numpy", "GPU"):
        assert name in printed
    for activation in functional.ACTIVATIONS:
        assert f"attention_pool {activation}" in printed
    assert "dice           train" in printed and "dice           eval" in printed
    if not torch.cuda.is_available():
        assert "reference (no CUDA device)" in printed


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["train", "--pooling", "max"], "invalid choice"),
    (["train", "--backend", "fast"], "invalid choice"),
    (["train", "--epochs", "0"], "must be a positive integer"),
    (["train", "--batch-size", "-4"], "must be a positive integer"),
    (["train", "--lr", "0"], "must be a positive number"),
    (["train", "--device", "tpu"], "--device must be"),
    (["train", "--metrics-out", "no/such/folder/m.json"], "does not exist"),
    (["train", "--save", "no/such/folder/m.pt"], "does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_or_triton_without_a_gpu(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["train", *TINY[:-2], "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--backend", "triton"])
    assert "--backend triton needs a CUDA device" in capsys.readouterr().err


def _train_tiny(tmp_path, *flags):
    metrics_path, model_path = tmp_path / "metrics.json", tmp_path / "model.pt"
    assert main(["train", *TINY, "--seed", "2", *flags, "--metrics-out", str(metrics_path),
                 "--save", str(model_path)]) == 0
    return json.loads(metrics_path.read_text()), torch.load(model_path)


def test_mba_lambda_counts_saves_and_changes_training(tmp_path):
    plain, _ = _train_tiny(tmp_path)
    metrics, saved = _train_tiny(tmp_path, "--mba-lambda", "0.5")
    assert (plain["regularizer"], plain["reg_lambda"]) == ("none", None)
    assert (metrics["regularizer"], metrics["reg_lambda"], metrics["optimizer"]) == ("mba", 0.5, "adam")
    assert saved["regularization"] == {"regularizer": "mba", "reg_lambda": 0.5}
    assert metrics["test_logloss"] != plain["test_logloss"]

    # the saved counts are the frequencies of the training rows the command streamed
    data = SyntheticDIN(SyntheticConfig(**saved["data_config"]))
    model = DIN(**saved["model_config"])
    expected = count_frequencies(data.stream("train", 600, 200), model)
    assert saved["mba_counts"].keys() == expected.keys() == {"item", "category"}
    for name, counts in expected.items():
        assert torch.equal(saved["mba_counts"][name], counts), name
    assert saved["mba_counts"]["item"].sum() > 600  # candidates and history items were counted
    # and rebuild the regularizer next to the loaded model
    model.load_state_dict(saved["state_dict"])
    MBARegularizer(model.embedding_tables(), saved["mba_counts"], saved["regularization"]["reg_lambda"])


def test_l2(tmp_path):
    plain, _ = _train_tiny(tmp_path)
    metrics, saved = _train_tiny(tmp_path, "--l2", "0.01")
    assert (metrics["regularizer"], metrics["reg_lambda"]) == ("l2", 0.01)
    assert "mba_counts" not in saved
    assert metrics["test_logloss"] != plain["test_logloss"]


@pytest.mark.parametrize("flags", [
    ["--optimizer", "sgd", "--lr", "0.5"],
    ["--optimizer", "adagrad", "--lr", "0.05", "--sparse-embeddings", "--mba-lambda", "1"],
    ["--optimizer", "sgd", "--lr", "0.5", "--sparse-embeddings", "--l2", "0.01"],
    ["--sparse-embeddings", "--mba-lambda", "1"],  # adam: SparseAdam for the tables
])
def test_optimizers_and_sparse_embeddings(tmp_path, flags):
    metrics, saved = _train_tiny(tmp_path, *flags, "--epochs", "2")
    optimizer = flags[flags.index("--optimizer") + 1] if "--optimizer" in flags else "adam"
    assert metrics["optimizer"] == optimizer
    assert metrics["sparse_embeddings"] == saved["model_config"]["sparse_embeddings"] == ("--sparse-embeddings" in flags)
    assert all(0 < loss < 5 for loss in metrics["train_loss"]) and 0 <= metrics["test_auc"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--mba-lambda", "1", "--l2", "1"], "not allowed with argument"),
    (["train", "--mba-lambda", "0"], "must be a positive number"),
    (["train", "--l2", "-1"], "must be a positive number"),
    (["train", "--optimizer", "rmsprop"], "invalid choice"),
    (["train", "--l2", "1", "--sparse-embeddings"], "SparseAdam"),
])
def test_bad_regularization_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastdin {fastdin.__version__}"


@pytest.mark.parametrize("flags", [["--batch-size", "1"], ["--train-size", "1"]])
def test_train_refuses_one_row_batches(capsys, flags):
    """Dice's batch statistics need two rows: refused up front with one line, not a traceback later."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, *flags])
    assert exit_info.value.code == 2
    assert "must be at least 2: Dice's batch statistics" in capsys.readouterr().err


def test_train_drops_a_one_row_last_batch(tmp_path, capsys):
    metrics_path = tmp_path / "metrics.json"
    tiny = [a if a != "600" else "201" for a in TINY]  # 200 + 1 rows at batch size 200
    assert main(["train", *tiny, "--epochs", "1", "--metrics-out", str(metrics_path)]) == 0
    assert "training on 200 rows per epoch" in capsys.readouterr().out
    assert 0 <= json.loads(metrics_path.read_text())["test_auc"] <= 1


def test_train_with_one_test_label_reports_nan_auc(tmp_path, capsys):
    metrics_path = tmp_path / "metrics.json"
    tiny = [a if a != "300" else "1" for a in TINY]  # one test row: one label
    assert main(["train", *tiny, "--epochs", "1", "--metrics-out", str(metrics_path)]) == 0
    assert "test AUC nan (undefined: the test rows hold one label only)" in capsys.readouterr().out
    metrics = json.loads(metrics_path.read_text())
    assert metrics["test_auc"] is None and metrics["test_logloss"] > 0
