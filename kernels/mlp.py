"""What both attention kernels (per-user `attention_pool`, packed rows `attention_packed`) share: the
attention MLP's parameter loads, its activations forward and backward (Dice's math is
`kernels.dice`'s), the compute-dtype product, and the launchers' per-layer tuple arguments.

Per-layer kernel arguments are tuples (Triton >= 3.2 passes them): weights W and biases BIAS of every
layer (the score layer last), per hidden layer its five activation pointers ACTP = (slope or Dice
alpha, Dice mean, Dice var, Dice weight, Dice bias) and its slope stride (0: one shared slope).
Absent or unused entries repeat a tensor that is there: a kernel never reads them.

Only Triton lives here: no autograd, no modules.
"""
from typing import Sequence

import triton
import triton.language as tl

from fastdin.kernels.dice import dice_gate, dice_grads

ACT_CODES = {"sigmoid": 0, "relu": 1, "prelu": 2, "dice": 3}
MAX_HIDDEN_LAYERS = 4


def block(n: int) -> int:
    """A tile dimension for n: a power of two, and >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


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
