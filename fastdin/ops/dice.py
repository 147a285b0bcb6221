"""The Dice op: checks, the backend table, the fused kernels' autograd.Function and torch.library ops.

The math is `fastdin.reference.dice`; the kernels are `fastdin.kernels.dice`.
"""
from typing import Optional

import torch
from torch import Tensor

from fastdin import reference
from fastdin.ops.backend import checking_values, choose_backend
from fastdin.ops.checks import check_dice_params, require_dice_rows, require_float, require_same_device, require_tensor
from fastdin.reference import DiceParams

DICE_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dice_kernels():
    from fastdin.kernels import dice as dice_kernels

    return dice_kernels


def check_dice_inputs(x, alpha, running_mean, running_var, weight, bias, training, mask) -> None:
    require_tensor("x", x)
    require_float("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, H] or [B, T, H], got shape {list(x.shape)}")
    features = x.shape[-1]
    check_dice_params(DiceParams(alpha, running_mean, running_var, weight, bias), features)
    rows = x.numel() // max(features, 1)
    if mask is not None:
        require_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of valid rows, got dtype {mask.dtype}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask must have shape {list(x.shape[:-1])} (x without its feature dim), got {list(mask.shape)}")
        if training and checking_values(mask):
            rows = int(mask.sum().item())
    if training:
        require_dice_rows(rows)
    require_same_device({"x": x, "alpha": alpha, "running_mean": running_mean, "running_var": running_var,
                          "weight": weight, "bias": bias, "mask": mask})


def dice_kernel_gap(x: Tensor, training: bool) -> Optional[str]:
    """None when a Triton kernel covers this Dice case, else why none does."""
    if x.dtype not in DICE_KERNEL_DTYPES:
        return f"x has dtype {x.dtype}; the kernel takes {', '.join(map(str, DICE_KERNEL_DTYPES))}"
    if x.numel() == 0:
        return "x is empty"
    return None


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
    chosen = choose_backend(backend, x.device, dice_kernel_gap(x, training), "dice",
                            has_torch_path="torch" in IMPLEMENTATIONS)
    return IMPLEMENTATIONS[chosen](x, alpha, running_mean, running_var, weight, bias, training, momentum, eps, mask)


def _dice_triton(x, alpha, running_mean, running_var, weight, bias, training, momentum, eps, mask):
    if torch.compiler.is_compiling():  # one opaque graph node; eager skips the custom-op dispatch cost
        out, _stats, new_mean, new_var = _dice_op(x, alpha, weight, bias, running_mean, running_var, mask,
                                                  training, momentum, eps)
        if training:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        return out
    return _DiceFunction.apply(x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps)


def _dice_reference(x, alpha, running_mean, running_var, weight, bias, training, momentum, eps, mask):
    return reference.dice(x, alpha, running_mean, running_var, weight=weight, bias=bias, training=training,
                          momentum=momentum, eps=eps, mask=mask)


# backend -> implementation, each called with checked inputs; "torch" where a fast PyTorch path exists
IMPLEMENTATIONS = {"triton": _dice_triton, "reference": _dice_reference}


# ---------------------------------------------------------------------------------------------
# autograd Function and custom ops (Triton kernels in fastdin.kernels.dice)


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
