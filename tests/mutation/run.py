"""Mutation check: do the tests catch the kernels being wrong?

Applies a curated list of semantic mutants one at a time (text substitutions in the kernels and the
ops), runs the tests relevant to each (-x: it stops at the first failure), and prints per mutant
whether it was killed (some test failed) or survived (every test passed), then a summary. A
mutant whose text is not found exactly once is an ERROR, never a kill, and so is a test group that
fails before any mutant is applied.

On demand only (not collected by pytest; it takes a while): from the repository root,

    nice -n 10 python tests/mutation/run.py               # every mutant
    python tests/mutation/run.py --list                   # the mutants and what each breaks
    python tests/mutation/run.py --only attn-eps-dropped dice-eps-dropped
    python tests/mutation/run.py --check                  # only check that every mutant applies

By default the tree is copied to a temporary directory and the copy is mutated, so the checkout is
never touched (the copy imports itself: cwd comes first on sys.path, and fastdin/kernels and
fastdin/bench are symlinked as the editable install maps them). With --in-place the checkout itself
is mutated. Either way each file is restored after its mutant in a `finally` (Ctrl-C and SIGTERM
included), a copy of each original is kept under the system temp dir until it is restored, and a
run that finds copies left by a killed run restores them first.
"""
import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]  # the tree that is mutated (a copy unless --in-place)

ATTENTION = "kernels/attention_pool.py"
DICE = "kernels/dice.py"
PACKED = "kernels/attention_packed.py"
MLP = "kernels/mlp.py"
OPS_PACKED = "fastdin/ops/attention_packed.py"
OPS_ATTENTION = "fastdin/ops/attention.py"
OPS_DICE = "fastdin/ops/dice.py"
OPS_BACKEND = "fastdin/ops/backend.py"
OPS_CHECKS = "fastdin/ops/checks.py"
TORCH_PATH = "fastdin/packed.py"
LAUNCH = "kernels/launch.py"

# Test groups, cheapest and broadest first (-x stops at the first failure). The sm_90 builds need
# ptxas and test no numerics: left out.
ATTENTION_TESTS = ["tests/test_layouts.py::test_attention_layout",
                   "tests/test_padding_and_edge_cases.py::test_per_user_kernels_softmax_give_zeros_for_a_user_with_no_valid_position",
                   "tests/test_offsets.py::test_attention_offsets_past_2_31",
                   "tests/test_program_split.py::test_attention_split_independent", "tests/test_attention_kernel.py",
                   "tests/test_attention_dice_train.py", "tests/test_compile_grads.py::test_compiled_attention_every_gradient"]
DICE_TESTS = ["tests/test_dice_kernel.py", "tests/test_layouts.py::test_dice_layout",
              "tests/test_layouts.py::test_dice_variance_near_eps", "tests/test_offsets.py::test_dice_offsets_past_2_31",
              "tests/test_program_split.py::test_dice_split_independent",
              "tests/test_compile_grads.py::test_compiled_dice_every_gradient"]
# the packed-rows kernels: what the triton backend runs on the CPU except for training-mode Dice
PACKED_TESTS = ["tests/test_attention_packed_kernel.py", "tests/test_program_split.py::test_packed_split_independent",
                "tests/test_layouts.py::test_attention_jagged_layout", "tests/test_layouts.py::test_attention_layout",
                "tests/test_attention_kernel.py"]
TRAIN_TESTS = ["tests/test_attention_dice_train.py", "tests/test_program_split.py::test_attention_split_independent",
               "tests/test_layouts.py::test_attention_layout"]
SHARED_STATS_TESTS = DICE_TESTS + TRAIN_TESTS
# kernels/mlp.py: the attention MLP's parameters and activations, shared by both attention kernels
MLP_TESTS = PACKED_TESTS + [t for t in ATTENTION_TESTS if t not in PACKED_TESTS]
ERROR_TESTS = ["tests/test_errors.py", "tests/test_dice_kernel.py::test_kernel_gap"]
REFUSAL_TESTS = ["tests/test_launch_refusal.py"]
BOUND_TESTS = ["tests/test_attention_packed_kernel.py::test_dispatch_follows_the_gpu",
               "tests/test_attention_packed_kernel.py::test_a_gpu_with_wgmma_tries_the_shapes_within_the_bounds_slack",
               "tests/test_attention_packed_kernel.py::test_sm80_builds_within_the_mma_sync_estimate"]
DESELECT = "not sm90"


@dataclass
class Mutant:
    name: str
    path: str
    edits: Sequence[Tuple[str, str]]  # (old, new): old must occur exactly once (or use `occurrence`)
    breaks: str
    tests: List[str]
    occurrence: int = 0  # which occurrence of old (0-based) when it is not unique; -1: must be unique
    extra: dict = field(default_factory=dict)


def M(name, path, old, new, breaks, tests, occurrence=-1):
    return Mutant(name, path, [(old, new)], breaks, tests, occurrence)


