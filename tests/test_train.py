import pytest
import torch

from fastdin.data import SyntheticConfig, SyntheticDIN
from fastdin.model import DIN
from fastdin.train import evaluate, train

TINY = SyntheticConfig(num_categories=12, items_per_category=5, max_history=8, interests_per_user=2, seed=1)


def tiny_model(data, pooling="attention"):
    return DIN(**data.vocab_sizes(), embed_dim=8, pooling=pooling, attention_hidden=(16,), mlp_hidden=(32,))


def test_training_learns():
    data = SyntheticDIN(TINY)
    model = tiny_model(data)
    test = data.stream("test", 2000, 1000)
    before = evaluate(model, test, torch.device("cpu"))["auc"]
    metrics = train(model, data.stream("train", 6000, 128), test, epochs=2, lr=1e-2, progress=False, log=None)
    assert len(metrics["train_loss"]) == len(metrics["epochs"]) == 2
    assert metrics["train_loss"][1] < metrics["train_loss"][0]
    assert metrics["test_auc"] == metrics["epochs"][-1]["test_auc"]
    assert metrics["test_auc"] > 0.75 and metrics["test_auc"] > before + 0.15
    assert 0 < metrics["test_logloss"] < 0.69  # better than a coin
    assert metrics["device"] == "cpu" and metrics["wall_time_s"] > 0


def test_after_backward_runs_between_backward_and_step():
    data = SyntheticDIN(TINY)
    model = tiny_model(data, pooling="sum")
    initial = model.out.weight.detach().clone()
    calls = []

    def hook(m, batch):
        # gradients are there, the step has not happened yet; zeroing them makes Adam's step a no-op
        calls.append((m.out.weight.grad is not None, m.out.weight.detach().clone(), len(batch["label"])))
        for p in m.parameters():
            if p.grad is not None:
                p.grad.zero_()

    train(model, data.stream("train", 300, 128), data.stream("test", 200, 200), epochs=2,
          after_backward=hook, progress=False, log=None)
    assert [c[2] for c in calls] == [128, 128, 44] * 2
    assert all(c[0] for c in calls)
    assert torch.equal(calls[0][1], initial)
    assert torch.equal(model.out.weight, initial)


def test_bad_arguments():
    data = SyntheticDIN(TINY)
    model = tiny_model(data)
    with pytest.raises(ValueError, match="epochs"):
        train(model, data.stream("train", 10, 10), data.stream("test", 10, 10), epochs=0, progress=False)
    one_label = [{**data.batch("test", 0, 8), "label": torch.ones(8)}]
    with pytest.raises(ValueError, match="both labels"):
        evaluate(model, one_label, torch.device("cpu"))
