"""The attention-pooling op (DIN's local activation unit + mask + weighted sum): checks, the
backend table, the fused kernel's autograd.Function and its torch.library custom ops.

The math is `fastdin.reference.attention_pool`; the kernels are `fastdin.kernels.attention_pool`.
"""
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fastdin import packed, reference
from fastdin.kernels.launch import tf32_matmuls
from fastdin.ops import attention_packed
from fastdin.ops.backend import (LAUNCH_REFUSED, checking_values, choose_backend, kernel_dtype, record_refusal, refusal,
                                 refusal_count)
from fastdin.ops.backend import shared_memory_limit as _shared_memory_limit
from fastdin.ops.checks import (check_activation, check_offsets, check_positions, require_dice_rows, require_float,
                                require_same_device, require_tensor)
from fastdin.reference import DICE_STATS, NORMALIZATIONS

FAMILY = "per-user"  # in fastdin.ops.backend's record of refused programs


def check_attention_inputs(query, keys, weights, biases, activation, act_params, lengths, mask, normalization, dice_stats,
                           offsets=None):
    """Check the arguments of `attention_pool`; returns (query as [B, D], lengths as [B] or None)."""
    require_tensor("keys", keys)
    require_tensor("query", query)
    require_float("keys", keys)
    require_float("query", query)
    if offsets is not None:
        if keys.dim() != 2:
            raise ValueError(f"jagged keys (with offsets) must be [N, D], got shape {list(keys.shape)}")
        batch, seq_len, dim = check_offsets(offsets, keys.shape[0], lengths, mask), 1, keys.shape[1]
    elif keys.dim() != 3:
        raise ValueError(f"keys must be [B, T, D] (or [N, D] with offsets), got shape {list(keys.shape)}")
    else:
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
        require_tensor(f"weights[{layer}]", w)
        require_tensor(f"biases[{layer}]", b)
        require_float(f"weights[{layer}]", w)
        if w.dim() != 2 or w.shape[1] != fan_in:
            raise ValueError(f"weights[{layer}] must be [out, {fan_in}] (nn.Linear layout), got shape {list(w.shape)}")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"biases[{layer}] must have shape [{w.shape[0]}], got {list(b.shape)}")
        fan_in = w.shape[0]
    if weights[-1].shape[0] != 1:
        raise ValueError(f"the last weight is the score layer and must be [1, {weights[-1].shape[1]}], got {list(weights[-1].shape)}")
    hidden_sizes = [w.shape[0] for w in weights[:-1]]
    check_activation(activation, act_params, hidden_sizes)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if dice_stats not in DICE_STATS:
        raise ValueError(f"dice_stats must be one of {DICE_STATS}, got {dice_stats!r}")
    if offsets is None:
        lengths = check_positions(lengths, mask, batch, seq_len)
    if activation == "dice" and any(p.training for p in act_params):
        rows = keys.shape[0] if offsets is not None else batch * seq_len
        positions = mask if mask is not None else lengths
        if dice_stats == "valid" and positions is not None and checking_values(positions):
            rows = int(positions.sum().item())
        require_dice_rows(rows)
    def named():  # built only to name a mismatch
        tensors = {"query": query, "keys": keys, "lengths": lengths, "mask": mask, "offsets": offsets}
        tensors.update({f"weights[{i}]": w for i, w in enumerate(weights)})
        tensors.update({f"biases[{i}]": b for i, b in enumerate(biases)})
        if activation == "prelu":
            tensors.update({f"act_params[{i}]": p for i, p in enumerate(act_params)})
        if activation == "dice":
            tensors.update({f"act_params[{i}].alpha": p.alpha for i, p in enumerate(act_params)})
        return tensors

    device = keys.device
    acts = act_params if activation == "prelu" else [p.alpha for p in act_params] if activation == "dice" else []
    if any(t is not None and t.device != device for t in (query, lengths, mask, offsets, *weights, *biases, *acts)):
        require_same_device(named())
    return query, lengths


# ---------------------------------------------------------------------------------------------
# the fused kernels as torch.library ops (one graph node for torch.compile), with autograd.
# The kernel module is imported lazily: triton may be missing, and TRITON_INTERPRET must be set first.


def _attention_kernels():
    from fastdin.kernels import attention_pool as attention_kernels

    return attention_kernels


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
    try:
        return _attention_kernels().attention_dice_batch_stats(
            query, keys, weights, biases, act_tensors, lengths, mask, dice_eps, affine, count_all, momenta,
        )
    except LAUNCH_REFUSED as error:
        raise _dice_step_refused(keys, weights, error) from error


