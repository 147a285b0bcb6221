"""torch.compile(fullgraph=True) through the custom ops, with aot_eager and with inductor: the output,
the scores, the gradient of the query, the keys and EVERY parameter, and the running statistics,
against the float64 reference (the numerics policy). Under softmax the score layer's bias gets an
exact zero gradient: checked to be about 0, not skipped.
"""
import copy

import pytest
import torch
from layout_helpers import assert_within_policy

from fastdin.layers import AttentionPooling, Dice

pytestmark = pytest.mark.usefixtures("on_kernel_device")

MODULES = {
    "attention-prelu-softmax-eval": dict(embed_dim=5, hidden_units=(7, 4), activation="prelu",
                                         normalization="softmax", return_scores=True),
    "attention-dice-train-affine": dict(embed_dim=5, hidden_units=(6,), activation="dice", return_scores=True,
                                        dice_affine=True),
}


def randomized(module):
    """Random parameters and running statistics (the defaults leave some gradients exactly 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.8, 0.8)
        for m in module.modules():
            if hasattr(m, "running_var"):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module


def step(module, inputs, grads):
    """[outputs..., grads of the inputs and of every parameter, buffers] of one forward and backward."""
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    outputs = module(*leaves)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    differentiable = [t for t in leaves if t.requires_grad] + list(module.parameters())
    result = torch.autograd.grad(outputs, differentiable, [g.to(o.dtype) for g, o in zip(grads, outputs)])
    return outputs + list(result) + [b for b in module.buffers() if b.is_floating_point()]


def check_compiled(module, inputs, grads, compile_backend, zero_at=None):
    want_module = copy.deepcopy(module).double()
    same_module = copy.deepcopy(module)
    for m in (want_module, same_module):
        for sub in m.modules():
            if hasattr(sub, "backend"):
                sub.backend = "reference"
    for sub in module.modules():
        if hasattr(sub, "backend"):
            sub.backend = "triton"
    compiled = torch.compile(module, backend=compile_backend, fullgraph=True)
    want = step(want_module, [t.double() if t.is_floating_point() else t for t in inputs], grads)
    same = step(same_module, inputs, grads)
    got = step(compiled, inputs, grads)
    assert_within_policy(got, want, same, torch.float32, zero_at, f"(compiled with {compile_backend})")


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", MODULES)
def test_compiled_attention_every_gradient(name, compile_backend):
    kwargs = MODULES[name]
    module = randomized(AttentionPooling(backend="triton", **kwargs))
    module.train(kwargs["activation"] == "dice")
    B, T, D = 3, 6, kwargs["embed_dim"]
    inputs = [torch.randn(B, D), torch.randn(B, T, D), torch.tensor([T, 3, 0])]
    grads = [torch.randn(B, D), torch.randn(B, T)]
    # results: out, scores, d query, d keys, then the parameters (the score layer's bias last)
    zero_at = 2 + 2 + len(list(module.parameters())) - 1 if kwargs.get("normalization") == "softmax" else None
    check_compiled(module, inputs, grads, compile_backend, zero_at)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_dice_every_gradient(compile_backend):
    module = randomized(Dice(6, eps=1e-5, affine=True, backend="triton"))
    x, mask = torch.randn(3, 5, 6), torch.rand(3, 5) > 0.3
    mask[0, :2] = True
    check_compiled(module, [x, mask], [torch.randn(3, 5, 6)], compile_backend)
