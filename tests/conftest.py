"""Test setup: without a GPU the Triton kernels run under Triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so before fastdin.kernels
is imported anywhere.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Where the kernel tests run: on CUDA when there is a GPU, else on the CPU under the interpreter
# (without it Triton cannot run on CPU tensors, so with a GPU the CPU is not a kernel device).
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


# Every random test starts from this seed (FASTDIN_TEST_SEED=N runs the suite on other inputs; tests
# that seed again offset their seeds by it). tests/sweep_seeds.py sweeps the numerics tests over many.
TEST_SEED = int(os.environ.get("FASTDIN_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(TEST_SEED)


@pytest.fixture
def on_kernel_device():
    """New tensors and modules default to the kernels' device (CUDA on a GPU machine, else the CPU)."""
    with torch.device(DEVICES[0]):
        yield

# tests/mutation/run.py is an on-demand mutation check, not a test module
collect_ignore = ["mutation"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: the recompiles of code objects that many tests compile (the
    ops, the layers) would otherwise add up across the session to dynamo's recompile limit."""
    yield
    torch._dynamo.reset()
