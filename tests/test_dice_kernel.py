"""The fused Triton Dice kernel against the float64 reference: output, every gradient, running stats.

On the CPU the kernels run under TRITON_INTERPRET=1 (set in conftest), in fp32 and fp16; on CUDA
bf16 is added (the interpreter's bf16 arithmetic is wrong, see docs/design.md). Every float tensor the
kernel launchers allocate is prefilled with NaN, so an element a kernel fails to write shows up.
"""
import pytest
import torch
from conftest import DEVICES
from layout_helpers import assert_within_policy

# tests without a device parameter build their tensors on the kernels' device
pytestmark = pytest.mark.usefixtures("on_kernel_device")
from torch import nn

from fastdin import functional, reference
from fastdin.kernels import dice as dice_kernels
from fastdin.layers import Dice

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


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


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


def reference_float64(x, params, running, mask, training, grad):
    as64 = {name: p.double() if p is not None else None for name, p in params.items()}
    return run_dice(x.double(), as64, tuple(r.double() for r in running), mask, training, grad.double(),
                    backend="reference")


def flat_results(result):
    """[out, *grads (x, then the parameters), running_mean, running_var] of run_dice."""
    out, grads, run_mean, run_var = result
    return [out, *grads.values(), run_mean, run_var]


def assert_within_policy_of_reference(result, x, params, running, mask, training, grad, what=""):
    """The numerics policy: within twice the same-dtype reference's error (plus ATOL) of float64."""
    want = reference_float64(x, params, running, mask, training, grad)
    same_dtype = run_dice(x, params, running, mask, training, grad, backend="reference")
    assert_within_policy(flat_results(result), flat_results(want), flat_results(same_dtype), x.dtype, what=what)


def assert_matches_reference(x, params, running, mask, training, dtype):
    grad = torch.randn(x.shape, device=x.device).to(dtype)
    result = run_dice(x, params, running, mask, training, grad, backend="triton")
    out, grads = result[:2]
    assert out.dtype == dtype and out.shape == x.shape
    for name, g in grads.items():
        assert g.dtype == params.get(name, x).dtype, name
    assert_within_policy_of_reference(result, x, params, running, mask, training, grad)


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
    grads = {name: g for name, g in grads.items() if g is not None}
    assert_within_policy_of_reference((out, grads, running_mean, running_var), x, params, running, mask, True, grad,
                                      str(config))


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
    ones = torch.ones_like(x)
    want = flat_results(reference_float64(x, params, running, None, True, ones))[:2]
    same_dtype = flat_results(run_dice(x, params, running, None, True, ones, backend="reference"))[:2]
    assert_within_policy([out, leaf.grad], want, same_dtype, torch.float32)


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
    """Dice(backend="triton") and Dice(backend="reference") agree over SGD steps and then in eval."""
    modules = {backend: Dice(37, eps=1e-5, affine=affine, backend=backend).to(device)
               for backend in ("triton", "reference")}
    modules["triton"].load_state_dict(modules["reference"].state_dict())
    optimizers = {b: torch.optim.SGD(m.parameters(), lr=0.5) for b, m in modules.items()}
    for step in range(3):
        x = torch.randn(4, 25, 37, device=device) * 2 + 1
        mask = torch.rand(4, 25, device=device) > 0.2
        grad = torch.randn_like(x)
        outs = {}
        for backend, module in modules.items():
            leaf = x.clone().requires_grad_()
            optimizers[backend].zero_grad()
            outs[backend] = module(leaf, mask)
            outs[backend].backward(grad)
            outs[backend] = (outs[backend], leaf.grad)
            optimizers[backend].step()
        torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-5)
    for name, want in modules["reference"].state_dict().items():
        torch.testing.assert_close(modules["triton"].state_dict()[name], want, rtol=1e-4, atol=1e-5)
    x = torch.randn(30, 37, device=device)
    with torch.no_grad():
        evals = [m.eval()(x) for m in modules.values()]
    torch.testing.assert_close(evals[0], evals[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_stable_under_large_offset(device):
    """mean 1000, std 0.1: E[x^2] - E[x]^2 in fp32 would lose the variance entirely; the merge must not."""
    x = 1000 + 0.1 * torch.randn(200, 24, device=device)
    mask = torch.rand(200, device=device) > 0.3
    running = (torch.zeros(24, device=device), torch.ones(24, device=device))
    _, stats = dice_kernels.dice_forward(x, torch.zeros(24, device=device), None, None, *running, mask, True, 0.1,
                                         1e-8, block_rows=16, row_programs=3)
    valid = x[mask].double()
    assert rel_err(stats[0], valid.mean(0)) < 1e-6
    assert rel_err(stats[1], (valid.var(0, unbiased=False) + 1e-8).rsqrt()) < 1e-3
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
    assert rel_err(x.grad, x_eager.grad) < 1e-6
    for name, p in eager_module.named_parameters():
        assert rel_err(getattr(compiled_module, name).grad, p.grad) < 1e-6, name
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(compiled_module, name), getattr(eager_module, name)), name
