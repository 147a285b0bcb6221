"""Results that must not depend on how the work is split over programs.

Under the interpreter programs run one after another, so a run repeated with the same split cannot
show a reduction that depends on the split. Here the split is a test parameter: the number of
programs (users per program), the rows per tile (BLOCK_T) for attention, and the row programs, rows
per block and feature blocks for Dice. Every split must match the float64 reference within the
policy, and all splits must agree with each other within the fp32 tolerance. On a GPU, repeated runs
must also be bitwise equal (fixed-order reductions, no atomics).
"""
import pytest
import torch
from fastdin.testing import FLOOR, relative_errors
from conftest import DEVICES
from layout_helpers import AttentionSetup, assert_within_policy, attention_values, lay_out, run_attention, score_bias_position
from test_dice_kernel import _poison_allocations  # noqa: F401 (autouse: NaN-filled Dice allocations)

from fastdin import functional
from fastdin.kernels import attention_pool as attention_kernels
from fastdin.kernels import dice as dice_kernels
from fastdin.ops import attention_packed as attention_packed_ops

ATTENTION_SPLITS = [(1, 16), (2, 32), (3, 16), (5, 16)]  # (programs, BLOCK_T) over 5 users, T = 20
SETUPS = [
    AttentionSetup("prelu", "softmax", batch=5, seq_len=20),
    AttentionSetup("dice", "softmax", hidden=(6, 4), batch=5, seq_len=20, dice_training=True, dice_stats="all",
                   dice_eps=0.5),
]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(attention_kernels, "POISON_OUTPUTS", True)


def split_attention(monkeypatch, programs, block_t):
    """Every per-user attention launch of the test uses `programs` programs and BLOCK_T = block_t
    (the packed-rows kernels, which test their program counts themselves, are turned off)."""
    monkeypatch.setattr(attention_packed_ops, "packed_gap", lambda *args: "the test forces the per-user kernels")
    monkeypatch.setattr(attention_kernels, "_num_programs", lambda batch, device, per_sm: programs)
    monkeypatch.setattr(attention_kernels, "_pick_block_t", lambda seq_len, widths, budget: block_t)


def assert_splits_agree(results, what):
    for split, result in results.items():
        for i, err in enumerate(relative_errors(result, results[next(iter(results))])):
            assert err <= FLOOR[torch.float32], f"{what}: split {split}, result {i} differs by {err:.2e}"


@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_attention_split_independent(monkeypatch, setup):
    values = attention_values(setup, "contiguous", DEVICES[0])
    want = run_attention(setup, *lay_out(values, "contiguous", torch.float64), "reference")
    same_dtype = run_attention(setup, *lay_out(values, "contiguous", torch.float32), "reference")
    zero_at = score_bias_position(setup)
    results = {}
    for programs, block_t in ATTENTION_SPLITS:
        split_attention(monkeypatch, programs, block_t)
        got = run_attention(setup, *lay_out(values, "contiguous", torch.float32), "triton")
        assert_within_policy(got, want, same_dtype, torch.float32, zero_at, f"({setup}, split {programs}/{block_t})")
        results[programs, block_t] = [t for i, t in enumerate(got) if i != zero_at]
    assert_splits_agree(results, str(setup))


PACKED_SETUPS = [AttentionSetup("prelu", None, batch=5, seq_len=20), AttentionSetup("prelu", "softmax", batch=5, seq_len=20)]
PACKED_SPLITS = [(1, 16), (3, 16), (2, 32)]  # (programs, BLOCK_M and BLOCK_M_BWD): users cut by tile and program boundaries