MUTANTS = [
    # ---------------------------------------------------------------- attention kernel: masking
    M("attn-score-grad-mask-dropped", ATTENTION, "                ds = tl.where(valid, dw, 0.0)", "                ds = dw",
      "no normalization: padded positions pass a score gradient into the MLP (mask dropped on one gradient)",
      ATTENTION_TESTS),
    M("attn-dk-pool-mask-dropped", ATTENTION, "                w = tl.where(valid, s, 0.0)\n", "                w = s\n",
      "no normalization: dkeys gets the pooling term s_t * g at padded positions", ATTENTION_TESTS),
    M("attn-softmax-dk-mask-dropped", ATTENTION, "                w = tl.where(valid, tl.exp(s - lse), 0.0)",
      "                w = tl.exp(s - lse)", "softmax backward: padded positions get softmax weights", ATTENTION_TESTS),
    M("attn-fwd-score-mask-dropped", ATTENTION, "                s = tl.where(valid, s, 0.0)\n                acc +=",
      "                acc +=", "no normalization: padded positions count in the output and the scores", ATTENTION_TESTS),
    M("attn-length-off-by-one", ATTENTION, "valid = valid & (offs_t < tl.load(len_ptr + b64))",
      "valid = valid & (offs_t <= tl.load(len_ptr + b64))", "position t = length counts as valid", ATTENTION_TESTS),
    Mutant("attn-bwd-tile-bound-off-by-one", ATTENTION, [("            tmask = offs_t < T\n", "            tmask = offs_t < T - 1\n")],
           "backward: the last position of every row is never loaded nor stored", ATTENTION_TESTS, occurrence=1),
    M("attn-dk-padding-zeros-skipped", ATTENTION,
      "            _store_zeros_past(dk_ptr + b64 * T * D, reach, T, D, D, BLOCK_T, BLOCK_D)", "            pass",
      "backward: the key gradient past a user's last tile is never written (uninitialised memory)", ATTENTION_TESTS),
    M("attn-scores-padding-zeros-skipped", ATTENTION,
      "            _store_zeros_past(scores_ptr + b64 * stride_sb, reach, T, 1, 1, BLOCK_T, 1)", "            pass",
      "forward: the returned scores past a user's last tile are never written", ATTENTION_TESTS),
    M("attn-mask-reach-last-tile-only", ATTENTION,
      "reach = tl.maximum(reach, tl.max(tl.where(valid, offs_t + 1, 0), axis=0))",
      "reach = tl.max(tl.where(valid, offs_t + 1, 0), axis=0)",
      "a mask's reach is taken from its last tile only: a history that ends early is never computed", ATTENTION_TESTS),
    M("attn-stats-count-all-reach-dropped", ATTENTION,
      "            if COUNT_ALL:  # statistics over every t < T\n                reach = T\n",
      "            if COUNT_ALL:  # statistics over every t < T\n                reach = reach\n",
      "Dice statistics over all t < T stop at each user's last valid position", ATTENTION_TESTS),
    M("attn-bwd-count-all-reach-dropped", ATTENTION,
      "            if COUNT_ALL:  # the padding is in the batch statistics, so it gets their gradient\n"
      "                reach = T\n",
      "            if COUNT_ALL:  # the padding is in the batch statistics, so it gets their gradient\n"
      "                reach = reach\n",
      "backward with Dice statistics over all t < T: the padding past a user's last tile gets no gradient through "
      "them", ATTENTION_TESTS),
    # ---------------------------------------------------------------- attention kernel: activations
    # ---------------------------------------------------------------- both attention kernels (kernels/mlp.py)
    M("mlp-prelu-bwd-slope-dropped", MLP, "dx = tl.where(x >= 0, dh, a[None, :] * dh)", "dx = tl.where(x >= 0, dh, dh)",
      "PReLU backward uses slope 1 on the negative side (wrong slope)", MLP_TESTS),
    M("mlp-prelu-slope-grad-wrong-side", MLP, "da = tl.sum(tl.where(x >= 0, 0.0, x * dh), axis=0)",
      "da = tl.sum(tl.where(x >= 0, x * dh, 0.0), axis=0)", "PReLU slope gradient taken on the positive side",
      MLP_TESTS),
    M("mlp-prelu-slope-stride-ignored", MLP,
      'slope_strides.append(1 if activation != "prelu" or params[0].numel() > 1 else 0)',
      'slope_strides.append(1 if activation != "prelu" else 0)',
      "per-feature PReLU slopes read as one shared slope (a stride ignored)", MLP_TESTS),
    M("mlp-dice-weight-grad-unnormalised", MLP, "dgamma = tl.sum(g_z * x_hat, axis=0)",
      "dgamma = tl.sum(g_z * (x - mean[None, :]), axis=0)",
      "Dice affine weight gradient uses x - mean instead of x_hat", MLP_TESTS),
    M("mlp-dice-eps-dropped", MLP, "rstd = 1.0 / tl.sqrt(load_vec(params[2], n, 1, BLOCK, 1.0) + eps)",
      "rstd = 1.0 / tl.sqrt(load_vec(params[2], n, 1, BLOCK, 1.0))",
      "Dice in the attention unit: 1/sqrt(var) without eps", MLP_TESTS),
    M("mlp-weights-not-contiguous", MLP, "weights = tuple([w if w.is_contiguous() else w.contiguous() for w in weights])",
      "weights = tuple(weights)", "a sliced weight read with its fan-in as the row stride", MLP_TESTS),
    M("mlp-biases-not-contiguous", MLP, "biases = tuple([b if b.is_contiguous() else b.contiguous() for b in biases])",
      "biases = tuple(biases)", "strided biases read with stride 1", MLP_TESTS),
    M("mlp-act-params-not-contiguous", MLP,
      "params = [p if p.is_contiguous() else p.contiguous() for p in act_tensors[layer]] if act_tensors else []",
      "params = list(act_tensors[layer]) if act_tensors else []",
      "strided activation parameters (slopes, Dice alpha/weight/bias) read with stride 1", MLP_TESTS),
    M("mlp-fold-dWd-sign", MLP, "_store_matrix(ptr, U - S_k, H1, D, 4 * D, 2 * D, TRANSPOSED)",
      "_store_matrix(ptr, S_k - U, H1, D, 4 * D, 2 * D, TRANSPOSED)",
      "first-layer fold: the (q - k) block's gradient has the wrong sign", MLP_TESTS),
    M("mlp-partials-first-program-dropped", MLP, "for p in range(0, n_parts)", "for p in range(1, n_parts)",
      "the weight-gradient reduction skips the first program's partials", MLP_TESTS),
    M("mlp-partials-transposed-ignored", MLP, "    if TRANSPOSED:\n        cols = tl.arange(0, tile.shape[0])",
      "    if False:\n        cols = tl.arange(0, tile.shape[0])",
      "per-user kernels: their transposed weight-gradient tiles stored as if they were not", MLP_TESTS),
    # ---------------------------------------------------------------- attention kernel: softmax
    M("attn-softmax-acc-correction-dropped", ATTENTION, "acc = acc * correction + tl.sum(p[:, None] * k, axis=0)",
      "acc = acc + tl.sum(p[:, None] * k, axis=0)", "online softmax: the accumulator is not rescaled (no softmax correction)",
      ATTENTION_TESTS),
    M("attn-softmax-sum-correction-dropped", ATTENTION, "l_i = l_i * correction + tl.sum(p, axis=0)",
      "l_i = l_i + tl.sum(p, axis=0)", "online softmax: the normaliser is not rescaled", ATTENTION_TESTS),
    M("attn-softmax-delta-dropped", ATTENTION, "ds = w * (dw - delta)", "ds = w * dw",
      "softmax backward without the - sum_t w_t dL/dw_t term", ATTENTION_TESTS),
    # ---------------------------------------------------------------- attention kernel: gradients
    M("attn-first-bias-grad-dropped", ATTENTION, "            db1_acc += dc_b\n", "            db1_acc += 0.0 * dc_b\n",
      "first layer's bias gradient is 0 (a bias gradient dropped)", ATTENTION_TESTS),
    M("attn-score-bias-grad-dropped", ATTENTION, "dbo_acc += tl.sum(ds, axis=0)", "dbo_acc += 0.0 * tl.sum(ds, axis=0)",
      "score layer's bias gradient is 0 (exact only under softmax)", ATTENTION_TESTS),
    M("attn-fold-dq-product-term-dropped", ATTENTION,
      "return tl.sum((wq + wd) * dc_b[None, :], axis=1) + tl.sum(wp * dW_b, axis=1)",
      "return tl.sum((wq + wd) * dc_b[None, :], axis=1)", "dquery misses the q * k block's term", ATTENTION_TESTS),
    # ---------------------------------------------------------------- attention kernel: training-mode Dice
    M("attn-through-stats-dropped", ATTENTION, "            G = _through_batch_stats(G, x, mean, inv_std, S, Q, inv_count, counted)",
      "            G = G", "training Dice: no gradient through the batch mean and variance", TRAIN_TESTS),
    M("attn-stats-count-padding", ATTENTION, "                counted = valid\n", "                counted = tmask\n",
      "dice_stats='valid': padded positions counted in the batch statistics", TRAIN_TESTS),
    M("attn-bwd-count-padding", ATTENTION, "            counted = valid  # the positions in Dice's batch statistics",
      "            counted = tmask  # the positions in Dice's batch statistics",
      "dice_stats='valid' backward: the statistics' gradient reaches padded positions (mask dropped on one gradient)",
      TRAIN_TESTS),
    M("attn-stat-sums-weight-dropped", ATTENTION, "        S = S * gamma\n        Q = Q * gamma\n", "",
      "training affine Dice: the gradient through the statistics misses Dice's weight (dL/dx_hat = weight * dL/dz)",
      TRAIN_TESTS),
    M("attn-stat-sums-first-program-dropped", ATTENTION, "        for p in range(0, n_parts):",
      "        for p in range(1, n_parts):", "training Dice: the sums over the programs skip the first one",
      TRAIN_TESTS),
    Mutant("attn-stats-mean-var-swapped", ATTENTION,
           [("    tl.store(stats_ptr + feats, mean, mask=ok)\n    tl.store(stats_ptr + h_max + feats, var, mask=ok)",
             "    tl.store(stats_ptr + feats, var, mask=ok)\n    tl.store(stats_ptr + h_max + feats, mean, mask=ok)")],
           "attention Dice batch statistics: mean and variance swapped", TRAIN_TESTS),
    # ---------------------------------------------------------------- attention launchers: strides and dtypes
    M("attn-mask-stride-ignored", ATTENTION, "mask_strides = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)",
      "mask_strides = (mask.shape[1], 1) if mask is not None else (0, 0)",
      "the launcher assumes a contiguous [B, T] mask", ATTENTION_TESTS),
    M("attn-lengths-stride-ignored", ATTENTION, "lengths = lengths.contiguous() if lengths is not None else None",
      "lengths = lengths", "strided lengths (a column of a table) read as contiguous", ATTENTION_TESTS),
    M("attn-fwd-query-stride-ignored", ATTENTION,
      "        query.stride(0), keys.stride(0), keys.stride(1), stride_mb, stride_mt, out.stride(0),",
      "        dim, keys.stride(0), keys.stride(1), stride_mb, stride_mt, out.stride(0),",
      "forward: the query stride ignored (an expanded query is misread)", ATTENTION_TESTS),
    M("attn-bwd-query-stride-ignored", ATTENTION,
      "query.stride(0), keys.stride(0), keys.stride(1), stride_mb, stride_mt, *grad_out.stride(),",
      "dim, keys.stride(0), keys.stride(1), stride_mb, stride_mt, *grad_out.stride(),",
      "backward: the query stride ignored", ATTENTION_TESTS),
    M("attn-stats-query-stride-ignored", ATTENTION,
      "            query.stride(0), keys.stride(0), keys.stride(1), stride_mb, stride_mt, 0, 0, width,",
      "            dim, keys.stride(0), keys.stride(1), stride_mb, stride_mt, 0, 0, width,",
      "training Dice statistics pass: the query stride ignored", TRAIN_TESTS),
    M("attn-fwd-keys-strides-ignored", ATTENTION,
      "        query.stride(0), keys.stride(0), keys.stride(1), stride_mb, stride_mt, out.stride(0),",
      "        query.stride(0), seq_len * dim, dim, stride_mb, stride_mt, out.stride(0),",
      "forward: keys read as contiguous (expanded or sliced keys misread)", ATTENTION_TESTS),
    M("attn-grad-out-strides-ignored", ATTENTION, "stride_mb, stride_mt, *grad_out.stride(),",
      "stride_mb, stride_mt, dim, 1,", "backward: grad_out read as contiguous (a stride-0 .sum() gradient misread)",
      ATTENTION_TESTS),
    M("attn-grad-scores-strides-ignored", ATTENTION, "*(grad_scores.stride() if grad_scores is not None else (0, 0))",
      "*((seq_len, 1) if grad_scores is not None else (0, 0))", "backward: grad_scores read as contiguous",
      ATTENTION_TESTS),
    Mutant("attn-fwd-user-index-int32", ATTENTION, [("b64 = tl.cast(b, tl.int64)", "b64 = b")],
           "forward: the user index in int32 (b * stride wraps past 2^31; a dtype narrowed)", ATTENTION_TESTS,
           occurrence=0),
    Mutant("attn-bwd-user-index-int32", ATTENTION, [("b64 = tl.cast(b, tl.int64)", "b64 = b")],
           "backward: the user index in int32 (a dtype narrowed)", ATTENTION_TESTS, occurrence=1),
    # ---------------------------------------------------------------- Dice kernels
    M("dice-eps-dropped", DICE, "rstd = 1.0 / tl.sqrt(var + eps)", "rstd = 1.0 / tl.sqrt(var)",
      "standalone Dice: 1/sqrt(var) without eps", DICE_TESTS),
    M("chan-merge-term-dropped", DICE, "return total, mean + delta * share_b, m2 + m2_b + delta * delta * count * share_b",
      "return total, mean + delta * share_b, m2 + m2_b",
      "Chan merge without the between-groups term (Dice and attention statistics)", SHARED_STATS_TESTS),
    M("chan-merge-mean-unweighted", DICE, "return total, mean + delta * share_b,", "return total, mean + delta * 0.5,",
      "Chan merge: the means averaged without their counts", SHARED_STATS_TESTS),
    M("dice-partials-spread-dropped", DICE, " + counts * spread * spread, axis=0)", ", axis=0)",
      "merge of the per-program partials without the spread of their means", SHARED_STATS_TESTS),
    M("dice-running-mean-var-swapped", DICE,
      "update_running_stats(run_mean_ptr, run_var_ptr, feats, feat_ok, mean, var, count, momentum)",
      "update_running_stats(run_mean_ptr, run_var_ptr, feats, feat_ok, var, mean, count, momentum)",
      "running statistics: mean and variance swapped", DICE_TESTS),
    M("running-var-bessel-dropped", DICE, "var * (count / (count - 1.0)) * momentum", "var * momentum",
      "running variance not unbiased (Dice and attention)", SHARED_STATS_TESTS),
    M("dice-stats-grad-mask-dropped", DICE, "dx -= tl.where(valid[:, None], through_stats, 0.0)", "dx -= through_stats",
      "the gradient through the statistics reaches masked rows (mask dropped on one gradient)", DICE_TESTS),
    Mutant("dice-stats-mask-dropped", DICE,
           [("valid = valid & (tl.load(mask_ptr + rows, mask=valid, other=0) != 0)", "valid = valid")],
           "masked rows counted in the batch statistics", DICE_TESTS, occurrence=0),
    M("dice-alpha-grad-wrong", DICE, "d_alpha = g * x * (1.0 - p)", "d_alpha = g * x * p",
      "alpha gradient uses p instead of 1 - p", DICE_TESTS),
    M("dice-bias-grad-dropped", DICE, "tl.store(dbias_ptr + feats, sum_gz.to(dbias_ptr.dtype.element_ty), mask=feat_ok)",
      "tl.store(dbias_ptr + feats, (0.0 * sum_gz).to(dbias_ptr.dtype.element_ty), mask=feat_ok)",
      "Dice affine bias gradient is 0 (a bias gradient dropped)", DICE_TESTS),
    M("dice-stats-grad-weight-dropped", DICE, "s2 = weight * sum_gz_xhat", "s2 = sum_gz_xhat",
      "affine Dice: the variance term of the statistics' gradient misses the weight", DICE_TESTS),
    M("dice-stats-last-row-dropped", DICE, "        valid = rows < n_rows\n        if HAS_MASK:\n            valid = valid & (tl.load",
      "        valid = rows < n_rows - 1\n        if HAS_MASK:\n            valid = valid & (tl.load",
      "the last row left out of the statistics (an off-by-one row bound)", DICE_TESTS),
    Mutant("dice-row-index-int32", DICE, [("first_row = pid_r.to(tl.int64) * rows_per_prog", "first_row = pid_r * rows_per_prog")],
           "statistics pass: row index in int32 (a dtype narrowed)", DICE_TESTS, occurrence=0),
    Mutant("dice-bwd-row-index-int32", DICE, [("first_row = pid_r.to(tl.int64) * rows_per_prog", "first_row = pid_r * rows_per_prog")],
           "backward dx pass: row index in int32 (a dtype narrowed)", DICE_TESTS, occurrence=3),
    M("dice-x-strides-ignored", DICE, "    return max(t.shape[1], 1), t.stride(0), t.stride(1)",
      "    return max(t.shape[1], 1), t.shape[1] * t.shape[2], t.shape[2]", "x [B, T, H] read as contiguous",
      DICE_TESTS),
    M("dice-grad-out-strides-ignored", DICE, "_, dy_stride_outer, dy_stride_inner = _row_view(grad_out)",
      "_, dy_stride_outer, dy_stride_inner = _row_view(x)", "grad_out assumed laid out like x (stride-0 .sum() misread)",
      DICE_TESTS),
    M("dice-param-stride-ignored", DICE, "return None if t is None else t.reshape(-1).contiguous()",
      "return None if t is None else t.reshape(-1)", "strided alpha/weight/bias/mask read with stride 1", DICE_TESTS),
    # ---------------------------------------------------------------- packed-rows attention kernels
    M("packed-softmax-carry-correction-dropped", PACKED, "scale = tl.where(carried, tl.exp(carry_m - m), 0.0)",
      "scale = tl.where(carried, 1.0, 0.0)", "packed: a user's softmax carried across tiles is not rescaled "
      "(no softmax correction)", PACKED_TESTS),
    M("packed-segment-carry-dropped", PACKED,
      "out = _segment_totals(same, w[:, None] * kf, DT) + tl.where(carried[:, None], carry_acc[None, :], 0.0)",
      "out = _segment_totals(same, w[:, None] * kf, DT)", "packed: a user cut by a tile boundary loses its earlier rows",
      PACKED_TESTS),
    M("packed-query-stride-ignored", PACKED, "q = tl.load(q_ptr + user[:, None] * stride_qb + offs_d[None, :]",
      "q = tl.load(q_ptr + user[:, None] * D + offs_d[None, :]", "packed: the query stride ignored (an expanded query)",
      PACKED_TESTS),
    M("packed-grad-out-strides-ignored", PACKED, "stride_sb, stride_st, *grad_out.stride(),",
      "stride_sb, stride_st, grad_out.shape[1], 1,", "packed backward: grad_out read as contiguous", PACKED_TESTS),
    M("packed-find-user-off-by-one", PACKED, "right = key <= x", "right = key < x",
      "packed: a user's first row is given to the user before it (an off-by-one in the row-to-user search)",
      PACKED_TESTS),
    M("packed-program-share-overlap", PACKED, "owned = (users < B) & (excl >= lo) & (excl < hi)",
      "owned = (users < B) & (excl >= lo) & (excl <= hi)",
      "packed: a user starting at a program boundary is owned by two programs (its rows counted twice)",
      PACKED_TESTS),
    M("packed-tile-bound-off-by-one", PACKED, "    live = rows < row_end", "    live = rows < row_end - 1",
      "packed: the last row of every program is never loaded nor stored (an off-by-one tile bound)", PACKED_TESTS,
      occurrence=0),
    M("packed-keys-strides-ignored", PACKED,
      "k = tl.load(k_ptr + user[:, None] * stride_kb + t[:, None] * stride_kt",
      "k = tl.load(k_ptr + user[:, None] * T * D + t[:, None] * D", "packed: keys read as contiguous "
      "(expanded or sliced keys misread)", PACKED_TESTS),
    M("packed-user-index-int32", PACKED, "    user = _find_user(rows, u_begin, u_end, offs_ptr, T, n_iter, False)\n    j =",
      "    user = _find_user(rows, u_begin, u_end, offs_ptr, T, n_iter, False).to(tl.int32)\n    j =",
      "packed: the user index in int32 (user * stride wraps past 2^31; a dtype narrowed)",
      ["tests/test_offsets.py::test_packed_attention_offsets_past_2_31"] + PACKED_TESTS),
    M("packed-lse-normaliser-dropped", PACKED, "m + tl.log(l_sum)", "m",
      "packed softmax: the stored log-sum-exp misses the normaliser (the backward's weights are wrong)",
      PACKED_TESTS),
    M("packed-softmax-delta-dropped", PACKED, "ds = w * (dw - delta)", "ds = w * dw",
      "packed softmax backward without the - sum_r w_r dL/dw_r term (no softmax correction)", PACKED_TESTS),
    M("packed-softmax-delta-scores-term-dropped", PACKED,
      "delta += tl.load(delta_ptr + user, mask=live, other=0.0)",
      "delta += 0.0 * tl.load(delta_ptr + user, mask=live, other=0.0)",
      "packed softmax backward: delta misses the returned scores' gradient", PACKED_TESTS),
    M("packed-first-bias-grad-dropped", PACKED, "db1 += tl.sum(G1, axis=1)", "db1 += 0.0 * tl.sum(G1, axis=1)",
      "packed: the first layer's bias gradient is 0 (a bias gradient dropped)", PACKED_TESTS),
    M("packed-score-bias-grad-dropped", PACKED, "dbo += tl.sum(ds, axis=0)", "dbo += 0.0 * tl.sum(ds, axis=0)",
      "packed: the score layer's bias gradient is 0 (exact only under softmax)", PACKED_TESTS),
    M("packed-score-weight-grad-dropped", PACKED, "dwo += tl.sum(h_top * ds[None, :], axis=1)",
      "dwo += 0.0 * tl.sum(h_top * ds[None, :], axis=1)", "packed: the score layer's weight gradient is 0",
      PACKED_TESTS),
    M("packed-staged-weights-overlap", PACKED, "return rows[:, None] * tile.shape[1] + cols[None, :]",
      "return rows[:, None] + cols[None, :]",
      "packed backward: the weights passed through the scratch overlap themselves (a row stride dropped)",
      PACKED_TESTS),
    M("packed-fold-forward-Wd-dropped", PACKED, "return (wk - wd).to(DT), wp.to(DT), (wq + wd).to(DT)",
      "return wk.to(DT), wp.to(DT), (wq + wd).to(DT)",
      "packed first-layer fold: Wd left out of the keys' block (Ak = Wk instead of Wk - Wd)", PACKED_TESTS),
    M("packed-stacked-block-offset-dropped", PACKED, "offs = (i // BLOCK_D)[:, None] * (H1 * BLOCK_D) + h[None, :]",
      "offs = h[None, :]", "packed backward: the stacked first layer repeats Ak in all three blocks", PACKED_TESTS),
    M("packed-stacked-inputs-swapped", PACKED, "tl.join(q, tl.zeros_like(q))), (0, 3, 2, 1))",
      "tl.join(q, tl.zeros_like(q))), (0, 2, 3, 1))",
      "packed backward: the recompute multiplies q * k by Aq and q by Ap (stacked inputs out of order)", PACKED_TESTS),
    M("packed-fold-dq-product-term-dropped", PACKED,
      "dq = tl.sum(tl.where(part == 2, X, 0.0) + tl.where(part == 1, X * k_t, 0.0), axis=0)",
      "dq = tl.sum(tl.where(part == 2, X, 0.0), axis=0)", "packed: dquery misses the q * k block's term", PACKED_TESTS),
    M("packed-dk-pool-term-dropped", PACKED, "dk = tl.trans(dk_mlp) + w[:, None] * g", "dk = tl.trans(dk_mlp)",
      "packed: dkeys misses the pooling term w_r * g_b", PACKED_TESTS),
    M("packed-dq-carry-dropped", PACKED, "carry_dq = _row_pick(dq, rows, last)", "carry_dq = _row_pick(dq, rows, last) * 0.0",
      "packed backward: a user cut by a tile boundary loses the dquery of its earlier rows", PACKED_TESTS),
    M("packed-empty-users-not-zeroed", PACKED,
      "    _zero_empty_users(out_ptr, stride_ob, D, u_begin, u_end, len_ptr, B, T, NV, BLOCK_M, BLOCK_D, JAGGED)\n",
      "", "packed: a user with no valid position gets no output written (garbage instead of zeros)", PACKED_TESTS),
    M("packed-dk-padding-not-zeroed", PACKED, "        _store_padding_zeros(dk_ptr,", "        if False:\n            _store_padding_zeros(dk_ptr,",
      "packed backward: dkeys at padded positions left unwritten", PACKED_TESTS),
    M("packed-mask-positions-reversed", PACKED,
      "positions = torch.argsort(mask.logical_not().to(torch.uint8), dim=1, stable=True)",
      "positions = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)",
      "packed: a mask's valid positions looked up as its padded ones", PACKED_TESTS),
    M("packed-lengths-stride-ignored", OPS_PACKED, "lengths = lengths.contiguous() if lengths is not None else None",
      "lengths = lengths", "packed: strided lengths read as contiguous", PACKED_TESTS),
    # ---------------------------------------------------------------- ops (autograd and custom ops)
    M("op-compiled-attention-weight-grads-none", OPS_ATTENTION, "    return (*grads, *(None,) * _OP_INPUTS_WITHOUT_GRAD)",
      "    return (grads[0], grads[1], [None] * len(grads[2]), grads[3], grads[4], *(None,) * _OP_INPUTS_WITHOUT_GRAD)",
      "the compiled custom op's backward returns None for the weight gradients", ATTENTION_TESTS[-1:] + ATTENTION_TESTS),
    M("op-compiled-dice-affine-grads-none", OPS_DICE, "    dweight, dbias = grads[2:] if weight is not None else (None, None)",
      "    dweight, dbias = None, None", "the compiled Dice op's backward returns None for weight and bias", DICE_TESTS),
    M("op-compiled-dice-running-stats-dropped", OPS_DICE, "            running_mean.copy_(new_mean)\n",
      "", "compiled Dice does not update the running mean", DICE_TESTS),
    M("op-keys-last-stride-not-copied", OPS_ATTENTION,
      "query, keys = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys)]", "pass",
      "keys with stride(-1) != 1 passed to the kernel as is", ATTENTION_TESTS),
    M("op-softmax-delta-scores-term-dropped", OPS_ATTENTION,
      "            delta = delta + (scores.float() * grad_scores.float()).sum(-1)", "            delta = delta",
      "softmax backward: delta misses the returned scores' gradient", ATTENTION_TESTS),
    M("op-length-check-off-by-one", OPS_CHECKS, "if low.item() < 0 or high.item() > seq_len:",
      "if low.item() < 0 or high.item() > seq_len + 1:", "a length of T + 1 accepted", ERROR_TESTS),
    M("op-kernel-gap-ignored", OPS_BACKEND, "    if kernel_gap is not None:\n        raise NotImplementedError",
      "    if kernel_gap is not None and False:\n        raise NotImplementedError",
      "backend='triton' runs a kernel on a case no kernel covers", ERROR_TESTS),
    M("op-auto-slow-kernel-ignored", OPS_BACKEND, "and kernel_gap is None and slow_kernel is None",
      "and kernel_gap is None", "auto runs a kernel the op called the wrong choice (fp32 with TF32 off)", ERROR_TESTS),
    M("op-slow-kernel-tf32-ignored", OPS_ATTENTION,
      "kernel_dtype(keys) == torch.float32 and not tf32_matmuls():",
      "kernel_dtype(keys) == torch.float32:", "auto skips the kernels for fp32 even with TF32 allowed",
      ["tests/test_packed.py"]),
    M("op-slow-kernel-not-asked", OPS_ATTENTION, "                            slow_kernel=attention_slow_kernel(keys))",
      "                            slow_kernel=None)", "attention_pool never hands the fp32 reason to the choice",
      ["tests/test_packed.py"]),
    M("op-packed-gap-storage-dtype", OPS_PACKED, "    dtype = kernel_dtype(keys)  # what the kernels compute in",
      "    dtype = keys.dtype  # what the kernels compute in",
      "fp32 keys under bf16 autocast kept off the packed kernels (asked about as fp32)",
      ["tests/test_attention_packed_kernel.py::test_dispatch_asks_about_the_autocast_dtype"]),
    M("launch-tf32-new-api-ignored", LAUNCH, "    if precision is None:\n        return bool(matmul.allow_tf32)",
      "    if True:\n        return bool(matmul.allow_tf32)",
      "the kernels' fp32 precision read from the legacy flag only (raises after torch >= 2.9's fp32_precision)",
      ["tests/test_launch.py"]),
    M("serving-shared-history-on-torch-path", "fastdin/serving.py",
      '        if self.attention.backend_for(keys) == "triton":', '        if keys.is_cuda or self.attention.backend == "triton":',
      "score_candidates hands the PyTorch paths N stride-0 copies of the history (fp32 on CUDA)",
      ["tests/test_serving.py"]),
    M("torch-path-chunks-on-cuda", TORCH_PATH, '    return (device.type != "cuda" and not torch.is_grad_enabled()',
      "    return (not torch.is_grad_enabled()",
      "CUDA inference on the torch path pools in chunks (launches, index_add_ atomics)", ["tests/test_packed.py"]),
    M("op-refused-mask-rebuilt-wrong", OPS_PACKED,
      "valid = torch.arange(positions.shape[1], device=positions.device)[None, :] < counts[:, None]",
      "valid = torch.arange(positions.shape[1], device=positions.device)[None, :] <= counts[:, None]",
      "a refused packed backward recomputes with one extra valid position per user (mask input)", REFUSAL_TESTS),
    M("op-refused-scores-grad-dropped", OPS_PACKED, "    if grad_scores is None or not spec.return_scores:",
      "    if True:", "a refused packed backward ignores the returned scores' gradient", REFUSAL_TESTS),
    M("op-compiled-refusal-raised", OPS_PACKED, "        except LAUNCH_REFUSED:\n            pass  # recorded by _forward",
      "        except ZeroDivisionError:\n            pass",
      "a compiled graph's packed op raises a refused launch instead of running the torch path", REFUSAL_TESTS),
    M("op-compiled-refused-forward-backward-on-kernels", OPS_PACKED,
      "    if refusal(FAMILY, keys, weights) is None:\n        try:\n            return _backward(",
      "    if True:\n        try:\n            return _backward(",
      "after a refused forward ran on the torch path, the backward runs the kernels with an lse they did not write",
      REFUSAL_TESTS),
    M("op-per-user-compiled-refusal-raised", OPS_ATTENTION,
      "            record_refusal(FAMILY, keys, weights, error)\n    spec = Spec(activation",
      "            raise\n    spec = Spec(activation",
      "a compiled graph's per-user op raises a refused launch instead of running the torch path", REFUSAL_TESTS),
    M("op-per-user-refused-forward-backward-on-kernels", OPS_ATTENTION,
      "    if training or refusal(FAMILY, keys, weights) is None:\n        try:\n            return _attention_kernels().attention_pool_backward(",
      "    if True:\n        try:\n            return _attention_kernels().attention_pool_backward(",
      "after a refused per-user forward ran on the torch path, the backward runs the kernels with an lse they did "
      "not write", REFUSAL_TESTS),
    M("op-per-user-refused-backward-raised", OPS_ATTENTION,
      "            if training:\n                raise RuntimeError(f\"the attention backward",
      "            if True:\n                raise RuntimeError(f\"the attention backward",
      "a refused per-user backward fails instead of recomputing on the torch path", REFUSAL_TESTS),
    M("op-refusal-not-recorded", OPS_PACKED, "        record_refusal(FAMILY, keys, weights, error)\n        raise",
      "        raise", "a refused packed forward is not recorded, so the call is not dispatched again", REFUSAL_TESTS),
    M("op-mma-sync-bound-low", OPS_PACKED, "return int(1.1 * (8 * first + 2 * deeper) * elt) + 8192",
      "return int(1.1 * (4 * first + 2 * deeper) * elt) + 8192",
      "the shared-memory bound without wgmma counts half the first layer (an L4 gets the paper shape packed)",
      BOUND_TESTS),
    M("op-wgmma-slack-everywhere", OPS_PACKED,
      "return wgmma and on_gpu and not torch.compiler.is_compiling() and estimate <= WGMMA_SLACK * limit",
      "return estimate <= WGMMA_SLACK * limit",
      "cases over the bound are tried under the interpreter, torch.compile and mma.sync GPUs too", BOUND_TESTS),
]

