"""DIN attention pooling over packed rows: work in proportion to the real history.

The rows are the N = sum(lengths) valid positions of all users, numbered user by user (row r of user
b is its j-th valid position, j = r - offsets[b], offsets the exclusive cumsum of the lengths).
Padded positions are never loaded or computed. Inputs: padded keys [B, T, D] (any strides, stride 0
over B allowed) with lengths [B], or with a row->position map [B, T] (a mask's valid positions first,
see `packed_rows`), or jagged keys [N, D] with offsets [B+1] (TorchRec/FBGEMM values + offsets).

The first layer has constant weights (docs/design.md, "Packed rows"): with W1 split into its four
D-row blocks, x_t W1 + b1 = k Ak + (q*k) Ap + q Aq + b1 where Ak = Wk - Wd, Ap = Wp, Aq = Wq + Wd.
The three products are one [H1, 3D] x [3D, BLOCK_M] MMA (feature-major: the hidden tiles are
[H, rows], see `_mlp_fwd`), cut along K into three chained tl.dots that accumulate in one fp32
accumulator; the backward keeps one stacked copy [Ak | Ap | Aq | 0] for the recompute and for the
input gradients (`_stacked_first_layer`). The q Aq part is the per-user c_b = q_b (Wq + Wd), taken per row:
that costs one more MMA per tile but no separate launch and no [B, H1] buffer, and in the backward
U = sum q_b^T dc_b = sum_r q_r^T G1[r] and dq come out of the same per-row products. Every matrix
is the same for every row, so a program loads them once, in the compute dtype.

Work split (no atomics, no second pass over users): every program scans the lengths (once to find
N, once for the offsets; cheap next to the keys) and owns the users whose first row falls in its
share [p * ceil(N / P), (p + 1) * ceil(N / P)) of the rows. It walks its users' rows in tiles of
BLOCK_M consecutive rows across users. A user cut by a tile boundary is carried in registers to the
next tile (a segmented sum inside the tile plus the carry, in row order), so each user is finished
by its owner in a fixed order: deterministic, and the host never needs N (no .item() sync; the
grid is fixed). Per program work is its share plus at most one user's length.

Launches: forward 1; backward 2 (the per-tile backward writing per-program fp32 partials of every
weight gradient into one flat buffer, then one reduction in a fixed order). A mask adds the torch
ops of `packed_rows` (a count and a stable argsort).

Only Triton lives here: no autograd, no modules.
"""
import functools
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdin.kernels.launch import block, ceil_div, multiprocessors, tf32_matmuls
from fastdin.kernels.mlp import (ACT_CODES, MAX_HIDDEN_LAYERS, TRITON_DTYPES, GradLayout, act_bwd, act_fwd, dot,
                                 grad_layout, layer_tuples, load_act, load_vec, store_partials, sum_partials)

# Tests set this so every output and partial starts as NaN: an element a kernel fails to write fails.
POISON_OUTPUTS = False
# Untuned (no GPU measured yet): two warpgroups, which split the feature-major hidden tiles between
# them (`_mlp_fwd`; sm_90 builds at the paper shape: with 4 warps the softmax forward spills 60 B).
# The backward holds its weight-gradient accumulators across the tile loop, so it takes 16-row tiles:
# every product of its tile has M = a hidden width or 4 BLOCK_D, so they stay wgmma (sm_90 builds at the
# paper shape: 444 B of spills per thread with 32 rows, 100 B with 16; 1484 B before, row-major dk, 64 rows).
BLOCK_M = 64
# the forward over first layers wider than 128: with 64 rows the sm_90 builds spilled 84 B (D = 32,
# 256/128) and 60 B (the seed shape) per thread, with 32 rows 0 and 16 B
BLOCK_M_WIDE = 32
BLOCK_M_BWD = 16
BLOCK_B = 1024  # lengths scanned per step
NUM_WARPS_FWD = 8
NUM_WARPS_BWD = 8
NUM_STAGES = 1
NEG = tl.constexpr(-1.0e30)  # a score below every real one (masked rows)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# rows, users and positions


@triton.jit
def _user_length(b, B, T, NV, len_ptr, JAGGED: tl.constexpr):
    """Rows of user b (vector or scalar, int64), clamped so they can never address memory out of
    bounds: lengths to [0, T]; jagged offsets to 0 <= start <= stop <= N values."""
    ok = b < B
    if JAGGED:
        start = tl.minimum(tl.maximum(tl.load(len_ptr + b, mask=ok, other=0).to(tl.int64), 0), NV)
        stop = tl.minimum(tl.maximum(tl.load(len_ptr + b + 1, mask=ok, other=0).to(tl.int64), start), NV)
        n = stop - start
    else:
        n = tl.minimum(tl.maximum(tl.load(len_ptr + b, mask=ok, other=0).to(tl.int64), 0), T)
    return tl.where(ok, n, 0)


