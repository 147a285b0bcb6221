"""The fused Triton Dice kernel against the float64 reference: output, every gradient, running stats.

On the CPU the kernels run under TRITON_INTERPRET=1 (set in conftest), in fp32 and fp16; on CUDA
bf16 is added (the interpreter's bf16 arithmetic is wrong, see docs/design.md). Every float tensor the
kernel launchers allocate is prefilled with NaN, so an element a kernel fails to write shows up.
"""
import copy

import pytest
import torch
from conftest import DEVICES

# tests without a device parameter build their tensors on the kernels' device
pytestmark = pytest.mark.usefixtures("on_kernel_device")
from torch import nn

from fastdin import functional, reference
from fastdin.kernels import dice as dice_kernels
from fastdin.layers import Dice
from fastdin.testing import assert_close_to_reference, relative_error

DTYPES = [(d, t) for d in DEVICES for t in (torch.float32, torch.float16)] + (
    [("cuda", torch.bfloat16)] if "cuda" in DEVICES else []
)


@pytest.fixture(autouse=True)
def _poison_allocations(monkeypatch):
    """NaN-fill every float tensor the launchers allocate (outputs, statistics, partials, grads)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(dice_kernels.torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(dice_kernels.torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def make_case(shape, dtype, device, masked, affine):
    """Fresh random Dice inputs: x with a per-feature offset and scale, parameters, buffers, mask."""
    features = shape[-1]
    x = (torch.randn(shape, device=device) * (0.5 + torch.rand(features, device=device) * 3)
         + torch.randn(features, device=device) * 2).to(dtype)
    params = {
        "alpha": torch.randn(features, device=device),
        "weight": torch.randn(features, device=device) if affine else None,
        "bias": torch.randn(features, device=device) if affine else None,
    }
    running = (torch.randn(features, device=device), torch.rand(features, device=device) + 0.5)
    mask = (torch.rand(shape[:-1], device=device) > 0.3) if masked else None
    if mask is not None:
        mask.reshape(-1)[:2] = True  # at least two valid rows
    return x, params, running, mask


def run_dice(x, params, running, mask, training, grad, **kwargs):
    """Dice forward + backward; returns (out, grads by name, running_mean, running_var)."""
    x = x.detach().clone().requires_grad_()
    leaves = {name: p.detach().clone().requires_grad_() for name, p in params.items() if p is not None}
    running_mean, running_var = (r.clone() for r in running)
    out = functional.dice(x, leaves["alpha"], running_mean, running_var, weight=leaves.get("weight"),
                          bias=leaves.get("bias"), training=training, momentum=0.1, eps=1e-5, mask=mask, **kwargs)
    out.backward(grad)
    grads = {"x": x.grad, **{name: leaf.grad for name, leaf in leaves.items()}}
    return out, grads, running_mean, running_var


def reference_in(dtype, x, params, running, mask, training, grad):
    """The reference from the same inputs with x, the parameters and grad in dtype (float64: the
    ground truth; x's dtype: the same-dtype run of the numerics policy)."""
    cast = {name: p.to(dtype) if p is not None else None for name, p in params.items()}
    running = tuple(r.double() for r in running) if dtype == torch.float64 else running
    return run_dice(x.to(dtype), cast, running, mask, training, grad.to(dtype), backend="reference")


def assert_results_match(name, got, x, params, running, mask, training, grad):
    """got = (out, grads by name, running_mean, running_var) of the kernel, against the reference."""
    want = reference_in(torch.float64, x, params, running, mask, training, grad)
    # the same-dtype reference in two orders of summation: as given, and with the rows reversed
    flip = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
    same = [reference_in(x.dtype, x, params, running, mask, training, grad),
            list(reference_in(x.dtype, x[flip], params, running, None if mask is None else mask[flip], training,
                              grad[flip]))]
    same[1][0], same[1][1]["x"] = same[1][0][flip], same[1][1]["x"][flip]
    for label, i in (("output", 0), ("running mean", 2), ("running var", 3)):
        # the buffers are fp32 whatever x is: they hold the statistics computed at x's precision
        assert_close_to_reference(f"{name} {label}", got[i], want[i], [s[i] for s in same], x.dtype)
    for grad_name, ref_grad in want[1].items():
        assert_close_to_reference(f"{name} gradient of {grad_name}", got[1][grad_name], ref_grad,
                                  [s[1][grad_name] for s in same], x.dtype)


def assert_matches_reference(x, params, running, mask, training, dtype):
    grad = torch.randn(x.shape, device=x.device).to(dtype)
    out, grads, run_mean, run_var = run_dice(x, params, running, mask, training, grad, backend="triton")
    assert out.dtype == dtype and out.shape == x.shape
    for name, g in grads.items():
        assert g.shape == params.get(name, x).shape and g.dtype == params.get(name, x).dtype, name
    assert_results_match(f"dice {tuple(x.shape)} {str(dtype)[6:]} training={training}",
                         (out, grads, run_mean, run_var), x, params, running, mask, training, grad)


@pytest.mark.parametrize("device,dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,masked,affine",
    [
        ((5, 80), False, False),  # N smaller than one block
        ((300, 37), True, True),  # H not a power of 2; several row programs
        ((3, 70, 200), True, False),  # [B, T, H] with a [B, T] mask; two feature blocks
        ((2, 9, 80), False, True),
    ],
)
def test_training_matches_reference(device, dtype, shape, masked, affine):
    x, params, running, mask = make_case(shape, dtype, device, masked, affine)
    assert_matches_reference(x, params, running, mask, True, dtype)


@pytest.mark.parametrize("device,dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
def test_eval_matches_reference(device, dtype, affine):
    x, params, running, mask = make_case((4, 11, 37), dtype, device, True, affine)
    assert_matches_reference(x, params, running, mask, False, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,affine,config",
    [
        ((2, 29, 37), False, {"block_rows": 16, "block_features": 16, "row_programs": 3}),
        ((2, 29, 37), True, {"block_rows": 16, "block_features": 16, "row_programs": 3}),
        # 20 partials: more than one merge step (16 partials of 256 features at a time)
        ((310, 200), True, {"block_rows": 16, "block_features": 256, "row_programs": 20}),
    ],
)
def test_small_blocks_many_programs(device, shape, affine, config):
    """Force small blocks so the row split, the merges of partials and feature blocks all get exercised."""
    x, params, running, mask = make_case(shape, torch.float32, device, True, affine)
    running_mean, running_var = (r.clone() for r in running)
    out, stats = dice_kernels.dice_forward(x, params["alpha"], params["weight"], params["bias"], running_mean,
                                           running_var, mask, True, 0.1, 1e-5, **config)
    grad = torch.randn_like(x)
    dx, dalpha, dweight, dbias = dice_kernels.dice_backward(grad, x, mask, params["alpha"], params["weight"],
                                                            params["bias"], stats, True, **config)
    grads = {"x": dx, "alpha": dalpha, "weight": dweight, "bias": dbias}
    assert_results_match(f"dice small blocks {shape} {config}", (out, grads, running_mean, running_var), x, params,
                         running, mask, True, grad)


@pytest.mark.parametrize("device", DEVICES)
def test_running_statistics_match_batchnorm(device):
    """Two masked training steps update the buffers exactly as nn.BatchNorm1d on the valid rows."""
    features = 37
    bn = nn.BatchNorm1d(features, eps=1e-5, momentum=0.1, affine=False).to(device)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(2):
        x, params, _, mask = make_case((70, features), torch.float32, device, True, False)
        functional.dice(x, params["alpha"], running_mean, running_var, training=True, momentum=0.1, eps=1e-5,
                        mask=mask, backend="triton")
        bn(x[mask])
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(running_var, bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_and_gradient(device):
    """x read in place through [B, T, H] strides; an all-zero-stride upstream gradient (from sum)."""
    x, params, running, _ = make_case((6, 3, 40), torch.float32, device, False, True)
    x = x.transpose(0, 1)  # [3, 6, 40], not contiguous
    leaf = x.detach().requires_grad_()
    out = functional.dice(leaf, params["alpha"], *(r.clone() for r in running), weight=params["weight"],
                          bias=params["bias"], backend="triton")
    out.sum().backward()
    want, same = (reference_in(dtype, x, params, running, None, True, torch.ones_like(x))
                  for dtype in (torch.float64, torch.float32))
    assert_close_to_reference("strided dice output", out, want[0], same[0])
    assert_close_to_reference("strided dice gradient of x", leaf.grad, want[1]["x"], same[1]["x"])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    x, params, running, mask = make_case((300, 37), torch.float32, device, True, True)
    grad = torch.randn_like(x)
    first = run_dice(x, params, running, mask, True, grad, backend="triton")[1]
    second = run_dice(x, params, running, mask, True, grad, backend="triton")[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_training_needs_two_valid_rows(device):
    x, params, running, _ = make_case((1, 8), torch.float32, device, False, False)
    with pytest.raises(ValueError, match="more than one"):
        functional.dice(x, params["alpha"], *running, backend="triton")
    x, params, running, _ = make_case((4, 8), torch.float32, device, False, False)
    one_valid = torch.tensor([False, True, False, False], device=device)
    with pytest.raises(ValueError, match="more than one"):
        functional.dice(x, params["alpha"], *running, mask=one_valid, backend="triton")


def test_kernel_gap():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert functional.dice_kernel_gap(torch.zeros(2, 3, dtype=dtype), True) is None
    assert "float64" in functional.dice_kernel_gap(torch.zeros(2, 3, dtype=torch.float64), True)
    x, params, running, _ = make_case((4, 8), torch.float64, DEVICES[0], False, False)
    with pytest.raises(NotImplementedError, match="float64"):
        functional.dice(x, params["alpha"], *running, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [False, True])
def test_module_triton_equals_reference(device, affine):
    """Dice(backend="triton") and Dice(backend="reference") agree over SGD steps and then in eval,
    within the numerics policy's bound of a float64 copy."""
    modules = {backend: Dice(37, eps=1e-5, affine=affine, backend=backend).to(device)
               for backend in ("triton", "reference")}
    modules["triton"].load_state_dict(modules["reference"].state_dict())
    modules["float64"] = copy.deepcopy(modules["reference"]).double()
    optimizers = {b: torch.optim.SGD(m.parameters(), lr=0.5) for b, m in modules.items()}

    def assert_steps_match(name, results):
        for i, (got, same, want) in enumerate(zip(*results.values())):
            if got.is_floating_point():
                assert_close_to_reference(f"{name} result {i}", got, want, same)
            else:
                assert torch.equal(got, same) and torch.equal(got, want), f"{name} result {i}"

    for step in range(3):
        x = (torch.randn(4, 25, 37, device=device) * 2 + 1).double()
        mask = torch.rand(4, 25, device=device) > 0.2
        grad = torch.randn_like(x)
        results = {}
        for backend, module in modules.items():
            dtype = module.alpha.dtype
            leaf = x.to(dtype).requires_grad_()
            optimizers[backend].zero_grad()
            out = module(leaf, mask)
            out.backward(grad.to(dtype))
            optimizers[backend].step()
            results[backend] = [out, leaf.grad] + [p.grad for p in module.parameters()] + list(module.buffers())
        assert_steps_match(f"step {step}", results)
    x = torch.randn(30, 37, device=device).double()
    with torch.no_grad():
        assert_steps_match("eval", {b: [m.eval()(x.to(m.alpha.dtype))] for b, m in modules.items()})


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_stable_under_large_offset(device):
    """mean 1000, std 0.1: E[x^2] - E[x]^2 in fp32 would lose the variance entirely; the merge must not."""
    x = 1000 + 0.1 * torch.randn(200, 24, device=device)
    mask = torch.rand(200, device=device) > 0.3
    running = (torch.zeros(24, device=device), torch.ones(24, device=device))
    _, stats = dice_kernels.dice_forward(x, torch.zeros(24, device=device), None, None, *running, mask, True, 0.1,
                                         1e-8, block_rows=16, row_programs=3)
    valid = x[mask]
    # the same-dtype run: torch's own fp32 mean of the same rows
    assert_close_to_reference("large offset mean", stats[0], valid.double().mean(0), valid.mean(0))
    # The variance here is conditioned 2 x mean / std = 2e4: an fp32 algorithm may lose 2e4 x 6e-8 =
    # 1.2e-3 of it (seen: 5e-5), while torch's CPU var (4e-8) carries more than fp32 inside, so it
    # is no same-dtype run. The test is of stability (E[x^2] - E[x]^2 would lose all of it): 1e-3.
    want = (valid.double().var(0, unbiased=False) + 1e-8).rsqrt()
    assert relative_error(stats[1], want) < 1e-3
    assert torch.equal(stats[2], torch.full_like(stats[2], float(mask.sum())))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_compiled_dice_matches_eager_kernel(affine, training):
    """torch.compile(fullgraph=True) goes through the fastdin::dice custom ops; same numbers and state."""
    compiled_module, eager_module = Dice(6, affine=affine, backend="triton"), Dice(6, affine=affine, backend="triton")
    with torch.no_grad():
        for name, p in compiled_module.named_parameters():
            p.uniform_(-1, 1)
            getattr(eager_module, name).copy_(p)
    compiled_module.train(training)
    eager_module.train(training)
    x = torch.randn(3, 5, 6, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    mask[0, :2] = True
    grad = torch.randn(3, 5, 6)
    x_eager = x.detach().clone().requires_grad_()
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    (compiled(x, mask) * grad).sum().backward()
    (eager_module(x_eager, mask) * grad).sum().backward()
    assert relative_error(x.grad, x_eager.grad) < 1e-6  # the same kernels: equal up to fusion
    for name, p in eager_module.named_parameters():
        assert relative_error(getattr(compiled_module, name).grad, p.grad) < 1e-6, name
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(compiled_module, name), getattr(eager_module, name)), name
