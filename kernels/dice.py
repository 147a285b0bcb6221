"""Dice (Zhou et al. 2018) forward and backward with batch and running statistics, in Triton.

f(x) = p*x + (1-p)*alpha*x with p = sigmoid(weight * x_hat + bias) (weight 1, bias 0 without affine)
and x_hat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), per feature (the last dim).

x is [N, H] or [B, T, H], read in place as rows x H through its strides (the last dim must be
contiguous). An optional bool mask of valid rows ([N] or [B, T]) selects the rows that count in the
training statistics; every row gets an output and a gradient.

Launches, each over a grid of (row programs, feature blocks):
  training forward: `_dice_stats_kernel` (per-program count/mean/M2 partials, Chan-merged chunk by
                    chunk, so no catastrophic cancellation), then `_dice_fwd_kernel`, which merges
                    the partials of its feature block in a fixed order, writes the output, and (row
                    program 0) saves mean/rstd/count and updates the running statistics on the device.
  eval forward:     `_dice_fwd_kernel` alone, with the running statistics.
  backward:         `_dice_bwd_reduce_kernel` (per-program fp32 partials of the per-feature sums),
                    then `_dice_bwd_dx_kernel`, which sums them in a fixed order (deterministic),
                    writes dx (exact: with the terms through the batch mean and variance) and
                    (row program 0) the parameter gradients.

The jit helpers `chan_merge`, `dice_gate` and `dice_grads` hold the math and are meant for reuse by
kernels that apply Dice to a tile they computed themselves (the attention unit).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastdin.kernels.launch import ceil_div, multiprocessors, next_power_of_2

# ---------------------------------------------------------------------------------------------
# math pieces (fp32 tiles)


@triton.jit
def _row_offsets(rows, rows_per_outer, stride_outer, stride_inner):
    """Element offsets of rows of x seen as [rows, H]: [B, T, H] has B outer blocks of T rows."""
    return (rows // rows_per_outer) * stride_outer + (rows % rows_per_outer) * stride_inner


@triton.jit
def update_running_stats(run_mean_ptr, run_var_ptr, feats, ok, mean, var, count, momentum):
    """nn.BatchNorm1d's update: the biased var normalizes, the unbiased var is tracked. Fewer than two
    counted rows (possible with the value checks off) have no unbiased var: the statistics stay."""
    ok = ok & (count >= 2.0)
    run_mean = tl.load(run_mean_ptr + feats, mask=ok, other=0.0).to(tl.float32)
    run_var = tl.load(run_var_ptr + feats, mask=ok, other=0.0).to(tl.float32)
    run_mean = run_mean * (1.0 - momentum) + mean * momentum
    run_var = run_var * (1.0 - momentum) + var * (count / (count - 1.0)) * momentum
    tl.store(run_mean_ptr + feats, run_mean.to(run_mean_ptr.dtype.element_ty), mask=ok)
    tl.store(run_var_ptr + feats, run_var.to(run_var_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _store_partials(part_ptr, pid_r, n_parts, n_feat, feats, ok, first, second, third):
    """One program's three per-feature partials into the [3, n_parts, n_feat] buffer."""
    part = pid_r * n_feat + feats
    plane = n_parts * n_feat
    tl.store(part_ptr + part, first, mask=ok)
    tl.store(part_ptr + plane + part, second, mask=ok)
    tl.store(part_ptr + 2 * plane + part, third, mask=ok)


@triton.jit
def chan_merge(count, mean, m2, count_b, mean_b, m2_b):
    """Merge two (count, mean, sum of squared deviations) summaries (Chan et al.); counts may be 0."""
    total = count + count_b
    share_b = count_b / tl.maximum(total, 1.0)
    delta = mean_b - mean
    return total, mean + delta * share_b, m2 + m2_b + delta * delta * count * share_b


@triton.jit
def dice_gate(x, mean, rstd, weight, bias):
    """(x_hat, p) with p = sigmoid(weight * x_hat + bias)."""
    x_hat = (x - mean) * rstd
    return x_hat, tl.sigmoid(x_hat * weight + bias)


