"""GAUC, evaluate and predict against the model's own forward, and DIN.from_checkpoint."""
import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from fastdin import DIN
from fastdin.data import load
from fastdin.evaluate import evaluate, gauc, predict

from test_data_columns import write_bars


def test_gauc_by_hand():
    # user a: 3 rows, scores rank one positive over one negative out of 2 pairs -> AUC 0.5
    # user b: 2 rows, ranked right -> AUC 1; user c: only positives -> left out
    labels = np.array([1, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.5, 0.7, 0.2, 0.9, 0.1, 0.3, 0.4])
    users = np.array(["a", "a", "a", "b", "b", "c", "c"])
    assert gauc(labels, scores, users) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)
    assert np.isnan(gauc(np.array([1, 1]), np.array([0.1, 0.2]), np.array([1, 2])))
    with pytest.raises(ValueError, match="one entry per row"):
        gauc(labels, scores[:3], users)


@pytest.fixture
def trained(tmp_path):
    loaded = load("bars", write_bars(tmp_path, train=__import__("test_data_columns").BARS_TRAIN * 4))
    torch.manual_seed(0)
    model = DIN(schema=loaded.schema, attention_hidden=(4,), mlp_hidden=(4,), mlp_activation="dice")
    model.train()
    model(loaded.train.batch(np.arange(len(loaded.train))))  # running statistics move off their start
    return model.eval(), loaded


def test_predict_and_evaluate_match_forward(trained):
    model, loaded = trained
    rows = loaded.train
    with torch.no_grad():
        expected = torch.sigmoid(model(rows.batch(np.arange(len(rows))))).double().numpy()
    for batch_size in (1, 3, 4096):
        np.testing.assert_allclose(predict(model, rows, batch_size=batch_size), expected, rtol=1e-6)
    # a list of batches gives the same (and keeps its order)
    np.testing.assert_allclose(predict(model, list(rows.batches(5))), expected, rtol=1e-6)
    metrics = evaluate(model, rows, batch_size=3)
    assert metrics["auc"] == pytest.approx(roc_auc_score(rows.labels, expected))
    assert metrics["logloss"] == pytest.approx(log_loss(rows.labels, expected))
    assert metrics["gauc"] == pytest.approx(gauc(rows.labels, expected, rows.users))
    assert metrics["rows"] == len(rows) and metrics["users"] == 3
    assert not model.training


def test_evaluate_needs_both_labels(trained):
    model, loaded = trained
    positives = loaded.train.subset(loaded.train.labels == 1)
    with pytest.raises(ValueError, match="both labels"):
        evaluate(model, positives)


def test_from_checkpoint_keeps_vocabulary(trained, tmp_path):
    model, loaded = trained
    model.vocabulary = loaded.vocabulary.to_dict()
    torch.save(model.checkpoint(), tmp_path / "m.pt")
    again = DIN.from_checkpoint(tmp_path / "m.pt")
    assert again.vocabulary == loaded.vocabulary.to_dict()
    np.testing.assert_array_equal(predict(again, loaded.test), predict(model, loaded.test))
    with pytest.raises(ValueError, match="not a fastdin checkpoint"):
        DIN.from_checkpoint({"weights": 1})