def _dice_step_refused(keys, weights, error) -> RuntimeError:
    """Record a refused training-mode Dice program and say why the step cannot be retried."""
    reason = record_refusal(FAMILY, keys, weights, error)
    return RuntimeError(f"training-mode Dice: {reason}; this step's running statistics may be updated in part. "
                        f"The next calls of this case go elsewhere; backend='torch' runs it")


class Spec(NamedTuple):
    """What a call of the per-user kernels fixes besides its tensors (frozen; the custom ops take it
    as its fields, a schema holds no NamedTuple)."""

    activation: str
    dice_eps: float
    dice_affine: bool
    softmax: bool
    return_scores: bool
    dice_count_all: bool  # training-mode Dice: statistics over all B * T positions, padding included


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
    includes the terms through the statistics.

    A compiled graph calls this op whatever the GPU refuses: a refused case (now, or recorded since
    the graph was traced) runs on the torch path here, its lse then zeros (the backward op recomputes);
    training-mode Dice cannot, and says why."""
    training = dice_count is not None
    if training or refusal(FAMILY, keys, weights) is None:
        try:
            return _attention_kernels().attention_pool_forward(
                query, keys, weights, biases, act_tensors, lengths, mask, activation, dice_eps, dice_affine,
                softmax, return_scores,
            )
        except LAUNCH_REFUSED as error:
            if training:
                raise _dice_step_refused(keys, weights, error) from error
            record_refusal(FAMILY, keys, weights, error)
    spec = Spec(activation, dice_eps, dice_affine, softmax, return_scores, dice_count_all)
    with torch.no_grad():
        out, scores = attention_packed.torch_path(query, keys, weights, biases, act_tensors, _packed_spec(spec),
                                                  _where(lengths, mask))
    lse = torch.zeros(query.shape[0] if softmax else 0, dtype=torch.float32, device=keys.device)
    return out, scores if return_scores else keys.new_empty(0), lse


def _packed_spec(spec: Spec) -> "attention_packed.Spec":
    """The packed ops' Spec of a per-user call, for their torch path (scores always returned)."""
    return attention_packed.Spec(False, spec.activation, spec.dice_eps, spec.dice_affine, spec.softmax, True,
                                 attention_packed.act_tensors_per_layer(spec.activation, spec.dice_affine))


def _where(lengths: Optional[Tensor], mask: Optional[Tensor]) -> dict:
    return dict(lengths=lengths) if lengths is not None else dict(mask=mask) if mask is not None else {}


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
    grads = _kernel_or_recomputed_grads(
        grad_out, grad_scores, query, keys, weights, biases, act_tensors, lengths, mask, lse, delta,
        activation, dice_eps, dice_affine, softmax, dice_count, dice_count_all,
    )
    # the weight gradients are views of one buffer; a custom op's outputs may not alias each other
    return grads[:2] + [g.clone() for g in grads[2:]]


def _kernel_or_recomputed_grads(grad_out, grad_scores, query, keys, weights, biases, act_tensors, lengths, mask,
                                lse, delta, activation, dice_eps, dice_affine, softmax, dice_count, dice_count_all):
    """The backward kernels' gradients, or where this GPU refused a program of the case (now, or
    before: the forward may then have run on the torch path, without the kernels' lse) the torch
    path's, its forward recomputed. Training-mode Dice cannot recompute: its statistics are this
    step's."""
    training = dice_count is not None
    if training or refusal(FAMILY, keys, weights) is None:
        try:
            return _attention_kernels().attention_pool_backward(
                grad_out, grad_scores, query, keys, weights, biases, act_tensors, lengths, mask, lse, delta,
                activation, dice_eps, dice_affine, softmax, dice_count, dice_count_all,
            )
        except LAUNCH_REFUSED as error:  # the forward's program fit this GPU, the backward's did not
            reason = record_refusal(FAMILY, keys, weights, error)
            if training:
                raise RuntimeError(f"the attention backward: {reason}. The next calls of this case go elsewhere; "
                                   f"backend='torch' runs it") from error
    spec = _packed_spec(Spec(activation, dice_eps, dice_affine, softmax, True, dice_count_all))
    return attention_packed.recomputed_grads(grad_out, grad_scores, query, keys, list(weights), list(biases),
                                             list(act_tensors), spec, _where(lengths, mask))


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


