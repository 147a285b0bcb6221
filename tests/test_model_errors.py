"""DIN and Dice name the field and the expected shape or range for every bad input (issue 9)."""
import re

import pytest
import torch

import fastdin
from fastdin import Dice
from fastdin.model import DIN


def model(**kwargs):
    kwargs = {"embed_dim": 4, "user_sparse_sizes": (4, 3), "num_dense": 2, "attention_hidden": (4,),
              "mlp_hidden": (4,), **kwargs}
    return DIN(10, 5, **kwargs)


def batch():
    return {
        "item": torch.tensor([1, 2, 3]),
        "category": torch.tensor([1, 2, 1]),
        "hist_items": torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]]),
        "hist_categories": torch.tensor([[1, 1, 0], [2, 0, 0], [1, 2, 2]]),
        "lengths": torch.tensor([2, 1, 3]),
        "user_sparse": torch.tensor([[1, 2], [2, 1], [3, 2]]),
        "dense": torch.randn(3, 2),
    }


def _with(**changes):
    def change(b):
        for key, value in changes.items():
            if value is None:
                del b[key]
            else:
                b[key] = value
    return change


BATCH_CASES = {
    "item id past the table": (_with(item=torch.tensor([1, 10, 3])), ValueError, "batch['item'] ids must lie in [0, 10)"),
    "negative item id": (_with(item=torch.tensor([1, -1, 3])), ValueError, "batch['item'] ids must lie in [0, 10)"),
    "history id past the table": (_with(hist_items=torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 11]])), ValueError,
                                  "batch['hist_items'] ids must lie in [0, 10)"),
    "category id past the table": (_with(category=torch.tensor([1, 5, 1])), ValueError,
                                   "batch['category'] ids must lie in [0, 5)"),
    "user field id past its table": (_with(user_sparse=torch.tensor([[1, 3], [2, 1], [3, 2]])), ValueError,
                                     "batch['user_1'] ids must lie in [0, 3)"),
    "hist_categories shaped unlike hist_items": (_with(hist_categories=torch.ones(3, 4, dtype=torch.long)), ValueError,
                                                 "batch['hist_categories'] must have shape [B, T] like 'hist_items' = [3, 3]"),
    "history of another batch size": (_with(hist_items=torch.ones(2, 3, dtype=torch.long),
                                            hist_categories=torch.ones(2, 3, dtype=torch.long)), ValueError,
                                      "batch['hist_items'] must have shape [B, T] with B = 3"),
    "history 1-d": (_with(hist_items=torch.ones(3, dtype=torch.long)), ValueError, "batch['hist_items'] must have shape [B, T]"),
    "dense missing": (_with(dense=None), ValueError, "batch is missing the dense field 'dense' [B, 2]"),
    "dense of the wrong width": (_with(dense=torch.randn(3, 3)), ValueError, "batch['dense'] must have shape [B, 2] = [3, 2]"),
    "dense integer": (_with(dense=torch.ones(3, 2, dtype=torch.long)), TypeError, "batch['dense'] must be a floating-point"),
    "user_sparse with more fields": (_with(user_sparse=torch.ones(3, 3, dtype=torch.long)), ValueError,
                                     "batch['user_sparse'] must have shape [B, 2]"),
    "user_sparse with fewer fields": (_with(user_sparse=torch.ones(3, 1, dtype=torch.long)), ValueError,
                                      "batch['user_sparse'] must have shape [B, 2]"),
    "user_sparse missing": (_with(user_sparse=None), ValueError, "batch is missing the sparse fields ['user_0', 'user_1']"),
    "bool item ids": (_with(item=torch.tensor([True, False, True])), TypeError, "batch['item'] holds ids"),
    "bool history ids": (_with(hist_items=torch.ones(3, 3, dtype=torch.bool)), TypeError, "batch['hist_items'] holds ids"),
    "item of shape [B, 1]": (_with(item=torch.tensor([[1], [2], [3]])), ValueError, "batch['item'] must have shape [B]"),
    "category of shape [B, 1]": (_with(category=torch.tensor([[1], [2], [1]])), ValueError,
                                 "batch['category'] must have shape [B] = [3]"),
    "item a list": (_with(item=[1, 2, 3]), TypeError, "batch['item'] must be a torch.Tensor"),
    "history a list": (_with(hist_items=[[1, 2, 0]] * 3), TypeError, "batch['hist_items'] must be a torch.Tensor"),
    "item 0-d": (_with(item=torch.tensor(1)), ValueError, "batch['item'] must have shape [B], got []"),
    "left-padded history read as right-padded": (
        _with(hist_items=torch.tensor([[0, 1, 2], [0, 0, 3], [4, 5, 6]]),
              hist_categories=torch.tensor([[0, 1, 1], [0, 0, 2], [1, 2, 2]])), ValueError, "looks left-padded"),
}


