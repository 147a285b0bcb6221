"""The fast pure-PyTorch path of attention pooling (backend "torch"): packed rows and a first layer
with constant weights.

The math is `fastdin.reference.attention_pool`'s (docs/design.md, "Packed rows"), computed only
where it counts:

- **Packed rows.** Only the valid positions are gathered, N = sum of the lengths rows, ordered by
  user (jagged input is taken as it is). A row's user comes from one row->user index built once per
  call; offsets [B + 1] delimit each user's segment.
- **Constant weights.** With W1 split into its D-column blocks Wq, Wk, Wd, Wp, x_t W1 =
  [k_t, q_b * k_t] [[Wk - Wd], [Wp]] + c_b with c_b = q_b (Wq + Wd) + b1: one [B, D] x [D, H1] GEMM per
  batch for c, then the same [2D, H1] matrix for every row (two GEMMs accumulated in place into the
  gathered c; the backward is two GEMMs too); the [B, T, 4D] concat is never built.
- **Segmented pooling.** out_b = sum over b's rows of w_r k_r, and a segmented softmax (per-user max
  and sum), both as fixed-order sums: index_add_ on the CPU (deterministic there), segment_reduce
  on CUDA (one sorted segment per user, no atomics).

Padding is selected out, never multiplied by 0, so NaN or inf in padded keys never counts. Dice's
batch statistics are taken over the valid rows ("valid"), or over all B*T positions ("all"). For
"all", padded positions whose keys are all zero share one pre-activation per user (x = 0 gives
pre1 = c_b), so each such user adds one row counted T - length_b times; padded keys that are not all
zero are computed as rows of their own.

Without autograd (and without softmax, scores or Dice training) on the CPU the rows are gathered,
scored and pooled in chunks that stay in cache. Gathering the valid rows of padded input reads N on the host
(on CUDA one device-to-host sync per call, and one more for Dice statistics over "all" positions).

Under torch.compile the padded input takes a dense form without data-dependent shapes: every one
of the B*T positions is a row, padded keys are replaced by zeros (select) and the mask weights the
statistics and the pooling. Jagged input has static shapes (N = keys.shape[0]) and stays packed.
"""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdin.reference import DiceParams, valid_positions


# ---------------------------------------------------------------------------------------------
# segmented sums and gathers (rows ordered by user; offsets [B + 1] delimit the segments)


def segment_sum(values: Tensor, user: Tensor, offsets: Tensor, batch: int) -> Tensor:
    """[B, *] sums of values [R, *] over each user's rows, in a fixed order (deterministic); fp16 and
    bf16 values are summed in fp32."""
    if values.dtype in (torch.float16, torch.bfloat16):
        return segment_sum(values.float(), user, offsets, batch).to(values.dtype)
    if values.is_cuda:  # index_add_ uses atomics on CUDA
        return segment_sum_sorted(values, offsets)
    return values.new_zeros((batch,) + values.shape[1:]).index_add_(0, user, values)  # in row order on the CPU


def segment_sum_sorted(values: Tensor, offsets: Tensor) -> Tensor:
    """The same from the offsets alone (rows ordered by user): each segment reduced by itself, no atomics."""
    return torch.segment_reduce(values, "sum", offsets=offsets, axis=0, unsafe=True)


# The Functions define setup_context, so that torch.func transforms take them (fastdin.ops.attention_packed
# differentiates this path with torch.func.vjp inside a custom op, where autograd is off).
class _GatherRows(torch.autograd.Function):
    """table [B, F] -> rows [R, F] (row r gets its user's entry); the backward is a segment sum."""

    @staticmethod
    def forward(table, user, offsets):
        return table.index_select(0, user)

    @staticmethod
    def setup_context(ctx, inputs, output):
        table, user, offsets = inputs
        ctx.save_for_backward(user, offsets)
        ctx.batch = table.shape[0]

    @staticmethod
    def backward(ctx, grad):
        user, offsets = ctx.saved_tensors
        return segment_sum(grad, user, offsets, ctx.batch), None, None


class _SegmentSum(torch.autograd.Function):
    """values [R, F] -> [B, F] per-user sums; the backward gathers."""

    @staticmethod
    def forward(values, user, offsets, batch):
        return segment_sum(values, user, offsets, batch)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (user,) = ctx.saved_tensors
        return grad.index_select(0, user), None, None, None


