"""Shared by the attention-kernel tests (test_attention_kernel.py, test_attention_dice_train.py): the
case description, fresh random inputs, the comparison with the float64 reference, and fake inputs for
the sm_90 builds (tests/sm90_build.py)."""
from dataclasses import dataclass
from typing import Optional, Sequence

import pytest
import torch

from fastdin.layers import AttentionPooling

# Relative error vs the float64 reference: at most twice the error of the reference run in the same
# dtype, plus a small floor per dtype (docs/design.md's numerics policy, flash-attention's rule).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# bf16 arithmetic is wrong in the interpreter: CUDA only
LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@dataclass
class Case:
    dim: int
    hidden: Sequence[int]
    activation: str = "sigmoid"
    seq_len: int = 9
    batch: int = 3
    positions: Optional[str] = "lengths"  # "lengths" | "mask" | None
    normalization: Optional[str] = None
    return_scores: bool = True
    layout: str = "contiguous"  # "contiguous" | "strided" | "expanded" | "transposed"
    shared_slope: bool = True  # PReLU: one slope per layer, else one per feature
    dice_affine: bool = False

    def __str__(self):
        return (f"D{self.dim}-H{'x'.join(map(str, self.hidden))}-{self.activation}-T{self.seq_len}-"
                f"{self.positions}-{self.normalization}-{self.layout}")


def make_inputs(case: Case, device):
    """Fresh random float64 leaves: query, the keys' base tensor, weights, biases and act params."""
    B, T, D = case.batch, case.seq_len, case.dim
    base_shape = {"contiguous": (B, T, D), "strided": (B, 2 * T, D + 3), "expanded": (1, T, D),
                  "transposed": (B, D, T)}[case.layout]
    leaves = {"query": torch.randn(B, D), "keys_base": torch.randn(base_shape)}
    fan_in = 4 * D
    weights, biases = [], []
    for width in list(case.hidden) + [1]:
        weights.append(torch.randn(width, fan_in) * (2.0 / fan_in) ** 0.5)
        biases.append(torch.randn(width) * 0.5)
        fan_in = width
    leaves["weights"], leaves["biases"] = weights, biases
    if case.activation == "prelu":
        leaves["slopes"] = [torch.rand(1 if case.shared_slope else h) * 0.5 for h in case.hidden]
    if case.activation == "dice":
        leaves["alpha"] = [torch.rand(h) for h in case.hidden]
        leaves["running_mean"] = [torch.randn(h) * 0.3 for h in case.hidden]
        leaves["running_var"] = [torch.rand(h) + 0.5 for h in case.hidden]
        if case.dice_affine:
            leaves["dice_weight"] = [1 + 0.3 * torch.randn(h) for h in case.hidden]
            leaves["dice_bias"] = [0.3 * torch.randn(h) for h in case.hidden]
    positions = {}
    if case.positions == "lengths":
        lengths = torch.randint(0, T + 1, (B,))
        lengths[-1] = 0  # a row with no valid position
        positions["lengths"] = lengths
    elif case.positions == "mask":
        mask = torch.rand(B, T) < 0.6
        mask[-1] = False
        positions["mask"] = mask
    leaves = {k: ([t.double().to(device) for t in v] if isinstance(v, list) else v.double().to(device))
              for k, v in leaves.items()}
    positions = {k: v.to(device) for k, v in positions.items()}
    return leaves, positions


def cast_leaves(leaves, dtype):
    """Copies of the leaves in dtype that require grad (Dice running statistics stay fixed)."""
    out = {}
    for name, value in leaves.items():
        trainable = name not in ("running_mean", "running_var")
        if isinstance(value, list):
            out[name] = [t.detach().to(dtype).requires_grad_(trainable) for t in value]
        else:
            out[name] = value.detach().to(dtype).requires_grad_(trainable)
    return out


def keys_from_base(case: Case, base):
    B, T, D = case.batch, case.seq_len, case.dim
    if case.layout == "strided":
        return base[:, ::2, 1:D + 1]
    if case.layout == "expanded":
        return base.expand(B, T, D)
    if case.layout == "transposed":
        return base.transpose(1, 2)
    return base