@pytest.mark.parametrize("pooling", ["attention", "sum"])
@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_din_rejects_bad_batch(case, pooling):
    change, error, words = BATCH_CASES[case]
    din = model(pooling=pooling)
    good = batch()
    assert din(good).shape == (3,)
    change(good)
    with pytest.raises(error, match=re.escape(words)):
        din(good)


def test_id_range_checks_follow_set_value_checks():
    din = model()
    bad = batch()
    bad["user_sparse"] = torch.tensor([[1, 2], [2, 1], [3, 2]])
    bad["category"] = torch.tensor([1, 2, 4])  # the largest valid id passes
    assert din(bad).shape == (3,)
    bad["category"] = torch.tensor([1, 2, 5])
    previous = fastdin.set_value_checks(False)
    try:
        with pytest.raises(IndexError):  # unchecked, torch's own error is what is left
            din(bad)
    finally:
        fastdin.set_value_checks(previous)
    with pytest.raises(ValueError, match="category"):
        din(bad)


CONSTRUCTION_CASES = {
    "num_items=0": (lambda: DIN(num_items=0, num_categories=5), ValueError, "num_items must be an integer >= 2"),
    "num_categories=1": (lambda: DIN(10, 1), ValueError, "num_categories must be an integer >= 2"),
    "num_items float": (lambda: DIN(10.0, 5), ValueError, "num_items must be an integer"),
    "no sizes and no schema": (lambda: DIN(), ValueError, "either schema=... or num_items and num_categories"),
    "user size 0": (lambda: DIN(10, 5, user_sparse_sizes=(4, 0)), ValueError, "user_sparse_sizes[1] must be an integer >= 2"),
    "negative num_dense": (lambda: DIN(10, 5, num_dense=-1), ValueError, "num_dense must be a non-negative integer"),
    "attention_hidden=80": (lambda: DIN(10, 5, attention_hidden=80), TypeError,
                            "attention_hidden (the hidden_units of the attention MLP) must be a sequence"),
    "mlp_hidden=80": (lambda: DIN(10, 5, mlp_hidden=80), TypeError, "mlp_hidden (the hidden_units of the top MLP)"),
    "attention_hidden=(80.5,)": (lambda: DIN(10, 5, attention_hidden=(80.5,)), ValueError,
                                 "must hold positive integer sizes, got (80.5,)"),
    "mlp_hidden=(200, True)": (lambda: DIN(10, 5, mlp_hidden=(200, True)), ValueError, "positive integer sizes"),
    "MLP hidden_units=80": (lambda: fastdin.MLP(4, 80), TypeError, "hidden_units must be a sequence"),
    "AttentionPooling hidden_units=(80.5,)": (lambda: fastdin.AttentionPooling(4, (80.5,)), ValueError,
                                              "hidden_units must hold positive integer sizes"),
    "schema and sizes": (lambda: DIN(10, 5, schema=DIN(10, 5).schema), ValueError, "not both"),
}


@pytest.mark.parametrize("case", list(CONSTRUCTION_CASES))
def test_din_construction_rejects(case):
    build, error, words = CONSTRUCTION_CASES[case]
    with pytest.raises(error, match=re.escape(words)):
        build()


@pytest.mark.parametrize("training", [True, False])
def test_dice_names_its_feature_count(training):
    dice = Dice(5).train(training)
    with pytest.raises(ValueError, match=re.escape("Dice(5) takes x of shape [N, 5] or [B, T, 5], got [4, 7]")):
        dice(torch.randn(4, 7))
    with pytest.raises(ValueError, match=re.escape("Dice(5) takes x of shape")):
        dice(torch.randn(2, 3, 7))
    assert dice(torch.randn(4, 5)).shape == (4, 5)