# Mutants that cannot change any result, kept to document why (run them with --equivalent).
EQUIVALENT = [
    Mutant("attn-softmax-empty-row-mask-dropped", ATTENTION,
           [("p = tl.where(valid, tl.exp(s - m_new), 0.0)", "p = tl.exp(s - m_new)")],
           "softmax: padded positions of a tile with no valid position so far get weight exp(0) = 1. Equivalent: "
           "their keys are loaded as 0 (never read), so the pooled sum gets nothing; the normaliser they add is "
           "multiplied by exp(-1e30 - m) = 0 as soon as a valid position raises the running max, and a row with "
           "none gives 0 / l = 0 and lse = -1e30 + log(l) = -1e30 in fp32, as unmutated. Its test stays: "
           "tests/test_padding_and_edge_cases.py::test_per_user_kernels_softmax_give_zeros_for_a_user_with_no_valid_position",
           ATTENTION_TESTS),
    Mutant("attn-returned-scores-mask-dropped", ATTENTION,
           [("tl.store(scores_ptr + b64 * stride_sb + offs_t, tl.where(valid, tl.exp(s - lse), 0.0), mask=tmask)",
             "tl.store(scores_ptr + b64 * stride_sb + offs_t, tl.exp(s - lse), mask=tmask)")],
           "softmax: the returned scores' final mask. Equivalent: the raw scores stored before it are already "
           "-1e30 at padded positions, and exp(-1e30 - lse) is exactly 0 in fp32 (lse is 0 for an empty row)",
           ATTENTION_TESTS),
]


