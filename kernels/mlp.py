"""What both attention kernels (per-user `attention_pool`, packed rows `attention_packed`) share: the
attention MLP's parameter loads, its activations forward and backward (Dice's math is
`kernels.dice`'s), the compute-dtype product, the launchers' per-layer tuple arguments, and the
weight-gradient partials (one flat fp32 row per program, summed by one launch).

Per-layer kernel arguments are tuples (Triton >= 3.2 passes them): weights W and biases BIAS of every
layer (the score layer last), per hidden layer its five activation pointers ACTP = (slope or Dice
alpha, Dice mean, Dice var, Dice weight, Dice bias) and its slope stride (0: one shared slope).
Absent or unused entries repeat a tensor that is there: a kernel never reads them.

Only Triton lives here: no autograd, no modules.
"""
import functools
from typing import List, NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdin.kernels.dice import dice_gate, dice_grads
from fastdin.kernels.launch import ceil_div

ACT_CODES = {"sigmoid": 0, "relu": 1, "prelu": 2, "dice": 3}
MAX_HIDDEN_LAYERS = 4
TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def layer_tuples(weights: Sequence, biases: Sequence, act_tensors: Sequence[Sequence], activation: str):
    """(W, BIAS, ACTP, SLOPE_STRIDE) kernel tuples. weights and biases of every layer (made contiguous
    where they are not); act_tensors per hidden layer: [slope] (prelu), [alpha, mean, var(, weight,
    bias)] (Dice), [] otherwise. ACTP and SLOPE_STRIDE have MAX_HIDDEN_LAYERS entries."""
    weights = tuple([w if w.is_contiguous() else w.contiguous() for w in weights])
    biases = tuple([b if b.is_contiguous() else b.contiguous() for b in biases])
    acts, slope_strides = [], []
    for layer, bias in enumerate(biases[:-1]):
        params = [p if p.is_contiguous() else p.contiguous() for p in act_tensors[layer]] if act_tensors else []
        slope_strides.append(1 if activation != "prelu" or params[0].numel() > 1 else 0)
        acts.append(tuple(params + [bias] * (5 - len(params))))
    absent = MAX_HIDDEN_LAYERS - len(acts)
    return weights, biases, tuple(acts + acts[:1] * absent), tuple(slope_strides + [1] * absent)


