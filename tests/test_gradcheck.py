"""torch.autograd.gradcheck in float64 for the reference attention pooling and Dice.

Every differentiable input is checked: query, keys, every weight and bias, the PReLU slopes and
Dice's alpha / weight / bias. Dice in training updates its running statistics in place, so each
call inside gradcheck works on fresh clones of them.
"""
import pytest
import torch
from torch.autograd import gradcheck

from fastdin import reference
from fastdin.reference import DiceParams

F64 = torch.float64
BATCH, SEQ, DIM, HIDDEN = 3, 4, 2, (3, 2)

ACT_CASES = {
    "sigmoid": ("sigmoid", {}),
    "relu": ("relu", {}),
    "prelu1": ("prelu", {"slopes": 1}),
    "preluH": ("prelu", {"slopes": "H"}),
    "dice-train-valid": ("dice", {"training": True, "stats": "valid"}),
    "dice-train-all-affine": ("dice", {"training": True, "stats": "all", "affine": True}),
    "dice-train-valid-affine": ("dice", {"training": True, "stats": "valid", "affine": True}),
    "dice-eval": ("dice", {"training": False}),
    "dice-eval-affine": ("dice", {"training": False, "affine": True}),
}


def _leaf(t):
    return t.detach().to(F64).requires_grad_()


def _dice_tensors(features, affine):
    """alpha, weight, bias (trainable) and running mean / var (buffers) for one Dice layer."""
    trainable = [_leaf(torch.randn(features))]
    if affine:
        trainable += [_leaf(1 + 0.3 * torch.randn(features)), _leaf(0.3 * torch.randn(features))]
    buffers = (0.3 * torch.randn(features, dtype=F64), 0.5 + torch.rand(features, dtype=F64))
    return trainable, buffers


@pytest.mark.parametrize("positions", ["lengths", "mask"])
@pytest.mark.parametrize("normalization", [None, "softmax"])
@pytest.mark.parametrize("case", list(ACT_CASES))
def test_attention_pool_gradcheck(case, normalization, positions):
    activation, opts = ACT_CASES[case]
    sizes = [4 * DIM, *HIDDEN, 1]
    query = _leaf(torch.randn(BATCH, DIM))
    keys = _leaf(torch.randn(BATCH, SEQ, DIM))
    weights = [_leaf(torch.randn(o, i) / i ** 0.5) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [_leaf(0.1 * torch.randn(o)) for o in sizes[1:]]
    lengths = torch.tensor([SEQ, 0, 2])  # row 1 has no valid position
    mask = None
    if positions == "mask":
        lengths, mask = None, torch.tensor([[True, False, True, True], [False] * SEQ, [False, True, True, False]])
    act_inputs, buffers = [], []
    if activation == "prelu":
        act_inputs = [_leaf(0.25 + 0.1 * torch.randn(1 if opts["slopes"] == 1 else h)) for h in HIDDEN]
    elif activation == "dice":
        for h in HIDDEN:
            trainable, stats = _dice_tensors(h, opts.get("affine", False))
            act_inputs += trainable
            buffers.append(stats)
    per_layer = len(act_inputs) // len(HIDDEN)

    def pool(query, keys, *params):
        ws, bs, acts = params[:len(weights)], params[len(weights):2 * len(weights)], params[2 * len(weights):]
        act_params = None
        if activation == "prelu":
            act_params = list(acts)
        elif activation == "dice":
            act_params = []
            for layer, (mean, var) in enumerate(buffers):
                alpha, *affine = acts[layer * per_layer:(layer + 1) * per_layer]
                weight, bias = affine if affine else (None, None)
                act_params.append(DiceParams(alpha, mean.clone(), var.clone(), weight, bias, training=opts["training"]))
        return reference.attention_pool(
            query, keys, ws, bs, activation=activation, act_params=act_params, lengths=lengths, mask=mask,
            normalization=normalization, return_scores=True, dice_stats=opts.get("stats", "valid"),
        )

    inputs = (query, keys, *weights, *biases, *act_inputs)
    assert gradcheck(pool, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    # the empty row gets zero output; its keys get zero gradient unless Dice takes statistics over all positions
    out, _ = pool(*inputs)
    out.sum().backward()
    assert torch.equal(out[1], torch.zeros(DIM, dtype=F64))
    padding_counts = opts.get("stats") == "all"
    assert torch.equal(keys.grad[1], torch.zeros(SEQ, DIM, dtype=F64)) != padding_counts


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("mode", ["train-all-rows", "train-mask", "train-3d-mask", "eval", "eval-3d"])
def test_dice_gradcheck(mode, affine):
    features = 3
    shape = (2, 4, features) if "3d" in mode else (6, features)
    x = _leaf(torch.randn(*shape))
    mask = None
    if "mask" in mode:
        mask = torch.rand(shape[:-1]) < 0.6
        mask.reshape(-1)[:2] = True
    training = mode.startswith("train")
    trainable, (mean, var) = _dice_tensors(features, affine)

    def act(x, alpha, *affine_params):
        weight, bias = affine_params if affine_params else (None, None)
        return reference.dice(x, alpha, mean.clone(), var.clone(), weight=weight, bias=bias, training=training,
                              mask=mask)

    assert gradcheck(act, (x, *trainable), eps=1e-6, atol=1e-6, rtol=1e-4)