# ---------------------------------------------------------------------------------------------


def _replace(text: str, old: str, new: str, occurrence: int) -> str:
    count = text.count(old)
    if occurrence < 0:
        if count != 1:
            raise LookupError(f"found {count} times, expected once: {old!r}")
        return text.replace(old, new)
    if count <= occurrence:
        raise LookupError(f"found {count} times, wanted occurrence {occurrence}: {old!r}")
    at = -1
    for _ in range(occurrence + 1):
        at = text.index(old, at + 1)
    return text[:at] + new + text[at + len(old):]


def mutated_text(mutant: Mutant) -> str:
    text = (ROOT / mutant.path).read_text()
    for old, new in mutant.edits:
        text = _replace(text, old, new, mutant.occurrence)
    return text


def backup_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"fastdin-mutation-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]}"


def copy_tree() -> Path:
    """A copy of the checkout that imports itself (see the module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="fastdin-mutation-tree-"))
    shutil.copytree(ROOT, work, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache"))
    for package, folder in (("kernels", "kernels"), ("bench", "bench")):
        (work / "fastdin" / package).symlink_to(Path("..") / folder)
    probe = "import fastdin.kernels.dice as d, fastdin.ops.attention as a; print(d.__file__); print(a.__file__)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=work, capture_output=True, text=True, check=True).stdout
    assert all(line.startswith(str(work)) for line in found.split()), f"the copy imports from elsewhere: {found}"
    return work


def restore_leftovers() -> None:
    """Put back originals a killed run left in the backup directory."""
    BACKUP_DIR = backup_dir()
    if not BACKUP_DIR.exists():
        return
    for backup in BACKUP_DIR.rglob("*"):
        if backup.is_file():
            target = ROOT / backup.relative_to(BACKUP_DIR)
            print(f"restoring {target} from a previous run's backup")
            shutil.copy2(backup, target)
            backup.unlink()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_tests(tests: Sequence[str], timeout: float):
    """(return code, the first failing test or error line, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", "-k", DESELECT, *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"timed out after {timeout:.0f} s", time.monotonic() - start
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.M)
    if failed:
        return proc.returncode, failed[0], seconds
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return proc.returncode, lines[-1] if lines else "", seconds


