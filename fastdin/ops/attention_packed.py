"""The "triton" implementation of attention pooling on packed rows (fastdin.kernels.attention_packed):
which cases it covers, its autograd.Function (eager) and its torch.library custom ops (torch.compile,
export).

`fastdin.ops.attention` dispatches here for the cases `packed_gap` admits and keeps the per-user
kernels (fastdin.kernels.attention_pool) for the rest: training-mode Dice, and first layers too wide
for a program's shared memory. Inputs arrive checked.
"""
import functools
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fastdin.kernels.launch import block
from fastdin.ops.backend import LAUNCH_REFUSED, has_wgmma, kernel_dtype, record_refusal, refusal, shared_memory_limit

H200_SHARED_BYTES = 232448  # the most shared memory one block may use on an H100/H200 (227 KiB)
FAMILY = "packed-rows"  # in fastdin.ops.backend's record of refused programs


_KERNELS = []


def _kernels():
    # lazy: triton may be missing, and TRITON_INTERPRET must be set before the kernels are defined;
    # kept once imported (an import statement per call costs about 20 us of import machinery)
    if not _KERNELS:
        from fastdin.kernels import attention_packed

        _KERNELS.append(attention_packed)
    return _KERNELS[0]


@functools.lru_cache(maxsize=None)
def shared_memory_estimate(dim: int, hidden: tuple, dtype: torch.dtype, wgmma: bool = True) -> int:
    """Bytes of shared memory the larger of the two programs needs: the weights in the compute dtype
    (the backward stacks its first layer, `_stacked_first_layer` in the kernels, and reads them back
    from its partials row, `_staged`) and the tiles staged for the products' operands. Bounds fitted
    to ptxas builds of twelve shapes (bf16, D from 16 to 128, one to three hidden layers):
    - wgmma (sm_90): 7-27% above the larger program of each (D=32 80/40: 57344 B, D=64 256/128/64:
      227328 B, D=16 32: a forward of 17408 B);
    - mma.sync (sm_80, sm_86, sm_89: A100, A10, L4, RTX 30xx/40xx), where the backward needs about
      twice as much (D=32 80/40: 106496 B, D=64 80/40: 172032 B): 10% above (8 D H1 + 2 * the deeper
      weights) elements + 8 KB, which is the build for nine of the shapes and above it for three
      (D = 16)."""
    blocks = [block(h) for h in hidden]
    first, deeper = block(dim) * blocks[0], sum(a * b for a, b in zip(blocks[:-1], blocks[1:]))
    elt = 4 if dtype == torch.float32 else 2
    if not wgmma:
        return int(1.1 * (8 * first + 2 * deeper) * elt) + 8192
    elements = 5 * (3 * first + deeper) // 4 + 8 * sum(blocks) + 128 * block(dim)
    return elements * elt + 10240


def packed_gap(keys: Tensor, weights: Sequence[Tensor], activation: str, act_params) -> Optional[str]:
    """None when the packed kernels cover this case (after fastdin.ops.attention's own gap), else why not."""
    if activation == "dice" and any(p.training for p in act_params):
        return "training-mode Dice (batch statistics) runs on the per-user kernels"
    dtype = kernel_dtype(keys)  # what the kernels compute in: fp32 keys under bf16 autocast are bf16 here
    if keys.is_cuda and dtype == torch.float32:
        # sm_90 builds of the fp32 variants spill tens of KB per thread (ieee products run on FMAs;
        # tf32x3 needs 400 KB of shared memory): the per-user kernels stay until that is fixed
        return "float32 on CUDA runs on the per-user kernels"
    refused = refusal(FAMILY, keys, weights)
    if refused is not None:
        return refused
    hidden = tuple([w.shape[0] for w in weights[:-1]])
    limit = shared_memory_limit(keys.device) or H200_SHARED_BYTES  # the interpreter: an H200's
    wgmma = has_wgmma(keys.device)
    estimate = shared_memory_estimate(keys.shape[-1], hidden, dtype, wgmma)
    if estimate > limit and not worth_a_launch(estimate, limit, wgmma, keys.is_cuda):
        return f"D = {keys.shape[-1]} with hidden sizes {list(hidden)} needs more shared memory than {limit} B"
    return None