class _SegmentSoftmax(torch.autograd.Function):
    """Softmax of scores [R] (fp32 or fp64) within each user's rows; a user with no rows has none."""

    @staticmethod
    def forward(scores, user, offsets, batch):
        # the per-user max only shifts the exponent (the softmax does not depend on it)
        top = scores.new_full((batch,), float("-inf")).scatter_reduce_(0, user, scores, "amax", include_self=True)
        e = torch.exp(scores - top.index_select(0, user))
        total = segment_sum(e, user, offsets, batch)
        return e / total.index_select(0, user)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, user, offsets, ctx.batch = inputs
        ctx.save_for_backward(output, user, offsets)

    @staticmethod
    def backward(ctx, grad):
        w, user, offsets = ctx.saved_tensors
        wg = w * grad
        return wg - w * segment_sum(wg, user, offsets, ctx.batch).index_select(0, user), None, None, None


def segment_softmax(scores: Tensor, user: Tensor, offsets: Tensor, batch: int) -> Tensor:
    """_SegmentSoftmax, in fp32 for fp16/bf16 scores (the weights back in their dtype)."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        return _SegmentSoftmax.apply(scores.float(), user, offsets, batch).to(scores.dtype)
    return _SegmentSoftmax.apply(scores, user, offsets, batch)


class _ZeroPaddingRows(torch.autograd.Function):
    """The one row per padded user that stands for its count_b zero padded keys in Dice's statistics
    over all positions: forward zeros [P, D]; backward gives each padded key of user b the row's
    gradient / count_b (every copy of the row has the same share)."""

    @staticmethod
    def forward(keys, valid, pad_user, count):
        return keys.new_zeros(pad_user.shape[0], keys.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        keys, valid, pad_user, count = inputs
        ctx.save_for_backward(valid, pad_user, count)
        ctx.keys_shape = keys.shape

    @staticmethod
    def backward(ctx, grad):
        valid, pad_user, count = ctx.saved_tensors
        batch, _, dim = ctx.keys_shape
        per_user = grad.new_zeros(batch, dim).index_copy_(0, pad_user, grad / count.unsqueeze(1))
        return torch.where(valid.unsqueeze(-1), 0, per_user.unsqueeze(1)), None, None, None


class _FirstLayer(torch.autograd.Function):
    """pre1 [R, H1] = c_b + k Ak + (q_b * k) Ap for rows k [R, D] of users `user`, with a backward of
    two GEMMs ([k, q_b * k] against [Ak; Ap], recomputing q_b * k instead of keeping it)."""

    @staticmethod
    def forward(keys, query, c, user, offsets, first_k, first_qk):
        q_rows = query.index_select(0, user)
        return c.index_select(0, user).addmm_(keys, first_k).addmm_(q_rows * keys, first_qk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        keys, query, c, user, offsets, first_k, first_qk = inputs
        ctx.save_for_backward(keys, query, user, offsets, first_k, first_qk)

    @staticmethod
    def backward(ctx, grad):
        keys, query, user, offsets, first_k, first_qk = ctx.saved_tensors
        batch, dim = query.shape
        q_rows = query.index_select(0, user)
        dkeys = dquery = dc = dfirst = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            t = grad.mm(torch.cat([first_k, first_qk]).t())  # [R, 2D]: grad Ak^T | grad Ap^T
            t_k, t_qk = t[:, :dim], t[:, dim:]
            if ctx.needs_input_grad[1]:
                dquery = segment_sum(t_qk * keys, user, offsets, batch)
            if ctx.needs_input_grad[0]:
                dkeys = t_k.addcmul_(t_qk, q_rows)
        if ctx.needs_input_grad[2]:
            dc = segment_sum(grad, user, offsets, batch)
        if ctx.needs_input_grad[5] or ctx.needs_input_grad[6]:
            dfirst = torch.cat([keys, q_rows * keys], 1).t().mm(grad)  # [2D, H1]
        return (dkeys, dquery, dc, None, None, None if dfirst is None else dfirst[:dim],
                None if dfirst is None else dfirst[dim:])


def gather_rows(table: Tensor, user: Tensor, offsets: Tensor) -> Tensor:
    return _GatherRows.apply(table, user, offsets)


# ---------------------------------------------------------------------------------------------
# rows


class RowGroup(NamedTuple):
    """Rows of one kind, ordered by user: keys [R, D], user [R] int64, offsets [B + 1] int64, and each
    row's count in Dice's batch statistics (None: 1 each)."""

    keys: Tensor
    user: Tensor
    offsets: Tensor
    count: Optional[Tensor] = None


def offsets_from_counts(counts: Tensor) -> Tensor:
    """The exclusive cumsum [B + 1] (int64) of per-user row counts [B]."""
    return F.pad(counts.cumsum(0), (1, 0))


def rows_from_offsets(offsets: Tensor, rows: int) -> Tensor:
    """The user of each of `rows` packed rows, from offsets [B + 1] (static shapes: compile-friendly)."""
    batch = offsets.shape[0] - 1
    users = torch.arange(batch, device=offsets.device)
    return users.repeat_interleave(offsets.diff(), output_size=rows)


def _gather_keys(keys: Tensor, flat: Tensor, user: Tensor) -> Tensor:
    """keys [B, T, D] at the flat positions (b * T + t), read in place through any strides."""
    batch, seq_len, dim = keys.shape
    if batch < 2 or keys.stride(0) == seq_len * keys.stride(1):  # [B, T] merges into one dim: a view
        return keys.reshape(batch * seq_len, dim).index_select(0, flat)
    return keys[user, flat - user * seq_len]  # e.g. expanded keys (stride 0 over B): no copy of [B, T, D]


def _padded_groups(keys: Tensor, valid: Tensor, dice_all: bool):
    """The valid rows of padded keys, plus (for Dice statistics over all positions) the padded ones."""
    batch, seq_len, dim = keys.shape
    counts = valid.sum(1)
    flat = valid.reshape(-1).nonzero().squeeze(1)  # row-major: ordered by user
    user = torch.div(flat, seq_len, rounding_mode="floor")
    groups = [RowGroup(_gather_keys(keys, flat, user), user, offsets_from_counts(counts))]
    if dice_all:
        pad_counts = seq_len - counts
        padded_keys_nonzero = torch.where(valid.unsqueeze(-1), 0, keys).ne(0).any()  # NaN counts as non-zero
        if bool(padded_keys_nonzero):
            pad_flat = (~valid).reshape(-1).nonzero().squeeze(1)
            pad_user = torch.div(pad_flat, seq_len, rounding_mode="floor")
            groups.append(RowGroup(_gather_keys(keys, pad_flat, pad_user), pad_user, offsets_from_counts(pad_counts)))
        else:  # every padded key is zero: one row per padded user, counted T - length times
            has_pad = pad_counts > 0
            pad_user = has_pad.nonzero().squeeze(1)
            count = pad_counts.index_select(0, pad_user).to(keys.dtype)
            zero_keys = _ZeroPaddingRows.apply(keys, valid, pad_user, count)
            groups.append(RowGroup(zero_keys, pad_user, offsets_from_counts(has_pad.long()), count))
    return groups, flat


# ---------------------------------------------------------------------------------------------
# the MLP over rows


def _dice(h: Tensor, p: DiceParams, count: Optional[Tensor], total) -> Tensor:
    """Dice on rows [R, H]; batch statistics over the rows, each weighted by count (None: 1), total rows.
    Statistics and the gate run in fp32 whatever h's dtype (docs/design.md, numerics policy)."""
    wide = torch.promote_types(h.dtype, torch.float32)  # float64 stays float64
    h32 = h.to(wide)
    if p.training:
        if count is None:
            mean = h32.mean(0)
            var = h32.var(0, unbiased=False)
        else:
            count = count.to(wide)
            mean = count @ h32 / total
            var = count @ (h32 - mean).square() / total
        with torch.no_grad():
            p.running_mean.mul_(1 - p.momentum).add_(mean.detach().to(p.running_mean.dtype), alpha=p.momentum)
            unbiased = var.detach().to(p.running_var.dtype) * (total / (total - 1))
            p.running_var.mul_(1 - p.momentum).add_(unbiased, alpha=p.momentum)
    else:
        mean, var = p.running_mean.to(wide), p.running_var.to(wide)
    x_hat = (h32 - mean) * torch.rsqrt(var + p.eps)
    if p.weight is not None:
        x_hat = x_hat * p.weight.to(wide) + p.bias.to(wide)
    alpha = p.alpha.reshape(-1).to(wide)
    return (h32 * (alpha + (1 - alpha) * torch.sigmoid(x_hat))).to(h.dtype)  # p*h + (1-p)*alpha*h


