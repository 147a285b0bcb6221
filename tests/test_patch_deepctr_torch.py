"""fastdin.patch on DeepCTR-Torch 0.3.0's DIN, built through DeepCTR-Torch's own API."""
import copy

import numpy as np
import pytest
import torch

import fastdin
from patch_checks import assert_patch_keeps_numbers, assert_unpatch_restores, rel_err

pytest.importorskip("deepctr_torch", reason="deepctr-torch is not installed (tests/requirements-peers.txt)")
from fastdin.bench.peer_models import deepctr_din, deepctr_input  # noqa: E402

T = 6


def build(att_activation="Dice", weight_normalization=False):
    return deepctr_din(seq_len=T, att_activation=att_activation, weight_normalization=weight_normalization)


@pytest.mark.parametrize("weight_normalization", [False, True])
@pytest.mark.parametrize("att_activation", ["sigmoid", "prelu", "Dice"])
def test_din_same_predictions_and_gradients(att_activation, weight_normalization):
    model, x, _ = build(att_activation, weight_normalization)
    model = model.double()
    X = deepctr_input(model, x).double()
    patched, replaced = assert_patch_keeps_numbers(model, lambda m: m(X))
    assert [r.path for r in replaced] == ["attention"]
    assert_unpatch_restores(patched, replaced)


def test_return_score_and_standalone_units():
    from deepctr_torch.layers import AttentionSequencePoolingLayer, LocalActivationUnit
    from deepctr_torch.layers.activation import Dice

    model = torch.nn.ModuleDict({
        "pool": AttentionSequencePoolingLayer((6, 3), "Dice", True, return_score=True, embedding_dim=5),
        "unit": LocalActivationUnit((6,), embedding_dim=5, activation="prelu"),
        "dice2": Dice(5, dim=2), "dice3": Dice(5, dim=3)}).double()
    query, keys = torch.randn(4, 1, 5, dtype=torch.float64), torch.randn(4, T, 5, dtype=torch.float64)
    lengths = torch.tensor([[0], [1], [T], [2]])

    def forward(m):
        return torch.cat([m["pool"](query, keys, lengths).flatten(), m["unit"](query, keys).flatten(),
                          m["dice2"](keys[:, 0]).flatten(), m["dice3"](keys).flatten()])

    patched, replaced = assert_patch_keeps_numbers(model, forward)
    assert {r.path for r in replaced} == {"pool", "unit", "dice2", "dice3"}
    assert patched["pool"](query, keys, lengths).shape == (4, 1, T)
    assert_unpatch_restores(patched, replaced)


def test_exact_false_uses_fastdin_semantics():
    from deepctr_torch.layers import AttentionSequencePoolingLayer

    model = torch.nn.Sequential(AttentionSequencePoolingLayer((6,), "sigmoid", True, embedding_dim=5)).double()
    fastdin.patch(model, backend="reference", exact=False)
    query, keys = torch.randn(3, 1, 5, dtype=torch.float64), torch.randn(3, T, 5, dtype=torch.float64)
    out = model[0](query, keys, torch.tensor([[0], [2], [T]]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # DeepCTR-Torch: the mean of the padding


def test_unsupported_units_are_left_alone_and_reported():
    from deepctr_torch.layers.core import LocalActivationUnit

    model = torch.nn.Sequential(LocalActivationUnit((6,), embedding_dim=5, use_bn=True), torch.nn.Linear(3, 2))
    with pytest.warns(fastdin.integrations.PatchWarning, match="use_bn"):
        assert fastdin.patch(model) == []
    assert fastdin.patch(torch.nn.Sequential(torch.nn.Linear(3, 2))) == []


def test_training_with_deepctr_fit_gives_the_same_losses():
    model, x, y = build("Dice", True)
    patched = copy.deepcopy(model)
    fastdin.patch(patched, backend="reference")
    histories = []
    for m in (model, patched):
        torch.manual_seed(0)
        m.compile("adam", "binary_crossentropy")
        histories.append(m.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=True).history["loss"])
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    X = deepctr_input(model, x).float()
    model.eval(), patched.eval()
    assert rel_err(patched(X), model(X)) < 1e-5


@pytest.mark.parametrize("att_activation", ["sigmoid", "Dice"])
def test_triton_backend_within_fp32_policy(att_activation):
    pytest.importorskip("triton")
    model, x, _ = build(att_activation, True)
    X = deepctr_input(model, x).float()
    assert_patch_keeps_numbers(model, lambda m: m(X), tol=1e-5, backend="triton", modes=(False,))
