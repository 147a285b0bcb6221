"""Memory layouts every backend must accept, shared by the layout, program-split and offset tests.

Each layout builds the op's inputs as *views* with the same values as contiguous tensors: a weight
that is a column slice of a wider tensor (row stride > fan-in) or a transpose (stride(-1) != 1),
biases and activation parameters that are columns of a table (stride 2), a strided mask (m[:, ::2]) and strided lengths (table[:, 0]), one candidate for every user (the query
expanded, stride 0 over B), keys expanded or sliced, and a stride-0 (plain .sum()) or non-contiguous
grad_out. Gradients are taken with respect to the views themselves, so an expanded query gets one
gradient row per user. The float64 reference always sees contiguous copies of the same values.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastdin.reference import DiceParams

ATTENTION_LAYOUTS = ("contiguous", "weight_slice", "weight_transposed", "params_strided", "mask_strided",
                     "lengths_strided",
                     "query_expanded", "keys_expanded", "keys_strided", "keys_transposed", "grad_stride0",
                     "grad_strided")
# jagged keys [N, D] with offsets [B + 1] (the valid rows of the padded keys, user by user), plain or
# a column slice of a wider tensor; scores and the keys' gradient then come back as [N] and [N, D]
JAGGED_LAYOUTS = ("jagged", "jagged_strided")


@dataclass
class AttentionSetup:
    """One attention-pooling configuration (small: under the interpreter each program costs ~1 ms)."""
    activation: str = "prelu"
    normalization: Optional[str] = "softmax"
    hidden: Sequence[int] = (6, 3)
    batch: int = 3
    seq_len: int = 5
    dim: int = 4
    dice_training: bool = False
    dice_stats: str = "valid"
    dice_eps: float = 1e-5

    def __str__(self):
        train = f"-train-{self.dice_stats}-eps{self.dice_eps:g}" if self.dice_training else ""
        return f"{self.activation}-{self.normalization}{train}"


def attention_values(setup: AttentionSetup, layout: str, device):
    """Fresh random contiguous fp32 values of every input of one call, shaped for `layout`."""
    B, T, D = setup.batch, setup.seq_len, setup.dim
    query = torch.randn(1 if layout == "query_expanded" else B, D, device=device).expand(B, D).contiguous()
    keys = torch.randn(1 if layout == "keys_expanded" else B, T, D, device=device).expand(B, T, D).contiguous()
    weights, biases, fan_in = [], [], 4 * D
    for width in list(setup.hidden) + [1]:
        weights.append(torch.randn(width, fan_in, device=device) * (2.0 / fan_in) ** 0.5)
        biases.append(torch.randn(width, device=device) * 0.5)
        fan_in = width
    values = {"query": query, "keys": keys, "weights": weights, "biases": biases,
              "grad_out": torch.randn(B, D, device=device), "grad_scores": torch.randn(B, T, device=device)}
    if layout == "grad_stride0":  # what out.sum() + scores.sum() hands the backward
        values["grad_out"] = torch.ones(B, D, device=device)
        values["grad_scores"] = torch.ones(B, T, device=device)
    if setup.activation == "prelu":
        values["slopes"] = [torch.rand(h, device=device) * 0.5 for h in setup.hidden]  # one per feature
    if setup.activation == "dice":
        values["alpha"] = [torch.rand(h, device=device) for h in setup.hidden]
        values["dice_weight"] = [1 + 0.3 * torch.randn(h, device=device) for h in setup.hidden]
        values["dice_bias"] = [0.3 * torch.randn(h, device=device) for h in setup.hidden]
        values["running_mean"] = [torch.randn(h, device=device) * 0.3 for h in setup.hidden]
        values["running_var"] = [torch.rand(h, device=device) + 0.5 for h in setup.hidden]
    if layout == "mask_strided":
        mask = torch.rand(B, T, device=device) < 0.6
        mask[0, :2] = True  # Dice in training needs two counted positions
        mask[-1] = False  # a row with no valid position
        values["mask"] = mask
    else:
        lengths = torch.randint(1, T + 1, (B,), device=device)
        lengths[0], lengths[-1] = T, 0
        values["lengths"] = lengths
    return values


def _slice_of_wider(t: torch.Tensor) -> torch.Tensor:
    """A wider random tensor whose columns 3 : 3 + n hold the weight t ([out, n]): its slice
    wide[:, 3:3 + n] has a row stride larger than the fan-in."""
    wide = torch.randn(t.shape[0], t.shape[1] + 5, dtype=t.dtype, device=t.device)
    wide[:, 3:3 + t.shape[1]] = t
    return wide


def lay_out(values, layout: str, dtype, requires_grad: bool = True):
    """(inputs in `layout` and dtype, the tensors to differentiate) from `attention_values`.

    inputs holds query, keys, weights, biases, activation tensors, lengths or mask, grad_out and
    grad_scores (None for a stride-0 gradient: the loss is then a plain sum). The differentiated
    tensors are the views the op receives, in a fixed order: query, keys, weights, biases, then the
    activation parameters."""
    def leaf(t):
        return t.detach().to(dtype).clone().requires_grad_(requires_grad)

    def vector(t):  # biases and activation parameters; with params_strided a column of a [n, 2] table
        if layout != "params_strided":
            return leaf(t)
        table = torch.randn(t.shape[0], 2, dtype=dtype, device=t.device)
        table[:, 1] = t
        return table.requires_grad_(requires_grad)[:, 1]

    q, k = values["query"], values["keys"]
    B, T, D = k.shape
    if layout == "query_expanded":
        query = leaf(q[:1]).expand(B, D)
    else:
        query = leaf(q)
    valid = None
    if layout in JAGGED_LAYOUTS:
        valid = torch.arange(T, device=k.device) < values["lengths"][:, None]
        rows = k[valid]
        if layout == "jagged_strided":
            wide = torch.randn(rows.shape[0], D + 3, dtype=dtype, device=k.device)
            wide[:, 1:D + 1] = rows.to(dtype)
            keys = wide.requires_grad_(requires_grad)[:, 1:D + 1]
        else:
            keys = leaf(rows)
    elif layout == "keys_expanded":
        keys = leaf(k[:1]).expand(B, T, D)
    elif layout == "keys_strided":
        wide = torch.randn(B, 2 * T, D + 3, dtype=dtype, device=k.device)
        wide[:, ::2, 1:D + 1] = k.to(dtype)
        keys = wide.requires_grad_(requires_grad)[:, ::2, 1:D + 1]
    elif layout == "keys_transposed":  # stored [B, D, T]: stride 1 over T, not D (the kernels need a copy)
        keys = leaf(k.transpose(1, 2).contiguous()).transpose(1, 2)
    else:
        keys = leaf(k)
    weights = []
    for w in values["weights"]:
        if layout == "weight_slice":
            weights.append(leaf(_slice_of_wider(w))[:, 3:3 + w.shape[1]])
        elif layout == "weight_transposed":
            weights.append(leaf(w.t().contiguous()).t())
        else:
            weights.append(leaf(w))
    biases = [vector(b) for b in values["biases"]]
    inputs = {"query": query, "keys": keys, "weights": weights, "biases": biases}
    trainable = [query, keys, *weights, *biases]
    if "slopes" in values:
        inputs["slopes"] = [vector(s) for s in values["slopes"]]
        trainable += inputs["slopes"]
    if "alpha" in values:
        for name in ("alpha", "dice_weight", "dice_bias"):
            inputs[name] = [vector(t) for t in values[name]]
            trainable += inputs[name]
        for name in ("running_mean", "running_var"):
            inputs[name] = [t.detach().float().clone() for t in values[name]]
    if "mask" in values:
        mask = values["mask"]
        wide = torch.rand(B, 2 * T, device=mask.device) < 0.5
        wide[:, ::2] = mask
        inputs["mask"] = wide[:, ::2] if layout == "mask_strided" else mask.clone()
    if valid is not None:
        inputs["offsets"] = torch.nn.functional.pad(values["lengths"].cumsum(0), (1, 0))
    elif "lengths" in values:
        lengths = values["lengths"]
        if layout == "lengths_strided":
            table = torch.full((B, 2), T, dtype=lengths.dtype, device=lengths.device)  # junk column: T
            table[:, 0] = lengths
            inputs["lengths"] = table[:, 0]
        else:
            inputs["lengths"] = lengths.clone()
    grad_out, grad_scores = values["grad_out"].to(dtype), values["grad_scores"].to(dtype)
    if layout == "grad_stride0":
        grad_out = grad_scores = None
    elif layout == "grad_strided":
        wide = torch.randn(B, 2 * D, dtype=dtype, device=grad_out.device)
        wide[:, ::2] = grad_out
        grad_out = wide[:, ::2]
        grad_scores = grad_scores.t().contiguous().t()
    if valid is not None:
        grad_scores = grad_scores[valid]
    inputs["grad_out"], inputs["grad_scores"] = grad_out, grad_scores
    return inputs, trainable


def as_jagged(result, values):
    """A padded run's [out, scores [B, T], dquery, dkeys [B, T, D], ...] with the scores and the keys'
    gradient taken at the valid positions, user by user, as a jagged run returns them."""
    lengths = values["lengths"]
    valid = torch.arange(values["keys"].shape[1], device=lengths.device) < lengths[:, None]
    result = list(result)
    result[1], result[3] = result[1][valid], result[3][valid]
    return result


def attention_act_params(setup: AttentionSetup, inputs):
    if setup.activation == "prelu":
        return inputs["slopes"]
    if setup.activation == "dice":
        return [DiceParams(inputs["alpha"][i], inputs["running_mean"][i], inputs["running_var"][i],
                           inputs["dice_weight"][i], inputs["dice_bias"][i], training=setup.dice_training,
                           momentum=0.3, eps=setup.dice_eps) for i in range(len(setup.hidden))]
    return None


def run_attention(setup: AttentionSetup, inputs, trainable, backend, call=None):
    """[out, scores, *gradients of `trainable`, *running statistics] of one forward and backward.

    call(query, keys, weights, biases, act_params, positions) runs the op; by default
    fastdin.functional.attention_pool with `backend`."""
    from fastdin import functional

    positions = {name: inputs[name] for name in ("lengths", "mask", "offsets") if name in inputs}
    act_params = attention_act_params(setup, inputs)
    if call is None:
        out, scores = functional.attention_pool(
            inputs["query"], inputs["keys"], inputs["weights"], inputs["biases"], activation=setup.activation,
            act_params=act_params, normalization=setup.normalization, return_scores=True,
            dice_stats=setup.dice_stats, backend=backend, **positions)
    else:
        out, scores = call(inputs["query"], inputs["keys"], inputs["weights"], inputs["biases"], act_params,
                           positions)
    if inputs["grad_out"] is None:
        grads = torch.autograd.grad(out.sum() + scores.sum(), trainable)
    else:
        grads = torch.autograd.grad((out, scores), trainable, (inputs["grad_out"], inputs["grad_scores"]))
    running = [t for name in ("running_mean", "running_var") for t in inputs.get(name, [])]
    return [out, scores, *grads, *running]


def score_bias_position(setup: AttentionSetup) -> Optional[int]:
    """Index in run_attention's result of the score layer's bias gradient, exactly 0 under softmax."""
    if setup.normalization != "softmax":
        return None
    return 2 + 2 + len(setup.hidden) + 1 + len(setup.hidden)


def assert_within_policy(got, want, same_dtype, dtype, zero_at=None, what=""):
    """The numerics policy (design.md): every result finite and of want's shape, with a relative
    error vs the float64 reference of at most twice the same-dtype reference's plus FLOOR[dtype] (fastdin.testing).
    zero_at: the index of a gradient that is exactly 0 in exact arithmetic (the score bias under
    softmax), checked by absolute value instead."""
    from fastdin.testing import FLOOR, error_bound, relative_errors

    assert len(got) == len(want) == len(same_dtype)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"result {i}: shape {list(g.shape)} != {list(w.shape)} {what}"
        assert torch.isfinite(g).all(), f"result {i}: NaN or inf {what}"
    errors = relative_errors(got, want)
    bounds = [error_bound(dtype, e) for e in relative_errors(same_dtype, want)]
    if zero_at is not None:
        assert got[zero_at].abs().max().item() <= FLOOR[dtype], f"score-bias gradient not ~0 {what}"
        errors[zero_at] = bounds[zero_at] = 0.0
    for i, (err, bound) in enumerate(zip(errors, bounds)):
        assert err <= bound, f"result {i}: relative error {err:.2e} > {bound:.2e} {what}"