def check_mutant(mutant: Mutant, timeout: float):
    """('killed' | 'survived' | 'ERROR', detail, seconds); the file is restored in every case."""
    path = ROOT / mutant.path
    original = path.read_bytes()
    try:
        text = mutated_text(mutant)
    except (LookupError, FileNotFoundError) as error:
        return "ERROR", f"mutant does not apply: {error}", 0.0
    backup = backup_dir() / mutant.path
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_bytes(original)
    try:
        path.write_text(text)
        code, detail, seconds = run_tests(mutant.tests, timeout)
    finally:
        path.write_bytes(original)
        backup.unlink()
    assert path.read_bytes() == original
    if code == 0:
        return "survived", "every test passed", seconds
    if code == 5:
        return "ERROR", "no tests collected", seconds
    return "killed", detail, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every mutant applies")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test group")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's tests")
    parser.add_argument("--markdown", type=Path, help="also write the result table here")
    parser.add_argument("--in-place", action="store_true", help="mutate the checkout itself, not a copy")
    parser.add_argument("--equivalent", action="store_true", help="run the mutants known to be equivalent instead")
    args = parser.parse_args(argv)
    pool = EQUIVALENT if args.equivalent else MUTANTS
    names = [m.name for m in pool]
    assert len(set(names)) == len(names), "mutant names must be unique"
    mutants = pool if not args.only else [m for m in pool if m.name in args.only]
    unknown = set(args.only or []) - set(names)
    if unknown:
        parser.error(f"unknown mutants: {sorted(unknown)}")
    if args.list:
        for m in mutants:
            print(f"{m.name:45s} {m.path:28s} {m.breaks}")
        return 0
    global ROOT
    signal.signal(signal.SIGTERM, _interrupt)
    restore_leftovers()
    checkout = ROOT
    if not args.in_place and not args.check:
        ROOT = copy_tree()
        print(f"mutating a copy of the tree: {ROOT}")
    try:
        return run_all(args, mutants)
    finally:
        if ROOT != checkout:
            shutil.rmtree(ROOT, ignore_errors=True)
            ROOT = checkout


