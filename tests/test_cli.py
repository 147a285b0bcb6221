import json

import pytest
import torch

from fastdin import functional
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