def _activate(h: Tensor, activation: str, params, count: Optional[Tensor], total) -> Tensor:
    # h is a fresh GEMM output that no backward needs: sigmoid and relu may overwrite it
    if activation == "sigmoid":
        return h.sigmoid_()
    if activation == "relu":
        return h.relu_()
    if activation == "prelu":
        return F.prelu(h, params.reshape(-1).to(h.dtype))  # on [R, H] the channel dim is the feature dim
    return _dice(h, params, count, total)


def _row_mlp(query: Tensor, weights, biases, activation: str, act_params, count=None, total=None):
    """The attention MLP as a function scores(k [R, D], per_row) -> [R], where per_row maps a [B, F]
    table to the rows' [R, F]; count/total weight Dice's batch statistics (see row_scores)."""
    dim = query.shape[1]
    wq, wk, wd, wp = weights[0].split(dim, dim=1)  # nn.Linear layout [H1, 4D]: the blocks of q, k, q - k, q * k
    # x_t W1 + b1 = c_b + k_t (Wk - Wd) + (q_b * k_t) Wp, with c_b = q_b (Wq + Wd) + b1 once per user
    first_k, first_qk = (wk - wd).t(), wp.t()
    c = torch.addmm(biases[0], query, (wq + wd).t())  # [B, H1]

    def scores(k, per_row, user=None, offsets=None):
        if user is not None:  # one group of rows, with autograd
            h = _FirstLayer.apply(k, query, c, user, offsets, first_k, first_qk)
        else:  # pre1 accumulated in place into the gathered c: no [R, 2D] concat and no extra copy
            h = per_row(c).addmm_(k, first_k).addmm_(per_row(query) * k, first_qk)
        for layer in range(len(weights) - 1):
            if layer:
                h = torch.addmm(biases[layer], h, weights[layer].t())
            params = act_params[layer] if act_params is not None else None
            h = _activate(h, activation, params, count, total)
        return torch.addmm(biases[-1], h, weights[-1].t()).squeeze(1)

    return scores