@triton.jit
def dice_grads(x, g, p, alpha, weight):
    """Elementwise backward of y = x * (alpha + (1-alpha) * p) for upstream g.

    Returns (dx holding p fixed, the alpha-gradient term, dL/dz for z = weight*x_hat + bias, dL/dx_hat).
    """
    dx_direct = g * (alpha + (1.0 - alpha) * p)
    d_alpha = g * x * (1.0 - p)
    g_z = g * (1.0 - alpha) * x * p * (1.0 - p)
    return dx_direct, d_alpha, g_z, g_z * weight


@triton.jit
def _load_rows(ptr, rows, feats, n_rows, n_feat, rows_per_outer, stride_outer, stride_inner):
    """A [BLOCK_R, BLOCK_H] fp32 tile; rows past the end and features past H read 0."""
    ok = (rows < n_rows)[:, None] & (feats < n_feat)[None, :]
    offsets = _row_offsets(rows, rows_per_outer, stride_outer, stride_inner)[:, None] + feats[None, :]
    return tl.load(ptr + offsets, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _load_params(alpha_ptr, weight_ptr, bias_ptr, feats, n_feat, AFFINE: tl.constexpr):
    feat_ok = feats < n_feat
    alpha = tl.load(alpha_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)
    if AFFINE:
        weight = tl.load(weight_ptr + feats, mask=feat_ok, other=1.0).to(tl.float32)
        bias = tl.load(bias_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)
    else:
        weight = tl.full(feats.shape, 1.0, tl.float32)
        bias = tl.zeros(feats.shape, tl.float32)
    return alpha, weight, bias


@triton.jit
def _load_stats(stats_ptr, feats, n_feat):
    """The saved [3, H] statistics: mean, rstd and the valid-row count (repeated per feature)."""
    feat_ok = feats < n_feat
    mean = tl.load(stats_ptr + feats, mask=feat_ok, other=0.0)
    rstd = tl.load(stats_ptr + n_feat + feats, mask=feat_ok, other=0.0)
    count = tl.load(stats_ptr + 2 * n_feat + feats, mask=feat_ok, other=1.0)
    return mean, rstd, count


@triton.jit
def merge_stat_partials(part_ptr, n_parts, n_feat, feats, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """(count, mean, M2) of all rows from the [3, n_parts, H] partials, BLOCK_P partials at a time.

    Fixed order, so every program gets the same bits. Within a block the parallel formula
    M2 = sum M2_i + sum n_i (mean_i - mean)^2 is exact and stable.
    """
    feat_ok = feats < n_feat
    count = tl.zeros([BLOCK_H], tl.float32)
    mean = tl.zeros([BLOCK_H], tl.float32)
    m2 = tl.zeros([BLOCK_H], tl.float32)
    plane = n_parts * n_feat
    for first in range(0, n_parts, BLOCK_P):
        parts = first + tl.arange(0, BLOCK_P)
        ok = (parts < n_parts)[:, None] & feat_ok[None, :]
        at = parts[:, None] * n_feat + feats[None, :]
        counts = tl.load(part_ptr + at, mask=ok, other=0.0)
        means = tl.load(part_ptr + plane + at, mask=ok, other=0.0)
        count_b = tl.sum(counts, axis=0)
        mean_b = tl.sum(counts * means, axis=0) / tl.maximum(count_b, 1.0)
        spread = means - mean_b[None, :]
        m2_b = tl.sum(tl.load(part_ptr + 2 * plane + at, mask=ok, other=0.0) + counts * spread * spread, axis=0)
        count, mean, m2 = chan_merge(count, mean, m2, count_b, mean_b, m2_b)
    return count, mean, m2


@triton.jit
def _sum_partials(part_ptr, n_parts, n_feat, feats, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """Sum over the n_parts rows of one [n_parts, H] plane of partials, in a fixed order."""
    feat_ok = feats < n_feat
    total = tl.zeros([BLOCK_H], tl.float32)
    for first in range(0, n_parts, BLOCK_P):
        parts = first + tl.arange(0, BLOCK_P)
        ok = (parts < n_parts)[:, None] & feat_ok[None, :]
        total += tl.sum(tl.load(part_ptr + parts[:, None] * n_feat + feats[None, :], mask=ok, other=0.0), axis=0)
    return total


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _dice_stats_kernel(
    x_ptr, mask_ptr, part_ptr,
    n_rows, n_feat, n_parts, rows_per_outer, stride_outer, stride_inner, rows_per_prog,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per row program: count, mean and M2 of its valid rows, stored to part[3, n_parts, H]."""
    pid_r = tl.program_id(0)
    feats = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    feat_ok = feats < n_feat
    count = tl.zeros([BLOCK_H], tl.float32)
    mean = tl.zeros([BLOCK_H], tl.float32)
    m2 = tl.zeros([BLOCK_H], tl.float32)
    first_row = pid_r.to(tl.int64) * rows_per_prog
    for start in range(0, rows_per_prog, BLOCK_R):
        rows = first_row + start + tl.arange(0, BLOCK_R)
        valid = rows < n_rows
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + rows, mask=valid, other=0) != 0)
        x = _load_rows(x_ptr, rows, feats, n_rows, n_feat, rows_per_outer, stride_outer, stride_inner)
        x = tl.where(valid[:, None], x, 0.0)
        # the chunk's own two-pass summary (exact centring), merged into the running one
        count_b = tl.sum(valid.to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=0) / tl.maximum(count_b, 1.0)
        centred = tl.where(valid[:, None], x - mean_b[None, :], 0.0)
        count, mean, m2 = chan_merge(count, mean, m2, count_b, mean_b, tl.sum(centred * centred, axis=0))
    _store_partials(part_ptr, pid_r, n_parts, n_feat, feats, feat_ok, count, mean, m2)


@triton.jit
def _dice_fwd_kernel(
    x_ptr, out_ptr, alpha_ptr, weight_ptr, bias_ptr, part_ptr, stats_ptr, run_mean_ptr, run_var_ptr,
    n_rows, n_feat, n_parts, rows_per_outer, stride_outer, stride_inner, rows_per_prog, momentum, eps,
    TRAINING: tl.constexpr, AFFINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out = Dice(x) for the rows of this program, with batch (merged partials) or running statistics."""
    pid_r = tl.program_id(0)
    feats = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    feat_ok = feats < n_feat
    if TRAINING:
        # every program merges the (few) partials of its feature block in the same order, so all
        # agree bit for bit and no extra launch or grid-wide sync is needed
        count, mean, m2 = merge_stat_partials(part_ptr, n_parts, n_feat, feats, BLOCK_P, BLOCK_H)
        count = tl.where(feat_ok, count, 2.0)  # lanes past H are never stored: keep their math finite
        var = m2 / count
    else:
        count = tl.zeros([BLOCK_H], tl.float32)
        mean = tl.load(run_mean_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)
        var = tl.load(run_var_ptr + feats, mask=feat_ok, other=1.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    if pid_r == 0:
        tl.store(stats_ptr + feats, mean, mask=feat_ok)
        tl.store(stats_ptr + n_feat + feats, rstd, mask=feat_ok)
        tl.store(stats_ptr + 2 * n_feat + feats, count, mask=feat_ok)
        if TRAINING:
            update_running_stats(run_mean_ptr, run_var_ptr, feats, feat_ok, mean, var, count, momentum)
    alpha, weight, bias = _load_params(alpha_ptr, weight_ptr, bias_ptr, feats, n_feat, AFFINE)
    first_row = pid_r.to(tl.int64) * rows_per_prog
    # second pass over the rows: last-read chunk first, as it is the likeliest to be still in L2
    for start in range(0, rows_per_prog, BLOCK_R):
        rows = first_row + (rows_per_prog - BLOCK_R - start) + tl.arange(0, BLOCK_R)
        x = _load_rows(x_ptr, rows, feats, n_rows, n_feat, rows_per_outer, stride_outer, stride_inner)
        _, p = dice_gate(x, mean[None, :], rstd[None, :], weight[None, :], bias[None, :])
        out = x * (alpha[None, :] + (1.0 - alpha[None, :]) * p)
        ok = (rows < n_rows)[:, None] & feat_ok[None, :]
        tl.store(out_ptr + rows[:, None] * n_feat + feats[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dice_bwd_reduce_kernel(
    x_ptr, dy_ptr, alpha_ptr, weight_ptr, bias_ptr, stats_ptr, part_ptr,
    n_rows, n_feat, n_parts, rows_per_outer, x_stride_outer, x_stride_inner, dy_stride_outer, dy_stride_inner,
    rows_per_prog,
    AFFINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per row program, over all its rows: sum g*x*(1-p) (alpha), sum g_z (bias), sum g_z*x_hat (weight)."""
    pid_r = tl.program_id(0)
    feats = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    feat_ok = feats < n_feat
    # not `_`: the GPU compiler would carry it into the loop, which rebinds `_` to a [BLOCK_R, BLOCK_H] tile
    mean, rstd, _count = _load_stats(stats_ptr, feats, n_feat)
    alpha, weight, bias = _load_params(alpha_ptr, weight_ptr, bias_ptr, feats, n_feat, AFFINE)
    sum_alpha = tl.zeros([BLOCK_H], tl.float32)
    sum_gz = tl.zeros([BLOCK_H], tl.float32)
    sum_gz_xhat = tl.zeros([BLOCK_H], tl.float32)
    first_row = pid_r.to(tl.int64) * rows_per_prog
    for start in range(0, rows_per_prog, BLOCK_R):
        rows = first_row + start + tl.arange(0, BLOCK_R)
        x = _load_rows(x_ptr, rows, feats, n_rows, n_feat, rows_per_outer, x_stride_outer, x_stride_inner)
        g = _load_rows(dy_ptr, rows, feats, n_rows, n_feat, rows_per_outer, dy_stride_outer, dy_stride_inner)
        x_hat, p = dice_gate(x, mean[None, :], rstd[None, :], weight[None, :], bias[None, :])
        _, d_alpha, g_z, _ = dice_grads(x, g, p, alpha[None, :], weight[None, :])
        # rows past the end load g = 0, so they add nothing
        sum_alpha += tl.sum(d_alpha, axis=0)
        sum_gz += tl.sum(g_z, axis=0)
        sum_gz_xhat += tl.sum(g_z * x_hat, axis=0)
    _store_partials(part_ptr, pid_r, n_parts, n_feat, feats, feat_ok, sum_alpha, sum_gz, sum_gz_xhat)


@triton.jit
def _dice_bwd_dx_kernel(
    x_ptr, dy_ptr, mask_ptr, dx_ptr, alpha_ptr, weight_ptr, bias_ptr, stats_ptr, part_ptr,
    dalpha_ptr, dweight_ptr, dbias_ptr,
    n_rows, n_feat, n_parts, rows_per_outer, x_stride_outer, x_stride_inner, dy_stride_outer, dy_stride_inner,
    rows_per_prog,
    TRAINING: tl.constexpr, HAS_MASK: tl.constexpr, AFFINE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dx for the rows of this program; row program 0 also stores d alpha, d weight, d bias.

    In training, with S1 = sum_i dL/dx_hat_i and S2 = sum_i dL/dx_hat_i * x_hat_i over ALL rows (the
    outputs of masked rows depend on the batch statistics too), and n valid rows:
    dx_j = direct_j + rstd * dL/dx_hat_j - [j valid] * rstd / n * (S1 + S2 * x_hat_j).
    """
    pid_r = tl.program_id(0)
    feats = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    feat_ok = feats < n_feat
    mean, rstd, count = _load_stats(stats_ptr, feats, n_feat)
    alpha, weight, bias = _load_params(alpha_ptr, weight_ptr, bias_ptr, feats, n_feat, AFFINE)
    plane = n_parts * n_feat
    sum_alpha = _sum_partials(part_ptr, n_parts, n_feat, feats, BLOCK_P, BLOCK_H)
    sum_gz = _sum_partials(part_ptr + plane, n_parts, n_feat, feats, BLOCK_P, BLOCK_H)
    sum_gz_xhat = _sum_partials(part_ptr + 2 * plane, n_parts, n_feat, feats, BLOCK_P, BLOCK_H)
    if pid_r == 0:
        tl.store(dalpha_ptr + feats, sum_alpha.to(dalpha_ptr.dtype.element_ty), mask=feat_ok)
        if AFFINE:
            tl.store(dweight_ptr + feats, sum_gz_xhat.to(dweight_ptr.dtype.element_ty), mask=feat_ok)
            tl.store(dbias_ptr + feats, sum_gz.to(dbias_ptr.dtype.element_ty), mask=feat_ok)
    if TRAINING:
        stat_scale = rstd / count
        s1 = weight * sum_gz
        s2 = weight * sum_gz_xhat
    first_row = pid_r.to(tl.int64) * rows_per_prog
    # second pass over the rows: last-read chunk first, as it is the likeliest to be still in L2
    for start in range(0, rows_per_prog, BLOCK_R):
        rows = first_row + (rows_per_prog - BLOCK_R - start) + tl.arange(0, BLOCK_R)
        in_range = rows < n_rows
        x = _load_rows(x_ptr, rows, feats, n_rows, n_feat, rows_per_outer, x_stride_outer, x_stride_inner)
        g = _load_rows(dy_ptr, rows, feats, n_rows, n_feat, rows_per_outer, dy_stride_outer, dy_stride_inner)
        x_hat, p = dice_gate(x, mean[None, :], rstd[None, :], weight[None, :], bias[None, :])
        dx_direct, _, _, g_xhat = dice_grads(x, g, p, alpha[None, :], weight[None, :])
        dx = dx_direct + rstd[None, :] * g_xhat
        if TRAINING:
            valid = in_range
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
            through_stats = stat_scale[None, :] * (s1[None, :] + s2[None, :] * x_hat)
            dx -= tl.where(valid[:, None], through_stats, 0.0)
        ok = in_range[:, None] & feat_ok[None, :]
        tl.store(dx_ptr + rows[:, None] * n_feat + feats[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# launchers


def _row_view(t: torch.Tensor):
    """(rows_per_outer, stride_outer, stride_inner) reading [N, H] or [B, T, H] in place as rows."""
    if t.dim() == 2:
        return max(t.shape[0], 1), 0, t.stride(0)
    return max(t.shape[1], 1), t.stride(0), t.stride(1)


class _Grid:
    """Block sizes and the row split shared by every launch of one call."""

    def __init__(self, n_rows: int, n_feat: int, device: torch.device, block_rows: Optional[int],
                 block_features: Optional[int], row_programs: Optional[int]):
        self.block_h = block_features or min(next_power_of_2(n_feat), 128)
        self.block_r = block_rows or max(16, 4096 // self.block_h)
        self.feature_blocks = ceil_div(n_feat, self.block_h)
        chunks = max(1, ceil_div(n_rows, self.block_r))
        if row_programs is None:
            # about one program per SM: enough to stream memory, while the partials every program
            # merges (row programs x feature blocks) stay small; the interpreter pays per program
            on_gpu = device.type == "cuda"
            row_programs = max(1, multiprocessors(device) // self.feature_blocks) if on_gpu else 4
        chunks_per_prog = ceil_div(chunks, max(1, min(row_programs, chunks)))
        self.rows_per_prog = chunks_per_prog * self.block_r
        self.row_programs = max(1, ceil_div(n_rows, self.rows_per_prog))
        self.grid = (self.row_programs, self.feature_blocks)
        # 8 warps for the 4096-element row tiles keeps the several live fp32 tiles of the backward
        # in registers (the warp rule of thumb of Liger-Kernel's calculate_settings); not tuned on a GPU
        self.num_warps = 8 if self.block_r * self.block_h >= 2048 else 4
        # partials merged per step; a power of 2 that bounds the tile to about 4096 elements
        self.block_p = min(next_power_of_2(self.row_programs), max(1, 4096 // self.block_h))
        self.blocks = {"BLOCK_R": self.block_r, "BLOCK_H": self.block_h, "num_warps": self.num_warps}


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t as a stride-1 vector, as the kernels index it (reshape(-1) alone keeps a column's stride)."""
    return None if t is None else t.reshape(-1).contiguous()


def dice_forward(
    x: torch.Tensor, alpha: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    running_mean: torch.Tensor, running_var: torch.Tensor, mask: Optional[torch.Tensor], training: bool,
    momentum: float, eps: float, *, block_rows: Optional[int] = None, block_features: Optional[int] = None,
    row_programs: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dice over the last dim of x ([N, H] or [B, T, H]); returns (out, stats).

    out is contiguous, with x's shape and dtype. stats is fp32 [3, H]: mean, rstd and the valid-row
    count, for `dice_backward`. In training the running statistics are updated in place, on the
    device (no host synchronisation). Inputs are assumed checked (`fastdin.functional`).
    block_rows, block_features and row_programs override the launch configuration (tests use
    them to get several programs from small inputs).
    """
    x = _contiguous_last(x)
    n_feat = x.shape[-1]
    n_rows = x.numel() // n_feat
    config = _Grid(n_rows, n_feat, x.device, block_rows, block_features, row_programs)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    stats = torch.empty(3, n_feat, dtype=torch.float32, device=x.device)
    # BatchNorm buffers are contiguous; work on a copy only if someone passed a strided view
    run_mean = running_mean.reshape(-1) if running_mean.is_contiguous() else running_mean.reshape(-1).clone()
    run_var = running_var.reshape(-1) if running_var.is_contiguous() else running_var.reshape(-1).clone()
    rows_per_outer, stride_outer, stride_inner = _row_view(x)
    parts = None
    if training:
        parts = torch.empty(3, config.row_programs, n_feat, dtype=torch.float32, device=x.device)
        _dice_stats_kernel[config.grid](
            x, _flat(mask), parts,
            n_rows, n_feat, config.row_programs, rows_per_outer, stride_outer, stride_inner, config.rows_per_prog,
            HAS_MASK=mask is not None, **config.blocks,
        )
    affine = weight is not None
    _dice_fwd_kernel[config.grid](
        x, out, _flat(alpha), _flat(weight), _flat(bias),
        parts, stats, run_mean, run_var,
        n_rows, n_feat, config.row_programs, rows_per_outer, stride_outer, stride_inner, config.rows_per_prog,
        float(momentum), float(eps),
        TRAINING=training, AFFINE=affine, BLOCK_P=config.block_p, **config.blocks,
    )
    if training and run_mean.data_ptr() != running_mean.data_ptr():
        running_mean.copy_(run_mean.view_as(running_mean))
    if training and run_var.data_ptr() != running_var.data_ptr():
        running_var.copy_(run_var.view_as(running_var))
    return out, stats


def dice_backward(
    grad_out: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor], alpha: torch.Tensor,
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], stats: torch.Tensor, training: bool,
    *, block_rows: Optional[int] = None, block_features: Optional[int] = None, row_programs: Optional[int] = None,
):
    """Exact gradients of `dice_forward`: (dx, dalpha, dweight, dbias), dweight/dbias None without affine.

    In training dx includes the terms through the batch mean and variance; masked rows add nothing
    to those statistics but get their elementwise gradient. Parameter gradients have the
    parameters' shapes and dtypes; the reductions are deterministic.
    """
    x = _contiguous_last(x)
    grad_out = _contiguous_last(grad_out)
    n_feat = x.shape[-1]
    n_rows = x.numel() // n_feat
    config = _Grid(n_rows, n_feat, x.device, block_rows, block_features, row_programs)
    affine = weight is not None
    flat = [_flat(t) for t in (alpha, weight, bias)]
    parts = torch.empty(3, config.row_programs, n_feat, dtype=torch.float32, device=x.device)
    rows_per_outer, x_stride_outer, x_stride_inner = _row_view(x)
    _, dy_stride_outer, dy_stride_inner = _row_view(grad_out)
    _dice_bwd_reduce_kernel[config.grid](
        x, grad_out, *flat, stats, parts,
        n_rows, n_feat, config.row_programs, rows_per_outer, x_stride_outer, x_stride_inner,
        dy_stride_outer, dy_stride_inner, config.rows_per_prog,
        AFFINE=affine, **config.blocks,
    )
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dalpha = torch.empty_like(flat[0])
    dweight = torch.empty_like(flat[1]) if affine else None
    dbias = torch.empty_like(flat[2]) if affine else None
    _dice_bwd_dx_kernel[config.grid](
        x, grad_out, _flat(mask), dx, *flat, stats, parts,
        dalpha, dweight, dbias,
        n_rows, n_feat, config.row_programs, rows_per_outer, x_stride_outer, x_stride_inner,
        dy_stride_outer, dy_stride_inner, config.rows_per_prog,
        TRAINING=training, HAS_MASK=mask is not None, AFFINE=affine, BLOCK_P=config.block_p, **config.blocks,
    )
    return (
        dx,
        dalpha.view_as(alpha),
        dweight.view_as(weight) if affine else None,
        dbias.view_as(bias) if affine else None,
    )
