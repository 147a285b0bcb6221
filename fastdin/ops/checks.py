"""Argument checks shared by the ops: types, shapes, devices, positions and activation parameters."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastdin.ops.backend import checking_values
from fastdin.reference import ACTIVATIONS, DiceParams


def require_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def require_same_device(named: dict) -> None:
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_positions(lengths: Optional[Tensor], mask: Optional[Tensor], batch: int, seq_len: int):
    """Check lengths ([B] or [B, 1], integer, within [0, T]) or mask ([B, T], bool); returns lengths as [B]."""
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    if mask is not None:
        require_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor [B, T] (true = valid position), got dtype {mask.dtype}")
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(f"mask must have shape [B, T] = [{batch}, {seq_len}], got {list(mask.shape)}")
    if lengths is None:
        return None
    require_tensor("lengths", lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.dim() == 2 and lengths.shape[1] == 1:
        lengths = lengths.reshape(-1)
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must have shape [B] or [B, 1] with B = {batch}, got {list(lengths.shape)}")
    if batch and checking_values(lengths):
        low, high = torch.aminmax(lengths)
        if low.item() < 0 or high.item() > seq_len:
            raise ValueError(f"lengths must lie in [0, T] = [0, {seq_len}], got values in [{low.item()}, {high.item()}]")
    return lengths


def check_activation(activation: str, act_params, hidden_sizes: Sequence[int]) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation not in ("prelu", "dice"):
        return
    if act_params is None or len(act_params) != len(hidden_sizes):
        got = "None" if act_params is None else len(act_params)
        raise ValueError(f"act_params must hold one entry per hidden layer ({len(hidden_sizes)}) for {activation}, got {got}")
    for layer, (params, size) in enumerate(zip(act_params, hidden_sizes)):
        if activation == "prelu":
            require_tensor(f"act_params[{layer}]", params)
            if params.numel() not in (1, size):
                raise ValueError(f"act_params[{layer}] (PReLU weight) must have 1 or {size} elements, got {params.numel()}")
        else:
            if not isinstance(params, DiceParams):
                raise TypeError(f"act_params[{layer}] must be a DiceParams, got {type(params).__name__}")
            check_dice_params(params, size, f"act_params[{layer}].")


def check_dice_params(params: DiceParams, features: int, prefix: str = "") -> None:
    for name in ("alpha", "running_mean", "running_var", "weight", "bias"):
        t = getattr(params, name)
        if t is None and name in ("weight", "bias"):
            continue
        require_tensor(prefix + name, t)
        if t.numel() != features:
            raise ValueError(f"{prefix}{name} must have {features} elements (one per feature), got shape {list(t.shape)}")
    if (params.weight is None) != (params.bias is None):
        raise ValueError(f"{prefix}weight and {prefix}bias must be given together (affine) or both be None")



def require_dice_rows(rows: int) -> None:
    if rows < 2:  # as nn.BatchNorm1d: one row has no variance
        raise ValueError(f"Dice in training needs more than one (valid) row to take batch statistics, got {rows}")




def check_offsets(offsets, rows: int, lengths: Optional[Tensor], mask: Optional[Tensor]) -> int:
    """Check jagged offsets: int64 [B + 1], from 0, non-decreasing, ending at N = rows; returns B."""
    if lengths is not None or mask is not None:
        raise ValueError("jagged keys take offsets alone: pass lengths or mask only with padded keys [B, T, D]")
    require_tensor("offsets", offsets)
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be an int64 tensor [B + 1] (values+offsets convention), got dtype {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D with B + 1 entries, got shape {list(offsets.shape)}")
    if checking_values(offsets):
        first, last = offsets[0].item(), offsets[-1].item()
        if first != 0 or last != rows:
            raise ValueError(f"offsets must start at 0 and end at N = keys.shape[0] = {rows}, got {first} and {last}")
        if offsets.shape[0] > 1 and bool((offsets.diff() < 0).any()):
            raise ValueError("offsets must be non-decreasing (user b's rows are offsets[b]:offsets[b+1])")
    return offsets.shape[0] - 1