def row_scores(query: Tensor, groups: Sequence[RowGroup], weights, biases, activation: str, act_params,
               total=None) -> Tensor:
    """The attention MLP's scores [R] for the rows of every group (concatenated in order).

    total: the number of positions Dice's statistics are taken over (default: the rows, each counted
    once or by its group's count)."""
    count = None
    if any(g.count is not None for g in groups):
        count = torch.cat([g.count if g.count is not None else g.keys.new_ones(g.keys.shape[0]) for g in groups])
    if total is None:
        total = sum(g.keys.shape[0] for g in groups) if count is None else count.sum()

    def per_row(table):  # [B, F] -> [R, F] over all groups
        parts = [gather_rows(table, g.user, g.offsets) for g in groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    scores = _row_mlp(query, weights, biases, activation, act_params, count, total)
    if len(groups) == 1:
        return scores(groups[0].keys, per_row, groups[0].user, groups[0].offsets)
    return scores(torch.cat([g.keys for g in groups]), per_row)


# Without autograd the rows go through the MLP and the pooled sum in chunks of this many, gathered
# chunk by chunk, so that a chunk's keys and activations stay in cache (on the 2-core CPU here,
# 2048 to 4096 rows beat both smaller chunks, by the ops' fixed cost, and all rows at once).
INFERENCE_CHUNK = 2048


def pools_in_chunks(device: torch.device, dice_training: bool, normalization, return_scores: bool) -> bool:
    """Whether this call takes `_pool_in_chunks`: inference without softmax, scores or Dice training,
    eager, and on the CPU only. On CUDA the chunks would cost about ten launches per 2048 rows,
    and their index_add_ sums with atomics (an order that changes from run to run); the whole rows
    there go through segment_reduce, in a fixed order."""
    return (device.type != "cuda" and not torch.is_grad_enabled() and not dice_training and normalization is None
            and not return_scores and not torch.compiler.is_compiling())


def _pool_in_chunks(query: Tensor, rows, keys_of, user: Tensor, weights, biases, activation, act_params) -> Tensor:
    """out [B, D] = sum of s_r k_r per user (no normalization, no autograd), keys_of(i, j) giving
    the keys of rows i:j, so that the keys are read once and every intermediate stays in cache."""
    scores = _row_mlp(query, weights, biases, activation, act_params)
    out = query.new_zeros(query.shape)
    for i in range(0, rows, INFERENCE_CHUNK):
        k, u = keys_of(i, i + INFERENCE_CHUNK), user[i:i + INFERENCE_CHUNK]
        out.index_add_(0, u, k * scores(k, lambda t: t.index_select(0, u)).unsqueeze(1))
    return out


def _pool_rows(scores: Tensor, keys: Tensor, user: Tensor, offsets: Tensor, batch: int, normalization):
    w = segment_softmax(scores, user, offsets, batch) if normalization == "softmax" else scores
    return _SegmentSum.apply(w.unsqueeze(1) * keys, user, offsets, batch), w


# ---------------------------------------------------------------------------------------------
# entry points (inputs already checked by fastdin.ops.attention)


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
    offsets: Optional[Tensor] = None,
    normalization: Optional[str] = None,
    return_scores: bool = False,
    dice_stats: str = "valid",
):
    """`fastdin.reference.attention_pool` on packed rows; query [B, D], weights in keys' dtype.

    Padded input: keys [B, T, D] with lengths [B] or mask [B, T]; scores come back as [B, T].
    Jagged input: keys [N, D] packed by user with offsets [B + 1]; scores come back packed, [N]
    (every position is valid, so dice_stats "all" is "valid").
    """
    batch = query.shape[0]
    dice_training = activation == "dice" and act_params[0].training
    in_chunks = pools_in_chunks(keys.device, dice_training, normalization, return_scores)
    if offsets is not None:
        user = rows_from_offsets(offsets, keys.shape[0])
        if in_chunks:
            return _pool_in_chunks(query, keys.shape[0], lambda i, j: keys[i:j], user, weights, biases, activation,
                                   act_params)
        scores = row_scores(query, [RowGroup(keys, user, offsets)], weights, biases, activation, act_params)
        out, w = _pool_rows(scores, keys, user, offsets, batch, normalization)
        return (out, w) if return_scores else out
    if torch.compiler.is_compiling():
        return _attention_pool_dense(query, keys, weights, biases, activation, act_params, lengths, mask,
                                     normalization, return_scores, dice_stats)
    seq_len = keys.shape[1]
    valid = valid_positions(lengths, mask, batch, seq_len, keys.device)
    if in_chunks:
        flat = valid.reshape(-1).nonzero().squeeze(1)
        user = torch.div(flat, seq_len, rounding_mode="floor")
        return _pool_in_chunks(query, flat.shape[0], lambda i, j: _gather_keys(keys, flat[i:j], user[i:j]), user,
                               weights, biases, activation, act_params)
    groups, flat = _padded_groups(keys, valid, dice_training and dice_stats == "all")
    total = batch * seq_len if len(groups) > 1 else None
    scores = row_scores(query, groups, weights, biases, activation, act_params, total)
    main = groups[0]
    out, w = _pool_rows(scores[:main.keys.shape[0]], main.keys, main.user, main.offsets, batch, normalization)
    if not return_scores:
        return out
    return out, w.new_zeros(batch * seq_len).index_copy(0, flat, w).view(batch, seq_len)


