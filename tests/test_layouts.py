"""Every memory layout the ops accept, on every backend, against the float64 reference.

The layouts (tests/layout_helpers.py): sliced and transposed weights, a strided mask and strided
lengths, an expanded query (one candidate for every user) and expanded or sliced keys, a stride-0
and a non-contiguous grad_out; for Dice a transposed x, strided parameters and mask, and a variance
comparable to eps. Backends: "reference", "torch" (the fast PyTorch path where an op has one) and
"triton" (on the CPU under the interpreter: tiny shapes). Kernel outputs start as NaN.
"""
import pytest
import torch
from conftest import DEVICES
from test_dice_kernel import _poison_allocations  # noqa: F401 (autouse: NaN-filled Dice allocations)
from layout_helpers import (ATTENTION_LAYOUTS, JAGGED_LAYOUTS, AttentionSetup, as_jagged, assert_within_policy,
                            attention_values, lay_out, run_attention, score_bias_position)

from fastdin import functional
from fastdin.kernels import attention_pool as attention_kernels
from fastdin.ops import attention_packed as attention_packed_ops

BACKENDS = ("reference", "torch", "triton")
# attention on the triton backend runs the packed-rows kernels where they cover the case (on the CPU:
# everything but training-mode Dice); "triton-per-user" turns them off to test the per-user kernels
ATTENTION_BACKENDS = BACKENDS + ("triton-per-user",)

SETUPS = [
    AttentionSetup("prelu", "softmax"),  # one slope per feature
    # training-mode Dice, eps comparable to the pre-activations' variance, so that eps counts
    AttentionSetup("dice", None, hidden=(5,), dice_training=True, dice_eps=0.5),
]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(attention_kernels, "POISON_OUTPUTS", True)


def use_backend(backend, monkeypatch):
    if backend == "triton-per-user":
        monkeypatch.setattr(attention_packed_ops, "packed_gap", lambda *args: "the test forces the per-user kernels")
        return "triton"
    return backend


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_attention_layout(setup, layout, backend, device, monkeypatch):
    backend = use_backend(backend, monkeypatch)
    values = attention_values(setup, layout, device)
    want = run_attention(setup, *lay_out(values, "contiguous", torch.float64), "reference")
    same_dtype = run_attention(setup, *lay_out(values, "contiguous", torch.float32), "reference")
    got = run_attention(setup, *lay_out(values, layout, torch.float32), backend)
    assert_within_policy(got, want, same_dtype, torch.float32, score_bias_position(setup),
                         f"({setup}, {layout}, {backend})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", JAGGED_LAYOUTS)
@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_attention_jagged_layout(setup, layout, backend, device):
    """Jagged keys [N, D] + offsets against the padded float64 reference of the same rows."""
    values = attention_values(setup, layout, device)
    want = as_jagged(run_attention(setup, *lay_out(values, "contiguous", torch.float64), "reference"), values)
    same_dtype = as_jagged(run_attention(setup, *lay_out(values, "contiguous", torch.float32), "reference"), values)
    try:
        got = run_attention(setup, *lay_out(values, layout, torch.float32), backend)
    except NotImplementedError as gap:  # a clear refusal of a case no Triton kernel covers yet
        if backend != "triton":
            raise
        pytest.skip(str(gap))
    assert_within_policy(got, want, same_dtype, torch.float32, score_bias_position(setup),
                         f"({setup}, {layout}, {backend})")


# ---------------------------------------------------------------------------------------------
# Dice on its own

DICE_LAYOUTS = ("contiguous", "x_transposed", "params_strided", "mask_strided", "grad_stride0", "grad_strided")


