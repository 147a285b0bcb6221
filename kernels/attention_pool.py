"""Fused DIN local activation unit: attention MLP + mask + (softmax) + weighted sum, forward and backward.

For user b with candidate q and history keys k_t the MLP sees x_t = [q, k_t, q - k_t, q * k_t]. The
first layer is folded per user (see docs/design.md, "Folding the first layer"): x_t W1 + b1 = k_t W_b + c_b with
W_b = Wk - Wd + diag(q) Wp and c_b = q (Wq + Wd) + b1, so the [B, T, 4D] concat is never built.
The kernels read the `nn.Linear` weights with masked loads (a non-contiguous one is copied first). Each program walks its
users (grid-stride loop) tile by tile over T, up to the tile holding the user's last valid position
(`_extent`; the padding past it is only zero-filled where an output needs it, so work follows the
lengths, except for Dice statistics over all t < T); biases and activation parameters are loaded once per
program, the weight matrices are re-read where they are used (from L1/L2): held in registers across
the loops they made ptxas (sm_90) spill heavily and pushed the backward of 256/128/64 layers past
the 227 KB of shared memory an H200 block may use. The backward recomputes the activations from the
keys (flash-attention style) and writes one row of fp32 partials per program (every weight gradient,
kernels/mlp.py), which one launch sums in a fixed order (deterministic).

Dice in training mode (batch statistics per hidden layer, over the valid or all positions) adds
constexpr modes to both kernels and never stores a [B, T, H] tensor. Forward: per layer l, a
statistics pass (STATS_LAYER = l: the tile's layer-l pre-activation, with the layers below
normalised by their now-known batch statistics, into per-program count/mean/M2 partials) and a
small merge kernel (fixed order; it also updates the running statistics on the device), then the
ordinary forward with the batch statistics in place of the running ones. Backward: the gradient
through the statistics of layer l needs S_l = sum dL/dx_hat and Q_l = sum dL/dx_hat * x_hat over
all positions, which depend on the layers above, so one sums pass per layer from the top down
(SUMS_LAYER = l), then the ordinary backward with every (S_l, Q_l) known.

Only Triton lives here: no autograd, no modules.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdin.kernels.dice import chan_merge, merge_stat_partials, update_running_stats
from fastdin.kernels.launch import block, ceil_div, multiprocessors, next_power_of_2, tf32_matmuls
from fastdin.kernels.mlp import (ACT_CODES, MAX_HIDDEN_LAYERS, TRITON_DTYPES, act_bwd, act_fwd, dot, grad_layout,
                                 layer_tuples, load_act, load_vec, store_partials, store_vector, sum_partials)

# Tests set this so every output and partial starts as NaN: an element a kernel fails to write fails.
POISON_OUTPUTS = False
# Untuned (no GPU measured yet). 8 warps halve the per-thread share of the fp32 tiles; one stage, since
# software-pipelined weight loads multiply the shared memory a program needs.
NUM_WARPS = 8
NUM_STAGES = 1


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _load_weight_t(w_ptr, stride_row, col0, n_in, n_out, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr):
    """W^T[i, o] = w[o, col0 + i] of an nn.Linear weight, as an fp32 [BLOCK_IN, BLOCK_OUT] tile (0 outside)."""
    offs_i = tl.arange(0, BLOCK_IN)
    offs_o = tl.arange(0, BLOCK_OUT)
    ptrs = w_ptr + offs_o[None, :] * stride_row + (col0 + offs_i[:, None])
    mask = (offs_i[:, None] < n_in) & (offs_o[None, :] < n_out)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_weight(w_ptr, n_in, n_out, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr, DT: tl.constexpr):
    """A contiguous nn.Linear weight as a [BLOCK_OUT, BLOCK_IN] tile in DT (0 outside)."""
    offs_o = tl.arange(0, BLOCK_OUT)
    offs_i = tl.arange(0, BLOCK_IN)
    ptrs = w_ptr + offs_o[:, None] * n_in + offs_i[None, :]
    mask = (offs_o[:, None] < n_out) & (offs_i[None, :] < n_in)
    return tl.load(ptrs, mask=mask, other=0.0).to(DT)


@triton.jit
def _load_mlp_params(W, BIAS, ACTP, SLOPE_STRIDE, HID, eps, BH: tl.constexpr, NUM_LAYERS: tl.constexpr,
                     ACT: tl.constexpr, AFFINE: tl.constexpr):
    """What a program loads once: per hidden layer its bias and activation parameters (the tuple of
    load_act), then the score layer's weight row and bias. Absent layers get the first layer's as
    placeholders (never used)."""
    bias1 = load_vec(BIAS[0], HID[0], 1, BH[0], 0.0)
    act1 = load_act(ACTP[0], SLOPE_STRIDE[0], HID[0], eps, BH[0], ACT, AFFINE)
    bias2, bias3, bias4 = bias1, bias1, bias1
    act2, act3, act4 = act1, act1, act1
    if NUM_LAYERS >= 2:
        bias2 = load_vec(BIAS[1], HID[1], 1, BH[1], 0.0)
        act2 = load_act(ACTP[1], SLOPE_STRIDE[1], HID[1], eps, BH[1], ACT, AFFINE)
    if NUM_LAYERS >= 3:
        bias3 = load_vec(BIAS[2], HID[2], 1, BH[2], 0.0)
        act3 = load_act(ACTP[2], SLOPE_STRIDE[2], HID[2], eps, BH[2], ACT, AFFINE)
    if NUM_LAYERS >= 4:
        bias4 = load_vec(BIAS[3], HID[3], 1, BH[3], 0.0)
        act4 = load_act(ACTP[3], SLOPE_STRIDE[3], HID[3], eps, BH[3], ACT, AFFINE)
    wo = load_vec(W[NUM_LAYERS], HID[NUM_LAYERS - 1], 1, BH[NUM_LAYERS - 1], 0.0)
    bo = tl.load(BIAS[NUM_LAYERS]).to(tl.float32)
    return (bias1, bias2, bias3, bias4), (act1, act2, act3, act4), wo, bo


@triton.jit
def _valid_positions(offs_t, T, b64, len_ptr, mask_ptr, stride_mb, stride_mt,
                     HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr):
    valid = offs_t < T
    if HAS_LENGTHS:
        valid = valid & (offs_t < tl.load(len_ptr + b64))
    if HAS_MASK:
        flags = tl.load(mask_ptr + b64 * stride_mb + offs_t * stride_mt, mask=offs_t < T, other=0)
        valid = valid & (flags != 0)
    return valid


@triton.jit
def _extent(T, b64, len_ptr, mask_ptr, stride_mb, stride_mt, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr,
            BLOCK_T: tl.constexpr):
    """1 + user b's last valid position (0 with none): the loops over t stop at the tile holding it, so
    the padding past it is never computed and work follows the lengths. A mask costs one read of its
    row first. int32 (T < 2^31)."""
    reach = T
    if HAS_MASK:
        reach = 0
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            valid = _valid_positions(offs_t, T, b64, len_ptr, mask_ptr, stride_mb, stride_mt, HAS_LENGTHS, HAS_MASK)
            reach = tl.maximum(reach, tl.max(tl.where(valid, offs_t + 1, 0), axis=0))
    elif HAS_LENGTHS:
        reach = tl.minimum(tl.maximum(tl.load(len_ptr + b64), 0), T).to(tl.int32)
    return reach


@triton.jit
def _store_zeros_past(ptr, reach, T, width, stride_t, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """Zeros at [t, :width] (row stride stride_t) for t from the end of the tile holding `reach` - 1
    (the loops over t stop there) to T: the padding an output must still hold as zeros."""
    cols = tl.arange(0, BLOCK_W)
    for t0 in range(tl.cdiv(reach, BLOCK_T) * BLOCK_T, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        ok = (offs_t < T)[:, None] & (cols < width)[None, :]
        tl.store(ptr + offs_t[:, None] * stride_t + cols[None, :], tl.zeros([BLOCK_T, BLOCK_W], tl.float32), mask=ok)


@triton.jit
def _fold_first_layer(w1, bias1, q, D, H1, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr):
    """This user's W_b = Wk - Wd + diag(q) Wp [BLOCK_D, BLOCK_H1] and c_b = q (Wq + Wd) + b1.
    Re-read per user (from L1/L2) rather than held in registers across the user loop."""
    wq = _load_weight_t(w1, 4 * D, 0, D, H1, BLOCK_D, BLOCK_H1)
    wk = _load_weight_t(w1, 4 * D, D, D, H1, BLOCK_D, BLOCK_H1)
    wd = _load_weight_t(w1, 4 * D, 2 * D, D, H1, BLOCK_D, BLOCK_H1)
    wp = _load_weight_t(w1, 4 * D, 3 * D, D, H1, BLOCK_D, BLOCK_H1)
    W_b = wk - wd + q[:, None] * wp
    c_b = tl.sum(q[:, None] * (wq + wd), axis=0) + bias1
    return W_b, c_b


@triton.jit
def _fold_first_layer_grad_query(w1, dW_b, dc_b, D, H1, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr):
    """dq_b = (Wq + Wd) dc_b + rowsum(Wp * dW_b)."""
    wq = _load_weight_t(w1, 4 * D, 0, D, H1, BLOCK_D, BLOCK_H1)
    wd = _load_weight_t(w1, 4 * D, 2 * D, D, H1, BLOCK_D, BLOCK_H1)
    wp = _load_weight_t(w1, 4 * D, 3 * D, D, H1, BLOCK_D, BLOCK_H1)
    return tl.sum((wq + wd) * dc_b[None, :], axis=1) + tl.sum(wp * dW_b, axis=1)


@triton.jit
def _hidden_layer_fwd(x_below, h_below, W, bias, HID, act, LAYER: tl.constexpr, NUM_LAYERS: tl.constexpr,
                      BH: tl.constexpr, ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
    """Hidden layer LAYER >= 2 on a tile: its pre-activation x and activation h. An absent layer passes
    the layer below through, so the top layer's h is always the last hidden activation."""
    x, h = x_below, h_below
    if NUM_LAYERS >= LAYER:
        n_in = HID[LAYER - 2]
        w_t = _load_weight_t(W[LAYER - 1], n_in, 0, n_in, HID[LAYER - 1], BH[LAYER - 2], BH[LAYER - 1]).to(DT)
        x = dot(h_below, w_t, tl.zeros([h_below.shape[0], w_t.shape[1]], tl.float32), DT, PRECISION) + bias[None, :]
        h = act_fwd(x, act, ACT)
    return x, h


