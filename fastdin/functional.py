"""The functional API: input checks, then dispatch to a Triton kernel or to the reference.

backend is "auto" | "triton" | "reference"; None reads the environment variable FASTDIN_BACKEND
(default "auto"). "auto" takes Triton when the tensors are on CUDA, Triton imports and a kernel
exists for the case, and the reference otherwise. "triton" raises where no kernel exists, and
runs on the CPU only under Triton's interpreter (TRITON_INTERPRET=1).
"""
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastdin import reference
from fastdin.reference import ACTIVATIONS, DICE_STATS, NORMALIZATIONS, DiceParams

BACKENDS = ("auto", "triton", "reference")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # no triton wheel on this platform
    HAS_TRITON = False

_value_checks = os.environ.get("FASTDIN_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> bool:
    """Turn the checks of tensor *values* (lengths within [0, T], Dice's valid-row count) on or off.

    They are on by default. On CUDA each costs a device-to-host synchronisation, so a tuned
    training loop whose inputs are known to be valid may turn them off. Shape, dtype and device
    checks are free and always run. Returns the previous setting.
    """
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    return previous


def _checking_values(t: Tensor) -> bool:
    if not _value_checks or torch.compiler.is_compiling() or t.is_meta:  # meta tensors have no values
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def default_backend() -> str:
    backend = os.environ.get("FASTDIN_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"FASTDIN_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_runnable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of this device."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def choose_backend(backend: Optional[str], device: torch.device, kernel_gap: Optional[str], op: str) -> str:
    """Resolve backend to "triton" or "reference".

    kernel_gap is None when a kernel exists for the case, else the reason why none does.
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        usable = device.type == "cuda" and HAS_TRITON and kernel_gap is None
        return "triton" if usable else "reference"
    if not triton_runnable(device):
        raise RuntimeError(
            f"backend='triton' for {op} needs CUDA tensors and an installed triton "
            f"(or TRITON_INTERPRET=1 on the CPU); got tensors on {device}"
        )
    if kernel_gap is not None:
        raise NotImplementedError(f"backend='triton': no Triton kernel for {op} in this case: {kernel_gap}")
    return "triton"


# ---------------------------------------------------------------------------------------------
# checks


def _require_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _require_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _require_same_device(named: dict) -> None:
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_positions(lengths: Optional[Tensor], mask: Optional[Tensor], batch: int, seq_len: int):
    """Check lengths ([B] or [B, 1], integer, within [0, T]) or mask ([B, T], bool); returns lengths as [B]."""
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    if mask is not None:
        _require_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor [B, T] (true = valid position), got dtype {mask.dtype}")
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(f"mask must have shape [B, T] = [{batch}, {seq_len}], got {list(mask.shape)}")
    if lengths is None:
        return None
    _require_tensor("lengths", lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.dim() == 2 and lengths.shape[1] == 1:
        lengths = lengths.reshape(-1)
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must have shape [B] or [B, 1] with B = {batch}, got {list(lengths.shape)}")
    if batch and _checking_values(lengths):
        low, high = torch.aminmax(lengths)
        if low.item() < 0 or high.item() > seq_len:
            raise ValueError(f"lengths must lie in [0, T] = [0, {seq_len}], got values in [{low.item()}, {high.item()}]")
    return lengths


def _check_activation(activation: str, act_params, hidden_sizes: Sequence[int]) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation not in ("prelu", "dice"):
        return
    if act_params is None or len(act_params) != len(hidden_sizes):
        got = "None" if act_params is None else len(act_params)
        raise ValueError(f"act_params must hold one entry per hidden layer ({len(hidden_sizes)}) for {activation}, got {got}")
    for layer, (params, size) in enumerate(zip(act_params, hidden_sizes)):
        if activation == "prelu":
            _require_tensor(f"act_params[{layer}]", params)
            if params.numel() not in (1, size):
                raise ValueError(f"act_params[{layer}] (PReLU weight) must have 1 or {size} elements, got {params.numel()}")
        else:
            if not isinstance(params, DiceParams):
                raise TypeError(f"act_params[{layer}] must be a DiceParams, got {type(params).__name__}")
            _check_dice_params(params, size, f"act_params[{layer}].")


def _check_dice_params(params: DiceParams, features: int, prefix: str = "") -> None:
    for name in ("alpha", "running_mean", "running_var", "weight", "bias"):
        t = getattr(params, name)
        if t is None and name in ("weight", "bias"):
            continue
        _require_tensor(prefix + name, t)
        if t.numel() != features:
            raise ValueError(f"{prefix}{name} must have {features} elements (one per feature), got shape {list(t.shape)}")
    if (params.weight is None) != (params.bias is None):
        raise ValueError(f"{prefix}weight and {prefix}bias must be given together (affine) or both be None")


def check_attention_inputs(query, keys, weights, biases, activation, act_params, lengths, mask, normalization, dice_stats):
    """Check the arguments of `attention_pool`; returns (query as [B, D], lengths as [B] or None)."""
    _require_tensor("keys", keys)
    _require_tensor("query", query)
    _require_float("keys", keys)
    _require_float("query", query)
    if keys.dim() != 3:
        raise ValueError(f"keys must be [B, T, D], got shape {list(keys.shape)}")
    batch, seq_len, dim = keys.shape
    if query.dim() == 3 and query.shape[1] == 1:
        query = query.reshape(query.shape[0], query.shape[2])
    if query.dim() != 2 or tuple(query.shape) != (batch, dim):
        raise ValueError(f"query must be [B, D] or [B, 1, D] with B = {batch}, D = {dim} (from keys), got shape {list(query.shape)}")
    if query.dtype != keys.dtype:
        raise TypeError(f"query and keys must have one dtype, got {query.dtype} and {keys.dtype}")
    if len(weights) < 2 or len(weights) != len(biases):
        raise ValueError(
            f"weights and biases must each hold the hidden layers and the score layer (at least 2 entries, "
            f"as many biases as weights), got {len(weights)} weights and {len(biases)} biases"
        )
    fan_in = 4 * dim
    for layer, (w, b) in enumerate(zip(weights, biases)):
        _require_tensor(f"weights[{layer}]", w)
        _require_tensor(f"biases[{layer}]", b)
        _require_float(f"weights[{layer}]", w)
        if w.dim() != 2 or w.shape[1] != fan_in:
            raise ValueError(f"weights[{layer}] must be [out, {fan_in}] (nn.Linear layout), got shape {list(w.shape)}")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"biases[{layer}] must have shape [{w.shape[0]}], got {list(b.shape)}")
        fan_in = w.shape[0]
    if weights[-1].shape[0] != 1:
        raise ValueError(f"the last weight is the score layer and must be [1, {weights[-1].shape[1]}], got {list(weights[-1].shape)}")
    hidden_sizes = [w.shape[0] for w in weights[:-1]]
    _check_activation(activation, act_params, hidden_sizes)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if dice_stats not in DICE_STATS:
        raise ValueError(f"dice_stats must be one of {DICE_STATS}, got {dice_stats!r}")
    lengths = check_positions(lengths, mask, batch, seq_len)
    if activation == "dice" and any(p.training for p in act_params):
        rows = batch * seq_len
        positions = mask if mask is not None else lengths
        if dice_stats == "valid" and positions is not None and _checking_values(positions):
            rows = int(positions.sum().item())
        _require_dice_rows(rows)
    named = {"query": query, "keys": keys, "lengths": lengths, "mask": mask}
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    named.update({f"biases[{i}]": b for i, b in enumerate(biases)})
    if activation == "prelu":
        named.update({f"act_params[{i}]": p for i, p in enumerate(act_params)})
    if activation == "dice":
        named.update({f"act_params[{i}].alpha": p.alpha for i, p in enumerate(act_params)})
    _require_same_device(named)
    return query, lengths


def _require_dice_rows(rows: int) -> None:
    if rows < 2:  # as nn.BatchNorm1d: one row has no variance
        raise ValueError(f"Dice in training needs more than one (valid) row to take batch statistics, got {rows}")


def check_dice_inputs(x, alpha, running_mean, running_var, weight, bias, training, mask) -> None:
    _require_tensor("x", x)
    _require_float("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, H] or [B, T, H], got shape {list(x.shape)}")
    features = x.shape[-1]
    _check_dice_params(DiceParams(alpha, running_mean, running_var, weight, bias), features)
    rows = x.numel() // max(features, 1)
    if mask is not None:
        _require_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of valid rows, got dtype {mask.dtype}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask must have shape {list(x.shape[:-1])} (x without its feature dim), got {list(mask.shape)}")
        if training and _checking_values(mask):
            rows = int(mask.sum().item())
    if training:
        _require_dice_rows(rows)
    _require_same_device({"x": x, "alpha": alpha, "running_mean": running_mean, "running_var": running_var,
                          "weight": weight, "bias": bias, "mask": mask})


# ---------------------------------------------------------------------------------------------
# ops


# The fused kernels as torch.library ops (one graph node for torch.compile), with autograd.
# The kernel modules are imported lazily: triton may be missing, and TRITON_INTERPRET must be set first.


def _attention_kernels():
    from fastdin.kernels import attention_pool as attention_kernels

    return attention_kernels


def _dice_kernels():
    from fastdin.kernels import dice as dice_kernels

    return dice_kernels


def _attention_act_tensors(activation: str, act_params) -> tuple:
    """Flatten act_params for the kernel: (tensors, Dice eps, Dice affine)."""
    if activation == "prelu":
        return [p.reshape(-1) for p in act_params], 0.0, False
    if activation != "dice":
        return [], 0.0, False
    affine = act_params[0].weight is not None
    tensors = []
    for p in act_params:
        tensors += [p.alpha.reshape(-1), p.running_mean, p.running_var]
        if affine:
            tensors += [p.weight, p.bias]
    return tensors, float(act_params[0].eps), affine  # one eps for all layers (attention_kernel_gap)


def _attention_dice_stats(
    query: Tensor, keys: Tensor, weights: list[Tensor], biases: list[Tensor], alphas: list[Tensor],
    running_means: list[Tensor], running_vars: list[Tensor], dice_weights: list[Tensor], dice_biases: list[Tensor],
    lengths: Optional[Tensor], mask: Optional[Tensor], dice_eps: float, count_all: bool, momenta: list[float],
) -> Tensor:
    """Training-mode Dice inside the attention unit: the batch statistics of every layer, fp32
    [L, 3, max H] (mean, biased var, count), and the running statistics' update in place."""
    affine = len(dice_weights) > 0
    act_tensors = []
    for layer, alpha in enumerate(alphas):
        act_tensors += [alpha, running_means[layer], running_vars[layer]]
        if affine:
            act_tensors += [dice_weights[layer], dice_biases[layer]]
    return _attention_kernels().attention_dice_batch_stats(
        query, keys, weights, biases, act_tensors, lengths, mask, dice_eps, affine, count_all, momenta,
    )


# eager calls the function itself (see _AttentionPoolFunction); torch.compile sees the op
_attention_dice_stats_op = torch.library.custom_op(
    "fastdin::attention_dice_stats", _attention_dice_stats, mutates_args=("running_means", "running_vars")
)


@_attention_dice_stats_op.register_fake
def _attention_dice_stats_fake(query, keys, weights, biases, alphas, running_means, running_vars, dice_weights,
                               dice_biases, lengths, mask, dice_eps, count_all, momenta):
    hidden = [w.shape[0] for w in weights[:-1]]
    return keys.new_empty((len(hidden), 3, max(hidden)), dtype=torch.float32)


@torch.library.custom_op("fastdin::attention_pool", mutates_args=())
def _attention_pool_op(
    query: Tensor, keys: Tensor, weights: list[Tensor], biases: list[Tensor], act_tensors: list[Tensor],
    lengths: Optional[Tensor], mask: Optional[Tensor], activation: str, dice_eps: float,
    dice_affine: bool, softmax: bool, return_scores: bool, dice_count: Optional[Tensor], dice_count_all: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, D], scores [B, T] or empty, softmax log-sum-exp [B] fp32 or empty).

    Training-mode Dice: act_tensors hold the batch statistics as the layers' mean/var, and
    dice_count (not None) the count of the positions they were taken over; the backward then
    includes the terms through the statistics."""
    return _attention_kernels().attention_pool_forward(
        query, keys, weights, biases, act_tensors, lengths, mask, activation, dice_eps, dice_affine,
        softmax, return_scores,
    )


@_attention_pool_op.register_fake
def _attention_pool_fake(query, keys, weights, biases, act_tensors, lengths, mask, activation, dice_eps,
                         dice_affine, softmax, return_scores, dice_count, dice_count_all):
    batch, seq_len, dim = keys.shape
    out = keys.new_empty((batch, dim))
    scores = keys.new_empty((batch, seq_len) if return_scores else (0,))
    lse = keys.new_empty((batch,) if softmax else (0,), dtype=torch.float32)
    return out, scores, lse


@torch.library.custom_op("fastdin::attention_pool_backward", mutates_args=())
def _attention_pool_backward_op(
    grad_out: Tensor, grad_scores: Optional[Tensor], query: Tensor, keys: Tensor, weights: list[Tensor],
    biases: list[Tensor], act_tensors: list[Tensor], lengths: Optional[Tensor], mask: Optional[Tensor],
    lse: Tensor, delta: Optional[Tensor], activation: str, dice_eps: float, dice_affine: bool,
    softmax: bool, dice_count: Optional[Tensor], dice_count_all: bool,
) -> list[Tensor]:
    """[dquery, dkeys, *dweights, *dbiases, *dact]; see `attention_pool_backward` in the kernels."""
    return _attention_kernels().attention_pool_backward(
        grad_out, grad_scores, query, keys, weights, biases, act_tensors, lengths, mask, lse, delta,
        activation, dice_eps, dice_affine, softmax, dice_count, dice_count_all,
    )


def _trainable_act_tensors(activation: str, act_tensors: Sequence[Tensor], dice_affine: bool) -> list:
    """The act tensors that get a gradient (PReLU slopes; Dice alpha, weight, bias), in kernel order."""
    if activation != "dice":
        return list(act_tensors)
    per_layer = 5 if dice_affine else 3
    return [t for i, t in enumerate(act_tensors) if i % per_layer not in (1, 2)]  # not the running stats


@_attention_pool_backward_op.register_fake
def _attention_pool_backward_fake(grad_out, grad_scores, query, keys, weights, biases, act_tensors, lengths,
                                  mask, lse, delta, activation, dice_eps, dice_affine, softmax, dice_count,
                                  dice_count_all):
    grads = [query.new_empty(query.shape), keys.new_empty(keys.shape)]
    grads += [t.new_empty(t.shape) for t in [*weights, *biases]]
    grads += [t.new_empty(t.shape) for t in _trainable_act_tensors(activation, act_tensors, dice_affine)]
    return grads


def _attention_pool_setup_context(ctx, inputs, output):
    (query, keys, weights, biases, act_tensors, lengths, mask, activation, dice_eps, dice_affine, softmax,
     return_scores, dice_count, dice_count_all) = inputs
    out, scores, lse = output
    ctx.save_for_backward(query, keys, lengths, mask, out, scores, lse, dice_count, *weights, *biases, *act_tensors)
    ctx.layers, ctx.activation, ctx.dice_eps, ctx.dice_affine = len(weights), activation, dice_eps, dice_affine
    ctx.softmax, ctx.return_scores, ctx.dice_count_all = softmax, return_scores, dice_count_all


def _attention_pool_grads(ctx, grad_out, grad_scores, backward_kernels):
    """The backward shared by the custom op and the eager Function: (dquery, dkeys, dweights, dbiases, dact)."""
    query, keys, lengths, mask, out, scores, lse, dice_count, *params = ctx.saved_tensors
    layers = ctx.layers
    weights, biases, act_tensors = params[:layers], params[layers:2 * layers], params[2 * layers:]
    if grad_out is None:  # only the scores were used
        grad_out = torch.zeros_like(out)
    if not ctx.return_scores:
        grad_scores = None
    delta = None
    if ctx.softmax:
        # sum_t w_t dL/dw_t = out . g (+ scores . grad_scores): the softmax backward needs only this per row
        delta = (out.float() * grad_out.float()).sum(-1)
        if grad_scores is not None:
            delta = delta + (scores.float() * grad_scores.float()).sum(-1)
    grads = backward_kernels(
        grad_out, grad_scores, query, keys, list(weights), list(biases), list(act_tensors), lengths, mask, lse,
        delta, ctx.activation, ctx.dice_eps, ctx.dice_affine, ctx.softmax, dice_count, ctx.dice_count_all,
    )
    dquery, dkeys = grads[0], grads[1]
    dweights, dbiases = grads[2:2 + layers], grads[2 + layers:2 + 2 * layers]
    trained = iter(grads[2 + 2 * layers:])
    per_layer = 5 if ctx.dice_affine else 3
    dact = [
        None if ctx.activation == "dice" and i % per_layer in (1, 2) else next(trained)
        for i in range(len(act_tensors))
    ]
    return dquery, dkeys, dweights, dbiases, dact


def _attention_pool_backward(ctx, grad_out, grad_scores, _grad_lse):
    grads = _attention_pool_grads(ctx, grad_out, grad_scores, _attention_pool_backward_op)
    return (*grads, None, None, None, None, None, None, None, None, None)


_attention_pool_op.register_autograd(_attention_pool_backward, setup_context=_attention_pool_setup_context)


class _AttentionPoolFunction(torch.autograd.Function):
    """The eager path of fastdin::attention_pool: the same kernels and backward without the custom
    op's dispatch, which costs about 8x the host time of an autograd.Function per call
    (bench/dispatch_overhead.py: 229 vs 29 us on a 2-core CPU), too much where a launch takes tens
    of microseconds."""

    @staticmethod
    def forward(ctx, query, keys, lengths, mask, activation, dice_eps, dice_affine, softmax, return_scores,
                dice_count, dice_count_all, layers, *tensors):
        weights, biases = list(tensors[:layers]), list(tensors[layers:2 * layers])
        act_tensors = list(tensors[2 * layers:])
        output = _attention_kernels().attention_pool_forward(
            query, keys, weights, biases, act_tensors, lengths, mask, activation, dice_eps, dice_affine,
            softmax, return_scores,
        )
        inputs = (query, keys, weights, biases, act_tensors, lengths, mask, activation, dice_eps, dice_affine,
                  softmax, return_scores, dice_count, dice_count_all)
        _attention_pool_setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # unused outputs (scores, lse) bring None, not zero tensors
        ctx.mark_non_differentiable(output[2])
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_scores, _grad_lse):
        dquery, dkeys, dweights, dbiases, dact = _attention_pool_grads(
            ctx, grad_out, grad_scores, _attention_kernels().attention_pool_backward
        )
        return (dquery, dkeys) + (None,) * 10 + (*dweights, *dbiases, *dact)


def _dice_batch_statistics(query, keys, weights, biases, act_params, lengths, mask, dice_eps, dice_affine,
                           count_all):
    """Training-mode Dice: (act tensors with the batch statistics as mean/var, the count they were
    taken over as a 1-element tensor); updates the running statistics."""
    stats_op = _attention_dice_stats_op if torch.compiler.is_compiling() else _attention_dice_stats
    with torch.no_grad():  # the gradient through the statistics is the attention op's backward
        stats = stats_op(
            query, keys, list(weights), list(biases), [p.alpha.reshape(-1) for p in act_params],
            [p.running_mean for p in act_params], [p.running_var for p in act_params],
            [p.weight.reshape(-1) for p in act_params] if dice_affine else [],
            [p.bias.reshape(-1) for p in act_params] if dice_affine else [],
            lengths, mask, dice_eps, count_all, [float(p.momentum) for p in act_params],
        )
    tensors = []
    for layer, p in enumerate(act_params):
        width = p.alpha.numel()
        tensors += [p.alpha.reshape(-1), stats[layer, 0, :width], stats[layer, 1, :width]]
        if dice_affine:
            tensors += [p.weight, p.bias]
    return tensors, stats[0, 2, :1]


def _attention_pool_triton(query, keys, weights, biases, activation, act_params, lengths, mask, normalization,
                           return_scores, dice_stats):
    """Run the fused kernel (inputs already checked); returns (out [B, D], scores [B, T] or None)."""
    if keys.is_cuda and torch.is_autocast_enabled("cuda"):
        # run in the autocast dtype; the kernel reads the weights as they are and converts them
        dtype = torch.get_autocast_dtype("cuda")
        query, keys = query.to(dtype), keys.to(dtype)
    # the kernel takes any strides except in the last dim (keys expanded over B stay a view)
    query, keys = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys)]
    weights = [w if w.stride(-1) == 1 else w.contiguous() for w in weights]
    biases = [b if b.stride(-1) == 1 else b.contiguous() for b in biases]
    act_tensors, dice_eps, dice_affine = _attention_act_tensors(activation, act_params)
    dice_count, count_all = None, dice_stats == "all"
    if activation == "dice" and act_params[0].training:
        act_tensors, dice_count = _dice_batch_statistics(query, keys, weights, biases, act_params, lengths, mask,
                                                         dice_eps, dice_affine, count_all)
    softmax = normalization == "softmax"
    if torch.compiler.is_compiling():  # one opaque graph node
        out, scores, _lse = _attention_pool_op(
            query, keys, list(weights), list(biases), act_tensors, lengths, mask, activation, dice_eps,
            dice_affine, softmax, return_scores, dice_count, count_all,
        )
    else:
        out, scores, _lse = _AttentionPoolFunction.apply(
            query, keys, lengths, mask, activation, dice_eps, dice_affine, softmax, return_scores, dice_count,
            count_all, len(weights), *weights, *biases, *act_tensors,
        )
    return out, (scores if return_scores else None)


def attention_kernel_gap(keys: Tensor, weights: Sequence[Tensor], activation: str, act_params) -> Optional[str]:
    """None when the fused Triton kernel covers this attention case, else why none does.

    Covered: keys float32/float16/bfloat16, D <= 256, 1 to 4 hidden layers of width <= 512 where the
    program fits the GPU's shared memory (estimated; wide first layers with a large D do not, e.g.
    D = 128 with 256/128 layers on an H200), activations sigmoid, relu, prelu and Dice, in eval mode
    (running statistics) and in training mode (batch statistics over the valid or all positions,
    exact backward through them), lengths or mask, normalization None or softmax, scores.
    """
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"keys dtype {keys.dtype}: the kernel takes float32, float16 or bfloat16"
    if keys.shape[-1] > 256:
        return f"embedding dim D = {keys.shape[-1]} > 256"
    hidden = [w.shape[0] for w in weights[:-1]]
    if len(hidden) > 4:
        return f"{len(hidden)} hidden layers > 4"
    if max(hidden) > 512:
        return f"hidden width {max(hidden)} > 512"
    if keys.is_cuda and HAS_TRITON:
        props = torch.cuda.get_device_properties(keys.device)
        limit = getattr(props, "shared_memory_per_block_optin", 232448)
        needed = _attention_kernels().shared_memory_estimate(keys.shape[-1], tuple(hidden), keys.dtype)
        if needed > limit:
            return (f"D = {keys.shape[-1]} with hidden sizes {hidden} needs about {needed // 1024} KB of shared "
                    f"memory per program, more than the {limit // 1024} KB this GPU allows")
    if activation == "dice":
        if len({bool(p.training) for p in act_params}) > 1:
            return "Dice layers mix training and eval mode"
        if len({p.weight is None for p in act_params}) > 1:
            return "Dice layers mix affine and non-affine"
        if len({float(p.eps) for p in act_params}) > 1:
            return "Dice layers with different eps"
    return None


def dice_kernel_gap(x: Tensor, training: bool) -> Optional[str]:
    """None when a Triton kernel covers this Dice case, else why none does."""
    if x.dtype not in DICE_KERNEL_DTYPES:
        return f"x has dtype {x.dtype}; the kernel takes {', '.join(map(str, DICE_KERNEL_DTYPES))}"
    if x.numel() == 0:
        return "x is empty"
    return None


def _match_weight_dtype(tensors: Sequence[Tensor], dtype: torch.dtype):
    """Outside autocast, run the reference in the inputs' dtype (as the kernels do)."""
    if torch.is_autocast_enabled():
        return list(tensors)
    return [t.to(dtype) for t in tensors]


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
    normalization: Optional[str] = None,
    return_scores: bool = False,
    dice_stats: str = "valid",
    backend: Optional[str] = None,
):
    """DIN's local activation unit + mask + weighted sum; see `fastdin.reference.attention_pool`.

    query is [B, D] or [B, 1, D]; the output keeps its rank. Returns (out, scores) with
    `return_scores`, where scores [B, T] are the weights used, after masking and softmax.
    """
    query_rank = query.dim() if isinstance(query, Tensor) else 0
    query2d, lengths = check_attention_inputs(
        query, keys, weights, biases, activation, act_params, lengths, mask, normalization, dice_stats
    )
    gap = attention_kernel_gap(keys, weights, activation, act_params)
    chosen = choose_backend(backend, keys.device, gap, "attention_pool")
    if chosen == "triton":
        out, scores = _attention_pool_triton(
            query2d, keys, weights, biases, activation, act_params, lengths, mask, normalization, return_scores,
            dice_stats,
        )
    else:
        result = reference.attention_pool(
            query2d, keys, _match_weight_dtype(weights, keys.dtype), _match_weight_dtype(biases, keys.dtype),
            activation=activation, act_params=act_params, lengths=lengths, mask=mask,
            normalization=normalization, return_scores=return_scores, dice_stats=dice_stats,
        )
        out, scores = result if return_scores else (result, None)
    if query_rank == 3:
        out = out.unsqueeze(1)
    return (out, scores) if return_scores else out


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
    backend: Optional[str] = None,
) -> Tensor:
    """Dice activation; see `fastdin.reference.dice`. Updates the running statistics in training."""
    check_dice_inputs(x, alpha, running_mean, running_var, weight, bias, training, mask)
    chosen = choose_backend(backend, x.device, dice_kernel_gap(x, training), "dice")
    if chosen == "triton":
        if torch.compiler.is_compiling():  # one opaque graph node; eager skips the custom-op dispatch cost
            out, _stats, new_mean, new_var = _dice_op(x, alpha, weight, bias, running_mean, running_var, mask,
                                                      training, momentum, eps)
            if training:
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
            return out
        return _DiceFunction.apply(x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps)
    return reference.dice(
        x, alpha, running_mean, running_var, weight=weight, bias=bias, training=training,
        momentum=momentum, eps=eps, mask=mask,
    )


