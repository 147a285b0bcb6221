"""Backend policy shared by every op.

backend is "auto" | "triton" | "torch" | "reference"; None reads the environment variable
FASTDIN_BACKEND (default "auto").
- "triton": the fused Triton kernels; an error where none covers the case. On the CPU they run
  only under Triton's interpreter (TRITON_INTERPRET=1).
- "torch": an op's fast pure-PyTorch path where it has one, else its reference.
- "reference": the plain, unfused ground truth (fastdin.reference).
- "auto": "triton" on CUDA where Triton imports and a kernel covers the case, unless the op says
  its kernel is the wrong choice there (`slow_kernel`, e.g. attention in float32 with TF32 off);
  else "torch".
"""
import functools
import os
import warnings
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "torch", "reference")

try:
    import triton  # noqa: F401
    from triton.runtime.errors import OutOfResources

    HAS_TRITON = True
    # what Triton raises, before anything runs, for a program the GPU cannot hold (shared memory)
    LAUNCH_REFUSED = (OutOfResources,)
except ImportError:  # no triton wheel on this platform
    HAS_TRITON = False
    LAUNCH_REFUSED = ()

_value_checks = os.environ.get("FASTDIN_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> bool:
    """Turn the checks of tensor *values* (lengths within [0, T], Dice's valid-row count) on or off.

    They are on by default. On CUDA each costs a device-to-host synchronisation, so a tuned
    training loop whose inputs are known to be valid may turn them off. Shape, dtype and device
    checks are free and always run. Returns the previous setting.
    """
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    return previous


def checking_values(t: Tensor) -> bool:
    """Whether to check the values of t now: on, and not while tracing or capturing a graph."""
    if not _value_checks or torch.compiler.is_compiling() or t.is_meta:  # meta tensors have no values
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # .item() would freeze this batch's values
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device: torch.device) -> Optional[int]:
    """Bytes of shared memory one program may use on this device; None where no GPU compiler runs."""
    if device.type != "cuda" or not HAS_TRITON:
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 232448)  # 232448: an H100/H200's (227 KiB)


@functools.lru_cache(maxsize=None)
def has_wgmma(device: torch.device) -> bool:
    """Whether Triton lowers the kernels' products to wgmma here (sm_90: H100, H200), which needs about
    half the shared memory of the mma.sync programs other GPUs run; the interpreter counts as sm_90.
    ROCm reports its own architecture numbers as a capability (9.4 on an MI300): no wgmma there."""
    if device.type != "cuda":
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9


def kernel_dtype(keys: Tensor) -> torch.dtype:
    """The dtype the kernels compute in: under autocast on keys' device its dtype (float64 is never
    autocast), else keys' own."""
    device = keys.device.type
    if keys.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return keys.dtype


# (kernel family, device, D, hidden sizes, dtype) -> why the GPU refused one of the family's programs
_REFUSED: Dict[tuple, str] = {}


def _case_key(family: str, keys: Tensor, weights: Sequence[Tensor]) -> tuple:
    # the compute dtype: the kernels see keys converted to the autocast dtype, the dispatch sees them before
    return family, keys.device, keys.shape[-1], tuple([w.shape[0] for w in weights[:-1]]), kernel_dtype(keys)


def record_refusal(family: str, keys: Tensor, weights: Sequence[Tensor], error) -> str:
    """Remember that this GPU refused a program of the `family` kernels for this case (Triton's
    OutOfResources, raised before anything ran: the shared-memory estimate let it through), so that
    the family's gap sends the case elsewhere from now on. Warns, and returns the reason."""
    hidden = [w.shape[0] for w in weights[:-1]]
    reason = (f"D = {keys.shape[-1]} with hidden sizes {hidden} in {kernel_dtype(keys)}: a program of the {family} "
              f"kernels needs {error.required} B of {error.name}, and {keys.device} allows {error.limit} B")
    _REFUSED[_case_key(family, keys, weights)] = reason
    warnings.warn(f"fastdin: {reason}; this case runs another kernel or the torch path from now on",
                  RuntimeWarning, stacklevel=3)
    return reason


def refusal(family: str, keys: Tensor, weights: Sequence[Tensor]) -> Optional[str]:
    """The reason `record_refusal` kept for this case, or None."""
    return _REFUSED.get(_case_key(family, keys, weights)) if _REFUSED else None


def refusal_count() -> int:
    return len(_REFUSED)


def default_backend() -> str:
    backend = os.environ.get("FASTDIN_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"FASTDIN_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_runnable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of this device."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def choose_backend(backend: Optional[str], device: torch.device, kernel_gap: Optional[str], op: str,
                   has_torch_path: bool = False, slow_kernel: Optional[str] = None) -> str:
    """Resolve backend to "triton", "torch" or "reference" for one call of op.

    kernel_gap is None when a Triton kernel exists for the case, else the reason why none does;
    has_torch_path says whether op has a fast PyTorch path ("torch" means the reference without one);
    slow_kernel, when not None, is why "auto" takes that path although a kernel covers the case
    ("triton" still runs the kernel).
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    torch_path = "torch" if has_torch_path else "reference"
    if backend == "reference":
        return "reference"
    if backend == "torch":
        return torch_path
    if backend == "auto":
        usable = device.type == "cuda" and HAS_TRITON and kernel_gap is None and slow_kernel is None
        return "triton" if usable else torch_path
    if not triton_runnable(device):
        raise RuntimeError(
            f"backend='triton' for {op} needs CUDA tensors and an installed triton "
            f"(or TRITON_INTERPRET=1 on the CPU); got tensors on {device}"
        )
    if kernel_gap is not None:
        raise NotImplementedError(f"backend='triton': no Triton kernel for {op} in this case: {kernel_gap}")
    return "triton"
