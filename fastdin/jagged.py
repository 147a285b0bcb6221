"""Jagged (packed) histories to the padded layout: values [N, D] with offsets [B + 1] -> keys [B, T, D].

The TorchRec / FBGEMM convention: user b's rows are values[offsets[b]:offsets[b + 1]], offsets int64
with offsets[0] = 0 and offsets[B] = N.
"""
from typing import Tuple

import torch
from torch import Tensor


def check_offsets(values: Tensor, offsets: Tensor) -> None:
    if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.numel() < 1:
        raise ValueError(f"offsets must be a 1-D int64 tensor [B + 1], got "
                         f"{list(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__}"
                         f"{' ' + str(offsets.dtype) if isinstance(offsets, Tensor) else ''}")
    if not isinstance(values, Tensor) or values.dim() != 2:
        raise ValueError(f"values must be [N, D] (the packed history rows), got "
                         f"{list(values.shape) if isinstance(values, Tensor) else type(values).__name__}")
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if offsets[0].item() != 0 or offsets[-1].item() != values.shape[0] or bool((offsets.diff() < 0).any()):
        raise ValueError(f"offsets must rise from 0 to N = {values.shape[0]} (the rows of values), "
                         f"got first {offsets[0].item()}, last {offsets[-1].item()}")


def jagged_to_padded(values: Tensor, offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """(keys [B, T, D] zero-padded with T the longest history (at least 1), lengths [B] int64).

    Differentiable in values (an index_put of the rows into the padded tensor).
    """
    check_offsets(values, offsets)
    lengths = offsets.diff()
    batch, rows = lengths.shape[0], values.shape[0]
    seq_len = max(int(lengths.max().item()), 1) if batch else 1
    user = torch.repeat_interleave(torch.arange(batch, device=values.device), lengths, output_size=rows)
    position = torch.arange(rows, device=values.device) - offsets[user]
    padded = values.new_zeros(batch, seq_len, values.shape[1])
    padded = padded.index_put((user, position), values)
    return padded, lengths