WGMMA_SLACK = 1.15  # sm_90 builds lie 7-27% under the bound (the seed shape's 227328 B: 12%)


def worth_a_launch(estimate: int, limit: int, wgmma: bool, on_gpu: bool) -> bool:
    """Whether a case whose bound exceeds the limit may still fit: on sm_90, within WGMMA_SLACK of it,
    only the compiler can tell (the seed shape builds 2% under an H200's limit). On a GPU in eager
    mode the launch then decides, and a refusal sends the case elsewhere (`record_refusal`). The
    interpreter has no compiler to ask, torch.compile's graph has no second try, and the mma.sync
    bound lies within 15% of the builds anyway (40% for D = 16): those keep to the bound."""
    return wgmma and on_gpu and not torch.compiler.is_compiling() and estimate <= WGMMA_SLACK * limit


def act_tensors_per_layer(activation: str, dice_affine: bool) -> int:
    """How many flat act tensors each hidden layer has (see `flat_act_tensors`)."""
    return {"prelu": 1, "dice": 5 if dice_affine else 3}.get(activation, 0)


def flat_act_tensors(activation: str, act_params):
    """(per-layer tensor count, flat act tensors, Dice eps, Dice affine) for both attention kernels'
    launchers: per layer [slope] (PReLU), [alpha, running mean, running var(, weight, bias)] (Dice).
    One eps for all layers (fastdin.ops.attention.attention_kernel_gap)."""
    if activation == "prelu":
        return act_tensors_per_layer(activation, False), [p.reshape(-1) for p in act_params], 0.0, False
    if activation != "dice":
        return act_tensors_per_layer(activation, False), [], 0.0, False
    affine = act_params[0].weight is not None
    flat = []
    for p in act_params:
        flat += [p.alpha.reshape(-1), p.running_mean, p.running_var]
        if affine:
            flat += [p.weight.reshape(-1), p.bias.reshape(-1)]
    return act_tensors_per_layer(activation, affine), flat, float(act_params[0].eps), affine


def _per_layer(flat: Sequence[Tensor], per_layer: int, layers: int):
    return [list(flat[i * per_layer:(i + 1) * per_layer]) for i in range(layers)] if per_layer else []


def _trainable(activation: str, per_layer: int):
    """Which positions of a layer's act tensors get a gradient (not Dice's running statistics)."""
    return [i for i in range(per_layer) if activation == "prelu" or i in (0, 3, 4)]


class Spec(NamedTuple):
    """What a call fixes besides its tensors (frozen and hashable: the custom ops take it as its fields)."""

    jagged: bool  # keys [N, D] with offsets, else padded [B, T, D]
    activation: str
    dice_eps: float
    dice_affine: bool
    softmax: bool
    return_scores: bool
    per_layer: int  # act tensors per hidden layer (0, 1 for PReLU, 3 or 5 for Dice)


def _forward(query, keys, weights, biases, act_flat, source, positions, spec: Spec):
    kernels = _kernels()
    rows = kernels.PackedRows(source, positions, spec.jagged)
    try:
        out, scores, lse = kernels.packed_attention_forward(
            query, keys, weights, biases, _per_layer(act_flat, spec.per_layer, len(weights) - 1), rows,
            spec.activation, spec.dice_eps, spec.dice_affine, spec.softmax, spec.return_scores)
    except LAUNCH_REFUSED as error:  # nothing ran; fastdin.ops.attention dispatches the call again
        record_refusal(FAMILY, keys, weights, error)
        raise
    empty = keys.new_empty(0)
    return out, scores if scores is not None else empty, lse if lse is not None else empty.float()


def _backward(grad_out, grad_scores, query, keys, weights, biases, act_flat, source, positions, out, scores, lse,
              spec: Spec):
    """[dquery, dkeys, *dweights, *dbiases, *d(trainable act tensors)]."""
    kernels = _kernels()
    rows = kernels.PackedRows(source, positions, spec.jagged)
    return kernels.packed_attention_backward(
        grad_out, grad_scores if spec.return_scores else None, query, keys, weights, biases,
        _per_layer(act_flat, spec.per_layer, len(weights) - 1), rows, out, scores if spec.return_scores else None,
        lse if spec.softmax else None, spec.activation, spec.dice_eps, spec.dice_affine, spec.softmax)


