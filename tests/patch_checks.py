"""Checks every peer's patch test shares: the same predictions and gradients before and after
`fastdin.patch`, and unpatch giving the original types back."""
import copy

import torch

import fastdin


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def outputs_and_grads(model, forward, params, seed=0):
    """forward(model) -> a tensor; returns it and the gradient of a fixed random projection of it
    with respect to every parameter in `params` (in that order)."""
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    out = forward(model)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed + 1))
    (out * weights).sum().backward()
    return out.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def assert_patch_keeps_numbers(model, forward, tol=1e-10, backend="reference", exact=True, modes=(True, False)):
    """Patch a copy of `model`; in train and eval mode its outputs and every parameter gradient equal
    the unpatched model's within `tol` (relative). The copy's parameters are found by identity, so the
    check also shows that the patched model trains the peer's own parameters. Returns the patched copy."""
    patched = copy.deepcopy(model)
    theirs, ours = list(model.parameters()), list(patched.parameters())
    replaced = fastdin.patch(patched, backend=backend, exact=exact)
    assert replaced, "nothing was patched"
    assert fastdin.patch(patched, backend=backend, exact=exact) == []  # patching twice is harmless
    assert {id(p) for p in patched.parameters()} <= {id(p) for p in ours}  # shared, not copied
    for training in modes:
        model.train(training), patched.train(training)
        want, want_grads = outputs_and_grads(model, forward, theirs)
        got, got_grads = outputs_and_grads(patched, forward, ours)
        assert got.shape == want.shape
        assert rel_err(got, want) <= tol, (training, rel_err(got, want))
        # a gradient that is itself round-off (a softmax-invariant bias, say) is measured against 1e-3 of
        # the whole gradient's norm rather than its own
        floor = 1e-3 * torch.cat([w.flatten() for w in want_grads if w is not None]).norm()
        for i, (g, w) in enumerate(zip(got_grads, want_grads)):
            g = torch.zeros_like(w) if g is None and w is not None else g
            w = torch.zeros_like(g) if w is None and g is not None else w
            if g is not None:
                err = ((g - w).norm() / torch.maximum(w.norm(), floor)).item()
                assert err <= tol, (training, i, err)
    for theirs_buf, ours_buf in zip(model.buffers(), patched.buffers()):
        assert rel_err(ours_buf.double(), theirs_buf.double()) <= tol  # running statistics followed
    return patched, replaced


def assert_unpatch_restores(patched, replaced):
    types = {r.path: r.old_type for r in replaced}
    restored = fastdin.unpatch(patched)
    assert {r.path for r in restored} == set(types)
    modules = dict(patched.named_modules())
    for path, old_type in types.items():
        assert type(modules[path]) is old_type
    assert fastdin.unpatch(patched) == []
