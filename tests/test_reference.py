"""The reference ops against an independent, loop-based float64 version written here.

The loop version walks user by user and position by position, runs the attention MLP one layer at a
time with explicit matrix-vector products, and takes Dice's statistics feature by feature with
explicit sums. It shares no code with `fastdin.reference`.
"""
import math

import pytest
import torch

from fastdin import reference
from fastdin.reference import DiceParams

MOMENTUM, EPS = 0.1, 1e-8


# ---------------------------------------------------------------------------------------------
# the loop-based version


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def loop_dice(rows, alpha, running_mean, running_var, weight, bias, training, counted):
    """Dice on a list of rows (each a list of H floats); `counted[i]` says whether row i enters the
    batch statistics. Returns (outputs, new running mean, new running var) as lists of floats."""
    features = len(alpha)
    out = [[0.0] * features for _ in rows]
    new_mean, new_var = list(running_mean), list(running_var)
    for j in range(features):
        if training:
            values = [row[j] for row, c in zip(rows, counted) if c]
            n = len(values)
            mean = sum(values) / n
            var = sum((v - mean) ** 2 for v in values) / n
            new_mean[j] = (1 - MOMENTUM) * running_mean[j] + MOMENTUM * mean
            new_var[j] = (1 - MOMENTUM) * running_var[j] + MOMENTUM * var * n / (n - 1)
        else:
            mean, var = running_mean[j], running_var[j]
        for i, row in enumerate(rows):
            z = (row[j] - mean) / math.sqrt(var + EPS)
            if weight is not None:
                z = z * weight[j] + bias[j]
            p = _sigmoid(z)
            out[i][j] = p * row[j] + (1 - p) * alpha[j] * row[j]
    return out, new_mean, new_var


def _floats(t):
    return None if t is None else t.tolist()


def loop_attention(query, keys, weights, biases, activation, act_params, valid, normalization, dice_stats):
    """Returns (out [B][D], weights [B][T], new running stats per Dice layer) as Python lists."""
    batch, seq_len, dim = keys.shape
    q, k = query.tolist(), keys.tolist()
    # h[b][t] is the input of the current layer at user b, position t
    h = [[q[b] + k[b][t] + [q[b][i] - k[b][t][i] for i in range(dim)] + [q[b][i] * k[b][t][i] for i in range(dim)]
          for t in range(seq_len)] for b in range(batch)]
    new_stats = []
    for layer in range(len(weights) - 1):
        w, bias = weights[layer].tolist(), biases[layer].tolist()
        pre = [[[sum(w[o][i] * h[b][t][i] for i in range(len(h[b][t]))) + bias[o] for o in range(len(w))]
                for t in range(seq_len)] for b in range(batch)]
        if activation == "dice":
            d = act_params[layer]
            rows = [pre[b][t] for b in range(batch) for t in range(seq_len)]
            counted = [dice_stats == "all" or valid[b][t] for b in range(batch) for t in range(seq_len)]
            flat, mean, var = loop_dice(rows, d.alpha.tolist(), d.running_mean.tolist(), d.running_var.tolist(),
                                        _floats(d.weight), _floats(d.bias), d.training, counted)
            new_stats.append((mean, var))
            h = [[flat[b * seq_len + t] for t in range(seq_len)] for b in range(batch)]
            continue
        for b in range(batch):
            for t in range(seq_len):
                for o, z in enumerate(pre[b][t]):
                    if activation == "sigmoid":
                        pre[b][t][o] = _sigmoid(z)
                    elif activation == "relu":
                        pre[b][t][o] = max(z, 0.0)
                    else:  # prelu, one shared slope or one per feature
                        slopes = act_params[layer].tolist()
                        slope = slopes[0] if len(slopes) == 1 else slopes[o]
                        pre[b][t][o] = z if z >= 0 else slope * z
        h = pre
    w_out, b_out = weights[-1].tolist()[0], biases[-1].item()
    scores = [[sum(wi * hi for wi, hi in zip(w_out, h[b][t])) + b_out if valid[b][t] else 0.0
               for t in range(seq_len)] for b in range(batch)]
    if normalization == "softmax":
        for b in range(batch):
            kept = [scores[b][t] for t in range(seq_len) if valid[b][t]]
            top = max(kept) if kept else 0.0
            total = sum(math.exp(s - top) for s in kept)
            scores[b] = [math.exp(scores[b][t] - top) / total if valid[b][t] else 0.0 for t in range(seq_len)]
    out = [[sum(scores[b][t] * k[b][t][i] for t in range(seq_len)) for i in range(dim)] for b in range(batch)]
    return out, scores, new_stats


# ---------------------------------------------------------------------------------------------
# cases

