"""`fastdin.patch(model)`: swap a peer library's DIN attention units and Dice activations, in place,
for fastdin's, keeping the peer's parameters and running statistics; `fastdin.unpatch` reverts.

One adapter per peer (deepctr_torch, fuxictr, rechub, recbole); torchrec.py, imported directly, is
the TorchRec-sharded DIN (not a patch). An adapter is consulted only for a
module whose class comes from its package, so no peer is imported here.
"""
import importlib
import warnings
from typing import List, NamedTuple, Optional

from torch import nn

from fastdin import functional
from fastdin.integrations._common import Patched, Unsupported

# top-level package of the peer's classes -> adapter module (imported on first use)
ADAPTERS = {
    "deepctr_torch": "fastdin.integrations.deepctr_torch",
    "fuxictr": "fastdin.integrations.fuxictr",
    "torch_rechub": "fastdin.integrations.rechub",
    "recbole": "fastdin.integrations.recbole",
}


class PatchWarning(UserWarning):
    """A peer module that `patch` recognised but left alone, because fastdin cannot give its numbers."""


class Replaced(NamedTuple):
    path: str
    old_type: type
    new_type: type


def _adapter(module: nn.Module):
    package = type(module).__module__.split(".")[0]
    name = ADAPTERS.get(package)
    return importlib.import_module(name) if name else None


def patch(model: nn.Module, backend: Optional[str] = None, verbose: bool = False, exact: bool = True) -> List[Replaced]:
    """Replace, in place, every peer DIN attention unit and Dice in `model` that fastdin can compute.

    The replacements hold the peer's own nn.Linear / PReLU / BatchNorm modules and parameters, so an
    optimizer built before the call keeps working and `unpatch` gives back the trained originals.
    exact=True keeps the peer's numbers, its defects included (padding in Dice's statistics,
    uniform softmax weights on rows with no valid position); exact=False uses fastdin's semantics.
    Recognised modules that fastdin cannot express are left alone with a PatchWarning. Returns
    (path, old type, new type) per replaced module; [] when there is nothing (more) to patch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in functional.BACKENDS:
        raise ValueError(f"backend must be None or one of {functional.BACKENDS}, got {backend!r}")
    if not isinstance(model, Patched) and _convert(model, "", backend, exact, probe=True):
        raise ValueError(f"patch replaces submodules in place; the model itself is a {type(model).__name__}: "
                         "put it inside a container (e.g. nn.Sequential) and patch that")
    replaced: List[Replaced] = []
    _walk(model, "", backend, exact, replaced, verbose)
    return replaced


def _convert(module: nn.Module, path: str, backend, exact: bool, probe: bool = False):
    adapter = _adapter(module)
    if adapter is None:
        return None
    try:
        return adapter.convert(module, backend=backend, exact=exact)
    except Unsupported as reason:
        if not probe:
            warnings.warn(f"fastdin.patch left {path} ({type(module).__name__}) alone: {reason}", PatchWarning,
                          stacklevel=4)
        return None


def _walk(module: nn.Module, prefix: str, backend, exact: bool, replaced: list, verbose: bool) -> None:
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, Patched):
            continue  # patched before: patching twice changes nothing
        new = _convert(child, path, backend, exact)
        if new is None:
            _walk(child, path + ".", backend, exact, replaced, verbose)
            continue
        new.train(child.training)
        setattr(module, name, new)
        replaced.append(Replaced(path, type(child), type(new)))
        if verbose:
            print(f"fastdin.patch: {path}: {type(child).__module__}.{type(child).__name__} -> {type(new).__name__}")


def unpatch(model: nn.Module) -> List[Replaced]:
    """Put back every module `patch` replaced in `model`, with the weights trained meanwhile."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored: List[Replaced] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, Patched):
                original = child.restore()
                setattr(module, name, original)
                restored.append(Replaced(prefix + name, type(child), type(original)))
            else:
                walk(child, prefix + name + ".")

    walk(model, "")
    return restored


__all__ = ["PatchWarning", "Replaced", "patch", "unpatch"]