@triton.jit
def _own_users(len_ptr, offs_ptr, B, T, NV, BLOCK_B: tl.constexpr, JAGGED: tl.constexpr):
    """This program's users [u_begin, u_end) and rows [row_begin, row_end): the users whose first row
    falls in its share of the N rows. Stores their exclusive offsets to offs_ptr (int64 [B]; every
    program writes only its own users' entries, and reads only those)."""
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK_B).to(tl.int64)
    zero = tl.sum(tl.zeros([BLOCK_B], tl.int64), axis=0)
    total = zero
    for b0 in range(0, B, BLOCK_B):
        total += tl.sum(_user_length(b0 + lanes, B, T, NV, len_ptr, JAGGED), axis=0)
    share = tl.maximum((total + programs - 1) // programs, 1)
    lo = pid * share
    hi = lo + share
    hi = tl.where(pid == programs - 1, tl.maximum(hi, total + 1), hi)  # the users that start at N
    carry = zero
    u_begin = zero + B
    u_end = zero
    row_begin = zero + total
    row_end = zero
    for b0 in range(0, B, BLOCK_B):
        users = b0 + lanes
        n = _user_length(users, B, T, NV, len_ptr, JAGGED)
        incl = tl.cumsum(n, axis=0) + carry
        excl = incl - n
        owned = (users < B) & (excl >= lo) & (excl < hi)
        tl.store(offs_ptr + users, excl, mask=owned)
        u_begin = tl.minimum(u_begin, tl.min(tl.where(owned, users, B), axis=0))
        u_end = tl.maximum(u_end, tl.max(tl.where(owned, users + 1, 0), axis=0))
        row_begin = tl.minimum(row_begin, tl.min(tl.where(owned, excl, total), axis=0))
        row_end = tl.maximum(row_end, tl.max(tl.where(owned, incl, 0), axis=0))
        carry += tl.sum(n, axis=0)
    tl.debug_barrier()  # the offsets stored above are read by other threads of this program
    return u_begin, u_end, row_begin, row_end


@triton.jit
def _find_user(x, u_begin, u_end, offs_ptr, T, n_iter, PADDING: tl.constexpr):
    """The user of each packed row x (or, with PADDING, of each padding slot x, numbered b * T - offset
    user by user): the last owned user whose first row (slot) is <= x. A binary search, n_iter steps."""
    lo = tl.zeros_like(x) + u_begin
    hi = tl.zeros_like(x) + u_end
    for _ in range(n_iter):
        mid = (lo + hi) // 2
        key = tl.load(offs_ptr + mid)
        if PADDING:
            key = mid * T - key
        right = key <= x
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _position(user, j, live, T, NV, len_ptr, pos_ptr, JAGGED: tl.constexpr, POS_MAP: tl.constexpr):
    """Where the j-th valid position of `user` lives: index t along the second stride (the packed
    value index for jagged input, else the position in [0, T))."""
    if JAGGED:
        t = tl.minimum(tl.maximum(tl.load(len_ptr + user, mask=live, other=0).to(tl.int64), 0), NV) + j
    elif POS_MAP:
        t = tl.load(pos_ptr + user * T + j, mask=live, other=0).to(tl.int64)
    else:
        t = j
    return t


@triton.jit
def _same_user(user, u_begin, live):
    """[M, M]: row r and live row r' belong to one user. Compared as int32 offsets from the program's
    first user (its users number fewer than 2^31): an int64 [M, M] compare costs twice the registers
    (sm_90 builds: 104 -> 20 B of forward spills)."""
    local = (user - u_begin).to(tl.int32)
    return (local[:, None] == local[None, :]) & live[None, :]


@triton.jit
def _high_low(values, DT: tl.constexpr):
    """values as high + low, both in DT: a product of each with a 0/1 matrix keeps about 16 bits more
    than DT alone (far below its own rounding)."""
    high = values.to(DT)
    return high, (values - high.to(tl.float32)).to(DT)


@triton.jit
def _segment_totals_fm(same, values, DT: tl.constexpr):
    """For each row, the sum of feature-major `values` [X, M] over the rows of its user in this tile
    (`same` [M, M]: row r and live row r' belong to one user), as values same^T: the MMA's M is X
    (with the high and low parts of `_high_low` stacked, 2X), not the rows, so it stays wgmma with
    small tiles. Tensor cores for 16-bit compute dtypes; exact fp32 products (ieee) for fp32. A scan
    would do the same work, but Triton's interpreter runs a custom scan element by element in Python."""
    if DT == tl.float32:
        totals = tl.dot(values, tl.trans(same.to(tl.float32)), input_precision="ieee")
    else:
        high, low = _high_low(values, DT)
        both = tl.reshape(tl.permute(tl.join(high, low), (2, 0, 1)), [2 * values.shape[0], values.shape[1]])
        totals = tl.sum(tl.reshape(tl.dot(both, tl.trans(same.to(DT))), [2, values.shape[0], values.shape[1]]),
                        axis=0)
    return totals


@triton.jit
def _segment_totals(same, values, DT: tl.constexpr):
    """`_segment_totals_fm` of row-major values [M, X], returned row-major (transposed views)."""
    return tl.trans(_segment_totals_fm(same, tl.trans(values), DT))


@triton.jit
def _row_pick(tile, rows, which):
    """Row `which` of a [M, X] tile, as a vector [X]."""
    return tl.sum(tl.where((rows == which)[:, None], tile, 0.0), axis=0)


@triton.jit
def _row_pick_scalar(vec, rows, which):
    return tl.sum(tl.where(rows == which, vec, 0.0), axis=0)


# ---------------------------------------------------------------------------------------------
# weights and activations


@triton.jit
def _load_linear(w_ptr, n_out, n_in, col0, row_stride, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """fp32 [BLOCK_OUT, BLOCK_IN] tile of an nn.Linear weight's columns col0 .. col0 + n_in (0 outside)."""
    o = tl.arange(0, BLOCK_OUT)
    i = tl.arange(0, BLOCK_IN)
    ok = (o[:, None] < n_out) & (i[None, :] < n_in)
    return tl.load(w_ptr + o[:, None] * row_stride + col0 + i[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _load_first_layer(w1, D, H1, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, DT: tl.constexpr):
    """(Ak, Ap, Aq) = (Wk - Wd, Wp, Wq + Wd), each [BLOCK_H1, BLOCK_D] in nn.Linear layout, in DT."""
    wq = _load_linear(w1, H1, D, 0, 4 * D, BLOCK_H1, BLOCK_D)
    wk = _load_linear(w1, H1, D, D, 4 * D, BLOCK_H1, BLOCK_D)
    wd = _load_linear(w1, H1, D, 2 * D, 4 * D, BLOCK_H1, BLOCK_D)
    wp = _load_linear(w1, H1, D, 3 * D, 4 * D, BLOCK_H1, BLOCK_D)
    return (wk - wd).to(DT), wp.to(DT), (wq + wd).to(DT)


@triton.jit
def _load_mlp(W, BIAS, ACTP, SLOPE_STRIDE, HID, D, eps, BLOCK_D: tl.constexpr, BH: tl.constexpr,
              NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, DT: tl.constexpr):
    """Everything a program loads once: the first layer's (Ak, Ap, Aq), the deeper layers' weights
    ([H_l, H_l-1], nn.Linear layout, in DT), every bias and activation parameter, the score row and
    bias. Absent layers repeat layer 1's tensors as placeholders (never used)."""
    A = _load_first_layer(W[0], D, HID[0], BLOCK_D, BH[0], DT)
    b1 = load_vec(BIAS[0], HID[0], 1, BH[0], 0.0)
    act1 = load_act(ACTP[0], SLOPE_STRIDE[0], HID[0], eps, BH[0], ACT, AFFINE)
    w2, w3, w4 = A[0], A[0], A[0]
    b2, b3, b4 = b1, b1, b1
    act2, act3, act4 = act1, act1, act1
    if NUM_LAYERS >= 2:
        w2 = _load_linear(W[1], HID[1], HID[0], 0, HID[0], BH[1], BH[0]).to(DT)
        b2 = load_vec(BIAS[1], HID[1], 1, BH[1], 0.0)
        act2 = load_act(ACTP[1], SLOPE_STRIDE[1], HID[1], eps, BH[1], ACT, AFFINE)
    if NUM_LAYERS >= 3:
        w3 = _load_linear(W[2], HID[2], HID[1], 0, HID[1], BH[2], BH[1]).to(DT)
        b3 = load_vec(BIAS[2], HID[2], 1, BH[2], 0.0)
        act3 = load_act(ACTP[2], SLOPE_STRIDE[2], HID[2], eps, BH[2], ACT, AFFINE)
    if NUM_LAYERS >= 4:
        w4 = _load_linear(W[3], HID[3], HID[2], 0, HID[2], BH[3], BH[2]).to(DT)
        b4 = load_vec(BIAS[3], HID[3], 1, BH[3], 0.0)
        act4 = load_act(ACTP[3], SLOPE_STRIDE[3], HID[3], eps, BH[3], ACT, AFFINE)
    wo = load_vec(W[NUM_LAYERS], HID[NUM_LAYERS - 1], 1, BH[NUM_LAYERS - 1], 0.0)
    bo = tl.load(BIAS[NUM_LAYERS]).to(tl.float32)
    return A, (w2, w3, w4), (b1, b2, b3, b4), (act1, act2, act3, act4), wo, bo


@triton.jit
def _tile_offsets(tile):
    rows = tl.arange(0, tile.shape[0])
    cols = tl.arange(0, tile.shape[1])
    return rows[:, None] * tile.shape[1] + cols[None, :]


@triton.jit
def _through_memory(tile, ptr):
    """tile stored row-major at ptr and read back (a barrier between: the threads that read an element
    are not those that wrote it); returns the tile read and the pointer past it."""
    offs = _tile_offsets(tile)
    tl.store(ptr + offs, tile)
    tl.debug_barrier()
    return tl.load(ptr + offs), ptr + tile.shape[0] * tile.shape[1]


@triton.jit
def _staged(A, WD, ptr, NUM_LAYERS: tl.constexpr):
    """The folded first layer, stacked (`_stacked_first_layer`), and the deeper weights, in the
    compute dtype, passed through global memory (this program's partials row, which is written only at
    the end; `_plan` makes it wide enough). An MMA operand computed in registers (the fold, the dtype
    conversion) is kept there as a register A operand by Triton; read from memory it goes to shared
    memory, once (sm_90 builds of the backward at the paper shape, 64-row tiles: 1612 -> 1484 B of
    spills, 110592 -> 69632 B of shared memory)."""
    first = ptr
    for i in tl.static_range(3):
        tl.store(ptr + _tile_offsets(A[i]), A[i])
        ptr += A[i].shape[0] * A[i].shape[1]
    w2, w3, w4 = WD
    if NUM_LAYERS >= 2:
        w2, ptr = _through_memory(w2, ptr)
    if NUM_LAYERS >= 3:
        w3, ptr = _through_memory(w3, ptr)
    if NUM_LAYERS >= 4:
        w4, ptr = _through_memory(w4, ptr)
    tl.debug_barrier()
    return _stacked_first_layer(first, A[0].shape[0], A[0].shape[1]), (w2, w3, w4)


@triton.jit
def _stacked_first_layer(ptr, H1: tl.constexpr, BLOCK_D: tl.constexpr):
    """AS = [Ak | Ap | Aq | 0]^T, [4 BLOCK_D, H1], read from where `_staged` wrote Ak, Ap, Aq ([H1,
    BLOCK_D] each, back to back); the zero block makes the stacked size a power of two. The backward's
    one copy of the first layer: x1^T = AS^T [k | qk | q | 0]^T and the input gradients AS G1."""
    i = tl.arange(0, 4 * BLOCK_D)
    h = tl.arange(0, H1)
    offs = (i // BLOCK_D)[:, None] * (H1 * BLOCK_D) + h[None, :] * BLOCK_D + (i % BLOCK_D)[:, None]
    return tl.load(ptr + offs, mask=(i < 3 * BLOCK_D)[:, None], other=0.0)


@triton.jit
def _input_grads_fm(AS, G1, q, k, DT: tl.constexpr, PRECISION: tl.constexpr):
    """The first layer's gradients into a tile's keys and queries, feature-major [D, rows]: from
    X = AS G1 = [Ak^T G1; Ap^T G1; Aq^T G1; 0] (AS from `_stacked_first_layer`, G1 [H1, rows]),
    dL/dk = Ak^T G1 + q * Ap^T G1 and dL/dq = Aq^T G1 + k * Ap^T G1 per row. One product with
    M = 4 BLOCK_D: a wgmma whatever the rows (row-major, G1^T A has M = rows)."""
    X = dot(AS, G1, tl.zeros([AS.shape[0], G1.shape[1]], tl.float32), DT, PRECISION)
    X = tl.reshape(X, [4, AS.shape[0] // 4, G1.shape[1]])
    part = tl.arange(0, 4)[:, None, None]
    q_t = tl.trans(q.to(tl.float32))[None, :, :]
    k_t = tl.trans(k.to(tl.float32))[None, :, :]
    dk = tl.sum(tl.where(part == 0, X, 0.0) + tl.where(part == 1, X * q_t, 0.0), axis=0)
    dq = tl.sum(tl.where(part == 2, X, 0.0) + tl.where(part == 1, X * k_t, 0.0), axis=0)
    return dk, dq


def staged_elements(block_d: int, blocks: Sequence[int]) -> int:
    """Elements `_staged` writes: the padded [H1, D] blocks Ak, Ap, Aq and every deeper [H_l, H_l-1]
    weight."""
    return 3 * blocks[0] * block_d + sum(a * b for a, b in zip(blocks[:-1], blocks[1:]))


@triton.jit
def _act_fm(x, act, ACT: tl.constexpr):
    """`act_fwd` of a feature-major [features, rows] tile, through transposed views (no data moves)."""
    return tl.trans(act_fwd(tl.trans(x), act, ACT))


@triton.jit
def _saved(x, h, DT: tl.constexpr, ACT: tl.constexpr):
    """What the backward keeps of a layer, in the compute dtype (as autograd saves it in the inputs'
    dtype): the activation for sigmoid and ReLU, the pre-activation for PReLU and Dice."""
    if ACT <= 1:
        kept = h.to(DT)
    else:
        kept = x.to(DT)
    return kept


@triton.jit
def _activation_of_saved(kept, act, ACT: tl.constexpr):
    if ACT <= 1:
        h = kept.to(tl.float32)
    else:
        h = _act_fm(kept.to(tl.float32), act, ACT)
    return h


@triton.jit
def _deep_fwd(kept_below, h_below, w, bias, act, LAYER: tl.constexpr, NUM_LAYERS: tl.constexpr,
              ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
    """Hidden layer LAYER >= 2 on [H, rows] tiles: (what the backward keeps, activation); an absent
    layer passes the one below on."""
    kept, h = kept_below, h_below
    if NUM_LAYERS >= LAYER:
        acc = tl.zeros([w.shape[0], h_below.shape[1]], tl.float32)
        x = dot(w, h_below, acc, DT, PRECISION) + bias[:, None]
        h = _act_fm(x, act, ACT)
        kept = _saved(x, h, DT, ACT)
    return kept, h


@triton.jit
def _mlp_fwd(k, qk, q, A, WD, BS, ACTS, wo, bo, NUM_LAYERS: tl.constexpr, ACT: tl.constexpr,
             DT: tl.constexpr, PRECISION: tl.constexpr, STACKED: tl.constexpr):
    """Scores [rows] of a tile of rows (k, qk, q: [rows, D]), what the backward keeps of every hidden
    layer (`_saved`; layers past NUM_LAYERS repeat the last one), and the last hidden activation.

    Feature-major: every hidden tile is [H, rows], x^T = W h_below^T, so the MMA's M is the hidden
    width and its N the rows. Triton puts all warps along M for chained products, and a 64-row tile
    row-major would be held whole by each warpgroup; feature-major, H1 = 128 is split between the
    two warpgroups of 8 warps (docs/design.md, "What the sm_90 builds say")."""
    if STACKED:  # A is AS (`_stacked_first_layer`): one product over [k | qk | q | 0]
        kin = tl.reshape(tl.permute(tl.join(tl.join(k, qk), tl.join(q, tl.zeros_like(q))), (0, 3, 2, 1)),
                         [k.shape[0], 4 * k.shape[1]])
        acc = dot(tl.trans(A), tl.trans(kin), tl.zeros([A.shape[1], k.shape[0]], tl.float32), DT, PRECISION)
    else:
        Ak, Ap, Aq = A
        acc = tl.zeros([Ak.shape[0], k.shape[0]], tl.float32)
        acc = dot(Ak, tl.trans(k), acc, DT, PRECISION)
        acc = dot(Ap, tl.trans(qk), acc, DT, PRECISION)
        acc = dot(Aq, tl.trans(q), acc, DT, PRECISION)
    x1 = acc + BS[0][:, None]
    h1 = _act_fm(x1, ACTS[0], ACT)
    kept1 = _saved(x1, h1, DT, ACT)
    kept2, h2 = _deep_fwd(kept1, h1, WD[0], BS[1], ACTS[1], 2, NUM_LAYERS, ACT, DT, PRECISION)
    kept3, h3 = _deep_fwd(kept2, h2, WD[1], BS[2], ACTS[2], 3, NUM_LAYERS, ACT, DT, PRECISION)
    kept4, h4 = _deep_fwd(kept3, h3, WD[2], BS[3], ACTS[3], 4, NUM_LAYERS, ACT, DT, PRECISION)
    s = tl.sum(h4 * wo[:, None], axis=0) + bo
    return s, (kept1, kept2, kept3, kept4), h4


@triton.jit
def _load_tile(r0, row_end, u_begin, u_end, offs_ptr, len_ptr, pos_ptr, q_ptr, k_ptr, B, T, NV, n_iter,
               stride_qb, stride_kb, stride_kt, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D,
               JAGGED: tl.constexpr, POS_MAP: tl.constexpr, DT: tl.constexpr):
    """A tile of BLOCK_M packed rows from r0: their users, positions, keys, queries and q * k."""
    rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
    live = rows < row_end
    user = _find_user(rows, u_begin, u_end, offs_ptr, T, n_iter, False)
    j = rows - tl.load(offs_ptr + user)
    n = _user_length(user, B, T, NV, len_ptr, JAGGED)
    t = _position(user, j, live, T, NV, len_ptr, pos_ptr, JAGGED, POS_MAP)
    offs_d = tl.arange(0, BLOCK_D)
    ok = live[:, None] & (offs_d < D)[None, :]
    k = tl.load(k_ptr + user[:, None] * stride_kb + t[:, None] * stride_kt + offs_d[None, :], mask=ok, other=0.0)
    q = tl.load(q_ptr + user[:, None] * stride_qb + offs_d[None, :], mask=ok, other=0.0)
    qk = (q.to(tl.float32) * k.to(tl.float32)).to(DT)
    ends = live & (j == n - 1)  # the user's last row
    return rows, live, user, t, ok, k, q, qk, ends


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _packed_fwd_kernel(
    q_ptr, k_ptr, len_ptr, pos_ptr, offs_ptr, out_ptr, scores_ptr, raw_ptr, lse_ptr,
    W, BIAS, ACTP, SLOPE_STRIDE, HID, eps,
    B, T, D, NV, n_iter,
    stride_qb, stride_kb, stride_kt, stride_ob, stride_sb, stride_st,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BH: tl.constexpr, BLOCK_B: tl.constexpr,
    NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, JAGGED: tl.constexpr,
    POS_MAP: tl.constexpr, SOFTMAX: tl.constexpr, STORE_SCORES: tl.constexpr,
    DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[b] = sum_r w_r k_r over this program's users; w = scores or their segmented softmax. With
    SOFTMAX, lse[b] for the backward. STORE_SCORES: the weights at scores[b * stride_sb + t * stride_st],
    zeros at the padding (padded input), the raw scores of a softmax first kept in raw_ptr (fp32)."""
    u_begin, u_end, row_begin, row_end = _own_users(len_ptr, offs_ptr, B, T, NV, BLOCK_B, JAGGED)
    A, WD, BS, ACTS, wo, bo = _load_mlp(W, BIAS, ACTP, SLOPE_STRIDE, HID, D, eps, BLOCK_D, BH, NUM_LAYERS, ACT,
                                        AFFINE, DT)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    lanes = tl.arange(0, BLOCK_M)
    # the user cut by the last tile boundary: (user, running max, running sum of exp, pooled sum)
    carry_user = u_begin * 0 - 1
    carry_m = tl.sum(tl.zeros([BLOCK_M], tl.float32), axis=0) + NEG
    carry_l = carry_m * 0.0
    carry_acc = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_M):
        rows, live, user, t, ok, k, q, qk, ends = _load_tile(
            r0, row_end, u_begin, u_end, offs_ptr, len_ptr, pos_ptr, q_ptr, k_ptr, B, T, NV, n_iter,
            stride_qb, stride_kb, stride_kt, BLOCK_M, BLOCK_D, D, JAGGED, POS_MAP, DT)
        s, _kept, _h = _mlp_fwd(k, qk, q, A, WD, BS, ACTS, wo, bo, NUM_LAYERS, ACT, DT, PRECISION, False)
        carried = live & (user == carry_user)
        kf = k.to(tl.float32)
        last = tl.minimum(r0 + BLOCK_M, row_end) - 1  # the tile's last live row
        same = _same_user(user, u_begin, live)
        if SOFTMAX:
            s = tl.where(live, s, NEG)
            m = tl.max(tl.where(same, s[None, :], NEG), axis=1)  # per segment
            m = tl.where(carried, tl.maximum(m, carry_m), m)
            p = tl.where(live, tl.exp(s - m), 0.0)
            scale = tl.where(carried, tl.exp(carry_m - m), 0.0)
            l_sum = tl.sum(tl.where(same, p[None, :], 0.0), axis=1) + scale * carry_l
            l_sum = tl.where(live, l_sum, 1.0)  # > 0 on live rows; the rest are never stored
            acc = _segment_totals(same, p[:, None] * kf, DT) + scale[:, None] * carry_acc[None, :]
            out = acc / l_sum[:, None]
            tl.store(lse_ptr + user, m + tl.log(l_sum), mask=ends)
            if STORE_SCORES:
                tl.store(raw_ptr + rows, s, mask=live)
            carry_m = _row_pick_scalar(m, rows, last)
            carry_l = _row_pick_scalar(l_sum, rows, last)
            carry_acc = _row_pick(acc, rows, last)
        else:
            w = tl.where(live, s, 0.0)
            out = _segment_totals(same, w[:, None] * kf, DT) + tl.where(carried[:, None], carry_acc[None, :], 0.0)
            if STORE_SCORES:
                tl.store(scores_ptr + user * stride_sb + t * stride_st, w, mask=live)
            carry_acc = _row_pick(out, rows, last)
        tl.store(out_ptr + user[:, None] * stride_ob + offs_d[None, :], out, mask=ends[:, None] & dmask[None, :])
        last_ends = tl.sum(tl.where(rows == last, ends.to(tl.int32), 0), axis=0) > 0
        carry_user = tl.where(last_ends, -1, tl.sum(tl.where(rows == last, user, 0), axis=0))

    # users with no valid position: zeros, never NaN
    _zero_empty_users(out_ptr, stride_ob, D, u_begin, u_end, len_ptr, B, T, NV, BLOCK_M, BLOCK_D, JAGGED)
    if SOFTMAX:
        _zero_empty_users(lse_ptr, 1, 1, u_begin, u_end, len_ptr, B, T, NV, BLOCK_M, 1, JAGGED)
    if STORE_SCORES:
        if SOFTMAX:  # normalise the raw scores now that every owned user's log-sum-exp is known
            tl.debug_barrier()
            for r0 in range(row_begin, row_end, BLOCK_M):
                rows = r0 + lanes.to(tl.int64)
                live = rows < row_end
                user = _find_user(rows, u_begin, u_end, offs_ptr, T, n_iter, False)
                j = rows - tl.load(offs_ptr + user)
                t = _position(user, j, live, T, NV, len_ptr, pos_ptr, JAGGED, POS_MAP)
                w = tl.exp(tl.load(raw_ptr + rows, mask=live, other=0.0) - tl.load(lse_ptr + user, mask=live, other=0.0))
                tl.store(scores_ptr + user * stride_sb + t * stride_st, w, mask=live)
        if not JAGGED:
            _store_padding_zeros(scores_ptr, 1, stride_sb, stride_st, u_begin, u_end, row_end, offs_ptr, len_ptr,
                                 pos_ptr, B, T, NV, n_iter, BLOCK_M, 1, POS_MAP)


@triton.jit
def _zero_empty_users(ptr, stride_b, width, u_begin, u_end, len_ptr, B, T, NV, BLOCK_U: tl.constexpr,
                      BLOCK_W: tl.constexpr, JAGGED: tl.constexpr):
    """Zeros in the rows [b, :width] of an output for this program's users with no valid position."""
    users = tl.arange(0, BLOCK_U).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    for b0 in range(u_begin, u_end, BLOCK_U):
        b = b0 + users
        empty = (b < u_end) & (_user_length(b, B, T, NV, len_ptr, JAGGED) == 0)
        tl.store(ptr + b[:, None] * stride_b + cols[None, :], tl.zeros([BLOCK_U, BLOCK_W], tl.float32),
                 mask=empty[:, None] & (cols < width)[None, :])


@triton.jit
def _store_padding_zeros(ptr, width, stride_b, stride_t, u_begin, u_end, row_end, offs_ptr, len_ptr, pos_ptr,
                         B, T, NV, n_iter, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, POS_MAP: tl.constexpr):
    """Zeros at the padding positions of this program's users in a [B, T(, width)] output. The padding
    slots are numbered user by user (user b's start at b * T - offset_b), so this too is tiled and
    costs in proportion to the padding."""
    lanes = tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    slot_begin = u_begin * T - tl.load(offs_ptr + u_begin, mask=u_begin < u_end, other=0)
    slot_end = u_end * T - row_end
    for s0 in range(slot_begin, slot_end, BLOCK_M):
        slots = s0 + lanes
        live = slots < slot_end
        user = _find_user(slots, u_begin, u_end, offs_ptr, T, n_iter, True)
        first = user * T - tl.load(offs_ptr + user)
        j = _user_length(user, B, T, NV, len_ptr, False) + slots - first
        t = _position(user, j, live, T, NV, len_ptr, pos_ptr, False, POS_MAP)
        ok = live[:, None] & (cols < width)[None, :]
        tl.store(ptr + user[:, None] * stride_b + t[:, None] * stride_t + cols[None, :],
                 tl.zeros([BLOCK_M, BLOCK_W], tl.float32), mask=ok)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _act_bwd_saved(kept, dh, act, ACT: tl.constexpr):
    """`act_bwd` of [H, rows] tiles from what the forward kept (`_saved`)."""
    if ACT == 0:
        h = kept.to(tl.float32)
        dx = dh * h * (1.0 - h)
        da = tl.sum(tl.zeros_like(dh), axis=1)
        result = dx, (da, da, da)
    elif ACT == 1:
        da = tl.sum(tl.zeros_like(dh), axis=1)
        result = tl.where(kept > 0, dh, 0.0), (da, da, da)
    else:
        dx, dact = act_bwd(tl.trans(kept.to(tl.float32)), tl.trans(dh), act, ACT)
        result = tl.trans(dx), dact
    return result


@triton.jit
def _deep_bwd(dh, kept, kept_below, w, act, act_below, grads, LAYER: tl.constexpr, NUM_LAYERS: tl.constexpr,
              ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
    """Hidden layer LAYER >= 2 on [H, rows] tiles: dL/dh_l into dL/dh_l-1, adding to
    grads = (dW^T [H_l-1, H_l], db, dact). dW is accumulated transposed so the MMA's M is H_l-1."""
    dwT, db, dact = grads
    if NUM_LAYERS >= LAYER:
        G, tile_dact = _act_bwd_saved(kept, dh, act, ACT)
        h_below = _activation_of_saved(kept_below, act_below, ACT)
        dwT = dot(h_below, tl.trans(G), dwT, DT, PRECISION)
        db += tl.sum(G, axis=1)
        dact = (dact[0] + tile_dact[0], dact[1] + tile_dact[1], dact[2] + tile_dact[2])
        dh = dot(tl.trans(w), G, tl.zeros([w.shape[1], G.shape[1]], tl.float32), DT, PRECISION)
    return dh, (dwT, db, dact)


@triton.jit
def _zero_grads(bias, BLOCK_IN: tl.constexpr):
    z = tl.zeros_like(bias)
    return tl.zeros([BLOCK_IN, bias.shape[0]], tl.float32), z, (z, z, z)


@triton.jit
def _transposed(grads):
    """(dW^T, db, dact) as (dW, db, dact): a view, no data moves."""
    return tl.trans(grads[0]), grads[1], grads[2]


@triton.jit
def _packed_bwd_kernel(
    q_ptr, k_ptr, len_ptr, pos_ptr, offs_ptr, out_ptr, lse_ptr, scores_ptr, go_ptr, gs_ptr, delta_ptr,
    dq_ptr, dk_ptr, part_ptr,
    W, BIAS, ACTP, SLOPE_STRIDE, HID, eps,
    B, T, D, NV, n_iter, part_stride,
    stride_qb, stride_kb, stride_kt, stride_ob, stride_sb, stride_st, stride_gb, stride_gd,
    stride_gsb, stride_gst, stride_dkb, stride_dkt,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BH: tl.constexpr, BLOCK_B: tl.constexpr,
    NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, JAGGED: tl.constexpr,
    POS_MAP: tl.constexpr, SOFTMAX: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr,
    DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """The backward over this program's users: dk per row (zeros at the padding), dq per user, and this
    program's fp32 partials of every weight gradient into part[pid, :] (the layout of `_grad_layout`).
    dWq = U, dWk = S_k, dWd = U - S_k, dWp = S_p, db1 = sum G1 with S_k = sum k^T G1,
    S_p = sum (q*k)^T G1, U = sum q^T G1 over the program's rows (docs/design.md, "Packed rows")."""
    u_begin, u_end, row_begin, row_end = _own_users(len_ptr, offs_ptr, B, T, NV, BLOCK_B, JAGGED)
    A, WD, BS, ACTS, wo, bo = _load_mlp(W, BIAS, ACTP, SLOPE_STRIDE, HID, D, eps, BLOCK_D, BH, NUM_LAYERS, ACT,
                                        AFFINE, DT)
    AS, WD = _staged(A, WD, (part_ptr + tl.program_id(0).to(tl.int64) * part_stride).to(tl.pointer_type(DT)),
                     NUM_LAYERS)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    lanes = tl.arange(0, BLOCK_M)
    if SOFTMAX and HAS_GRAD_SCORES:
        # delta_b gets sum_r w_r dL/dw_r over the user's rows: a segmented sum first, stored per user
        carry_user = u_begin * 0 - 1
        carry = tl.sum(tl.zeros([BLOCK_M], tl.float32), axis=0)
        for r0 in range(row_begin, row_end, BLOCK_M):
            rows = r0 + lanes.to(tl.int64)
            live = rows < row_end
            user = _find_user(rows, u_begin, u_end, offs_ptr, T, n_iter, False)
            j = rows - tl.load(offs_ptr + user)
            n = _user_length(user, B, T, NV, len_ptr, JAGGED)
            t = _position(user, j, live, T, NV, len_ptr, pos_ptr, JAGGED, POS_MAP)
            ends = live & (j == n - 1)
            w = tl.load(scores_ptr + user * stride_sb + t * stride_st, mask=live, other=0.0).to(tl.float32)
            gs = tl.load(gs_ptr + user * stride_gsb + t * stride_gst, mask=live, other=0.0).to(tl.float32)
            same = _same_user(user, u_begin, live)
            total = tl.sum(tl.where(same, (w * gs)[None, :], 0.0), axis=1) + tl.where(user == carry_user, carry, 0.0)
            tl.store(delta_ptr + user, total, mask=ends)
            last = tl.minimum(r0 + BLOCK_M, row_end) - 1
            carry = _row_pick_scalar(total, rows, last)
            carry_user = tl.sum(tl.where(rows == last, user, 0), axis=0)
        tl.debug_barrier()

    # per-program accumulators: the first layer's S_k, S_p, U ([H1, D], nn.Linear layout) and db1,
    # then (dW^T, db, dact) of the deeper layers, the score layer's
    S_k = tl.zeros(A[0].shape, tl.float32)
    S_p = tl.zeros(A[0].shape, tl.float32)
    U = tl.zeros(A[0].shape, tl.float32)
    db1 = tl.zeros([A[0].shape[0]], tl.float32)
    dact1 = (db1, db1, db1)
    grads2 = _zero_grads(BS[1], BH[0])
    grads3 = _zero_grads(BS[2], BH[1])
    grads4 = _zero_grads(BS[3], BH[2])
    dwo = tl.zeros_like(wo)
    dbo = tl.sum(tl.zeros([BLOCK_M], tl.float32), axis=0)
    carry_user = u_begin * 0 - 1
    carry_dq = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_M):
        rows, live, user, t, ok, k, q, qk, ends = _load_tile(
            r0, row_end, u_begin, u_end, offs_ptr, len_ptr, pos_ptr, q_ptr, k_ptr, B, T, NV, n_iter,
            stride_qb, stride_kb, stride_kt, BLOCK_M, BLOCK_D, D, JAGGED, POS_MAP, DT)
        s, kept, h_top = _mlp_fwd(k, qk, q, AS, WD, BS, ACTS, wo, bo, NUM_LAYERS, ACT, DT, PRECISION, True)
        kf = k.to(tl.float32)
        g = tl.load(go_ptr + user[:, None] * stride_gb + offs_d[None, :] * stride_gd, mask=ok, other=0.0)
        g = g.to(tl.float32)
        dw = tl.sum(kf * g, axis=1)  # dL/dw_r = k_r . g_b (+ the returned scores' gradient)
        if HAS_GRAD_SCORES:
            dw += tl.load(gs_ptr + user * stride_gsb + t * stride_gst, mask=live, other=0.0).to(tl.float32)
        if SOFTMAX:
            w = tl.where(live, tl.exp(s - tl.load(lse_ptr + user, mask=live, other=0.0)), 0.0)
            o = tl.load(out_ptr + user[:, None] * stride_ob + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
            delta = tl.sum(o * g, axis=1)
            if HAS_GRAD_SCORES:
                delta += tl.load(delta_ptr + user, mask=live, other=0.0)
            ds = w * (dw - delta)
        else:
            w = tl.where(live, s, 0.0)
            ds = tl.where(live, dw, 0.0)
        dwo += tl.sum(h_top * ds[None, :], axis=1)
        dbo += tl.sum(ds, axis=0)
        dh = wo[:, None] * ds[None, :]
        kept1, kept2, kept3, kept4 = kept
        dh, grads4 = _deep_bwd(dh, kept4, kept3, WD[2], ACTS[3], ACTS[2], grads4, 4, NUM_LAYERS, ACT, DT, PRECISION)
        dh, grads3 = _deep_bwd(dh, kept3, kept2, WD[1], ACTS[2], ACTS[1], grads3, 3, NUM_LAYERS, ACT, DT, PRECISION)
        dh, grads2 = _deep_bwd(dh, kept2, kept1, WD[0], ACTS[1], ACTS[0], grads2, 2, NUM_LAYERS, ACT, DT, PRECISION)
        G1, tile_dact = _act_bwd_saved(kept1, dh, ACTS[0], ACT)
        dact1 = (dact1[0] + tile_dact[0], dact1[1] + tile_dact[1], dact1[2] + tile_dact[2])
        S_k = dot(G1, k, S_k, DT, PRECISION)
        S_p = dot(G1, qk, S_p, DT, PRECISION)
        U = dot(G1, q, U, DT, PRECISION)
        db1 += tl.sum(G1, axis=1)
        dk_mlp, dq_rows = _input_grads_fm(AS, G1, q, kf, DT, PRECISION)
        dk = tl.trans(dk_mlp) + w[:, None] * g
        tl.store(dk_ptr + user[:, None] * stride_dkb + t[:, None] * stride_dkt + offs_d[None, :], dk, mask=ok)
        # dq_b = the sum of dq_rows over the user's rows: segmented, carried across tiles
        carried = live & (user == carry_user)
        same = _same_user(user, u_begin, live)
        dq = tl.trans(_segment_totals_fm(same, dq_rows, DT)) + tl.where(carried[:, None], carry_dq[None, :], 0.0)
        tl.store(dq_ptr + user[:, None] * D + offs_d[None, :], dq, mask=ends[:, None] & dmask[None, :])
        last = tl.minimum(r0 + BLOCK_M, row_end) - 1
        carry_dq = _row_pick(dq, rows, last)
        last_ends = tl.sum(tl.where(rows == last, ends.to(tl.int32), 0), axis=0) > 0
        carry_user = tl.where(last_ends, -1, tl.sum(tl.where(rows == last, user, 0), axis=0))

    _zero_empty_users(dq_ptr, D, D, u_begin, u_end, len_ptr, B, T, NV, BLOCK_M, BLOCK_D, JAGGED)
    if not JAGGED:
        _store_padding_zeros(dk_ptr, D, stride_dkb, stride_dkt, u_begin, u_end, row_end, offs_ptr, len_ptr, pos_ptr,
                             B, T, NV, n_iter, BLOCK_M, BLOCK_D, POS_MAP)

    tl.debug_barrier()  # every staged weight is read before the row is overwritten
    store_partials(part_ptr + tl.program_id(0).to(tl.int64) * part_stride, (U, S_k, S_p), db1, dact1,
                   _transposed(grads2), _transposed(grads3), _transposed(grads4), dwo, dbo, D, HID, SLOPE_STRIDE,
                   NUM_LAYERS, ACT, AFFINE, False)


# ---------------------------------------------------------------------------------------------
# launchers


class PackedRows(NamedTuple):
    """How the rows are found: `source` is lengths [B] or, when `jagged`, offsets [B+1]; `positions`
    is None or a [B, T] map whose row b lists user b's valid positions first (from a mask)."""

    source: Tensor
    positions: Optional[Tensor]
    jagged: bool


def packed_rows(lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                offsets: Optional[Tensor] = None, batch: int = 0, seq_len: int = 0,
                device=None) -> PackedRows:
    """The PackedRows of lengths [B], a bool mask [B, T], jagged offsets [B+1], or none (all T valid).
    No host sync: a mask becomes per-user counts and a stable argsort that puts the valid positions first."""
    if offsets is not None:
        return PackedRows(offsets, None, True)
    if mask is not None:
        counts = mask.sum(1)
        positions = torch.argsort(mask.logical_not().to(torch.uint8), dim=1, stable=True)
        return PackedRows(counts, positions.contiguous(), False)
    if lengths is None:
        lengths = torch.full((batch,), seq_len, dtype=torch.int64, device=device)
    return PackedRows(lengths, None, False)


def _num_programs(device: torch.device, rows_bound: int, block_m: int, per_sm: int) -> int:
    # not cached: rows_bound is N for jagged input, a new value almost every batch
    if device.type != "cuda":
        return 2  # the interpreter pays ~1 ms per program instance
    return max(1, min(multiprocessors(device) * per_sm, ceil_div(max(rows_bound, 1), block_m)))


class _Plan(NamedTuple):
    """What a launch needs that depends only on shapes, dtypes and flags: built once per combination
    (no next_power_of_2, no layout arithmetic per call)."""

    meta: dict  # the constexprs both kernels take
    hid: tuple  # hidden sizes padded to MAX_HIDDEN_LAYERS entries (absent layers are never read)
    grads: GradLayout  # the weight-gradient partials
    part_row: int  # floats per program in the backward's partials: the gradients, or the staged weights


@functools.lru_cache(maxsize=None)
def _plan(dim: int, hidden: tuple, dtype: torch.dtype, activation: str, affine: bool, tf32: bool,
          slope_sizes: tuple) -> _Plan:
    padded = tuple(block(h) for h in hidden) + (16,) * (MAX_HIDDEN_LAYERS - len(hidden))
    layout = grad_layout(dim, hidden, activation, affine, slope_sizes)
    staged_floats = ceil_div(staged_elements(block(dim), padded[:len(hidden)]) * dtype.itemsize, 4)
    meta = dict(BLOCK_D=block(dim), BH=padded, NUM_LAYERS=len(hidden), ACT=ACT_CODES[activation], AFFINE=affine,
                DT=TRITON_DTYPES[dtype], PRECISION="tf32" if tf32 else "ieee")
    return _Plan(meta, hidden + (1,) * (MAX_HIDDEN_LAYERS - len(hidden)),
                 layout, max(layout.width, staged_floats))


def _launch_plan(query, keys, weights, act_tensors, rows: PackedRows, activation, dice_affine):
    """(batch, T, N values, keys' strides over users and rows, plan)."""
    if rows.jagged:
        seq_len, n_values = 0, keys.shape[0]
        stride_kb, stride_kt = 0, keys.stride(0)
    else:
        seq_len, n_values = keys.shape[1], 0
        stride_kb, stride_kt = keys.stride(0), keys.stride(1)
    hidden = tuple([w.shape[0] for w in weights[:-1]])
    tf32 = keys.is_cuda and tf32_matmuls()
    slope_sizes = tuple([a[0].numel() for a in act_tensors]) if activation == "prelu" else ()
    plan = _plan(query.shape[1], hidden, keys.dtype, activation, dice_affine, tf32, slope_sizes)
    return query.shape[0], seq_len, n_values, stride_kb, stride_kt, plan


def packed_attention_forward(
    query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
    act_tensors: Sequence[Sequence[Tensor]], rows: PackedRows, activation: str, dice_eps: float,
    dice_affine: bool, softmax: bool, return_scores: bool,
    block_m: Optional[int] = None, num_programs: Optional[int] = None,
):
    """Launch the forward kernel. Returns (out [B, D] in keys' dtype, scores or None, lse [B] fp32 or
    None). keys: padded [B, T, D] or, with rows.jagged, packed [N, D]; stride 1 in the last dim (any
    other strides, stride 0 over B too). scores has keys' layout without D: [B, T] (zeros at the
    padding) or [N]. act_tensors per hidden layer: [slope] (prelu), [alpha, running_mean, running_var
    (, weight, bias)] (Dice, eval). The lse is the softmax log-sum-exp the backward needs."""
    batch, seq_len, n_values, stride_kb, stride_kt, plan = _launch_plan(query, keys, weights, act_tensors, rows,
                                                                        activation, dice_affine)
    device = keys.device
    dim = query.shape[1]
    out = _new((batch, dim), keys.dtype, device)
    score_shape = (n_values,) if rows.jagged else (batch, seq_len)
    # outputs a case does not use are None (no allocation on the hot path)
    scores = _new(score_shape, keys.dtype, device) if return_scores else None
    raw = _new(score_shape, torch.float32, device) if return_scores and softmax else None
    lse = _new((batch,), torch.float32, device) if softmax else None
    if batch == 0:
        return out, scores, lse
    block = block_m or (BLOCK_M if plan.meta["BH"][0] <= 128 else BLOCK_M_WIDE)
    programs = num_programs or _num_programs(device, n_values if rows.jagged else batch * seq_len, block, 2)
    offs = _new((batch,), torch.int64, device)
    W, BIAS, ACTP, SLOPE = layer_tuples(weights, biases, act_tensors, activation)
    stride_sb, stride_st = (0, 1) if rows.jagged else (seq_len, 1)
    _packed_fwd_kernel[(programs,)](
        query, keys, rows.source, rows.positions, offs, out, scores, raw, lse,
        W, BIAS, ACTP, SLOPE, plan.hid, float(dice_eps),
        batch, seq_len, dim, n_values, batch.bit_length(),
        query.stride(0), stride_kb, stride_kt, out.stride(0), stride_sb, stride_st,
        BLOCK_M=block, BLOCK_B=BLOCK_B, JAGGED=rows.jagged, POS_MAP=rows.positions is not None,
        SOFTMAX=softmax, STORE_SCORES=return_scores, num_warps=NUM_WARPS_FWD, num_stages=NUM_STAGES, **plan.meta,
    )
    return out, scores, lse


def packed_attention_backward(
    grad_out: Tensor, grad_scores: Optional[Tensor], query: Tensor, keys: Tensor, weights: Sequence[Tensor],
    biases: Sequence[Tensor], act_tensors: Sequence[Sequence[Tensor]], rows: PackedRows, out: Tensor,
    scores: Optional[Tensor], lse: Optional[Tensor], activation: str, dice_eps: float, dice_affine: bool,
    softmax: bool, block_m: Optional[int] = None, num_programs: Optional[int] = None,
) -> List[Tensor]:
    """Launch the backward (2 launches). grad_out [B, D] and grad_scores (scores' shape, or None) with
    any strides; out, scores and lse from the forward (scores needed only with grad_scores and softmax).

    Returns [dquery, dkeys, *dweights, *dbiases, *dact] where dact holds per hidden layer the slope's
    gradient (prelu) or Dice's alpha (and weight, bias with affine). The weight gradients are fp32
    views of one buffer, cast to the parameters' dtype where that differs."""
    batch, seq_len, n_values, stride_kb, stride_kt, plan = _launch_plan(query, keys, weights, act_tensors, rows,
                                                                        activation, dice_affine)
    device = keys.device
    dim = query.shape[1]
    W, BIAS, ACTP, SLOPE = layer_tuples(weights, biases, act_tensors, activation)
    width = plan.grads.width
    block = block_m or BLOCK_M_BWD
    programs = num_programs or _num_programs(device, n_values if rows.jagged else batch * seq_len, block, 1)
    dq = _new((batch, dim), query.dtype, device)
    dk = _new(keys.shape, keys.dtype, device)
    if batch == 0:
        parts = torch.zeros((1, width), dtype=torch.float32, device=device)
    else:
        parts = _new((programs, plan.part_row), torch.float32, device)
        offs = _new((batch,), torch.int64, device)
        has_gs = grad_scores is not None
        delta = _new((batch,), torch.float32, device) if softmax and has_gs else None
        stride_sb, stride_st = (0, 1) if rows.jagged else (seq_len, 1)
        gs_strides = (0, 1) if not has_gs else ((0, grad_scores.stride(0)) if rows.jagged else grad_scores.stride())
        dk_strides = (0, dk.stride(0)) if rows.jagged else (dk.stride(0), dk.stride(1))
        _packed_bwd_kernel[(programs,)](
            query, keys, rows.source, rows.positions, offs, out, lse, scores, grad_out, grad_scores, delta,
            dq, dk, parts,
            W, BIAS, ACTP, SLOPE, plan.hid, float(dice_eps),
            batch, seq_len, dim, n_values, batch.bit_length(), plan.part_row,
            query.stride(0), stride_kb, stride_kt, out.stride(0), stride_sb, stride_st, *grad_out.stride(),
            *gs_strides, *dk_strides,
            BLOCK_M=block, BLOCK_B=BLOCK_B, JAGGED=rows.jagged, POS_MAP=rows.positions is not None,
            SOFTMAX=softmax, HAS_GRAD_SCORES=has_gs, num_warps=NUM_WARPS_BWD, num_stages=NUM_STAGES, **plan.meta,
        )
    return [dq, dk, *sum_partials(parts, plan.grads, weights, biases, act_tensors, activation)]
