"""The numerics policy: how close a fast path must come to the float64 reference.

One measure, one per-dtype table, used by every numerics test and by `bench/accuracy.py`:

    error = ||got - ref64|| / ||ref64||                  (relative, Frobenius norm)
    bound = 2 * error of the reference run in the same dtype + FLOOR[dtype]

The factor 2 is flash-attention's rule: a kernel may lose at most about as much again as the plain
PyTorch computation does in its own precision. The floor covers what that rule cannot: the error of
a single reference run is one draw, and a second correct order of summation is another draw of the
same size, so "2x the draw" alone rejects correct kernels at random (seen: a fused kernel at 2.7x the
fp32 reference on a gradient that cancels, on a CPU with other vector paths).

An entry that is zero in exact math has no relative error: its computed value is rounding noise
that cancelled. Such entries are held to an absolute bound instead (ZERO_FLOOR times the result's
largest entry, at least 1), and the rest of the result to the relative one. They come from structure,
not chance: a softmax's gradients sum to zero over a user, so under softmax the score layer's bias
gets zero, and so does a hidden bias whose unit stays in one linear piece (PReLU) over a user who is
alone in the batch (seen: FASTDIN_TEST_SEED=7, four of five entries of a bias gradient at 1e-7 of
noise, 2.6e-4 relative to the fifth entry's 2.2e-4).
"""
from typing import Optional

import torch
from torch import Tensor

# The floor per dtype. fp32 (unit roundoff u = 6e-8): two correct orders of summing n terms differ by
# up to about n*u relative to the sum of the terms' sizes (sqrt(n)*u typically), and more relative to
# a result that cancels (a softmax or bias gradient): with the tests' n of a few hundred to a thousand
# (B*T positions, 4D*H products) that is up to ~6e-5, and Dice batch statistics over few rows
# amplify it. Measured (tests/sweep_seeds.py, seeds 0-16 of every kernel case): kernel error - 2 x
# reference error up to 1.07e-5 in most cases, 5.32e-5 for training-mode Dice with two counted rows
# (T = 1), and 1.2e-5 in the failure seen on another CPU; 1e-4 covers these, and an error of 1e-3
# still fails 10x over. fp16/bf16 (u = 4.9e-4 / 3.9e-3): results are rounded once to the dtype.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The absolute bound of an entry that is zero in exact math, per unit of the result's scale: fp32 noise
# there is u times the size of the cancelled terms (seen up to 2e-7), low precision's one rounding more.
ZERO_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# In float64 an exact zero comes out within ~1e-16 of the terms' size; a true entry this small next to
# entries of size 1 is a one-in-1e10 coincidence
_EXACT_ZERO = 1e-10

# Set to a list by a seed sweep (tests/sweep_seeds.py): every comparison is appended as
# (name, dtype, error, same-dtype reference error), so the worst error/bound ratio can be found.
RECORD: Optional[list] = None


def relative_error(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| in float64 (0 / 0 counts as 0: a result that is zero on both sides)."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30))


def error_bound(dtype: torch.dtype, same_dtype_error: float) -> float:
    """The largest relative error allowed for a result computed in `dtype` (see the module docstring)."""
    return 2 * same_dtype_error + FLOOR[dtype]


def assert_close_to_reference(name: str, got: Tensor, ref64: Tensor, ref_same_dtype, dtype: Optional[torch.dtype] = None
                              ) -> float:
    """Assert relative_error(got, ref64) <= error_bound(dtype, relative_error(ref_same_dtype, ref64)).

    `ref_same_dtype` is the reference run from the same inputs in the dtype the fast path computes
    in, or a sequence of such runs in different correct orders (say, with the batch reversed): the
    largest of their errors counts, as one run's error can be lucky. `dtype` defaults to that of
    `ref_same_dtype`; give it for results kept in another dtype (fp32 running statistics of an fp16
    layer). Returns the error / bound ratio.
    """
    runs = list(ref_same_dtype) if isinstance(ref_same_dtype, (list, tuple)) else [ref_same_dtype]
    dtype = dtype or runs[0].dtype
    got, ref64 = got.detach(), ref64.detach().to(got.device)
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    zero = ref64.abs() <= _EXACT_ZERO * scale
    if zero.any():
        noise, limit = float(got[zero].double().abs().max()), ZERO_FLOOR[dtype] * scale
        assert noise <= limit, (f"{name}: {noise:.2e} where the result is zero in exact math > {limit:.2e} "
                                f"(the absolute bound in {str(dtype).replace('torch.', '')})")
        if zero.all():
            return noise / limit
        got, ref64, runs = got[~zero], ref64[~zero], [r.detach().to(got.device)[~zero] for r in runs]
    error, same = relative_error(got, ref64), max(relative_error(r, ref64) for r in runs)
    bound = error_bound(dtype, same)
    if RECORD is not None:
        RECORD.append((name, dtype, error, same))
    assert error <= bound, (f"{name}: relative error {error:.2e} > {bound:.2e} = 2 x {same:.2e} (the reference in "
                            f"{str(dtype).replace('torch.', '')}) + {FLOOR[dtype]:.0e}")
    return error / bound


def assert_all_close_to_reference(name: str, got, ref64, ref_same_dtype, dtype=None) -> None:
    """assert_close_to_reference on each of three parallel sequences of results, named name[i]."""
    assert len(got) == len(ref64) == len(ref_same_dtype), name
    for i, (g, w, s) in enumerate(zip(got, ref64, ref_same_dtype)):
        assert_close_to_reference(f"{name}[{i}]", g, w, s, dtype)


def relative_errors(got, want) -> list:
    """relative_error of each pair of two parallel sequences of results."""
    return [relative_error(g, w) for g, w in zip(got, want)]
