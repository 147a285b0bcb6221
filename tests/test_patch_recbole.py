"""fastdin.patch on RecBole 1.2.1's DIN, built by RecBole's Config / create_dataset / data_preparation
on the ml-100k data RecBole ships (a short history and small sizes, to keep the test quick)."""
import copy
import math

import pytest
import torch
from torch import nn

import fastdin
from patch_checks import assert_patch_keeps_numbers, assert_unpatch_restores, rel_err

recbole = pytest.importorskip("recbole", reason="recbole is not installed (tests/requirements-peers.txt)")
from fastdin.bench.peer_models import recbole_ml100k, recbole_numpy2_aliases  # noqa: E402

recbole_numpy2_aliases()
from recbole.model.layers import SequenceAttLayer  # noqa: E402
from recbole.model.sequential_recommender import DIN  # noqa: E402

# importing RecBole's models turns on autograd's anomaly detection for the whole process (recbole 1.2.1's
# sequential_recommender/sine.py): every later backward would check for NaN and sync
torch.autograd.set_detect_anomaly(False)

T = 6


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    return recbole_ml100k(str(tmp_path_factory.mktemp("checkpoints")), seq_len=T)


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