@triton.jit
def load_vec(ptr, n, stride, BLOCK: tl.constexpr, other: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    return tl.load(ptr + offs * stride, mask=offs < n, other=other).to(tl.float32)


@triton.jit
def load_act(params, slope_stride, n, eps, BLOCK: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr):
    """A hidden layer's per-feature activation parameters (slope or Dice alpha, Dice mean, 1/std,
    weight, bias) from its five pointers; weight 1 and bias 0 without AFFINE."""
    zeros = tl.zeros([BLOCK], tl.float32)
    a, mean, rstd, gamma, beta = zeros, zeros, zeros, zeros + 1.0, zeros
    if ACT == 2:
        a = load_vec(params[0], n, slope_stride, BLOCK, 0.0)
    if ACT == 3:
        a = load_vec(params[0], n, 1, BLOCK, 0.0)
        mean = load_vec(params[1], n, 1, BLOCK, 0.0)
        rstd = 1.0 / tl.sqrt(load_vec(params[2], n, 1, BLOCK, 1.0) + eps)
        if AFFINE:
            gamma = load_vec(params[3], n, 1, BLOCK, 1.0)
            beta = load_vec(params[4], n, 1, BLOCK, 0.0)
    return a, mean, rstd, gamma, beta


@triton.jit
def act_fwd(x, act, ACT: tl.constexpr):
    """The activation of a [rows, features] tile (PReLU as the reference: x >= 0 passes)."""
    a, mean, rstd, gamma, beta = act
    if ACT == 0:
        h = tl.sigmoid(x)
    elif ACT == 1:
        h = tl.maximum(x, 0.0)
    elif ACT == 2:
        h = tl.where(x >= 0, x, a[None, :] * x)
    else:
        _, p = dice_gate(x, mean[None, :], rstd[None, :], gamma[None, :], beta[None, :])
        h = x * (a[None, :] + (1.0 - a[None, :]) * p)
    return h


@triton.jit
def act_bwd(x, dh, act, ACT: tl.constexpr):
    """dL/dx (Dice: its statistics held fixed) and the tile's per-feature sums of (slope or alpha
    gradient, dL/dz * x_hat, dL/dz) for Dice's z = weight * x_hat + bias: its weight and bias
    gradients, which training-mode Dice also needs without affine."""
    a, mean, rstd, gamma, beta = act
    da = tl.sum(tl.zeros_like(x), axis=0)
    dgamma, dbeta = da, da
    if ACT == 0:
        h = tl.sigmoid(x)
        dx = dh * h * (1.0 - h)
    elif ACT == 1:
        dx = tl.where(x > 0, dh, 0.0)
    elif ACT == 2:
        dx = tl.where(x >= 0, dh, a[None, :] * dh)
        da = tl.sum(tl.where(x >= 0, 0.0, x * dh), axis=0)
    else:
        x_hat, p = dice_gate(x, mean[None, :], rstd[None, :], gamma[None, :], beta[None, :])
        direct, d_alpha, g_z, g_xhat = dice_grads(x, dh, p, a[None, :], gamma[None, :])
        dx = direct + g_xhat * rstd[None, :]
        da = tl.sum(d_alpha, axis=0)
        dgamma = tl.sum(g_z * x_hat, axis=0)
        dbeta = tl.sum(g_z, axis=0)
    return dx, (da, dgamma, dbeta)


@triton.jit
def dot(a, b, acc, DT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with operands in the compute dtype DT (the inputs': fp32 stays exact with ieee),
    accumulated in fp32."""
    if DT == tl.float32:
        out = tl.dot(a.to(DT), b.to(DT), acc, input_precision=PRECISION)
    else:
        out = tl.dot(a.to(DT), b.to(DT), acc)
    return out


# ---------------------------------------------------------------------------------------------
# weight-gradient partials: one fp32 row per program, every gradient in one flat layout, summed
# over the programs by one launch in a fixed order (deterministic)


class GradLayout(NamedTuple):
    """Where each weight gradient lies in a program's row of the partials."""

    entries: tuple  # (shape, stride, offset) of each of [*weights, *biases, *trainable act parameters]
    width: int  # floats per program


@functools.lru_cache(maxsize=None)
def grad_layout(dim: int, hidden: tuple, activation: str, affine: bool, slope_sizes: tuple) -> GradLayout:
    """The layout `store_partials` writes, layer by layer: W_l (nn.Linear layout), b_l, the layer's
    activation parameters (PReLU slopes: slope_sizes[l] of them; Dice alpha, then weight and bias
    with affine), then the score layer's weight and bias."""
    fan_in, offset = 4 * dim, 0
    weights, biases, acts = [], [], []
    for layer, width in enumerate(hidden):
        weights.append(((width, fan_in), (fan_in, 1), offset))
        offset += width * fan_in
        biases.append(((width,), (1,), offset))
        offset += width
        if activation == "prelu":
            sizes = [slope_sizes[layer]]
        elif activation == "dice":
            sizes = [width] * (3 if affine else 1)  # alpha (, weight, bias)
        else:
            sizes = []
        for size in sizes:
            acts.append(((size,), (1,), offset))
            offset += size
        fan_in = width
    weights.append(((1, fan_in), (fan_in, 1), offset))
    offset += fan_in
    biases.append(((1,), (1,), offset))
    return GradLayout(tuple(weights + biases + acts), offset + 1)


def sum_partials(parts: Tensor, layout: GradLayout, weights: Sequence[Tensor], biases: Sequence[Tensor],
                 act_tensors: Sequence[Sequence[Tensor]], activation: str) -> List[Tensor]:
    """[*dweights, *dbiases, *dact] from the programs' partials [P, width]: one launch, then views of
    its fp32 output (cast where a parameter's dtype differs). act_tensors as for `layer_tuples`; dact
    holds per layer the slope's gradient (prelu) or Dice's alpha (and weight, bias), never its
    running statistics'."""
    trained = [t for layer in act_tensors for i, t in enumerate(layer) if activation == "prelu" or i in (0, 3, 4)]
    params = [*weights, *biases, *trained]
    flat = torch.empty(layout.width, dtype=torch.float32, device=parts.device)
    sum_partials_kernel[(ceil_div(layout.width, REDUCE_BLOCK),)](parts, flat, parts.shape[0], parts.stride(0),
                                                                 layout.width, BLOCK=REDUCE_BLOCK)
    grads = []
    for (shape, stride, offset), p in zip(layout.entries, params):
        g = flat.as_strided(shape, stride, offset)
        if g.shape != p.shape:
            g = g.view(p.shape)
        grads.append(g if g.dtype == p.dtype else g.to(p.dtype))
    return grads


REDUCE_BLOCK = 1024


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, n_parts, part_stride, width, BLOCK: tl.constexpr):
    """out[i] = sum_p part[p, i] for i < width (a row may be longer), p in order."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    total = tl.zeros([BLOCK], tl.float32)
    for p in range(0, n_parts):
        total += tl.load(part_ptr + p * part_stride + cols, mask=ok, other=0.0)
    tl.store(out_ptr + cols, total, mask=ok)


@triton.jit
def _store_matrix(ptr, tile, n_rows, n_cols, row_stride, col0, TRANSPOSED: tl.constexpr):
    """tile into rows [0, n_rows) and columns [col0, col0 + n_cols) of a row-major matrix; a TRANSPOSED
    tile holds them as [columns, rows] (stored through its addresses: no data moves)."""
    if TRANSPOSED:
        cols = tl.arange(0, tile.shape[0])
        rows = tl.arange(0, tile.shape[1])
        ok = (cols[:, None] < n_cols) & (rows[None, :] < n_rows)
        tl.store(ptr + rows[None, :] * row_stride + col0 + cols[:, None], tile, mask=ok)
    else:
        rows = tl.arange(0, tile.shape[0])
        cols = tl.arange(0, tile.shape[1])
        ok = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        tl.store(ptr + rows[:, None] * row_stride + col0 + cols[None, :], tile, mask=ok)


@triton.jit
def store_vector(ptr, vec, n):
    offs = tl.arange(0, vec.shape[0])
    tl.store(ptr + offs, vec, mask=offs < n)


@triton.jit
def _store_act_grads(ptr, dact, n, slope_stride, ACT: tl.constexpr, AFFINE: tl.constexpr):
    """Store a layer's activation-parameter partials; returns the pointer past them."""
    da, dgamma, dbeta = dact
    if ACT == 2:
        if slope_stride == 0:
            tl.store(ptr, tl.sum(da, axis=0))
        else:
            store_vector(ptr, da, n)
        ptr += tl.where(slope_stride == 0, 1, n)
    if ACT == 3:
        store_vector(ptr, da, n)
        ptr += n
        if AFFINE:
            store_vector(ptr, dgamma, n)
            store_vector(ptr + n, dbeta, n)
            ptr += 2 * n
    return ptr


@triton.jit
def _store_layer_grads(ptr, grads, n_out, n_in, slope_stride, LAYER: tl.constexpr, NUM_LAYERS: tl.constexpr,
                       ACT: tl.constexpr, AFFINE: tl.constexpr, TRANSPOSED: tl.constexpr):
    if NUM_LAYERS >= LAYER:
        dw, db, dact = grads
        _store_matrix(ptr, dw, n_out, n_in, n_in, 0, TRANSPOSED)
        ptr += n_out * n_in
        store_vector(ptr, db, n_out)
        ptr += n_out
        ptr = _store_act_grads(ptr, dact, n_out, slope_stride, ACT, AFFINE)
    return ptr


@triton.jit
def store_partials(ptr, first, db1, dact1, grads2, grads3, grads4, dwo, dbo, D, HID, SLOPE_STRIDE,
                   NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """One program's row of the partials, in the layout of `grad_layout`. The first layer's from the
    fold (docs/design.md, "Backward"): first = (U, S_k, S_p) in nn.Linear layout [H1, D], so dWq = U,
    dWk = S_k, dWd = U - S_k, dWp = S_p; grads_l = (dW_l [H_l, H_l-1], db_l, activation-parameter
    sums) of the deeper layers (absent ones: HID and SLOPE_STRIDE padded to 4 entries, never read).
    TRANSPOSED: every matrix comes as its transpose ([fan_in, H])."""
    U, S_k, S_p = first
    H1 = HID[0]
    _store_matrix(ptr, U, H1, D, 4 * D, 0, TRANSPOSED)
    _store_matrix(ptr, S_k, H1, D, 4 * D, D, TRANSPOSED)
    _store_matrix(ptr, U - S_k, H1, D, 4 * D, 2 * D, TRANSPOSED)
    _store_matrix(ptr, S_p, H1, D, 4 * D, 3 * D, TRANSPOSED)
    ptr += H1 * 4 * D
    store_vector(ptr, db1, H1)
    ptr += H1
    ptr = _store_act_grads(ptr, dact1, H1, SLOPE_STRIDE[0], ACT, AFFINE)
    ptr = _store_layer_grads(ptr, grads2, HID[1], H1, SLOPE_STRIDE[1], 2, NUM_LAYERS, ACT, AFFINE, TRANSPOSED)
    ptr = _store_layer_grads(ptr, grads3, HID[2], HID[1], SLOPE_STRIDE[2], 3, NUM_LAYERS, ACT, AFFINE, TRANSPOSED)
    ptr = _store_layer_grads(ptr, grads4, HID[3], HID[2], SLOPE_STRIDE[3], 4, NUM_LAYERS, ACT, AFFINE, TRANSPOSED)
    store_vector(ptr, dwo, HID[NUM_LAYERS - 1])
    tl.store(ptr + HID[NUM_LAYERS - 1], dbo)
