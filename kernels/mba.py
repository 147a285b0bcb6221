"""Mini-batch aware regularization: grad[j] += lam * w[j] / max(n[j], 1) once for each distinct id j.

One fused gather-scale-scatter over the rows that a batch looks up. The ids are sorted first,
so the first copy of each id owns its row: duplicates and the padding id are masked out and no
two programs write the same row (no atomics). Unlike `torch.unique`, sorting needs no
device-to-host sync, so the whole update is sync-free. The cost is O(ids in the batch × dim);
masked rows load nothing.

Whether this beats torch's index ops on a GPU is for `bench/bench_mba_step.py` to decide; until
then `fastdin.regularization` only uses it with backend="triton".
"""
import torch
import triton
import triton.language as tl

from fastdin.kernels.launch import ceil_div, next_power_of_2

BLOCK_IDS = 16  # sorted ids per program
MAX_BLOCK_DIM = 128  # columns per inner step; wider rows loop


@triton.jit
def _mba_scatter_kernel(
    ids_ptr, num_ids, weight_ptr, grad_ptr, counts_ptr, lam, dim, padding_idx,
    stride_w_row, stride_w_col, stride_g_row, stride_g_col,
    HAS_PADDING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs < num_ids
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    # ids >= 0, so -1 marks "no previous id" at the start of the array
    prev = tl.load(ids_ptr + offs - 1, mask=in_range & (offs > 0), other=-1)
    owner = in_range & (ids != prev)
    if HAS_PADDING:
        owner = owner & (ids != padding_idx)
    counts = tl.load(counts_ptr + ids, mask=owner, other=1)
    scale = lam / tl.maximum(counts, 1).to(tl.float32)  # n_j = 0 is treated as 1
    w_rows = weight_ptr + ids[:, None] * stride_w_row
    g_rows = grad_ptr + ids[:, None] * stride_g_row
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = owner[:, None] & (cols < dim)[None, :]
        w = tl.load(w_rows + cols[None, :] * stride_w_col, mask=mask, other=0.0)
        g = tl.load(g_rows + cols[None, :] * stride_g_col, mask=mask, other=0.0)
        out = g.to(tl.float32) + w.to(tl.float32) * scale[:, None]
        tl.store(g_rows + cols[None, :] * stride_g_col, out.to(grad_ptr.dtype.element_ty), mask=mask)


def mba_scatter_(grad: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                 lam: float, padding_idx=None) -> torch.Tensor:
    """In place: grad[j] += lam * weight[j] / max(counts[j], 1) for each distinct id j in ids.

    grad and weight are [rows, dim] (any strides), ids any shape of int ids in [0, rows) (not
    checked here), counts [rows] int64 contiguous, padding_idx an id to skip or None. Computes
    in fp32 and rounds once on store.
    """
    sorted_ids = torch.sort(ids.reshape(-1).to(torch.int64)).values
    num_ids = sorted_ids.numel()
    if num_ids == 0:
        return grad
    dim = weight.shape[1]
    block_dim = min(MAX_BLOCK_DIM, next_power_of_2(max(dim, 1)))
    grid = (ceil_div(num_ids, BLOCK_IDS),)
    _mba_scatter_kernel[grid](
        sorted_ids, num_ids, weight, grad, counts, float(lam), dim,
        -1 if padding_idx is None else int(padding_idx),
        weight.stride(0), weight.stride(1), grad.stride(0), grad.stride(1),
        HAS_PADDING=padding_idx is not None, BLOCK_N=BLOCK_IDS, BLOCK_D=block_dim,
    )
    return grad
