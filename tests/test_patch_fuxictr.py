"""fastdin.patch on FuxiCTR 2.3.10's DIN target attention and Dice.

FuxiCTR's DIN model class lives in its GitHub model_zoo, not in the PyPI package, so the model here
is assembled from the package's own parts the way that DIN is (fastdin.bench.peer_models.FuxiDIN),
trained with FuxiCTR's get_optimizer / get_loss.
"""
import copy

import pytest
import torch
from torch import nn

import fastdin
from patch_checks import assert_patch_keeps_numbers, assert_unpatch_restores, rel_err

pytest.importorskip("fuxictr", reason="fuxictr is not installed (tests/requirements-peers.txt)")
from fuxictr.pytorch.layers.attentions import DIN_Attention  # noqa: E402
from fuxictr.pytorch.torch_utils import get_loss, get_optimizer  # noqa: E402

from fastdin.bench.peer_models import FuxiDIN, fuxictr_batch as batch  # noqa: E402

T, E = 6, 5


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("activation", ["ReLU", "Sigmoid", "PReLU", "Dice"])
def test_din_same_predictions_and_gradients(activation, use_softmax):
    model = FuxiDIN(attention_activation=activation.lower() if activation == "PReLU" else activation, use_softmax=use_softmax).double()
    target, history, _ = batch()
    patched, replaced = assert_patch_keeps_numbers(model, lambda m: m(target, history))
    assert {r.path for r in replaced} >= {"attention", "dnn.mlp.1"}  # the attention and the DNN's Dice
    assert_unpatch_restores(patched, replaced)


def test_exact_false_and_unsupported():
    model = nn.Sequential(DIN_Attention(E, [4], use_softmax=True)).double()
    fastdin.patch(model, backend="reference", exact=False)
    out = model[0](torch.randn(2, E, dtype=torch.float64), torch.randn(2, T, E, dtype=torch.float64),
                   torch.tensor([[0.0] * T, [1.0] * T], dtype=torch.float64))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    with pytest.raises(ValueError, match="0 and 1"):
        model[0](torch.randn(1, E), torch.randn(1, T, E), torch.full((1, T), 0.5))
    with pytest.warns(fastdin.integrations.PatchWarning, match="BatchNorm1d"):
        assert fastdin.patch(nn.Sequential(DIN_Attention(E, [4], batch_norm=True))) == []


def test_training_with_fuxictr_optimizer_gives_the_same_losses():
    model = FuxiDIN(attention_activation="Dice", use_softmax=True).double()  # float64: Adam would magnify fp32 round-off
    patched = copy.deepcopy(model)
    fastdin.patch(patched, backend="reference")
    losses = []
    for m in (model, patched):
        optimizer, loss_fn = get_optimizer("adam", m.parameters(), 1e-2), get_loss("binary_crossentropy")
        run = []
        for step in range(4):
            target, history, label = batch(seed=step)
            loss = loss_fn(m(target, history), label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(torch.tensor(run))
    assert rel_err(losses[1], losses[0]) < 1e-10
    fastdin.unpatch(patched)
    for a, b in zip(model.state_dict().values(), patched.state_dict().values()):
        assert rel_err(b.double(), a.double()) < 1e-8  # the trained weights are in the restored model


def test_triton_backend_within_fp32_policy():
    pytest.importorskip("triton")
    target, history, _ = batch(4, T)
    assert_patch_keeps_numbers(FuxiDIN(attention_activation="Dice", use_softmax=True), lambda m: m(target, history), tol=1e-5, backend="triton",
                               modes=(False,))
