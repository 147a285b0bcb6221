"""Test setup: without a GPU the Triton kernels run under Triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so before fastdin.kernels
is imported anywhere.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