ACT_CASES = {
    "sigmoid": ("sigmoid", {}),
    "relu": ("relu", {}),
    "prelu1": ("prelu", {"slopes": 1}),
    "preluH": ("prelu", {"slopes": "H"}),
    "dice-train-valid": ("dice", {"training": True, "stats": "valid"}),
    "dice-train-all": ("dice", {"training": True, "stats": "all"}),
    "dice-train-valid-affine": ("dice", {"training": True, "stats": "valid", "affine": True}),
    "dice-train-all-affine": ("dice", {"training": True, "stats": "all", "affine": True}),
    "dice-eval": ("dice", {"training": False, "stats": "valid"}),
    "dice-eval-affine": ("dice", {"training": False, "stats": "valid", "affine": True}),
}


def make_mlp(dim, hidden, dtype=torch.float64):
    sizes = [4 * dim] + list(hidden) + [1]
    weights = [torch.randn(o, i, dtype=dtype) / math.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [0.1 * torch.randn(o, dtype=dtype) for o in sizes[1:]]
    return weights, biases


def make_act_params(activation, opts, hidden, dtype=torch.float64):
    if activation == "prelu":
        return [0.25 + 0.1 * torch.randn(1 if opts["slopes"] == 1 else h, dtype=dtype) for h in hidden]
    if activation != "dice":
        return None
    params = []
    for h in hidden:
        affine = opts.get("affine", False)
        params.append(DiceParams(
            alpha=torch.randn(h, dtype=dtype),
            running_mean=0.3 * torch.randn(h, dtype=dtype),
            running_var=0.5 + torch.rand(h, dtype=dtype),
            weight=1 + 0.3 * torch.randn(h, dtype=dtype) if affine else None,
            bias=0.3 * torch.randn(h, dtype=dtype) if affine else None,
            training=opts["training"], momentum=MOMENTUM, eps=EPS,
        ))
    return params


def clone_params(act_params):
    if act_params is None or not isinstance(act_params[0], DiceParams):
        return act_params
    return [p._replace(running_mean=p.running_mean.clone(), running_var=p.running_var.clone()) for p in act_params]


def make_positions(kind, batch, seq_len):
    """(lengths, mask, valid as nested lists). Row 1 always has no valid position."""
    if kind == "none":
        return None, None, [[True] * seq_len for _ in range(batch)]
    lengths = torch.randint(1, seq_len + 1, (batch,))
    lengths[1] = 0
    lengths[0] = seq_len
    mask = torch.arange(seq_len) < lengths.unsqueeze(1)
    if kind == "mask":  # not a prefix: a scattered pattern, still with row 1 empty
        mask = torch.rand(batch, seq_len) < 0.6
        mask[1] = False
        mask[0, 0] = mask[0, -1] = True
        return None, mask, mask.tolist()
    return lengths, None, mask.tolist()


SHAPES = {
    "odd": (3, 5, 3, (7, 5)),
    "T1": (4, 1, 3, (6,)),
    "one-layer": (3, 4, 5, (3,)),
}


@pytest.mark.parametrize("normalization", [None, "softmax"])
@pytest.mark.parametrize("positions", ["lengths", "mask", "none"])
@pytest.mark.parametrize("case", list(ACT_CASES))
def test_attention_pool_matches_loops(case, positions, normalization):
    activation, opts = ACT_CASES[case]
    batch, seq_len, dim, hidden = SHAPES["odd"]
    _check_attention(batch, seq_len, dim, hidden, activation, opts, positions, normalization)


@pytest.mark.parametrize("normalization", [None, "softmax"])
@pytest.mark.parametrize("shape", ["T1", "one-layer"])
@pytest.mark.parametrize("case", ["sigmoid", "preluH", "dice-train-valid", "dice-train-all-affine"])
def test_attention_pool_shapes(case, shape, normalization):
    activation, opts = ACT_CASES[case]
    batch, seq_len, dim, hidden = SHAPES[shape]
    positions = "mask" if seq_len == 1 else "lengths"
    if seq_len == 1 and activation == "dice" and opts["stats"] == "valid":
        positions = "lengths"  # T=1: lengths are 1 or 0, at least two rows stay valid
    _check_attention(batch, seq_len, dim, hidden, activation, opts, positions, normalization)


def _check_attention(batch, seq_len, dim, hidden, activation, opts, positions, normalization):
    query = torch.randn(batch, dim, dtype=torch.float64)
    keys = torch.randn(batch, seq_len, dim, dtype=torch.float64)
    weights, biases = make_mlp(dim, hidden)
    act_params = make_act_params(activation, opts, hidden)
    lengths, mask, valid = make_positions(positions, batch, seq_len)
    if seq_len == 1 and positions == "lengths":
        lengths = torch.tensor([1, 0] + [1] * (batch - 2))
        valid = [[bool(n)] for n in lengths.tolist()]
    ours = clone_params(act_params)
    out, scores = reference.attention_pool(
        query, keys, weights, biases, activation=activation, act_params=ours, lengths=lengths, mask=mask,
        normalization=normalization, return_scores=True, dice_stats=opts.get("stats", "valid"),
    )
    loop_out, loop_scores, loop_stats = loop_attention(
        query, keys, weights, biases, activation, act_params, valid, normalization, opts.get("stats", "valid")
    )
    assert out.shape == (batch, dim) and scores.shape == (batch, seq_len)
    torch.testing.assert_close(out, torch.tensor(loop_out, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores, torch.tensor(loop_scores, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    empty = [b for b in range(batch) if not any(valid[b])]
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    for b in empty:  # no valid position: exactly zero, not NaN, not uniform weights
        assert torch.equal(out[b], torch.zeros(dim, dtype=torch.float64))
        assert torch.equal(scores[b], torch.zeros(seq_len, dtype=torch.float64))
    without_scores = reference.attention_pool(
        query, keys, weights, biases, activation=activation, act_params=clone_params(act_params), lengths=lengths,
        mask=mask, normalization=normalization, dice_stats=opts.get("stats", "valid"),
    )
    torch.testing.assert_close(without_scores, out, rtol=0, atol=0)
    if activation == "dice":
        for p_before, p_after, (mean, var) in zip(act_params, ours, loop_stats):
            if opts["training"]:
                torch.testing.assert_close(p_after.running_mean, torch.tensor(mean, dtype=torch.float64))
                torch.testing.assert_close(p_after.running_var, torch.tensor(var, dtype=torch.float64))
            else:  # eval leaves the running statistics alone
                assert torch.equal(p_after.running_mean, p_before.running_mean)
                assert torch.equal(p_after.running_var, p_before.running_var)


def test_softmax_ignores_padding_values():
    """Masked positions leave the softmax: huge padded keys and scores change nothing."""
    batch, seq_len, dim, hidden = SHAPES["odd"]
    query = torch.randn(batch, dim, dtype=torch.float64)
    keys = torch.randn(batch, seq_len, dim, dtype=torch.float64)
    weights, biases = make_mlp(dim, hidden)
    lengths = torch.tensor([2, 0, 4])
    base = reference.attention_pool(query, keys, weights, biases, lengths=lengths, normalization="softmax")
    poisoned = keys.clone()
    for b, n in enumerate(lengths.tolist()):
        poisoned[b, n:] = 1e6
    again = reference.attention_pool(query, poisoned, weights, biases, lengths=lengths, normalization="softmax")
    torch.testing.assert_close(again, base, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Dice on its own


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d", "3d", "3d-mask", "2d-mask"])
def test_dice_matches_loops(layout, training, affine):
    features = 5
    x = torch.randn(*((13,) if layout.startswith("2d") else (3, 4)), features, dtype=torch.float64) * 2 + 0.5
    mask = None
    if layout.endswith("mask"):
        mask = torch.rand(x.shape[:-1]) < 0.6
        mask.reshape(-1)[:2] = True
    (params,) = make_act_params("dice", {"training": training, "affine": affine}, [features])
    ours = clone_params([params])[0]
    out = reference.dice(x, ours.alpha, ours.running_mean, ours.running_var, weight=ours.weight, bias=ours.bias,
                         training=training, momentum=MOMENTUM, eps=EPS, mask=mask)
    rows = x.reshape(-1, features).tolist()
    counted = [True] * len(rows) if mask is None else mask.reshape(-1).tolist()
    loop_out, mean, var = loop_dice(rows, params.alpha.tolist(), params.running_mean.tolist(),
                                    params.running_var.tolist(), _floats(params.weight), _floats(params.bias),
                                    training, counted)
    assert out.shape == x.shape
    torch.testing.assert_close(out, torch.tensor(loop_out, dtype=torch.float64).reshape(x.shape), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, torch.tensor(mean, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours.running_var, torch.tensor(var, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_dice_masked_rows_do_not_count():
    """Rows outside the mask get an output but leave the statistics: changing them changes nothing else."""
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    mask = torch.rand(4, 6) < 0.5
    mask[0, :2] = True
    (params,) = make_act_params("dice", {"training": True}, [3])
    a, b = clone_params([params])[0], clone_params([params])[0]
    out_a = reference.dice(x, a.alpha, a.running_mean, a.running_var, mask=mask)
    changed = torch.where(mask.unsqueeze(-1), x, 100 * torch.randn_like(x))
    out_b = reference.dice(changed, b.alpha, b.running_mean, b.running_var, mask=mask)
    torch.testing.assert_close(out_b[mask], out_a[mask], rtol=0, atol=0)
    assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


@pytest.mark.parametrize("kind", ["lengths", "mask", "none"])
def test_valid_positions(kind):
    lengths, mask, valid = make_positions(kind, 4, 6)
    got = reference.valid_positions(lengths, mask, 4, 6, "cpu")
    assert got.dtype == torch.bool and got.tolist() == valid
    if lengths is not None:  # [B, 1] lengths give the same mask
        assert torch.equal(reference.valid_positions(lengths.unsqueeze(1), None, 4, 6, "cpu"), got)
