"""Host-side arithmetic and device facts for the launchers, in plain Python.

triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton >= 3.5: called from host
code each costs about 5 us (this 2-core machine), more than a launch path's whole budget allows for
a few of them. torch.cuda.get_device_properties is looked up once per device.

Only host code lives here (torch, no triton: the ops layer imports it too): no kernels, no autograd.
"""
import functools

import torch


def tf32_matmuls() -> bool:
    """Whether float32 matmuls on CUDA may use TF32: torch.backends.cuda.matmul.fp32_precision (torch >=
    2.9, which also reflects the legacy flag and set_float32_matmul_precision), else allow_tf32. Reading
    the legacy flag after the new API set the precision raises in torch >= 2.9."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    return precision not in ("ieee", "none")


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up (b > 0)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def block(n: int) -> int:
    """A tile dimension for n: a power of two, and >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The SM count of a CUDA device."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