def _act_grads(trained, spec: Spec, n_act: int):
    """Gradients for every act tensor in order: None for Dice's running statistics."""
    trained = iter(trained)
    keep = set(_trainable(spec.activation, spec.per_layer))
    return [next(trained) if i % spec.per_layer in keep else None for i in range(n_act)]


def _saved(ctx, query, keys, source, positions, out, scores, lse, weights, biases, act_flat, spec: Spec):
    ctx.save_for_backward(query, keys, source, positions, out, scores, lse, *weights, *biases, *act_flat)
    ctx.spec, ctx.layers = spec, len(weights)


def _restored(ctx):
    """(query, keys, source, positions, out, scores, lse, weights, biases, act_flat) as `_saved` kept them."""
    query, keys, source, positions, out, scores, lse, *tensors = ctx.saved_tensors
    layers = ctx.layers
    return (query, keys, source, positions, out, scores, lse, list(tensors[:layers]),
            list(tensors[layers:2 * layers]), list(tensors[2 * layers:]))


def _mask_of(counts: Tensor, positions: Tensor) -> Tensor:
    """The bool mask [B, T] that `packed_rows` turned into (counts, positions)."""
    valid = torch.arange(positions.shape[1], device=positions.device)[None, :] < counts[:, None]
    return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device).scatter_(1, positions, valid)


def _where(source, positions, spec: Spec) -> dict:
    """The positions argument of fastdin.packed.attention_pool for the packed kernels' (source, positions)."""
    return (dict(offsets=source) if spec.jagged else dict(lengths=source) if positions is None
            else dict(mask=_mask_of(source, positions)))


def torch_path(query, keys, weights, biases, act_flat, spec: Spec, where: dict):
    """(out, scores) from the packed PyTorch path (fastdin.packed) on either kernel family's inputs
    (flat act tensors of eval-mode activations, the weights in the keys' dtype, as the kernels read
    them); `where` is lengths=, mask= or offsets= (or nothing: every position valid)."""
    from fastdin import packed
    from fastdin.reference import DiceParams

    weights, biases, act_flat = ([t.to(keys.dtype) for t in group] for group in (weights, biases, act_flat))
    layers = len(weights)
    act_layers = _per_layer(act_flat, spec.per_layer, layers - 1)
    if spec.activation == "prelu":
        act_params = [layer[0] for layer in act_layers]
    elif spec.activation == "dice":
        act_params = [DiceParams(*layer[:3], *(layer[3:5] if spec.dice_affine else (None, None)), training=False,
                                 eps=spec.dice_eps) for layer in act_layers]
    else:
        act_params = None
    return packed.attention_pool(query, keys, list(weights), list(biases), activation=spec.activation,
                                 act_params=act_params, normalization="softmax" if spec.softmax else None,
                                 return_scores=True, **where)


def recomputed_grads(grad_out, grad_scores, query, keys, weights, biases, act_flat, spec: Spec, where: dict):
    """The kernels' backward gradients ([dquery, dkeys, *dweights, *dbiases, *trained dact]) from the
    packed PyTorch path, its forward recomputed: for a case whose backward program this GPU refused,
    or whose forward ran on that path. torch.func.vjp, as autograd is off inside a custom op's body."""
    layers = len(weights)

    def forward(query, keys, *tensors):
        return torch_path(query, keys, tensors[:layers], tensors[layers:2 * layers], tensors[2 * layers:], spec,
                          where)

    (out, scores), vjp = torch.func.vjp(forward, query, keys, *weights, *biases, *act_flat)
    if grad_scores is None or not spec.return_scores:
        grad_scores = torch.zeros_like(scores)
    grads = list(vjp((grad_out.to(out.dtype), grad_scores.to(scores.dtype))))
    keep = set(_trainable(spec.activation, spec.per_layer))
    acts = [g for i, g in enumerate(grads[2 + 2 * layers:]) if i % spec.per_layer in keep]
    return grads[:2 + 2 * layers] + acts


