"""Regression tests of bugs found by trying the library (issue 9): strided lengths on the Triton path,
NaN/inf in padded keys, running statistics from fewer than two rows with the value checks off, the
kernel gap under autocast, and torch.compile with the default inductor backend.
"""
import copy

import pytest
import torch
from attention_helpers import float64_copy
from conftest import DEVICES

from fastdin import DIN, AttentionPooling, functional, reference
from fastdin.ops import attention as attention_op
from fastdin.reference import DiceParams
from fastdin.testing import assert_close_to_reference

KERNEL_DEVICE = DEVICES[0]


def _pool(activation, normalization, backend, dice_stats="valid", dtype=torch.float32, device=KERNEL_DEVICE):
    pool = AttentionPooling(5, (7, 3), activation, normalization, return_scores=True, dice_stats=dice_stats,
                            backend=backend).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in pool.parameters():
            p.uniform_(-0.7, 0.7)
    return pool


@pytest.mark.usefixtures("on_kernel_device")
def test_strided_lengths_on_the_triton_path():
    """lengths = table[:, 0] has stride 2; the kernel must not read table[b] for lengths[b]."""
    pool = _pool("sigmoid", None, "triton")
    query, keys = torch.randn(4, 5), torch.randn(4, 9, 5)
    table = torch.tensor([[9, 0], [2, 7], [0, 1], [5, 3]])
    lengths = table[:, 0]
    assert lengths.stride(0) == 2
    got = pool(query, keys, lengths=lengths)
    want = pool(query, keys, lengths=lengths.contiguous())
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    table_lengths = table[:, 0:1]  # [B, 1], also strided
    assert all(torch.equal(g, w) for g, w in zip(pool(query, keys, lengths=table_lengths), want))


# (activation, normalization, dice_stats, training): every normalization, Dice in eval and in training
# with statistics over the valid positions (padding over all B*T positions counts by definition)
PADDING_CASES = [("sigmoid", None, "valid", False), ("prelu", "softmax", "valid", False),
                 ("dice", None, "valid", True), ("dice", "softmax", "valid", True), ("dice", "softmax", "valid", False)]


def _poisoned_padding_run(pool, query, keys, lengths, mask, poison):
    """(outputs and gradients) of pool with the padded keys as they are and set to `poison`."""
    valid = reference.valid_positions(lengths, mask, *keys.shape[:2], keys.device)
    results = []
    for value in (None, poison):
        module = copy.deepcopy(pool)  # the same running statistics for both runs
        k = keys.clone() if value is None else torch.where(valid.unsqueeze(-1), keys, torch.full_like(keys, value))
        k.requires_grad_()
        q = query.clone().requires_grad_()
        out, scores = module(q, k, lengths=lengths, mask=mask)
        grads = torch.autograd.grad((out * out.detach().sin()).sum() + scores.sum(), [q, k, *module.parameters()])
        results.append((out, scores, grads, valid))
    return results


def _check_padding_never_counts(clean, poisoned, same_bits):
    (out, scores, grads, valid), (out_p, scores_p, grads_p, _) = clean, poisoned
    for name, a, b in [("out", out, out_p), ("scores", scores, scores_p)] + [
            (f"grad {i}", g, h) for i, (g, h) in enumerate(zip(grads, grads_p))]:
        assert torch.isfinite(b).all(), f"{name}: NaN or inf from the padding"
        if same_bits:
            assert torch.equal(a, b), name
        else:  # the kernel reads padding as 0 where the clean run read a value: other rounding only
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    dkeys = grads_p[1]
    assert torch.equal(dkeys[~valid], torch.zeros_like(dkeys[~valid])), "padded keys got a gradient"


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("activation,normalization,dice_stats,training", PADDING_CASES)
def test_reference_ignores_non_finite_padding(activation, normalization, dice_stats, training, dtype, poison):
    pool = _pool(activation, normalization, "reference", dice_stats, dtype, "cpu").train(training)
    query, keys = torch.randn(4, 5, dtype=dtype), torch.randn(4, 6, 5, dtype=dtype)
    for lengths, mask in ((torch.tensor([6, 2, 0, 3]), None), (None, torch.rand(4, 6) < 0.6)):
        if mask is not None:
            mask[0, :2] = True
        clean, poisoned = _poisoned_padding_run(pool, query, keys, lengths, mask, poison)
        _check_padding_never_counts(clean, poisoned, same_bits=True)