def dice_values(layout, device, variance=None):
    """Contiguous fp32 values of one training-mode Dice call on x [B, T, H] with a mask."""
    B, T, H = 4, 6, 5
    scale = 1.0 if variance is None else variance ** 0.5
    x = (torch.randn(B, T, H, device=device) * (0.5 + torch.rand(H, device=device)) + torch.randn(H, device=device)) * scale
    mask = torch.rand(B, T, device=device) > 0.3
    mask[0, :2] = True
    values = {"x": x, "mask": mask, "alpha": torch.rand(H, device=device), "weight": 1 + 0.3 * torch.randn(H, device=device),
              "bias": 0.3 * torch.randn(H, device=device), "running_mean": torch.randn(H, device=device),
              "running_var": torch.rand(H, device=device) + 0.5,
              "grad": torch.ones_like(x) if layout == "grad_stride0" else torch.randn_like(x)}
    return values


def dice_lay_out(values, layout, dtype):
    """(x, alpha, weight, bias, mask, grad (None: a plain sum), running statistics, differentiated views)."""
    def leaf(t):
        return t.detach().to(dtype).clone().requires_grad_()

    x = values["x"]
    if layout == "x_transposed":
        x = leaf(x.transpose(0, 1).contiguous()).transpose(0, 1)
    else:
        x = leaf(x)
    params = {}
    for name in ("alpha", "weight", "bias"):
        if layout == "params_strided":  # a column of a [H, 2] table
            table = torch.randn(values[name].shape[0], 2, dtype=dtype, device=x.device)
            table[:, 1] = values[name]
            params[name] = table.requires_grad_()[:, 1]
        else:
            params[name] = leaf(values[name])
    mask = values["mask"]
    if layout == "mask_strided":
        wide = torch.rand(mask.shape[0], 2 * mask.shape[1], device=mask.device) > 0.5
        wide[:, 1::2] = mask
        mask = wide[:, 1::2]
    grad = values["grad"].to(dtype)
    if layout == "grad_stride0":
        grad = None
    elif layout == "grad_strided":
        grad = grad.transpose(0, 2).contiguous().transpose(0, 2)
    running = [values[name].float().clone() for name in ("running_mean", "running_var")]
    return x, params, mask, grad, running, [x, params["alpha"], params["weight"], params["bias"]]


def run_dice(values, layout, dtype, backend, eps=1e-5):
    x, params, mask, grad, running, trainable = dice_lay_out(values, layout, dtype)
    out = functional.dice(x, params["alpha"], *running, weight=params["weight"], bias=params["bias"], training=True,
                          momentum=0.3, eps=eps, mask=mask, backend=backend)
    grads = torch.autograd.grad(out.sum() if grad is None else out, trainable, None if grad is None else grad)
    return [out, *grads, *running]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", DICE_LAYOUTS)
def test_dice_layout(layout, backend, device):
    values = dice_values(layout, device)
    want = run_dice(values, "contiguous", torch.float64, "reference")
    same_dtype = run_dice(values, "contiguous", torch.float32, "reference")
    got = run_dice(values, layout, torch.float32, backend)
    assert_within_policy(got, want, same_dtype, torch.float32, what=f"({layout}, {backend})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dice_variance_near_eps(backend, device):
    """Features with variance ~1e-8 and the default eps 1e-8: 1/sqrt(var + eps) differs from
    1/sqrt(var) by ~30%, far beyond the tolerance, so eps must be in every backend's math."""
    values = dice_values("contiguous", device, variance=1e-8)
    want = run_dice(values, "contiguous", torch.float64, "reference", eps=1e-8)
    same_dtype = run_dice(values, "contiguous", torch.float32, "reference", eps=1e-8)
    got = run_dice(values, "contiguous", torch.float32, backend, eps=1e-8)
    assert_within_policy(got, want, same_dtype, torch.float32, what=f"({backend})")
    without_eps = run_dice(values, "contiguous", torch.float64, "reference", eps=1e-30)
    from fastdin.testing import relative_errors

    assert relative_errors(without_eps[:1], want[:1])[0] > 100 * (relative_errors(same_dtype[:1], want[:1])[0] + 1e-5)