def _grads(grad_out, grad_scores, query, keys, weights, biases, act_flat, source, positions, out, scores, lse,
           spec: Spec):
    """The kernels' gradients, or the recomputed ones where this GPU refused a program of the case
    (now, or before: then the forward may have run on the torch path, without the kernels' lse)."""
    if refusal(FAMILY, keys, weights) is None:
        try:
            return _backward(grad_out, grad_scores, query, keys, weights, biases, act_flat, source, positions,
                             out, scores, lse, spec)
        except LAUNCH_REFUSED as error:  # the forward's program fit this GPU, the backward's did not
            record_refusal(FAMILY, keys, weights, error)
    return recomputed_grads(grad_out, grad_scores, query, keys, weights, biases, act_flat, spec,
                            _where(source, positions, spec))


class _PackedAttentionFunction(torch.autograd.Function):
    """The eager path: the launchers behind an autograd.Function (a custom op's dispatch costs several
    times its host time per call, bench/dispatch_overhead.py)."""

    @staticmethod
    def forward(ctx, query, keys, source, positions, spec, layers, *tensors):
        weights, biases, act_flat = tensors[:layers], tensors[layers:2 * layers], tensors[2 * layers:]
        out, scores, lse = _forward(query, keys, weights, biases, act_flat, source, positions, spec)
        _saved(ctx, query, keys, source, positions, out, scores, lse, weights, biases, act_flat, spec)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return out, scores, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_scores, _grad_lse):
        query, keys, source, positions, out, scores, lse, weights, biases, act_flat = _restored(ctx)
        if grad_out is None:  # only the scores were used
            grad_out = torch.zeros_like(out)
        grads = _grads(grad_out, grad_scores, query, keys, weights, biases, act_flat, source, positions, out, scores,
                       lse, ctx.spec)
        layers = ctx.layers
        no_grads = (None,) * 4  # source, positions, spec, layers
        return (grads[0], grads[1], *no_grads, *grads[2:2 + 2 * layers],
                *_act_grads(grads[2 + 2 * layers:], ctx.spec, len(act_flat)))