@pytest.mark.usefixtures("on_kernel_device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation,normalization,dice_stats,training", PADDING_CASES[1:4])
def test_kernel_ignores_non_finite_padding(activation, normalization, dice_stats, training, dtype):
    pool = _pool(activation, normalization, "triton", dice_stats, dtype).train(training)
    query, keys = torch.randn(3, 5, dtype=dtype), torch.randn(3, 6, 5, dtype=dtype)
    keys[1, 2:] = 0.0  # the clean run's padding holds zeros, which the kernel reads for padding
    keys[2, 4:] = 0.0
    clean, poisoned = _poisoned_padding_run(pool, query, keys, torch.tensor([6, 2, 4]), None, float("nan"))
    _check_padding_never_counts(clean, poisoned, same_bits=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("counted", [0, 1])
def test_running_statistics_stay_finite_without_two_rows(backend, counted):
    """Value checks off: Dice in training on fewer than two valid rows leaves the running statistics
    as they were (no unbiased variance of one row), for the Dice op and inside attention pooling."""
    device = "cpu" if backend == "reference" else KERNEL_DEVICE
    before = functional.set_value_checks(False)
    try:
        x = torch.randn(4, 6, device=device)
        mask = torch.arange(4, device=device) < counted
        mean, var = torch.zeros(6, device=device), torch.ones(6, device=device)
        functional.dice(x, torch.zeros(6, device=device), mean, var, mask=mask, backend=backend)
        assert torch.equal(mean, torch.zeros(6, device=device)) and torch.equal(var, torch.ones(6, device=device))
        pool = _pool("dice", None, backend, device=device).train()
        buffers = [b.clone() for b in pool.buffers() if b.is_floating_point()]
        pool(torch.randn(3, 5, device=device), torch.randn(3, 4, 5, device=device),
             lengths=torch.tensor([counted, 0, 0], device=device))
        after = [b for b in pool.buffers() if b.is_floating_point()]
        assert all(torch.equal(a, b) for a, b in zip(after, buffers))
    finally:
        functional.set_value_checks(before)


def test_kernel_gap_takes_the_autocast_dtype(monkeypatch):
    """fp32 keys under bf16/fp16 autocast run the kernel in that dtype: the shared-memory check must
    ask about that dtype, not refuse sizes only fp32 would not fit."""
    monkeypatch.setattr(attention_op, "_shared_memory_limit", lambda device: 232448)  # an H200's
    keys = torch.zeros(2, 3, 64)
    weights = [torch.zeros(256, 256), torch.zeros(128, 256), torch.zeros(64, 128), torch.zeros(1, 64)]
    assert "shared memory" in functional.attention_kernel_gap(keys, weights, "sigmoid", None)
    with torch.autocast("cpu", dtype=torch.float16):
        assert attention_op.kernel_dtype(keys) == torch.float16
        assert functional.attention_kernel_gap(keys, weights, "sigmoid", None) is None
        assert attention_op.kernel_dtype(keys.double()) == torch.float64  # float64 is never autocast


# ---------------------------------------------------------------------------------------------
# torch.compile with the default inductor backend (on the CPU: the reference path)


def _compare_compiled(name, model, inputs_list, train):
    """model compiled with inductor against the eager float32 and float64 copies, over several input
    shapes (recompiles), in train or eval mode: outputs, gradients and buffers."""
    eager, exact = copy.deepcopy(model), float64_copy(model)
    compiled = torch.compile(model)
    for step, inputs in enumerate(inputs_list):
        results = []
        for module, dtype in ((compiled, torch.float32), (eager, torch.float32), (exact, torch.float64)):
            module.train(train)
            if "batch" in inputs:  # DIN: ids only
                out = module(inputs["batch"])
            else:
                out = module(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()})
            out = out[0] if isinstance(out, tuple) else out
            grads = torch.autograd.grad(out.square().sum(), [p for p in module.parameters() if p.requires_grad],
                                        allow_unused=True) if train else []
            results.append([out, *[g for g in grads if g is not None]] +
                           [b for b in module.buffers() if b.is_floating_point()])
        for i, (got, same, want) in enumerate(zip(*results)):
            assert_close_to_reference(f"{name} step {step} result {i}", got, want, same)


@pytest.mark.parametrize("train", [True, False])
def test_inductor_attention_pooling_with_dice(train):
    torch._dynamo.reset()
    pool = AttentionPooling(4, (6, 3), "dice", return_scores=True, dice_stats="valid")
    inputs = []
    for batch, seq_len in ((3, 5), (4, 7), (2, 9)):  # new shapes: recompiles (or dynamic shapes)
        lengths = torch.randint(1, seq_len + 1, (batch,))
        lengths[0] = seq_len
        inputs.append({"query": torch.randn(batch, 4), "keys": torch.randn(batch, seq_len, 4), "lengths": lengths})
    _compare_compiled(f"AttentionPooling dice train={train}", pool, inputs, train)


def test_inductor_din_with_dice_attention():
    torch._dynamo.reset()
    model = DIN(num_items=20, num_categories=5, embed_dim=4, attention_activation="dice", attention_hidden=(6,),
                mlp_hidden=(8,))
    inputs = []
    for batch, seq_len in ((4, 5), (6, 3)):
        lengths = torch.randint(1, seq_len + 1, (batch,))
        lengths[0] = seq_len
        inputs.append({"batch": {
            "item": torch.randint(1, 20, (batch,)), "category": torch.randint(1, 5, (batch,)),
            "hist_items": torch.randint(1, 20, (batch, seq_len)), "hist_categories": torch.randint(1, 5, (batch, seq_len)),
            "lengths": lengths}})
    _compare_compiled("DIN dice", model, inputs, train=True)


def test_per_user_kernels_softmax_give_zeros_for_a_user_with_no_valid_position(monkeypatch):
    """The per-user kernels (they run fp32 on CUDA, training-mode Dice and wide layers) with softmax: a
    user of length 0 gets a zero output and zero weights, never uniform weights over its padding. On
    the CPU the packed kernels take this case, so they are turned off here."""
    from fastdin.ops import attention_packed

    monkeypatch.setattr(attention_packed, "packed_gap", lambda *args, **kwargs: "the per-user kernels, for this test")
    B, T, D = 3, 5, 4
    query, keys = torch.randn(B, D), torch.randn(B, T, D)
    weights, biases = [torch.randn(6, 4 * D), torch.randn(1, 6)], [torch.randn(6), torch.randn(1)]
    lengths = torch.tensor([5, 0, 2])
    results = {backend: functional.attention_pool(query, keys, weights, biases, lengths=lengths, normalization="softmax",
                                                  return_scores=True, backend=backend)
               for backend in ("triton", "reference")}
    (out, scores), (want_out, want_scores) = results["triton"], results["reference"]
    assert torch.equal(out[1], torch.zeros(D)) and torch.equal(scores[1], torch.zeros(T))
    assert torch.allclose(out, want_out, atol=1e-5) and torch.allclose(scores, want_scores, atol=1e-6)