# ---------------------------------------------------------------------------------------------
# Dice autograd Function (Triton kernels in fastdin.kernels.dice)

DICE_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _DiceFunction(torch.autograd.Function):
    """Dice through the fused kernels; saves only x, the mask and fp32 [3, H] statistics."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps):
        out, stats = _dice_kernels().dice_forward(x, alpha, weight, bias, running_mean, running_var, mask,
                                                  training, momentum, eps)
        ctx.save_for_backward(x, mask, alpha, weight, bias, stats)
        ctx.training = training
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, mask, alpha, weight, bias, stats = ctx.saved_tensors
        dx, dalpha, dweight, dbias = _dice_kernels().dice_backward(grad_out, x, mask, alpha, weight, bias,
                                                                   stats, ctx.training)
        return dx, dalpha, dweight, dbias, None, None, None, None, None, None


# The same kernels as torch.library ops, so torch.compile(fullgraph=True) and export trace through Dice.
# Eager calls go through _DiceFunction: a custom op's dispatch costs several times the host time of
# an autograd.Function per call (bench/dispatch_overhead.py), which matters at launch-bound sizes.


@torch.library.custom_op("fastdin::dice", mutates_args=())
def _dice_op(
    x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
    running_var: Tensor, mask: Optional[Tensor], training: bool, momentum: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, fp32 [3, H] statistics for the backward, new running mean, new running var).

    Functional (an op with autograd may not mutate), so the kernel updates copies of the running
    statistics, [H] each, and the caller copies them back.
    """
    new_mean, new_var = running_mean.clone(), running_var.clone()
    out, stats = _dice_kernels().dice_forward(x, alpha, weight, bias, new_mean, new_var, mask, training, momentum, eps)
    return out, stats, new_mean, new_var


