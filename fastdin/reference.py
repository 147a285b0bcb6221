"""Exact PyTorch versions of every fastdin op.

This is the single ground truth: the tests compare the kernels with it, the benchmarks time it as
"eager", and `fastdin.functional` falls back to it where no kernel runs. It is written plainly, as
the paper states the math: no first-layer fold and no tricks. Inputs are assumed valid here;
`fastdin.functional` checks them before dispatching.
"""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdin.jagged import jagged_to_padded

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
NORMALIZATIONS = (None, "softmax")
DICE_STATS = ("valid", "all")


class DiceParams(NamedTuple):
    """The parameters and state of one Dice activation (see `dice`)."""

    alpha: Tensor  # [H]
    running_mean: Tensor  # [H], updated in place in training
    running_var: Tensor  # [H], updated in place in training
    weight: Optional[Tensor] = None  # [H], only with affine=True
    bias: Optional[Tensor] = None  # [H], only with affine=True
    training: bool = True
    momentum: float = 0.1
    eps: float = 1e-8


def dice(
    x: Tensor,
    alpha: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-8,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Dice (Zhou et al. 2018): f(s) = p*s + (1-p)*alpha*s, p = sigmoid((s - E[s]) / sqrt(Var[s] + eps)).

    x is [N, H] or [B, T, H]; the statistics are per feature (the last dim). In training they are
    the biased batch statistics over the rows where `mask` ([N] or [B, T], bool) is true, or over all
    rows without a mask, and the running statistics are updated as `nn.BatchNorm1d` does (momentum,
    unbiased running variance). In eval the running statistics are used. With `weight`/`bias`
    (affine, as DeepCTR-Torch's BatchNorm) p = sigmoid(weight * x_hat + bias). Every row gets an
    output; masked rows only do not count in the statistics.
    """
    if training:
        rows = x.reshape(-1, x.shape[-1])
        if mask is not None:
            rows = rows[mask.reshape(-1)]
        count = rows.shape[0]
        mean = rows.mean(0)
        var = rows.var(0, unbiased=False)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            unbiased = var.detach().to(running_var.dtype) * (count / (count - 1))
            running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    else:
        mean = running_mean.to(x.dtype)
        var = running_var.to(x.dtype)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        x_hat = x_hat * weight + bias
    p = torch.sigmoid(x_hat)
    return p * x + (1 - p) * alpha * x


def valid_positions(lengths: Optional[Tensor], mask: Optional[Tensor], batch: int, seq_len: int, device) -> Tensor:
    """The [B, T] bool mask of the positions that count, from lengths [B] or a mask [B, T]."""
    if mask is not None:
        return mask.bool()
    if lengths is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    positions = torch.arange(seq_len, device=device)
    return positions.unsqueeze(0) < lengths.reshape(-1, 1)


def _activate(h: Tensor, activation: str, params, valid: Tensor, dice_stats: str) -> Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(h)
    if activation == "relu":
        return torch.relu(h)
    if activation == "prelu":
        # not F.prelu: it takes dim 1 as the channel dim, which is T for [B, T, H]; the slopes are per feature (last dim)
        return torch.where(h >= 0, h, params * h)
    d: DiceParams = params
    return dice(
        h, d.alpha, d.running_mean, d.running_var, weight=d.weight, bias=d.bias, training=d.training,
        momentum=d.momentum, eps=d.eps, mask=valid if dice_stats == "valid" else None,
    )


def attention_pool(
    query: Tensor,
    keys: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    *,
    activation: str = "sigmoid",
    act_params: Optional[Sequence] = None,
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
    normalization: Optional[str] = None,
    return_scores: bool = False,
    dice_stats: str = "valid",
):
    """DIN's local activation unit followed by the weighted sum of the history.

    query [B, D] (the candidate), keys [B, T, D] (the behaviour history).
    weights/biases: the `nn.Linear` parameters of the attention MLP in order; the first takes
    [q, k, q-k, q*k] (4D inputs) and the last is the score layer with one output.
    act_params: per hidden layer, the PReLU weight ([1] or [H]) for "prelu", a `DiceParams` for "dice".
    Positions past `lengths` [B] (or where `mask` [B, T] is false) do not count: with
    normalization=None their weight is 0; with "softmax" they are left out of the softmax, and a
    row with no valid position gets zero weights. Returns out [B, D], and the weights [B, T] when
    `return_scores`.

    Jagged input: keys [N, D] hold the users' histories one after another, user b's at rows
    offsets[b]:offsets[b+1] (offsets [B + 1], the values+offsets convention of TorchRec and FBGEMM).
    Every row is a valid position (so dice_stats "all" is "valid"), and the weights come back
    packed as [N].
    """
    if offsets is not None:
        padded, lengths = jagged_to_padded(keys, offsets)
        result = attention_pool(query, padded, weights, biases, activation=activation, act_params=act_params,
                                lengths=lengths, normalization=normalization, return_scores=return_scores)
        if not return_scores:
            return result
        out, scores = result
        return out, scores[valid_positions(lengths, None, *scores.shape, scores.device)]
    batch, seq_len, _ = keys.shape
    valid = valid_positions(lengths, mask, batch, seq_len, keys.device)
    q = query.unsqueeze(1).expand_as(keys)
    h = torch.cat([q, keys, q - keys, q * keys], dim=-1)
    for layer, (w, b) in enumerate(zip(weights[:-1], biases[:-1])):
        params = act_params[layer] if act_params is not None else None
        h = _activate(F.linear(h, w, b), activation, params, valid, dice_stats)
    scores = F.linear(h, weights[-1], biases[-1]).squeeze(-1)
    if normalization == "softmax":
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        # the mask product zeroes rows with no valid position (softmax made them uniform)
        scores = torch.softmax(scores, dim=-1) * valid
    else:
        scores = scores.masked_fill(~valid, 0.0)
    out = torch.bmm(scores.unsqueeze(1), keys).squeeze(1)
    return (out, scores) if return_scores else out