# The custom ops (torch.compile, export) take the Spec as its fields: a schema holds no NamedTuple. Their
# schemas stay as they were: graphs in torch's on-disk compile caches call them with these arguments. A
# cached backward graph is found by the forward graph's key alone (pytorch/pytorch#144344), so a changed
# backward op schema fails in the graphs users have cached (seen here: a cache from the old schema).
@torch.library.custom_op("fastdin::packed_attention_pool", mutates_args=())
def _packed_op(query: Tensor, keys: Tensor, weights: list[Tensor], biases: list[Tensor], act_flat: list[Tensor],
               source: Tensor, positions: Optional[Tensor], jagged: bool, activation: str, dice_eps: float,
               dice_affine: bool, softmax: bool, return_scores: bool, per_layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, D], scores (keys' layout without D) or empty, softmax log-sum-exp [B] fp32 or empty).
    A compiled graph calls this op whatever the GPU refuses: a refused case runs on the torch path here
    (its lse is then not the kernels', and the backward op recomputes its gradients)."""
    spec = Spec(jagged, activation, dice_eps, dice_affine, softmax, return_scores, per_layer)
    if refusal(FAMILY, keys, weights) is None:
        try:
            return _forward(query, keys, weights, biases, act_flat, source, positions, spec)
        except LAUNCH_REFUSED:
            pass  # recorded by _forward
    with torch.no_grad():
        out, scores = torch_path(query, keys, weights, biases, act_flat, spec, _where(source, positions, spec))
    empty = keys.new_empty(0)
    lse = torch.zeros(query.shape[0] if softmax else 0, dtype=torch.float32, device=keys.device)
    return out, scores if return_scores else empty, lse


@_packed_op.register_fake
def _packed_fake(query, keys, weights, biases, act_flat, source, positions, *fields):
    spec = Spec(*fields)
    out = keys.new_empty((query.shape[0], query.shape[1]))
    scores = keys.new_empty(keys.shape[:-1] if spec.return_scores else (0,))
    lse = keys.new_empty((query.shape[0],) if spec.softmax else (0,), dtype=torch.float32)
    return out, scores, lse


@torch.library.custom_op("fastdin::packed_attention_pool_backward", mutates_args=())
def _packed_backward_op(grad_out: Tensor, grad_scores: Optional[Tensor], query: Tensor, keys: Tensor,
                        weights: list[Tensor], biases: list[Tensor], act_flat: list[Tensor], source: Tensor,
                        positions: Optional[Tensor], jagged: bool, out: Tensor, scores: Tensor, lse: Tensor,
                        activation: str, dice_eps: float, dice_affine: bool, softmax: bool, return_scores: bool,
                        per_layer: int) -> list[Tensor]:
    spec = Spec(jagged, activation, dice_eps, dice_affine, softmax, return_scores, per_layer)
    grads = _grads(grad_out, grad_scores, query, keys, weights, biases, act_flat, source, positions, out, scores, lse,
                   spec)
    # the weight gradients are views of one buffer; a custom op's outputs may not alias each other
    return grads[:2] + [g.clone() for g in grads[2:]]


@_packed_backward_op.register_fake
def _packed_backward_fake(grad_out, grad_scores, query, keys, weights, biases, act_flat, source, positions, jagged,
                          out, scores, lse, *fields):
    spec = Spec(jagged, *fields)
    grads = [query.new_empty(query.shape), keys.new_empty(keys.shape)]
    grads += [t.new_empty(t.shape) for t in [*weights, *biases]]
    keep = set(_trainable(spec.activation, spec.per_layer))
    grads += [t.new_empty(t.shape) for i, t in enumerate(act_flat) if i % spec.per_layer in keep]
    return grads


def _setup_context(ctx, inputs, output):
    query, keys, weights, biases, act_flat, source, positions, *fields = inputs
    _saved(ctx, query, keys, source, positions, *output, weights, biases, act_flat, Spec(*fields))


def _op_backward(ctx, grad_out, grad_scores, _grad_lse):
    query, keys, source, positions, out, scores, lse, weights, biases, act_flat = _restored(ctx)
    if grad_out is None:  # only the scores were used
        grad_out = torch.zeros_like(out)
    spec, layers = ctx.spec, ctx.layers
    grads = _packed_backward_op(grad_out, grad_scores if spec.return_scores else None, query, keys, weights, biases,
                                act_flat, source, positions, spec.jagged, out, scores, lse, *spec[1:])
    dact = _act_grads(grads[2 + 2 * layers:], spec, len(act_flat))
    no_grads = (None,) * (2 + len(Spec._fields))  # source, positions and the Spec's fields
    return (grads[0], grads[1], list(grads[2:2 + layers]), list(grads[2 + layers:2 + 2 * layers]), dact, *no_grads)


_packed_op.register_autograd(_op_backward, setup_context=_setup_context)


def attention_pool_packed(query, keys, weights, biases, activation, act_params, lengths, mask, normalization,
                          return_scores, offsets=None):
    """Run the packed kernels on checked inputs; returns (out [B, D], scores or None). keys are padded
    [B, T, D] with lengths or mask, or packed [N, D] with offsets [B+1]; scores have keys' layout
    without D ([B, T] with zeros at the padding, or [N])."""
    if keys.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")  # the kernels read the weights as they are
        query, keys = query.to(dtype), keys.to(dtype)
    query, keys = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys)]
    lengths = lengths.contiguous() if lengths is not None else None  # read at len_ptr + b
    rows = _kernels().packed_rows(lengths=lengths, mask=mask, offsets=offsets, batch=keys.shape[0],
                                  seq_len=keys.shape[1] if keys.dim() == 3 else 0, device=keys.device)
    per_layer, act_flat, dice_eps, dice_affine = flat_act_tensors(activation, act_params)
    spec = Spec(rows.jagged, activation, dice_eps, dice_affine, normalization == "softmax", return_scores, per_layer)
    if torch.compiler.is_compiling():  # one opaque graph node
        out, scores, _lse = _packed_op(query, keys, list(weights), list(biases), act_flat, rows.source,
                                       rows.positions, *spec)
    elif not torch.is_grad_enabled():  # inference: no autograd node to build
        out, scores, _lse = _forward(query, keys, weights, biases, act_flat, rows.source, rows.positions, spec)
    else:
        out, scores, _lse = _PackedAttentionFunction.apply(query, keys, rows.source, rows.positions, spec,
                                                           len(weights), *weights, *biases, *act_flat)
    return out, (scores if return_scores else None)
