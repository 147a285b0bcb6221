"""fastdin.patch on RecBole 1.2.1's DIN, built by RecBole's Config / create_dataset / data_preparation
on the ml-100k data RecBole ships (a short history and small sizes, to keep the test quick)."""
import copy
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import fastdin
from patch_checks import assert_patch_keeps_numbers, assert_unpatch_restores, rel_err

recbole = pytest.importorskip("recbole", reason="recbole is not installed (tests/requirements-peers.txt)")
# RecBole 1.2.1's Config aliases NumPy 1 names that NumPy 2 removed; give it the NumPy 2 spellings
for _old, _new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, _old):
        setattr(np, _old, _new)
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.layers import SequenceAttLayer  # noqa: E402
from recbole.model.sequential_recommender import DIN  # noqa: E402

T = 6


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    settings = {
        "data_path": os.path.join(os.path.dirname(recbole.__file__), "dataset_example"),
        "checkpoint_dir": str(tmp_path_factory.mktemp("checkpoints")), "MAX_ITEM_LIST_LENGTH": T,
        "embedding_size": 4, "mlp_hidden_size": [8, 8], "train_batch_size": 16, "device": "cpu", "use_gpu": False,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}, "threshold": {"rating": 4},
        "train_neg_sample_args": None, "metrics": ["AUC"], "valid_metric": "AUC", "show_progress": False,
        "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "labeled"},
        "seed": 0, "reproducibility": True,
    }
    config = Config(model="DIN", dataset="ml-100k", config_dict=settings)
    train, _, _ = data_preparation(config, create_dataset(config))
    batches = []
    for inter in train:
        batches.append(inter)
        if len(batches) == 3:
            break
    return config, train.dataset, batches


def test_din_same_predictions_and_gradients(ml100k):
    config, dataset, batches = ml100k
    model = DIN(config, dataset).double()
    inter = copy.deepcopy(batches[0])
    inter[model.ITEM_SEQ_LEN] = torch.tensor([0, 1, T, 3]).repeat(4)  # lengths 0, 1 and T
    with pytest.warns(fastdin.integrations.PatchWarning, match="RecBole's Dice"):
        patched, replaced = assert_patch_keeps_numbers(model, lambda m: m.predict(inter))
    assert [r.path for r in replaced] == ["attention"]
    assert_unpatch_restores(patched, replaced)


def test_training_with_recbole_optimizer_gives_the_same_losses(ml100k, tmp_path, monkeypatch):
    from recbole.trainer import Trainer

    monkeypatch.chdir(tmp_path)  # RecBole's Trainer writes its tensorboard log under the working directory
    config, dataset, batches = ml100k
    torch.manual_seed(0)
    model = DIN(config, dataset).double()
    patched = copy.deepcopy(model)
    with pytest.warns(fastdin.integrations.PatchWarning):
        fastdin.patch(patched, backend="reference")
    losses = []
    for m in (model, patched):
        optimizer, run = Trainer(config, m).optimizer, []
        m.train()
        for inter in batches:  # the body of RecBole's Trainer._train_epoch
            optimizer.zero_grad()
            loss = m.calculate_loss(inter)
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(torch.tensor(run))
    assert rel_err(losses[1], losses[0]) < 1e-10


@pytest.mark.parametrize("softmax_stag", [False, True])
@pytest.mark.parametrize("return_seq_weight", [False, True])
def test_sequence_att_layer_variants(softmax_stag, return_seq_weight):
    layer = SequenceAttLayer(torch.arange(T).view(1, -1), [20, 6, 3], activation="relu", softmax_stag=softmax_stag,
                             return_seq_weight=return_seq_weight)
    model = nn.ModuleDict({"att": layer}).double()
    queries, keys = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, T, 5, dtype=torch.float64)
    lengths = torch.tensor([1, 2, T, 3])
    patched, replaced = assert_patch_keeps_numbers(model, lambda m: m["att"](queries, keys, lengths))
    empty = torch.tensor([0, 2, T, 3])
    if softmax_stag:  # RecBole: NaN on a row with no valid position (softmax of all -inf); kept by exact
        assert torch.isnan(layer(queries, keys, empty)[0]).all() and torch.isnan(patched["att"](queries, keys, empty)[0]).all()
        fastdin.patch(nn.ModuleDict({"att": layer}), exact=False)
    assert_unpatch_restores(patched, replaced)


def test_score_scale_is_folded_into_the_shared_dense_layer():
    layer = SequenceAttLayer(torch.arange(T).view(1, -1), [16, 4], activation="sigmoid", return_seq_weight=True)
    model = nn.Sequential(layer)
    fastdin.patch(model, backend="reference")
    score = model[0].pool.score
    assert score.dense is layer.dense and torch.equal(score.weight, layer.dense.weight / math.sqrt(4))


def test_unsupported_left_alone():
    layer = SequenceAttLayer(torch.arange(T).view(1, -1), [16, 4], activation="tanh")
    with pytest.warns(fastdin.integrations.PatchWarning, match="Tanh"):
        assert fastdin.patch(nn.Sequential(layer)) == []