@pytest.mark.parametrize("setup", PACKED_SETUPS, ids=str)
def test_packed_split_independent(monkeypatch, setup):
    """The packed-rows kernels (the triton backend's path here) with users cut by tile boundaries."""
    from fastdin.kernels import attention_packed as packed_kernels

    values = attention_values(setup, "contiguous", DEVICES[0])
    values["lengths"][1:-1] = setup.seq_len  # several users longer than one 16-row tile
    want = run_attention(setup, *lay_out(values, "contiguous", torch.float64), "reference")
    same_dtype = run_attention(setup, *lay_out(values, "contiguous", torch.float32), "reference")
    zero_at = score_bias_position(setup)
    results = {}
    for programs, block_m in PACKED_SPLITS:
        monkeypatch.setattr(packed_kernels, "BLOCK_M", block_m)
        monkeypatch.setattr(packed_kernels, "BLOCK_M_BWD", block_m)
        monkeypatch.setattr(packed_kernels, "_num_programs", lambda device, rows, block, per_sm: programs)
        got = run_attention(setup, *lay_out(values, "contiguous", torch.float32), "triton")
        assert_within_policy(got, want, same_dtype, torch.float32, zero_at, f"({setup}, split {programs}/{block_m})")
        results[programs, block_m] = [t for i, t in enumerate(got) if i != zero_at]
    assert_splits_agree(results, str(setup))


# (row programs, rows per block, features per block) over 2 x 29 rows of 37 features
DICE_SPLITS = [(1, 16, 64), (2, 32, 16), (4, 16, 16), (7, 16, 32)]


@pytest.mark.parametrize("training", [True, False])
def test_dice_split_independent(training):
    device = DEVICES[0]
    x = torch.randn(2, 29, 37, device=device) * (0.5 + torch.rand(37, device=device)) + torch.randn(37, device=device)
    alpha, weight, bias = (torch.rand(37, device=device), 1 + 0.3 * torch.randn(37, device=device),
                           0.3 * torch.randn(37, device=device))
    mask = torch.rand(2, 29, device=device) > 0.3
    grad = torch.randn_like(x)
    running = (torch.randn(37, device=device), torch.rand(37, device=device) + 0.5)

    def reference_run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, alpha, weight, bias)]
        mean, var = (r.to(dtype).clone() for r in running)
        out = functional.dice(leaves[0], leaves[1], mean, var, weight=leaves[2], bias=leaves[3], training=training,
                              momentum=0.3, eps=1e-5, mask=mask, backend="reference")
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype)), mean, var]

    want, same_dtype = reference_run(torch.float64), reference_run(torch.float32)
    results = {}
    for programs, rows, features in DICE_SPLITS:
        config = dict(row_programs=programs, block_rows=rows, block_features=features)
        mean, var = (r.clone() for r in running)
        out, stats = dice_kernels.dice_forward(x, alpha, weight, bias, mean, var, mask, training, 0.3, 1e-5, **config)
        grads = dice_kernels.dice_backward(grad, x, mask, alpha, weight, bias, stats, training, **config)
        results[programs, rows, features] = got = [out, *grads, mean, var]
        assert_within_policy(got, want, same_dtype, torch.float32, what=f"(split {config})")
    assert_splits_agree(results, "dice")


# ---------------------------------------------------------------------------------------------
# bitwise determinism on the GPU, where programs do run concurrently

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="programs run one at a time on the CPU")


@cuda_only
@pytest.mark.parametrize("setup", [
    AttentionSetup("prelu", "softmax", hidden=(80, 40), batch=512, seq_len=100, dim=32),
    AttentionSetup("dice", None, hidden=(80, 40), batch=512, seq_len=100, dim=32, dice_training=True),
], ids=str)
def test_attention_bitwise_deterministic_on_gpu(setup):
    values = attention_values(setup, "contiguous", "cuda")
    first = run_attention(setup, *lay_out(values, "contiguous", torch.float32), "triton")
    second = run_attention(setup, *lay_out(values, "contiguous", torch.float32), "triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@cuda_only
def test_dice_bitwise_deterministic_on_gpu():
    x = torch.randn(4096, 200, device="cuda")
    alpha, mask = torch.rand(200, device="cuda"), torch.rand(4096, device="cuda") > 0.3
    grad = torch.randn_like(x)
    runs = []
    for _ in range(2):
        mean, var = torch.zeros(200, device="cuda"), torch.ones(200, device="cuda")
        out, stats = dice_kernels.dice_forward(x, alpha, None, None, mean, var, mask, True, 0.1, 1e-8)
        runs.append([out, stats, mean, var, *dice_kernels.dice_backward(grad, x, mask, alpha, None, None, stats, True)[:2]])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
