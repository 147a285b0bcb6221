"""fastdin.patch on torch-rechub 0.9.0's DIN, built through torch-rechub's features and model API,
trained with its CTRTrainer. Its attention MLP has a BatchNorm per layer: the patched unit runs
fastdin in eval (BatchNorm folded into the shared Linear) and torch-rechub's own code in training."""
import copy

import pytest
import torch

import fastdin
from patch_checks import assert_patch_keeps_numbers, assert_unpatch_restores, rel_err

pytest.importorskip("torch_rechub", reason="torch-rechub is not installed (tests/requirements-peers.txt)")
from torch_rechub.trainers import CTRTrainer  # noqa: E402

from fastdin.bench.peer_models import rechub_batch as batch, rechub_din  # noqa: E402


def build(activation="prelu", use_softmax=False):
    return rechub_din(activation=activation, use_softmax=use_softmax)


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu"])
def test_din_same_predictions_and_gradients(activation, use_softmax):
    model = build(activation, use_softmax).double()
    with torch.no_grad():  # running statistics away from BatchNorm's initial ones, so the eval fold is tested
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 1e-4), module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1, 0.3), module.bias.normal_(0, 0.3)
    x, _ = batch()
    with pytest.warns(fastdin.integrations.PatchWarning, match="torch-rechub's Dice"):  # the DNN's Dice stays
        patched, replaced = assert_patch_keeps_numbers(model, lambda m: m(x))
    assert [r.path for r in replaced] == ["attention_layers.0"]
    assert_unpatch_restores(patched, replaced)


def test_default_dice_attention_left_alone():
    with pytest.warns(fastdin.integrations.PatchWarning, match="Dice"):
        assert fastdin.patch(build("dice")) == []


def test_training_with_ctr_trainer_gives_the_same_losses_and_predictions(tmp_path):
    torch.manual_seed(0)
    model = build("prelu", True)  # float32: CTRTrainer casts the labels to float
    patched = copy.deepcopy(model)
    with pytest.warns(fastdin.integrations.PatchWarning):
        fastdin.patch(patched, backend="reference")
    batches = [batch(seed=s) for s in range(3)]
    losses = [CTRTrainer(m, n_epoch=1, model_path=str(tmp_path)).train_one_epoch(batches) for m in (model, patched)]
    assert losses[1] == losses[0]  # training runs torch-rechub's own code
    model.eval(), patched.eval()
    x, _ = batch(seed=9)
    assert rel_err(patched(x), model(x)) < 1e-5