def run_all(args, mutants) -> int:
    if args.check:
        bad = 0
        for m in mutants:
            try:
                mutated_text(m)
            except (LookupError, FileNotFoundError) as error:
                bad += 1
                print(f"ERROR {m.name}: {error}")
        print(f"{len(mutants) - bad} of {len(mutants)} mutants apply")
        return 1 if bad else 0
    results = []
    try:
        if not args.no_baseline:  # every test the mutants use, once, unmutated
            union = list(dict.fromkeys(test for m in mutants for test in m.tests))
            code, detail, seconds = run_tests(union, args.timeout * 3)
            if code != 0:
                print(f"ERROR: the unmutated tests fail ({detail})")
                return 2
            print(f"baseline: every test passes unmutated ({seconds:.0f} s)", flush=True)
        for m in mutants:
            verdict, detail, seconds = check_mutant(m, args.timeout)
            results.append((m, verdict, detail, seconds))
            print(f"{verdict:8s} {m.name:45s} {seconds:6.1f} s  {detail}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: every file is restored")
    counts = {v: sum(r[1] == v for r in results) for v in ("killed", "survived", "ERROR")}
    print(f"\n{len(results)} mutants: {counts['killed']} killed, {counts['survived']} survived, {counts['ERROR']} errors")
    if args.markdown:
        rows = ["| mutant | file | what it breaks | result | by |", "|---|---|---|---|---|"]
        rows += [f"| {m.name} | {m.path} | {m.breaks} | {verdict} | `{detail}` |" for m, verdict, detail, _ in results]
        args.markdown.write_text("\n".join(rows) + "\n")
    return 0 if counts["survived"] == counts["ERROR"] == 0 and len(results) == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