@_dice_op.register_fake
def _dice_fake(x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps):
    stats = x.new_empty((3, x.shape[-1]), dtype=torch.float32)
    return x.new_empty(x.shape), stats, running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)


@torch.library.custom_op("fastdin::dice_backward", mutates_args=())
def _dice_backward_op(
    grad_out: Tensor, x: Tensor, mask: Optional[Tensor], alpha: Tensor, weight: Optional[Tensor],
    bias: Optional[Tensor], stats: Tensor, training: bool,
) -> list[Tensor]:
    """[dx, dalpha] plus [dweight, dbias] with affine."""
    grads = _dice_kernels().dice_backward(grad_out, x, mask, alpha, weight, bias, stats, training)
    return [g for g in grads if g is not None]


@_dice_backward_op.register_fake
def _dice_backward_fake(grad_out, x, mask, alpha, weight, bias, stats, training):
    return [t.new_empty(t.shape) for t in (x, alpha, weight, bias) if t is not None]


def _dice_op_setup_context(ctx, inputs, output):
    x, alpha, weight, bias, _running_mean, _running_var, mask, training, _momentum, _eps = inputs
    ctx.save_for_backward(x, mask, alpha, weight, bias, output[1])
    ctx.training = training


def _dice_op_backward(ctx, grad_out, _grad_stats, _grad_mean, _grad_var):
    x, mask, alpha, weight, bias, stats = ctx.saved_tensors
    grads = _dice_backward_op(grad_out, x, mask, alpha, weight, bias, stats, ctx.training)
    dweight, dbias = grads[2:] if weight is not None else (None, None)
    return grads[0], grads[1], dweight, dbias, None, None, None, None, None, None


_dice_op.register_autograd(_dice_op_backward, setup_context=_dice_op_setup_context)