def _saved(ctx, query, keys, weights, biases, act_tensors, lengths, mask, dice_count, output, spec: Spec):
    out, scores, lse = output
    ctx.save_for_backward(query, keys, lengths, mask, out, scores, lse, dice_count, *weights, *biases, *act_tensors)
    ctx.layers, ctx.spec = len(weights), spec


# the inputs of fastdin::attention_pool that get no gradient: lengths, mask, dice_count and the Spec's fields
_OP_INPUTS_WITHOUT_GRAD = 3 + len(Spec._fields)


def _attention_pool_setup_context(ctx, inputs, output):
    (query, keys, weights, biases, act_tensors, lengths, mask, activation, dice_eps, dice_affine, softmax,
     return_scores, dice_count, dice_count_all) = inputs
    spec = Spec(activation, dice_eps, dice_affine, softmax, return_scores, dice_count_all)
    _saved(ctx, query, keys, weights, biases, act_tensors, lengths, mask, dice_count, output, spec)


def _attention_pool_grads(ctx, grad_out, grad_scores, backward_kernels):
    """The backward shared by the custom op and the eager Function: (dquery, dkeys, dweights, dbiases, dact)."""
    query, keys, lengths, mask, out, scores, lse, dice_count, *params = ctx.saved_tensors
    layers, spec = ctx.layers, ctx.spec
    weights, biases, act_tensors = params[:layers], params[layers:2 * layers], params[2 * layers:]
    if grad_out is None:  # only the scores were used
        grad_out = torch.zeros_like(out)
    if not spec.return_scores:
        grad_scores = None
    delta = None
    if spec.softmax:
        # sum_t w_t dL/dw_t = out . g (+ scores . grad_scores): the softmax backward needs only this per row
        delta = (out.float() * grad_out.float()).sum(-1)
        if grad_scores is not None:
            delta = delta + (scores.float() * grad_scores.float()).sum(-1)
    grads = backward_kernels(
        grad_out, grad_scores, query, keys, list(weights), list(biases), list(act_tensors), lengths, mask, lse,
        delta, spec.activation, spec.dice_eps, spec.dice_affine, spec.softmax, dice_count, spec.dice_count_all,
    )
    dquery, dkeys = grads[0], grads[1]
    dweights, dbiases = grads[2:2 + layers], grads[2 + layers:2 + 2 * layers]
    trained = iter(grads[2 + 2 * layers:])
    per_layer = 5 if spec.dice_affine else 3
    dact = [
        None if spec.activation == "dice" and i % per_layer in (1, 2) else next(trained)
        for i in range(len(act_tensors))
    ]
    return dquery, dkeys, dweights, dbiases, dact


def _attention_pool_backward(ctx, grad_out, grad_scores, _grad_lse):
    grads = _attention_pool_grads(ctx, grad_out, grad_scores, _attention_pool_backward_op)
    return (*grads, *(None,) * _OP_INPUTS_WITHOUT_GRAD)


_attention_pool_op.register_autograd(_attention_pool_backward, setup_context=_attention_pool_setup_context)


