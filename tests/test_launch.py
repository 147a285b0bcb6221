"""The launchers' host arithmetic (kernels/launch.py) agrees with Triton's own helpers, which it
replaces because they cost about 5 us per host call."""
import pytest
import torch
import triton

from fastdin.kernels.launch import block, ceil_div, multiprocessors, next_power_of_2


def test_ceil_div_matches_triton():
    for a in list(range(0, 70)) + [2**31 - 1, 2**31, 2**40 + 3]:
        for b in (1, 2, 3, 16, 17, 1024):
            assert ceil_div(a, b) == triton.cdiv(a, b), (a, b)


def test_next_power_of_2_matches_triton():
    for n in list(range(1, 300)) + [2**31 - 1, 2**31, 2**31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    assert next_power_of_2(0) == 1  # a tile size: triton's gives 0, which no block size can be


def test_block_is_a_power_of_2_of_at_least_16():
    for n in range(0, 300):
        assert block(n) == max(16, triton.next_power_of_2(max(n, 1))), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_multiprocessors_is_the_device_count():
    device = torch.device("cuda")
    assert multiprocessors(device) == torch.cuda.get_device_properties(device).multi_processor_count


TF32_SETTINGS = [  # (statements run in a fresh interpreter, expected tf32_matmuls())
    ("pass", False),  # PyTorch's default
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cuda.matmul.allow_tf32 = False", False),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.set_float32_matmul_precision('highest')", False),
]
if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: reading allow_tf32 after these raises
    TF32_SETTINGS += [("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
                      ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
                      ("torch.backends.fp32_precision = 'tf32'", True)]


@pytest.mark.parametrize("statements,expected", TF32_SETTINGS)
def test_tf32_matmuls_reads_every_way_of_setting_it(statements, expected):
    """The kernels' fp32 precision follows PyTorch's, however it was set (the legacy flag, the matmul
    precision, or torch >= 2.9's fp32_precision), and reading it never raises. A fresh interpreter
    each: the two APIs, once mixed, make the legacy getter raise for the rest of the process."""
    import subprocess
    import sys

    code = f"import torch; {statements}; from fastdin.kernels.launch import tf32_matmuls; print(tf32_matmuls())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(expected)