def _attention_pool_dense(query, keys, weights, biases, activation, act_params, lengths, mask, normalization,
                          return_scores, dice_stats):
    """The padded input in a form without data-dependent shapes (for torch.compile): all B*T rows."""
    batch, seq_len, dim = keys.shape
    valid = valid_positions(lengths, mask, batch, seq_len, keys.device)
    dice_training = activation == "dice" and act_params[0].training
    if dice_training and dice_stats == "all":
        rows = keys.reshape(batch * seq_len, dim)  # the padded keys enter the statistics as they are
        count = None
    else:
        rows = torch.where(valid.unsqueeze(-1), keys, 0).reshape(batch * seq_len, dim)
        count = valid.reshape(-1).to(keys.dtype)
    user = torch.arange(batch, device=keys.device).repeat_interleave(seq_len)
    offsets = torch.arange(batch + 1, device=keys.device) * seq_len
    scores = row_scores(query, [RowGroup(rows, user, offsets, count)], weights, biases, activation, act_params)
    scores = scores.view(batch, seq_len)
    if normalization == "softmax":
        scores = torch.softmax(scores.masked_fill(~valid, torch.finfo(scores.dtype).min), dim=-1)
    w = torch.where(valid, scores, 0)
    out = torch.bmm(w.unsqueeze(1), torch.where(valid.unsqueeze(-1), keys, 0)).squeeze(1)
    return (out, w) if return_scores else out