class _AttentionPoolFunction(torch.autograd.Function):
    """The eager path of fastdin::attention_pool: the same kernels and backward without the custom
    op's dispatch, which costs about 8x the host time of an autograd.Function per call
    (bench/dispatch_overhead.py: 229 vs 29 us on a 2-core CPU), too much where a launch takes tens
    of microseconds."""

    @staticmethod
    def forward(ctx, query, keys, lengths, mask, dice_count, spec: Spec, layers, *tensors):
        weights, biases = list(tensors[:layers]), list(tensors[layers:2 * layers])
        act_tensors = list(tensors[2 * layers:])
        output = _attention_kernels().attention_pool_forward(
            query, keys, weights, biases, act_tensors, lengths, mask, spec.activation, spec.dice_eps,
            spec.dice_affine, spec.softmax, spec.return_scores,
        )
        _saved(ctx, query, keys, weights, biases, act_tensors, lengths, mask, dice_count, output, spec)
        ctx.set_materialize_grads(False)  # unused outputs (scores, lse) bring None, not zero tensors
        ctx.mark_non_differentiable(output[2])
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_scores, _grad_lse):
        dquery, dkeys, dweights, dbiases, dact = _attention_pool_grads(ctx, grad_out, grad_scores,
                                                                       _kernel_or_recomputed_grads)
        no_grads = (None,) * 5  # lengths, mask, dice_count, spec, layers
        return (dquery, dkeys, *no_grads, *dweights, *dbiases, *dact)


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
                           return_scores, dice_stats, offsets=None):
    """Run the fused kernel (inputs already checked); returns (out [B, D], scores [B, T] or None).
    The packed-rows kernels where they cover the case (jagged keys always go there), else the
    per-user ones."""
    if offsets is not None or attention_packed.packed_gap(keys, weights, activation, act_params) is None:
        return attention_packed.attention_pool_packed(query, keys, weights, biases, activation, act_params, lengths,
                                                      mask, normalization, return_scores, offsets=offsets)
    # run in the autocast dtype; the kernel reads the weights as they are and converts them
    dtype = kernel_dtype(keys)
    query, keys = query.to(dtype), keys.to(dtype)
    # the kernel takes any strides except in the last dim (keys expanded over B stay a view); the
    # launchers copy strided lengths (table[:, 0]), B integers, and parameters that are not contiguous
    query, keys = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys)]
    _, act_tensors, dice_eps, dice_affine = attention_packed.flat_act_tensors(activation, act_params)
    dice_count, count_all = None, dice_stats == "all"
    dice_training = activation == "dice" and act_params[0].training
    softmax = normalization == "softmax"
    try:
        if dice_training:
            act_tensors, dice_count = _dice_batch_statistics(query, keys, weights, biases, act_params, lengths, mask,
                                                             dice_eps, dice_affine, count_all)
        if torch.compiler.is_compiling():  # one opaque graph node
            out, scores, _lse = _attention_pool_op(
                query, keys, list(weights), list(biases), act_tensors, lengths, mask, activation, dice_eps,
                dice_affine, softmax, return_scores, dice_count, count_all,
            )
        else:
            spec = Spec(activation, dice_eps, dice_affine, softmax, return_scores, count_all)
            out, scores, _lse = _AttentionPoolFunction.apply(
                query, keys, lengths, mask, dice_count, spec, len(weights), *weights, *biases, *act_tensors,
            )
    except LAUNCH_REFUSED as error:
        if dice_training:  # the statistics passes of the layers below may have run: no second try
            raise _dice_step_refused(keys, weights, error) from error
        record_refusal(FAMILY, keys, weights, error)
        raise
    return out, (scores if return_scores else None)


def attention_kernel_gap(keys: Tensor, weights: Sequence[Tensor], activation: str, act_params) -> Optional[str]:
    """None when the fused Triton kernel covers this attention case, else why none does.

    Covered: keys float32/float16/bfloat16, D <= 256, 1 to 4 hidden layers of width <= 512 where the
    program fits the GPU's shared memory (estimated; wide first layers with a large D do not, e.g.
    D = 128 with 256/128 layers on an H200), activations sigmoid, relu, prelu and Dice, in eval mode
    (running statistics) and in training mode (batch statistics over the valid or all positions,
    exact backward through them), lengths or mask, normalization None or softmax, scores.
    """
    dtype = kernel_dtype(keys)  # under autocast the kernel runs in the autocast dtype, and needs its memory
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"keys dtype {dtype}: the kernel takes float32, float16 or bfloat16"
    refused = refusal(FAMILY, keys, weights)
    if refused is not None:
        return refused
    if keys.shape[-1] > 256:
        return f"embedding dim D = {keys.shape[-1]} > 256"
    hidden = [w.shape[0] for w in weights[:-1]]
    if len(hidden) > 4:
        return f"{len(hidden)} hidden layers > 4"
    if max(hidden) > 512:
        return f"hidden width {max(hidden)} > 512"
    limit = _shared_memory_limit(keys.device)
    if limit is not None:
        dice_training = activation == "dice" and any(p.training for p in act_params)
        needed = _attention_kernels().shared_memory_estimate(keys.shape[-1], tuple(hidden), dtype, dice_training)
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


def attention_slow_kernel(keys: Tensor) -> Optional[str]:
    """Why "auto" takes the torch path although a kernel covers this case, or None.

    float32 on CUDA with TF32 off (PyTorch's default; `fastdin.kernels.launch.tf32_matmuls`) asks for
    full-precision products, which Triton lowers to FMAs: the sm_90 builds of those kernels run at 32
    registers and spill 7-11 KB per thread at the paper shape (tests/test_attention_kernel.py), a
    stack of 1.4-1.6 MB per program, past L1 to L2 and HBM on every tile. The torch path gives the
    same fp32 numbers from cuBLAS GEMMs on the packed rows (docs/design.md, "float32 on CUDA").
    Under autocast the kernels run in the autocast dtype and are not concerned."""
    if keys.is_cuda and kernel_dtype(keys) == torch.float32 and not tf32_matmuls():
        return ("float32 with TF32 off: the kernels' full-precision products run on FMAs and spill "
                "(allow TF32 or use bf16 autocast for the kernels)")
    return None