def relative_errors(got, want):
    return [((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-12)).item() for g, w in zip(got, want)]


def outputs_and_grads(result, return_scores, grad_out, grad_scores, trainable):
    """[out, (scores,) *gradients of the trainable leaves] of the loss out . grad_out (+ scores . grad_scores)."""
    out, scores = result if return_scores else (result, None)
    loss = (out * grad_out.to(out.dtype)).sum()
    if scores is not None:
        loss = loss + (scores * grad_scores.to(scores.dtype)).sum()
    grads = torch.autograd.grad(loss, trainable)
    return [out] + ([scores] if scores is not None else []) + list(grads)


def score_bias_index(case: Case):
    """Under softmax the score layer's bias gets an exact zero gradient (a shift does not change the
    softmax): the index of that gradient in a run's result, checked by absolute value instead."""
    if case.normalization != "softmax":
        return None
    return (2 if case.return_scores else 1) + 2 + (len(case.hidden) + 1) + len(case.hidden)


def dtype_params(cases, low_precision_cases):
    """pytest params (case, dtype): every case in fp32, the low-precision ones in each of LOW_DTYPES."""
    pairs = [(case, torch.float32) for case in cases]
    pairs += [(case, dtype) for dtype in LOW_DTYPES for case in low_precision_cases]
    return [pytest.param(case, dtype, id=f"{case}-{str(dtype).replace('torch.', '')}") for case, dtype in pairs]


def check_against_reference(case: Case, dtype, device, run, leaves, positions, backend="triton"):
    """The kernel (`run(case, leaves, positions, backend, grad_out, grad_scores)` with backend "triton",
    or another fast backend) against the float64 reference: every result finite, of the dtype and
    shape, and within twice the same-dtype reference's error plus ATOL."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 runs on CUDA only")
    grad_out = torch.randn(case.batch, case.dim, dtype=torch.float64, device=device)
    grad_scores = torch.randn(case.batch, case.seq_len, dtype=torch.float64, device=device)
    # the float64 reference from exactly the inputs the kernel sees (rounded to dtype)
    want = run(case, cast_leaves(cast_leaves(leaves, dtype), torch.float64), positions, "reference",
               grad_out, grad_scores)
    got = run(case, cast_leaves(leaves, dtype), positions, backend, grad_out, grad_scores)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert torch.isfinite(g).all(), "a NaN (unwritten poisoned element?) or inf in the kernel's result"
    errors = relative_errors(got, want)
    skip = score_bias_index(case)
    if skip is not None:
        assert got[skip].abs().max().item() < (1e-5 if dtype == torch.float32 else 1e-2)
        errors[skip] = 0.0
    same_dtype = run(case, cast_leaves(leaves, dtype), positions, "reference", grad_out, grad_scores)
    bounds = [2 * e + ATOL[dtype] for e in relative_errors(same_dtype, want)]
    for i, (err, bound) in enumerate(zip(errors, bounds)):
        assert err <= bound, f"result {i}: relative error {err:.2e} > {bound:.2e} ({case}, {dtype})"


def make_module_pair(activation, normalization, dice_affine=False):
    """AttentionPooling on the triton and the reference backend, with the same random parameters and
    running statistics."""
    kwargs = dict(embed_dim=6, hidden_units=(11, 5), activation=activation, normalization=normalization,
                  return_scores=True, dice_affine=dice_affine)
    fast = AttentionPooling(backend="triton", **kwargs)
    slow = AttentionPooling(backend="reference", **kwargs)
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0, 0.5)
        for m in fast.modules():
            if hasattr(m, "running_var"):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def fake_bf16_inputs(dim, hidden, batch=4, seq_len=100):
    """(query, keys, weights, biases, lengths) for capturing launches: bf16 activations, fp32 weights."""
    keys, query = torch.randn(batch, seq_len, dim).bfloat16(), torch.randn(batch, dim).bfloat16()
    sizes = [4 * dim] + list(hidden) + [1]
    weights = [torch.randn(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.randn(o) for o in sizes[1:]]
    return query, keys, weights, biases, torch.full((batch,), seq_len)
