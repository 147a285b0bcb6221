"""The work each benchmark case must do: counted FLOPs and the fewest bytes it must move.

These are lower bounds, so achieved TFLOP/s and GB/s computed from them never flatter an
implementation that does extra work (eager builds the 4D concat; it is not counted).

Conventions, used by every formula here:
- A multiply-add is 2 FLOPs. Only matrix-like multiply-adds are counted; activations, bias adds,
  masking and softmax are not (they are O(1) per element of an H-wide row).
- Attention uses the exact first-layer fold of the design notes: per user
  W_b = Wk - Wd + diag(q) Wp and c_b = q (Wq + Wd) + b1 (4·D·H1 FLOPs), then per valid position
  2·D·H1 for the first layer, 2·H_{l-1}·H_l for each deeper layer, 2·H_L for the score and 2·D
  for the weighted sum. Positions past a row's length need no work and are not counted.
- Training (forward + backward) counts 3x the forward FLOPs: the backward takes a gradient with
  respect to both the input and the weights of every product, each as costly as the forward.
- Bytes: each input read once and each output written once, at the tensors' own element sizes
  (parameters stay fp32 under autocast). Inference reads the inputs and parameters and writes the
  output; training also reads the output gradient and writes the input and parameter gradients.
"""
from typing import Sequence

INT64 = 8
FP32 = 4

# Dice per element: normalise (x - mean) * rstd: 2; sigmoid: 4 (negate, exp, add, reciprocal);
# blend p*x + (1-p)*alpha*x = x * (alpha + p*(1 - alpha)): 3. Batch statistics in training
# (sum and sum of squares): 3 more.
DICE_FLOPS_PER_ELEMENT = 9
DICE_STATS_FLOPS_PER_ELEMENT = 3


def mlp_params(fan_in: int, hidden: Sequence[int], out: int = 1) -> int:
    """Weights and biases of Linear layers fan_in -> hidden... -> out."""
    sizes = [fan_in, *hidden, out]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def attention_flops(batch: int, positions: int, dim: int, hidden: Sequence[int], training: bool) -> int:
    """FLOPs of the local activation unit and weighted sum over `positions` valid (user, t) pairs."""
    fold = 4 * dim * hidden[0] * batch
    per_position = 2 * dim * hidden[0] + sum(2 * a * b for a, b in zip(hidden[:-1], hidden[1:]))
    per_position += 2 * hidden[-1] + 2 * dim
    forward = fold + per_position * positions
    return 3 * forward if training else forward


def attention_bytes(batch: int, seq_len: int, dim: int, hidden: Sequence[int], key_rows_read: int,
                    key_rows_grad: int, itemsize: int, training: bool, act_params: int = 0) -> int:
    """Fewest bytes for attention pooling.

    key_rows_read: distinct key vectors that must be read (the valid positions; T for one history
    shared by all candidates). key_rows_grad: rows of the key gradient that must be written (the
    whole [B, T, D] tensor, or [1, T, D] for a shared history). act_params: PReLU/Dice parameters.
    """
    params = (mlp_params(4 * dim, hidden) + act_params) * FP32
    inputs = key_rows_read * dim * itemsize + batch * dim * itemsize + batch * INT64 + params
    out = batch * dim * itemsize
    if not training:
        return inputs + out
    grads = key_rows_grad * dim * itemsize + batch * dim * itemsize + params
    return inputs + out + out + grads  # out is written, then its gradient read


def dice_flops(elements: int, training: bool) -> int:
    if not training:
        return DICE_FLOPS_PER_ELEMENT * elements
    return 3 * (DICE_FLOPS_PER_ELEMENT + DICE_STATS_FLOPS_PER_ELEMENT) * elements


def dice_bytes(rows: int, features: int, itemsize: int, training: bool) -> int:
    """Inference reads x and alpha and the running statistics and writes y. Training reads x and
    dy and writes y and dx; alpha and the running statistics are read, and alpha's gradient and the
    two running statistics written."""
    elements = rows * features
    if not training:
        return 2 * elements * itemsize + 3 * features * FP32
    return 4 * elements * itemsize + 6 * features * FP32


def din_flops(batch: int, positions: int, embed_dim: int, attention_hidden: Sequence[int],
              top_in: int, top_hidden: Sequence[int], training: bool) -> int:
    """DIN: attention over behaviours of width 2E, then the top MLP on each row (embedding lookups
    are gathers: no FLOPs)."""
    attention = attention_flops(batch, positions, 2 * embed_dim, attention_hidden, training=False)
    sizes = [top_in, *top_hidden, 1]
    top = batch * sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))
    forward = attention + top
    return 3 * forward if training else forward


def din_bytes(batch: int, seq_len: int, positions: int, embed_dim: int, dense_params: int, training: bool) -> int:
    """DIN: the ids (item, category, their histories: int64), the lengths, the embedding rows
    gathered for the candidate and the valid behaviours (two fp32 tables), the dense parameters and
    the logits; training also reads the labels and writes the gradients of the rows it gathered and
    of the dense parameters. The optimizer's update is not counted."""
    ids = batch * (2 + 2 * seq_len) * INT64 + batch * INT64
    rows = (batch + positions) * 2 * embed_dim * FP32
    inference = ids + rows + dense_params * FP32 + batch * FP32
    if not training:
        return inference
    return inference + batch * FP32 + rows + dense_params * FP32