def _match_weight_dtype(tensors: Sequence[Tensor], dtype: torch.dtype):
    """Outside autocast, run the reference in the inputs' dtype (as the kernels do)."""
    if torch.is_autocast_enabled():
        return list(tensors)
    return [t.to(dtype) for t in tensors]


def _attention_pool_reference(query, keys, weights, biases, activation, act_params, lengths, mask, normalization,
                              return_scores, dice_stats, offsets=None):
    result = reference.attention_pool(
        query, keys, _match_weight_dtype(weights, keys.dtype), _match_weight_dtype(biases, keys.dtype),
        activation=activation, act_params=act_params, lengths=lengths, mask=mask, offsets=offsets,
        normalization=normalization, return_scores=return_scores, dice_stats=dice_stats,
    )
    return result if return_scores else (result, None)


def _attention_pool_torch(query, keys, weights, biases, activation, act_params, lengths, mask, normalization,
                          return_scores, dice_stats, offsets=None):
    """The packed-rows PyTorch path (fastdin.packed), in the keys' dtype (the autocast dtype under autocast)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # the tracers record plain ops, not the path's autograd.Functions (nor its data-dependent rows)
        return _attention_pool_reference(query, keys, weights, biases, activation, act_params, lengths, mask,
                                         normalization, return_scores, dice_stats, offsets)
    if torch.is_autocast_enabled(keys.device.type):
        dtype = torch.get_autocast_dtype(keys.device.type)
        query, keys = query.to(dtype), keys.to(dtype)
    weights, biases = [t.to(keys.dtype) for t in weights], [t.to(keys.dtype) for t in biases]
    if activation == "prelu":
        act_params = [t.to(keys.dtype) for t in act_params]
    result = packed.attention_pool(
        query, keys, weights, biases, activation=activation, act_params=act_params, lengths=lengths, mask=mask,
        offsets=offsets, normalization=normalization, return_scores=return_scores, dice_stats=dice_stats,
    )
    return result if return_scores else (result, None)


# backend -> implementation, each called with checked inputs (query as [B, D], lengths as [B]) and
# returning (out [B, D], scores [B, T] or None). "torch" is the fast PyTorch path (fastdin.packed).
IMPLEMENTATIONS = {"triton": _attention_pool_triton, "torch": _attention_pool_torch,
                   "reference": _attention_pool_reference}


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
    offsets: Optional[Tensor] = None,
):
    """DIN's local activation unit + mask + weighted sum; see `fastdin.reference.attention_pool`.

    query is [B, D] or [B, 1, D]; the output keeps its rank. Returns (out, scores) with
    `return_scores`, where scores [B, T] are the weights used, after masking and softmax.
    Jagged input: keys [N, D] with offsets [B + 1] (int64, from 0 to N); scores then come back as [N].
    """
    query_rank = query.dim() if isinstance(query, Tensor) else 0
    query2d, lengths = check_attention_inputs(
        query, keys, weights, biases, activation, act_params, lengths, mask, normalization, dice_stats, offsets
    )
    gap = attention_kernel_gap(keys, weights, activation, act_params)
    if offsets is not None and gap is None:  # only the packed-rows kernels take jagged keys
        gap = attention_packed.packed_gap(keys, weights, activation, act_params)
    chosen = choose_backend(backend, keys.device, gap, "attention_pool", has_torch_path="torch" in IMPLEMENTATIONS,
                            slow_kernel=attention_slow_kernel(keys))
    refusals = refusal_count()
    try:
        out, scores = IMPLEMENTATIONS[chosen](
            query2d, keys, weights, biases, activation, act_params, lengths, mask, normalization, return_scores,
            dice_stats, offsets,
        )
    except LAUNCH_REFUSED:
        if refusal_count() == refusals:  # not a program the kernels recorded: nowhere else to go
            raise
        # the GPU refused a program the shared-memory estimate let through, before anything ran; the
        # gaps now name it, so the call goes to the next kernel (or, with "auto", the torch path)
        return attention_pool(query, keys, weights, biases, activation=activation, act_params=act_params,
                              lengths=lengths, mask=mask, normalization=normalization, return_scores=return_scores,
                              dice_stats=dice_stats, backend=backend, offsets=offsets)
    if query_rank == 3:
        out = out.unsqueeze(1)
    return (out, scores) if return_scores else out


