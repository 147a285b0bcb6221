"""Offset arithmetic past 2^31 elements, without allocating 2^31 elements.

The inputs are views with a huge batch stride S (2^30 + 2^20: an int32 kernel argument, while 2 * S
passes 2^31) into one sparse file mapped into memory: only the few pages holding the data are ever
touched. The views start 2^31 elements into the mapping, so an offset computed in int32 that wraps
still lands inside it (reading zeros or another user's data) instead of crashing, and the test
fails on the wrong numbers. The launchers are called directly: autograd would allocate a dense
gradient for the whole mapping.
"""
import pytest
import torch
from conftest import DEVICES
from layout_helpers import assert_within_policy

from fastdin import reference
from fastdin.kernels import attention_packed as packed_kernels
from fastdin.kernels import attention_pool as attention_kernels
from fastdin.kernels import dice as dice_kernels

STRIDE = 2**30 + 2**20
START = 2**31
pytestmark = pytest.mark.skipif(DEVICES[0] != "cpu", reason="a sparse host mapping stands in for 2^31 elements")


@pytest.fixture
def huge(tmp_path):
    """A float32 tensor of 2^32 + 2^22 elements backed by a sparse file (a few pages are touched)."""
    size = START + 2 * STRIDE + 2**21
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(size * 4)
    return torch.from_file(str(path), shared=True, size=size, dtype=torch.float32)


def place(huge, values, at):
    """A view of `huge` holding `values` ([B, ...]) with batch stride STRIDE, `at` elements past START."""
    inner = values[0].contiguous().stride()
    view = huge.as_strided(values.shape, (STRIDE, *inner), storage_offset=START + at)
    view.copy_(values)
    assert (values.shape[0] - 1) * STRIDE + START > 2**31  # the last user's offset needs int64
    return view


def attention_inputs(B, T, D, hidden):
    query, keys = torch.randn(B, D), torch.randn(B, T, D)
    grad_out, grad_scores = torch.randn(B, D), torch.randn(B, T)
    sizes = [4 * D, *hidden, 1]
    weights = [torch.randn(o, i) * i ** -0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.randn(o) * 0.5 for o in sizes[1:]]
    slopes = [torch.rand(h) * 0.5 for h in hidden]
    return query, keys, grad_out, grad_scores, weights, biases, slopes


def attention_reference(query, keys, grad_out, grad_scores, weights, biases, slopes, lengths, dtype):
    leaves = [t.to(dtype).requires_grad_() for t in (query, keys, *weights, *biases, *slopes)]
    n = len(weights)
    w, b, a = leaves[2:2 + n], leaves[2 + n:2 + 2 * n], leaves[2 + 2 * n:]
    out, scores = reference.attention_pool(leaves[0], leaves[1], w, b, activation="prelu", act_params=a,
                                           lengths=lengths, normalization="softmax", return_scores=True)
    return [out, scores, *torch.autograd.grad((out, scores), leaves, (grad_out.to(dtype), grad_scores.to(dtype)))]


def test_attention_offsets_past_2_31(huge):
    """The per-user kernels: a user's addresses are b * stride."""
    B, T, D, hidden = 3, 5, 4, (6, 3)
    inputs = attention_inputs(B, T, D, hidden)
    query, keys, grad_out, grad_scores, weights, biases, slopes = inputs
    lengths = torch.tensor([T, 3, 2])
    far = [place(huge, t, at) for t, at in ((query, 0), (keys, 1024), (grad_out, 2048), (grad_scores, 3072))]
    out, scores, lse = attention_kernels.attention_pool_forward(
        far[0], far[1], weights, biases, slopes, lengths, None, "prelu", 0.0, False, True, True)
    delta = (out * grad_out).sum(-1) + (scores * grad_scores).sum(-1)
    grads = attention_kernels.attention_pool_backward(
        far[2], far[3], far[0], far[1], weights, biases, slopes, lengths, None, lse, delta, "prelu", 0.0, False, True)
    score_bias = 2 + 2 + len(weights) + len(biases) - 1  # 0 under softmax
    assert_within_policy([out, scores, *grads], attention_reference(*inputs, lengths, torch.float64),
                         attention_reference(*inputs, lengths, torch.float32), torch.float32, score_bias)


@pytest.mark.parametrize("block_m", [16, 64])
def test_packed_attention_offsets_past_2_31(huge, block_m):
    """The packed-rows kernels: a row's key address is user * stride_kb + t * stride_kt, the query's
    and grad_out's user * stride (2 programs, one or several users per tile)."""
    B, T, D, hidden = 3, 5, 4, (6, 3)
    inputs = attention_inputs(B, T, D, hidden)
    query, keys, grad_out, grad_scores, weights, biases, slopes = inputs
    lengths = torch.tensor([T, 3, 2])
    far = [place(huge, t, at) for t, at in ((query, 0), (keys, 1024), (grad_out, 2048), (grad_scores, 3072))]
    acts = [[s] for s in slopes]
    rows = packed_kernels.packed_rows(lengths=lengths)
    out, scores, lse = packed_kernels.packed_attention_forward(
        far[0], far[1], weights, biases, acts, rows, "prelu", 0.0, False, True, True, block_m=block_m)
    grads = packed_kernels.packed_attention_backward(
        far[2], far[3], far[0], far[1], weights, biases, acts, rows, out, scores, lse, "prelu", 0.0, False, True,
        block_m=block_m)
    score_bias = 2 + 2 + len(weights) + len(biases) - 1  # 0 under softmax
    assert_within_policy([out, scores, *grads], attention_reference(*inputs, lengths, torch.float64),
                         attention_reference(*inputs, lengths, torch.float32), torch.float32, score_bias)


@pytest.mark.parametrize("training", [True, False])
def test_dice_offsets_past_2_31(huge, training):
    B, T, H = 3, 4, 5
    x, grad = torch.randn(B, T, H) * 2 + 1, torch.randn(B, T, H)
    alpha, weight, bias = torch.rand(H), 1 + 0.3 * torch.randn(H), 0.3 * torch.randn(H)
    mask = torch.rand(B, T) > 0.3
    mask[0, :2] = True
    running = [torch.zeros(H), torch.ones(H)]
    far_x, far_grad = place(huge, x, 0), place(huge, grad, 1024)
    out, stats = dice_kernels.dice_forward(far_x, alpha, weight, bias, *running, mask, training, 0.1, 1e-5,
                                           row_programs=2)
    grads = dice_kernels.dice_backward(far_grad, far_x, mask, alpha, weight, bias, stats, training, row_programs=2)

    def reference_run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, alpha, weight, bias)]
        out = reference.dice(leaves[0], leaves[1], torch.zeros(H, dtype=dtype), torch.ones(H, dtype=dtype),
                             weight=leaves[2], bias=leaves[3], training=training, eps=1e-5, mask=mask)
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]

    assert_within_policy([out, *grads], reference_run(torch.float64), reference_run(torch.float32), torch.float32)
