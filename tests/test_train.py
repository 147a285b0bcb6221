import math

import pytest
import torch
from conftest import TEST_SEED

from fastdin.data import SyntheticConfig, SyntheticDIN
from fastdin.model import DIN
from fastdin.train import evaluate, make_optimizers, train

TINY = SyntheticConfig(num_categories=12, items_per_category=5, max_history=8, interests_per_user=2, seed=TEST_SEED + 1)


def tiny_model(data, pooling="attention", sparse_embeddings=False):
    return DIN(**data.vocab_sizes(), embed_dim=8, pooling=pooling, attention_hidden=(16,), mlp_hidden=(32,),
               sparse_embeddings=sparse_embeddings)


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


OPTIMIZER_CLASSES = {"sgd": ["SGD"], "adagrad": ["Adagrad"], "adam": ["Adam"]}


@pytest.mark.parametrize("optimizer, lr, steps", [("sgd", 0.5, 3), ("adagrad", 0.05, 3), ("adam", 0.01, 1)])
def test_sparse_embeddings_train_as_dense_ones(optimizer, lr, steps):
    # SGD and Adagrad leave a row without gradient alone, so sparse and dense agree at every step;
    # Adam moves such rows by its momentum from the second step on, SparseAdam does not.
    data = SyntheticDIN(TINY)
    train_rows = data.stream("train", 64 * steps, 64)
    params = []
    for sparse in (False, True):
        torch.manual_seed(TEST_SEED)
        model = tiny_model(data, sparse_embeddings=sparse)
        initial = model.embeddings["item"].weight.detach().clone()
        expected = OPTIMIZER_CLASSES[optimizer] + (["SparseAdam"] if sparse and optimizer == "adam" else [])
        assert [type(o).__name__ for o in make_optimizers(model, lr, optimizer)] == expected
        train(model, train_rows, data.stream("test", 200, 200), epochs=1, lr=lr, optimizer=optimizer,
              progress=False, log=None)
        assert model.embeddings["item"].weight.grad.is_sparse == sparse
        params.append(dict(model.named_parameters()))
    dense, sparse = params
    seen = torch.zeros(len(initial), dtype=torch.bool)
    for batch in train_rows:
        seen[model.batch_ids(batch)["item"]] = True
    seen[0] = False  # padding
    assert not torch.equal(dense["embeddings.item.weight"][seen], initial[seen])
    assert torch.equal(dense["embeddings.item.weight"][~seen], initial[~seen])
    for name in dense:
        if name.startswith("embeddings.") and optimizer == "adam":
            # SparseAdam adds eps before the bias correction, Adam after: after one step a row with
            # gradient g moves lr g / (|g| + eps) under Adam and lr g / (|g| + c eps) under SparseAdam,
            # c = 1 / sqrt(1 - beta2) = 31.6; the difference peaks at |g| = sqrt(c) eps, at 0.70 lr
            # (seed 1 put a row past the 0.3 lr once used here), and rows with |g| >> eps agree
            torch.testing.assert_close(sparse[name], dense[name], rtol=0, atol=0.7 * lr, msg=name)
        else:
            torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_arguments():
    data = SyntheticDIN(TINY)
    model = tiny_model(data)
    with pytest.raises(ValueError, match="epochs"):
        train(model, data.stream("train", 10, 10), data.stream("test", 10, 10), epochs=0, progress=False)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(model, data.stream("train", 10, 10), data.stream("test", 10, 10), optimizer="rmsprop", progress=False)
    one_label = [{**data.batch("test", 0, 8), "label": torch.ones(8)}]
    metrics = evaluate(model, one_label, torch.device("cpu"))  # AUC is undefined with one label
    assert math.isnan(metrics["auc"]) and math.isfinite(metrics["logloss"])