@triton.jit
def _mlp_tile(k, W_b, c_b, W, BS, ACTS, wo, bo, HID, BH: tl.constexpr, NUM_LAYERS: tl.constexpr,
              ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of one [BLOCK_T, BLOCK_D] key tile, with every pre-activation x_l and activation h_l
    (layers past NUM_LAYERS repeat the last one, so h4 is the last hidden activation)."""
    x1 = dot(k, W_b, tl.zeros([k.shape[0], W_b.shape[1]], tl.float32), DT, PRECISION) + c_b[None, :]
    h1 = act_fwd(x1, ACTS[0], ACT)
    x2, h2 = _hidden_layer_fwd(x1, h1, W, BS[1], HID, ACTS[1], 2, NUM_LAYERS, BH, ACT, DT, PRECISION)
    x3, h3 = _hidden_layer_fwd(x2, h2, W, BS[2], HID, ACTS[2], 3, NUM_LAYERS, BH, ACT, DT, PRECISION)
    x4, h4 = _hidden_layer_fwd(x3, h3, W, BS[3], HID, ACTS[3], 4, NUM_LAYERS, BH, ACT, DT, PRECISION)
    s = tl.sum(h4 * wo[None, :], axis=1) + bo
    return s, (x1, x2, x3, x4), (h1, h2, h3, h4)


@triton.jit
def _pick_layer(x1, x2, x3, x4, LAYER: tl.constexpr):
    if LAYER == 1:
        x = x1
    elif LAYER == 2:
        x = x2
    elif LAYER == 3:
        x = x3
    else:
        x = x4
    return x


@triton.jit
def _accumulate_stats(count, mean, m2, x, counted):
    """Merge the tile's own two-pass (count, mean, M2) of x over its counted rows into the running one."""
    x = tl.where(counted[:, None], x, 0.0)
    count_b = tl.sum(counted.to(tl.float32), axis=0)
    mean_b = tl.sum(x, axis=0) / tl.maximum(count_b, 1.0)
    centred = tl.where(counted[:, None], x - mean_b[None, :], 0.0)
    return chan_merge(count, mean, m2, count_b, mean_b, tl.sum(centred * centred, axis=0))


@triton.jit
def _load_stat_sums(sums_ptr, layer, n_parts, h_max, n, act, BLOCK: tl.constexpr, KNOWN: tl.constexpr):
    """Layer `layer`'s (S, Q) = (sum dL/dx_hat, sum dL/dx_hat * x_hat): its sums pass's per-program
    partials of (sum dL/dz, sum dL/dz * x_hat) in sums [L, 2, n_parts, h_max], summed over the programs
    in order (every program the same: deterministic, and no launch in between), times Dice's weight
    (dL/dx_hat = weight * dL/dz). Zeros until they are KNOWN (the sums passes find them from the top
    layer down)."""
    S = tl.zeros([BLOCK], tl.float32)
    Q = tl.zeros([BLOCK], tl.float32)
    if KNOWN:
        plane = sums_ptr + (layer - 1) * 2 * n_parts * h_max
        for p in range(0, n_parts):
            S += load_vec(plane + p * h_max, n, 1, BLOCK, 0.0)
            Q += load_vec(plane + (n_parts + p) * h_max, n, 1, BLOCK, 0.0)
        _, _, _, gamma, _ = act
        S = S * gamma
        Q = Q * gamma
    return S, Q


@triton.jit
def _through_batch_stats(G, x, mean, inv_std, S, Q, inv_count, counted):
    """Add to G = dL/dx (statistics held fixed) the part through the batch mean and variance:
    -rstd / n * (S + x_hat * Q) at the positions that count in the statistics."""
    x_hat = (x - mean[None, :]) * inv_std[None, :]
    through = (inv_std * inv_count)[None, :] * (S[None, :] + x_hat * Q[None, :])
    return G - tl.where(counted[:, None], through, 0.0)


@triton.jit
def _zero_act_grads(act):
    """Accumulators of a layer's (slope or alpha, Dice weight, Dice bias) gradients."""
    a, _, _, _, _ = act
    return tl.zeros_like(a), tl.zeros_like(a), tl.zeros_like(a)


@triton.jit
def _pre_activation_grad(x, dh, act, stat_sums, inv_count, counted, dact, LAYER: tl.constexpr,
                         SUMS_LAYER: tl.constexpr, ACT: tl.constexpr, DICE_TRAIN: tl.constexpr):
    """Layer LAYER's G = dL/dx on a tile from dL/dh, adding the tile's sums to the activation-parameter
    accumulators dact. With batch statistics G also gets the part through them, whose (S, Q) are
    known in every pass but the layer's own sums pass."""
    G, tile_dact = act_bwd(x, dh, act, ACT)
    da, dg, de = tile_dact
    da_acc, dg_acc, de_acc = dact
    if SUMS_LAYER < LAYER:
        if DICE_TRAIN:
            _, mean, inv_std, _, _ = act
            S, Q = stat_sums
            G = _through_batch_stats(G, x, mean, inv_std, S, Q, inv_count, counted)
    return G, (da_acc + da, dg_acc + dg, de_acc + de)


@triton.jit
def _hidden_layer_bwd(dh, x, h_below, W, HID, act, stat_sums, inv_count, counted, grads, LAYER: tl.constexpr,
                      NUM_LAYERS: tl.constexpr, SUMS_LAYER: tl.constexpr, ACT: tl.constexpr,
                      DICE_TRAIN: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
    """Hidden layer LAYER >= 2 on a tile: dL/dh_l into dL/dh_{l-1}, adding to grads = (weight, bias,
    activation-parameter accumulators). An absent layer passes dh through; a sums pass stops at its
    layer and leaves the weights alone."""
    dw, db, dact = grads
    if NUM_LAYERS >= LAYER:
        if SUMS_LAYER <= LAYER:
            G, dact = _pre_activation_grad(x, dh, act, stat_sums, inv_count, counted, dact, LAYER, SUMS_LAYER,
                                           ACT, DICE_TRAIN)
            if SUMS_LAYER < LAYER:
                if SUMS_LAYER == 0:
                    dw = dot(tl.trans(h_below), G, dw, DT, PRECISION)
                    db += tl.sum(G, axis=0)
                w_tile = _load_weight(W[LAYER - 1], HID[LAYER - 2], HID[LAYER - 1], h_below.shape[1], x.shape[1], DT)
                dh = dot(G, w_tile, tl.zeros([G.shape[0], h_below.shape[1]], tl.float32), DT, PRECISION)
    return dh, (dw, db, dact)


# ---------------------------------------------------------------------------------------------
# kernels
#
# Per-layer arguments are the tuples of kernels/mlp.py (W, BIAS, ACTP, SLOPE_STRIDE), with the
# hidden sizes HID and their tile sizes BH padded to 4 entries by repeating the last layer's.


@triton.jit
def _attention_pool_fwd_kernel(
    q_ptr, k_ptr, len_ptr, mask_ptr, out_ptr, scores_ptr, lse_ptr, stat_part_ptr,
    W, BIAS, ACTP, SLOPE_STRIDE, HID, eps,
    B, T, D,
    stride_qb, stride_kb, stride_kt, stride_mb, stride_mt, stride_ob, stride_sb, HS,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BH: tl.constexpr,
    NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, STORE_SCORES: tl.constexpr,
    DT: tl.constexpr, PRECISION: tl.constexpr,
    STATS_LAYER: tl.constexpr, COUNT_ALL: tl.constexpr, BLOCK_HS: tl.constexpr,
):
    """The forward pass, or with STATS_LAYER = l > 0 a statistics pass of training-mode Dice: per
    program (count, mean, M2) of hidden layer l's pre-activation (HS wide) over the positions that
    count (all t < T with COUNT_ALL, else the valid ones) into stat_part [3, programs, HS]; the layers
    below l are normalised with their batch statistics, already found and passed as their mean/var."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    BS, ACTS, wo, bo = _load_mlp_params(W, BIAS, ACTP, SLOPE_STRIDE, HID, eps, BH, NUM_LAYERS, ACT, AFFINE)
    st_count = tl.zeros([BLOCK_HS], dtype=tl.float32)  # statistics pass: this program's summary
    st_mean = tl.zeros([BLOCK_HS], dtype=tl.float32)
    st_m2 = tl.zeros([BLOCK_HS], dtype=tl.float32)

    for b in range(pid, B, num_programs):
        # int64: b * stride can pass 2^31. Cast inside the loop: the interpreter drops the type of
        # an int64 range start (tests/test_layouts.py checks the offsets past 2^31 on the CPU)
        b64 = tl.cast(b, tl.int64)
        q = tl.load(q_ptr + b64 * stride_qb + offs_d, mask=dmask, other=0.0).to(tl.float32)
        W_b, c_b = _fold_first_layer(W[0], BS[0], q, D, HID[0], BLOCK_D, BH[0])
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        m_i = tl.max(tl.full([BLOCK_T], -1.0e30, tl.float32), axis=0)  # running max (softmax)
        l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)  # running sum of exp (softmax)
        reach = _extent(T, b64, len_ptr, mask_ptr, stride_mb, stride_mt, HAS_LENGTHS, HAS_MASK, BLOCK_T)
        if STATS_LAYER > 0:
            if COUNT_ALL:  # statistics over every t < T
                reach = T
        for t0 in range(0, reach, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < T
            valid = _valid_positions(offs_t, T, b64, len_ptr, mask_ptr, stride_mb, stride_mt, HAS_LENGTHS, HAS_MASK)
            k_ptrs = k_ptr + b64 * stride_kb + offs_t.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
            # padding is never read (NaN or inf there must not count), except by statistics over all t < T
            read = valid
            if STATS_LAYER > 0:
                if COUNT_ALL:
                    read = tmask
            k = tl.load(k_ptrs, mask=read[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s, xs, _hs = _mlp_tile(k, W_b, c_b, W, BS, ACTS, wo, bo, HID, BH, NUM_LAYERS, ACT, DT, PRECISION)
            if STATS_LAYER > 0:  # the layers above l (and the score) are unused here
                counted = valid
                if COUNT_ALL:
                    counted = tmask
                st_count, st_mean, st_m2 = _accumulate_stats(
                    st_count, st_mean, st_m2, _pick_layer(xs[0], xs[1], xs[2], xs[3], STATS_LAYER), counted)
            elif SOFTMAX:
                # online softmax over the valid positions; masked ones get exactly 0
                s = tl.where(valid, s, -1.0e30)
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                p = tl.where(valid, tl.exp(s - m_new), 0.0)
                correction = tl.exp(m_i - m_new)
                l_i = l_i * correction + tl.sum(p, axis=0)
                acc = acc * correction + tl.sum(p[:, None] * k, axis=0)
                m_i = m_new
            else:
                s = tl.where(valid, s, 0.0)
                acc += tl.sum(s[:, None] * k, axis=0)
            if STORE_SCORES:  # softmax: raw scores for now (fp32 buffer), normalised below
                tl.store(scores_ptr + b64 * stride_sb + offs_t, s, mask=tmask)
        if SOFTMAX:
            has_valid = l_i > 0
            l_safe = tl.where(has_valid, l_i, 1.0)
            acc = tl.where(has_valid, acc / l_safe, 0.0)  # a row with no valid position gives zeros
            lse = tl.where(has_valid, m_i + tl.log(l_safe), 0.0)
            tl.store(lse_ptr + b64, lse)
            if STORE_SCORES:
                tl.debug_barrier()  # the raw scores above were written by other threads of this program
                for t0 in range(0, reach, BLOCK_T):
                    offs_t = t0 + tl.arange(0, BLOCK_T)
                    tmask = offs_t < T
                    valid = _valid_positions(offs_t, T, b64, len_ptr, mask_ptr, stride_mb, stride_mt,
                                             HAS_LENGTHS, HAS_MASK)
                    s = tl.load(scores_ptr + b64 * stride_sb + offs_t, mask=tmask, other=0.0)
                    tl.store(scores_ptr + b64 * stride_sb + offs_t, tl.where(valid, tl.exp(s - lse), 0.0), mask=tmask)
        if STORE_SCORES:
            _store_zeros_past(scores_ptr + b64 * stride_sb, reach, T, 1, 1, BLOCK_T, 1)
        if STATS_LAYER == 0:
            tl.store(out_ptr + b64 * stride_ob + offs_d, acc, mask=dmask)
    if STATS_LAYER > 0:
        offs_hs = tl.arange(0, BLOCK_HS)
        part = pid * HS + offs_hs
        plane = num_programs * HS
        tl.store(stat_part_ptr + part, st_count, mask=offs_hs < HS)
        tl.store(stat_part_ptr + plane + part, st_mean, mask=offs_hs < HS)
        tl.store(stat_part_ptr + 2 * plane + part, st_m2, mask=offs_hs < HS)


@triton.jit
def _dice_batch_stats_kernel(part_ptr, n_parts, n_feat, stats_ptr, h_max, run_mean_ptr, run_var_ptr, momentum,
                             BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """Merge a statistics pass's partials in a fixed order (deterministic) into this layer's
    stats [3, h_max] (mean, biased var, count), and update the running statistics as
    nn.BatchNorm1d does (momentum, unbiased variance), on the device."""
    feats = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = feats < n_feat
    count, mean, m2 = merge_stat_partials(part_ptr, n_parts, n_feat, feats, BLOCK_P, BLOCK_H)
    count = tl.where(ok, count, 2.0)  # lanes past H are never stored: keep their math finite
    var = m2 / count
    tl.store(stats_ptr + feats, mean, mask=ok)
    tl.store(stats_ptr + h_max + feats, var, mask=ok)
    tl.store(stats_ptr + 2 * h_max + feats, count, mask=ok)
    update_running_stats(run_mean_ptr, run_var_ptr, feats, ok, mean, var, count, momentum)


@triton.jit
def _attention_pool_bwd_kernel(
    q_ptr, k_ptr, len_ptr, mask_ptr, grad_out_ptr, grad_scores_ptr, lse_ptr, delta_ptr,
    dq_ptr, dk_ptr,
    W, BIAS, ACTP, SLOPE_STRIDE, HID, eps,
    # per-program fp32 partials of every weight gradient: part [P, part_stride] (kernels/mlp.py)
    part_ptr, part_stride,
    # training-mode Dice: the sums passes' partials [L, 2, P, HMAX], the counted positions n
    sums_ptr, count_ptr,
    B, T, D,
    stride_qb, stride_kb, stride_kt, stride_mb, stride_mt, stride_gb, stride_gd, stride_gsb, stride_gst,
    HMAX, HS,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BH: tl.constexpr,
    NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr,
    DT: tl.constexpr, PRECISION: tl.constexpr,
    DICE_TRAIN: tl.constexpr, COUNT_ALL: tl.constexpr, SUMS_LAYER: tl.constexpr,
):
    """The backward pass. With DICE_TRAIN the Dice layers were normalised with batch statistics
    (passed as their mean/var; counted over all t < T with COUNT_ALL, else the valid positions), and
    each layer's gradient gets the part through those statistics, which needs the layer's
    S = sum_j dL/dx_hat_j and Q = sum_j dL/dx_hat_j x_hat_j over all positions. Those depend on the
    layers above, so first one pass per layer l from the top down, SUMS_LAYER = l, backpropagates to
    layer l with the known sums of the layers above and stores only per-program partials of
    (sum dL/dz, sum dL/dz x_hat) for z = (weight *) x_hat (+ bias) to its plane of sums; then the full
    pass (SUMS_LAYER = 0) runs with every layer's (S, Q) known."""
    BS, ACTS, wo, bo = _load_mlp_params(W, BIAS, ACTP, SLOPE_STRIDE, HID, eps, BH, NUM_LAYERS, ACT, AFFINE)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    stat_sums1 = _load_stat_sums(sums_ptr, 1, num_programs, HMAX, HID[0], ACTS[0], BH[0], DICE_TRAIN and SUMS_LAYER < 1)
    stat_sums2, stat_sums3, stat_sums4 = stat_sums1, stat_sums1, stat_sums1  # placeholders for absent layers
    if NUM_LAYERS >= 2:
        stat_sums2 = _load_stat_sums(sums_ptr, 2, num_programs, HMAX, HID[1], ACTS[1], BH[1],
                                      DICE_TRAIN and SUMS_LAYER < 2)
    if NUM_LAYERS >= 3:
        stat_sums3 = _load_stat_sums(sums_ptr, 3, num_programs, HMAX, HID[2], ACTS[2], BH[2],
                                      DICE_TRAIN and SUMS_LAYER < 3)
    if NUM_LAYERS >= 4:
        stat_sums4 = _load_stat_sums(sums_ptr, 4, num_programs, HMAX, HID[3], ACTS[3], BH[3],
                                      DICE_TRAIN and SUMS_LAYER < 4)
    inv_count = 0.0
    if DICE_TRAIN:
        inv_count = 1.0 / tl.load(count_ptr)

    # accumulators over this program's users (the fold's S1, S2, U and sum of dc_b; docs/design.md, "Backward")
    # (tile shapes from tensors: a shape list does not take an entry of the constexpr tuple BH)
    S1 = tl.zeros([BLOCK_D, BS[0].shape[0]], dtype=tl.float32)
    S2 = tl.zeros_like(S1)
    U = tl.zeros_like(S1)
    db1_acc = tl.zeros_like(BS[0])
    dact1 = _zero_act_grads(ACTS[0])
    # the deeper layers' (weight, bias, activation-parameter) accumulators
    grads2 = (tl.zeros([BS[0].shape[0], BS[1].shape[0]], dtype=tl.float32), tl.zeros_like(BS[1]),
              _zero_act_grads(ACTS[1]))
    grads3 = (tl.zeros([BS[1].shape[0], BS[2].shape[0]], dtype=tl.float32), tl.zeros_like(BS[2]),
              _zero_act_grads(ACTS[2]))
    grads4 = (tl.zeros([BS[2].shape[0], BS[3].shape[0]], dtype=tl.float32), tl.zeros_like(BS[3]),
              _zero_act_grads(ACTS[3]))
    dwo_acc = tl.zeros_like(wo)
    dbo_acc = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)

    for b in range(pid, B, num_programs):
        # int64: b * stride can pass 2^31. Cast inside the loop: the interpreter drops the type of
        # an int64 range start (tests/test_layouts.py checks the offsets past 2^31 on the CPU)
        b64 = tl.cast(b, tl.int64)
        q = tl.load(q_ptr + b64 * stride_qb + offs_d, mask=dmask, other=0.0).to(tl.float32)
        g = tl.load(grad_out_ptr + b64 * stride_gb + offs_d * stride_gd, mask=dmask, other=0.0).to(tl.float32)
        W_b, c_b = _fold_first_layer(W[0], BS[0], q, D, HID[0], BLOCK_D, BH[0])
        lse = 0.0
        delta = 0.0
        if SOFTMAX:
            lse = tl.load(lse_ptr + b64)
            delta = tl.load(delta_ptr + b64)  # sum_t w_t dL/dw_t = out_b . g_b (+ scores . grad_scores)
        dW_b = tl.zeros_like(W_b)
        dc_b = tl.zeros_like(BS[0])
        reach = _extent(T, b64, len_ptr, mask_ptr, stride_mb, stride_mt, HAS_LENGTHS, HAS_MASK, BLOCK_T)
        if DICE_TRAIN:
            if COUNT_ALL:  # the padding is in the batch statistics, so it gets their gradient
                reach = T
        for t0 in range(0, reach, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < T
            valid = _valid_positions(offs_t, T, b64, len_ptr, mask_ptr, stride_mb, stride_mt, HAS_LENGTHS, HAS_MASK)
            tile_offs = b64 * stride_kb + offs_t.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
            tile_mask = tmask[:, None] & dmask[None, :]
            # padding is never read (its key gradient comes out 0), except by statistics over all t < T
            read = valid
            if DICE_TRAIN:
                if COUNT_ALL:
                    read = tmask
            k = tl.load(k_ptr + tile_offs, mask=read[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s, xs, hs = _mlp_tile(k, W_b, c_b, W, BS, ACTS, wo, bo, HID, BH, NUM_LAYERS, ACT, DT, PRECISION)
            x1, x2, x3, x4 = xs
            h1, h2, h3, h4 = hs
            # gradient into the pooling weights w_t: k_t . g_b, plus any gradient into the returned scores
            dw = tl.sum(k * g[None, :], axis=1)
            if HAS_GRAD_SCORES:
                gs_ptrs = grad_scores_ptr + b64 * stride_gsb + offs_t * stride_gst
                dw += tl.load(gs_ptrs, mask=tmask, other=0.0).to(tl.float32)
            if SOFTMAX:
                w = tl.where(valid, tl.exp(s - lse), 0.0)
                ds = w * (dw - delta)
            else:
                w = tl.where(valid, s, 0.0)
                ds = tl.where(valid, dw, 0.0)
            dwo_acc += tl.sum(ds[:, None] * h4, axis=0)
            dbo_acc += tl.sum(ds, axis=0)
            dh = ds[:, None] * wo[None, :]
            counted = valid  # the positions in Dice's batch statistics
            if COUNT_ALL:
                counted = tmask
            # each layer: into its pre-activation (+ through the batch statistics), then its weights;
            # a sums pass stops at its layer
            dh, grads4 = _hidden_layer_bwd(dh, x4, h3, W, HID, ACTS[3], stat_sums4, inv_count, counted, grads4,
                                           4, NUM_LAYERS, SUMS_LAYER, ACT, DICE_TRAIN, DT, PRECISION)
            dh, grads3 = _hidden_layer_bwd(dh, x3, h2, W, HID, ACTS[2], stat_sums3, inv_count, counted, grads3,
                                           3, NUM_LAYERS, SUMS_LAYER, ACT, DICE_TRAIN, DT, PRECISION)
            dh, grads2 = _hidden_layer_bwd(dh, x2, h1, W, HID, ACTS[1], stat_sums2, inv_count, counted, grads2,
                                           2, NUM_LAYERS, SUMS_LAYER, ACT, DICE_TRAIN, DT, PRECISION)
            if SUMS_LAYER <= 1:
                G, dact1 = _pre_activation_grad(x1, dh, ACTS[0], stat_sums1, inv_count, counted, dact1, 1, SUMS_LAYER,
                                                ACT, DICE_TRAIN)
                if SUMS_LAYER == 0:
                    dW_b = dot(tl.trans(k), G, dW_b, DT, PRECISION)
                    dc_b += tl.sum(G, axis=0)
                    dk = dot(G, tl.trans(W_b), w[:, None] * g[None, :], DT, PRECISION)
                    dk_offs = b64 * T * D + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
                    tl.store(dk_ptr + dk_offs, dk, mask=tile_mask)
        if SUMS_LAYER == 0:
            _store_zeros_past(dk_ptr + b64 * T * D, reach, T, D, D, BLOCK_T, BLOCK_D)
            S1 += dW_b
            S2 += q[:, None] * dW_b
            U += q[:, None] * dc_b[None, :]
            db1_acc += dc_b
            dq = _fold_first_layer_grad_query(W[0], dW_b, dc_b, D, HID[0], BLOCK_D, BH[0])
            tl.store(dq_ptr + b64 * D + offs_d, dq, mask=dmask)

    pid64 = pid.to(tl.int64)
    if SUMS_LAYER > 0:  # a sums pass: only this layer's partials
        _, dg, de = _pick_layer(dact1, grads2[2], grads3[2], grads4[2], SUMS_LAYER)
        plane = sums_ptr + (SUMS_LAYER - 1) * 2 * num_programs * HMAX
        store_vector(plane + pid64 * HMAX, de, HS)
        store_vector(plane + (num_programs + pid64) * HMAX, dg, HS)
    else:
        # this program's partials; the accumulators hold W^T ([fan_in, H])
        store_partials(part_ptr + pid64 * part_stride, (U, S1, S2), db1_acc, dact1, grads2, grads3, grads4, dwo_acc,
                       dbo_acc, D, HID, SLOPE_STRIDE, NUM_LAYERS, ACT, AFFINE, True)


# ---------------------------------------------------------------------------------------------
# launchers


@functools.lru_cache(maxsize=None)  # asked on every CUDA call (attention_kernel_gap); hidden is a tuple
def shared_memory_estimate(dim: int, hidden: Tuple[int, ...], dtype: torch.dtype, dice_training: bool = False) -> int:
    """Bytes of shared memory the largest kernel variant a case launches needs per program on sm_90:
    the backward, or with training-mode Dice in fp32 its sums passes (SUMS_LAYER > 0), which ptxas
    put at 344 KB for D=64 200/80 and 377 KB for D=32 256/128/64 (issue 9): 1.64x and 1.94x the
    backward's estimate, so they count 2x. In bf16 the training builds fit as the backward does
    (tests/test_attention_dice_train.py).

    A fit to ptxas builds for sm_90 (bf16: D=32 80/40 -> 50 KB, D=64 256/128/64 -> 196 KB, D=64 512 ->
    160 KB, D=128 256/128 -> 260 KB; fp32 D=64 256/128/64 -> 220 KB): the operands of the products
    dominate, first the folded first layer (D x H1), then the deeper layers' weights.
    """
    blocks = [block(h) for h in hidden]
    fold = block(dim) * blocks[0]
    deeper = sum(a * b for a, b in zip(blocks[:-1], blocks[1:]))
    rows = _pick_block_t(1 << 30, list(hidden) + [dim], budget=2048) * (block(dim) + sum(blocks))
    estimate = 5 * fold + 3.125 * deeper + 1.5 * rows
    if dtype == torch.float32:
        estimate *= 2.0 * 1.1 if dice_training else 1.1
    return int(estimate)


def _num_programs(batch: int, device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return max(1, min(batch, 2))  # the interpreter pays ~1 ms per program instance
    return max(1, min(batch, multiprocessors(device) * per_sm))


def _pick_block_t(seq_len: int, widths: Sequence[int], budget: int) -> int:
    # keep a [BLOCK_T, widest layer] fp32 tile within `budget` elements: with the 80/40 layers,
    # ptxas (sm_90, 8 warps) showed no spills in the forward at 32 rows, and the least in the
    # backward at 16 (no GPU timing yet)
    cap = max(16, min(64, budget // block(max(widths))))
    return min(cap, block(seq_len))


def _per_layer(act_tensors, activation, dice_affine, layers):
    """The flat act_tensors as one list per hidden layer (kernels/mlp.py's convention)."""
    per_layer = {"prelu": 1, "dice": 5 if dice_affine else 3}.get(activation, 0)
    return [act_tensors[i * per_layer:(i + 1) * per_layer] for i in range(layers)] if per_layer else []


def _mlp_args(weights, biases, act_tensors, activation, dice_affine):
    """The kernels' (W, BIAS, ACTP, SLOPE_STRIDE) tuples (kernels/mlp.py) from flat act_tensors."""
    return layer_tuples(weights, biases, _per_layer(act_tensors, activation, dice_affine, len(weights) - 1),
                        activation)


def _common_meta(keys, weights, activation, affine, block_t, tile_budget):
    """(hidden sizes padded to 4 by repeating the last, the constexprs both kernels take)."""
    seq_len, dim = keys.shape[1], keys.shape[2]
    hidden = [w.shape[0] for w in weights[:-1]]
    sizes = tuple(hidden + [hidden[-1]] * (MAX_HIDDEN_LAYERS - len(hidden)))
    allow_tf32 = keys.is_cuda and tf32_matmuls()
    meta = dict(
        BLOCK_T=block_t or _pick_block_t(seq_len, hidden + [dim], tile_budget), BLOCK_D=block(dim),
        BH=tuple(block(h) for h in sizes), NUM_LAYERS=len(hidden), ACT=ACT_CODES[activation], AFFINE=affine,
        DT=TRITON_DTYPES[keys.dtype], PRECISION="tf32" if allow_tf32 else "ieee",
    )
    return sizes, meta


def _positions(lengths: Optional[Tensor], mask: Optional[Tensor]):
    # the kernel reads lengths at len_ptr + b: [B] with stride 1 (a column of a table is copied)
    lengths = lengths.contiguous() if lengths is not None else None
    # a bool mask is read as bytes (a view, no copy)
    mask_bytes = mask.view(torch.uint8) if mask is not None else None
    mask_strides = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    return lengths, mask_bytes, mask_strides


def attention_pool_forward(
    query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
    act_tensors: Sequence[Tensor], lengths: Optional[Tensor], mask: Optional[Tensor], activation: str,
    dice_eps: float, dice_affine: bool, softmax: bool, return_scores: bool,
    block_t: Optional[int] = None, num_programs: Optional[int] = None,
):
    """Launch the forward kernel. Returns (out [B, D] in keys' dtype, scores [B, T] or an empty
    tensor, lse [B] fp32 or an empty tensor; lse is the softmax log-sum-exp the backward needs).

    query [B, D] and keys [B, T, D] must have stride 1 in their last dim (keys may be expanded, e.g.
    stride 0 over B); weights are read in place (stride 1 in their last dim). act_tensors per hidden
    layer: [slope] for prelu, [alpha, mean, var(, weight, bias)] for dice, where mean/var are the
    running statistics (eval) or the batch statistics from `attention_dice_batch_stats` (training).
    """
    batch, seq_len, dim = keys.shape
    device = keys.device
    out = _new((batch, dim), keys.dtype, device)
    # softmax scores are normalised in place after the pass over T: keep them fp32 until then
    scores_dtype = torch.float32 if softmax else keys.dtype
    scores = _new((batch, seq_len) if return_scores else (0,), scores_dtype, device)
    lse = _new((batch,) if softmax else (0,), torch.float32, device)
    if batch == 0:
        return out, scores.to(keys.dtype), lse
    sizes, meta = _common_meta(keys, weights, activation, dice_affine, block_t, tile_budget=4096)
    lengths, mask_bytes, (stride_mb, stride_mt) = _positions(lengths, mask)
    grid = (num_programs or _num_programs(batch, device, per_sm=8),)  # untuned: no GPU measured yet
    _attention_pool_fwd_kernel[grid](
        query, keys, lengths, mask_bytes, out, scores, lse, None,
        *_mlp_args(weights, biases, act_tensors, activation, dice_affine), sizes, float(dice_eps),
        batch, seq_len, dim,
        query.stride(0), keys.stride(0), keys.stride(1), stride_mb, stride_mt, out.stride(0),
        scores.stride(0) if return_scores else 0, 0,
        HAS_LENGTHS=lengths is not None, HAS_MASK=mask is not None, SOFTMAX=softmax,
        STORE_SCORES=return_scores, STATS_LAYER=0, COUNT_ALL=False, BLOCK_HS=16,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, **meta,
    )
    return out, scores.to(keys.dtype), lse


def attention_dice_batch_stats(
    query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
    act_tensors: Sequence[Tensor], lengths: Optional[Tensor], mask: Optional[Tensor], dice_eps: float,
    dice_affine: bool, count_all: bool, momenta: Sequence[float],
    block_t: Optional[int] = None, num_programs: Optional[int] = None,
) -> Tensor:
    """Batch statistics of every training-mode Dice layer of the attention MLP, and the running
    statistics' update (in place, on the device, as nn.BatchNorm1d: momentum, unbiased variance).

    act_tensors: per hidden layer [alpha, running_mean, running_var(, weight, bias)]. The statistics
    of layer l's pre-activation are taken over the valid positions, or over all B*T with count_all,
    with the layers below l normalised by their own batch statistics: one pass over the keys per
    layer (per-program count/mean/M2 partials), then a fixed-order merge. Returns fp32
    [L, 3, max(H)]: per layer the mean, the biased variance and the count (repeated per feature);
    only the first H_l entries of a row are written.
    """
    batch, seq_len, _ = keys.shape
    device = keys.device
    hidden = [w.shape[0] for w in weights[:-1]]
    h_max = max(hidden)
    stats = _new((len(hidden), 3, h_max), torch.float32, device)
    sizes, meta = _common_meta(keys, weights, "dice", dice_affine, block_t, tile_budget=4096)
    lengths, mask_bytes, (stride_mb, stride_mt) = _positions(lengths, mask)
    # few programs: every partial is merged by the small kernel below (untuned: no GPU measured yet)
    programs = num_programs or _num_programs(max(batch, 1), device, per_sm=2)
    per_layer = 5 if dice_affine else 3
    act = list(act_tensors)
    for layer, width in enumerate(hidden):
        parts = _new((3, programs, width), torch.float32, device)
        _attention_pool_fwd_kernel[(programs,)](
            query, keys, lengths, mask_bytes, None, None, None, parts,
            *_mlp_args(weights, biases, act, "dice", dice_affine), sizes, float(dice_eps),
            batch, seq_len, keys.shape[2],
            query.stride(0), keys.stride(0), keys.stride(1), stride_mb, stride_mt, 0, 0, width,
            HAS_LENGTHS=lengths is not None, HAS_MASK=mask is not None, SOFTMAX=False, STORE_SCORES=False,
            STATS_LAYER=layer + 1, COUNT_ALL=count_all, BLOCK_HS=block(width),
            num_warps=NUM_WARPS, num_stages=NUM_STAGES, **meta,
        )
        block_h = min(block(width), 64)
        running_mean, running_var = act[layer * per_layer + 1], act[layer * per_layer + 2]
        _dice_batch_stats_kernel[(ceil_div(width, block_h),)](
            parts, programs, width, stats[layer], h_max, running_mean, running_var, float(momenta[layer]),
            BLOCK_P=min(next_power_of_2(programs), max(1, 4096 // block_h)), BLOCK_H=block_h,
        )
        # the passes for the layers above normalise this one with its batch statistics
        act[layer * per_layer + 1] = stats[layer, 0, :width]
        act[layer * per_layer + 2] = stats[layer, 1, :width]
    return stats


def attention_pool_backward(
    grad_out: Tensor, grad_scores: Optional[Tensor], query: Tensor, keys: Tensor,
    weights: Sequence[Tensor], biases: Sequence[Tensor], act_tensors: Sequence[Tensor],
    lengths: Optional[Tensor], mask: Optional[Tensor], lse: Tensor, delta: Optional[Tensor], activation: str,
    dice_eps: float, dice_affine: bool, softmax: bool, dice_count: Optional[Tensor] = None,
    dice_count_all: bool = False, block_t: Optional[int] = None, num_programs: Optional[int] = None,
) -> List[Tensor]:
    """Launch the backward kernel. grad_out [B, D] and grad_scores [B, T] (or None) with any strides
    (autograd hands expanded ones, e.g. for a plain .sum()); for softmax, lse from the forward and delta [B] fp32 = sum_t w_t dL/dw_t.
    Training-mode Dice: act_tensors hold the batch statistics as mean/var, dice_count is the fp32
    count of the positions they were taken over (one element) and dice_count_all says which
    (all t < T, or the valid ones); the gradients then include the terms through the statistics.

    Returns [dquery, dkeys, *dweights, *dbiases, *dact] where dact holds per hidden layer the
    slope's gradient (prelu) or alpha's (dice), then Dice's weight and bias (affine).
    """
    batch, seq_len, dim = keys.shape
    device = keys.device
    hidden = [w.shape[0] for w in weights[:-1]]
    # one program per SM: few fp32 weight-gradient partials to write and sum (untuned)
    programs = num_programs or _num_programs(batch, device, per_sm=1)
    dq = _new((batch, dim), query.dtype, device)
    dk = _new((batch, seq_len, dim), keys.dtype, device)
    slope_sizes = tuple([t.numel() for t in act_tensors]) if activation == "prelu" else ()
    layout = grad_layout(dim, tuple(hidden), activation, dice_affine, slope_sizes)
    if batch == 0:
        dq.zero_()
        dk.zero_()
        parts = torch.zeros((1, layout.width), dtype=torch.float32, device=device)
    else:
        parts = _new((programs, layout.width), torch.float32, device)
        sizes, meta = _common_meta(keys, weights, activation, dice_affine, block_t, tile_budget=2048)
        lengths, mask_bytes, (stride_mb, stride_mt) = _positions(lengths, mask)
        mlp_args = _mlp_args(weights, biases, act_tensors, activation, dice_affine)
        dice_train = dice_count is not None
        sums = _new((len(hidden), 2, programs, max(hidden)), torch.float32, device) if dice_train else None

        def launch(sums_layer, width):
            _attention_pool_bwd_kernel[(programs,)](
                query, keys, lengths, mask_bytes, grad_out, grad_scores, lse, delta, dq, dk,
                *mlp_args, sizes, float(dice_eps),
                parts, layout.width, sums, dice_count,
                batch, seq_len, dim,
                query.stride(0), keys.stride(0), keys.stride(1), stride_mb, stride_mt, *grad_out.stride(),
                *(grad_scores.stride() if grad_scores is not None else (0, 0)), max(hidden), width,
                HAS_LENGTHS=lengths is not None, HAS_MASK=mask is not None, SOFTMAX=softmax,
                HAS_GRAD_SCORES=grad_scores is not None, DICE_TRAIN=dice_train, COUNT_ALL=dice_count_all,
                SUMS_LAYER=sums_layer, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **meta,
            )

        if dice_train:  # the layers' (S, Q) through the batch statistics, from the top layer down
            for layer in reversed(range(len(hidden))):
                launch(layer + 1, hidden[layer])
        launch(0, 0)
    acts = _per_layer(act_tensors, activation, dice_affine, len(hidden))
    return [dq, dk, *sum_partials(parts, layout, weights, biases, acts, activation)]
