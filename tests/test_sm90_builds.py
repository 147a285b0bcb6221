"""The Dice and MBA kernels build for sm_90 (H100/H200) and fit a block, checked without a GPU.

Every launch the launchers make is compiled with Triton's compiler and ptxas (tests/sm90_build.py),
which catches what the interpreter lets through: front-end errors of the compiled language, more
shared memory than a block may use, register spills. One subprocess builds all cases (the
interpreter must be off there); each case is then checked on its own. Skipped, with the reason,
where this triton cannot build for sm_90.
"""
import itertools

import pytest
import torch

import sm90_build

# ptxas may spill a word or two even with registers to spare (seen: 4 B in the bf16 eval forward
# at 80 registers); spilling more means a tile too big for the register file
SPILL_LIMIT_BYTES = 16
H200_SMS = 132  # the launchers give about one row program per SM; on an H200 that makes BLOCK_P its largest

# The issues' shapes (rows x features); Dice runs on fp32, or on bf16 activations with fp32
# parameters and running statistics (autocast).
DICE_SHAPES = [(204800, 80), (4096, 200)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DICE_CASES = list(itertools.product(DICE_SHAPES, DTYPES, ("train", "eval"), ("affine", "plain"),
                                    ("mask", "nomask")))
# MBA on embedding tables and gradients of one dtype; dim 18 fits one column block, 200 loops over two
MBA_CASES = list(itertools.product(DTYPES, (18, 200), ("padding", "nopadding")))


def dice_case_id(shape, dtype, mode, affine, mask):
    return f"dice-{shape[0]}x{shape[1]}-{dtype}-{mode}-{affine}-{mask}"


def mba_case_id(dtype, dim, padding):
    return f"mba-{dtype}-dim{dim}-{padding}"


def _dice_call(dice, shape, dtype, mode, affine, mask):
    """A forward and backward through the launchers on uninitialised CPU tensors (nothing runs)."""
    def call():
        rows, features = shape
        x = torch.empty(rows, features, dtype=DTYPES[dtype])
        alpha, weight, bias, running_mean, running_var = torch.empty(5, features).unbind()
        if affine == "plain":
            weight = bias = None
        valid = torch.ones(rows, dtype=torch.bool) if mask == "mask" else None
        training = mode == "train"
        _, stats = dice.dice_forward(x, alpha, weight, bias, running_mean, running_var, valid, training, 0.1, 1e-8,
                                     row_programs=H200_SMS)
        dice.dice_backward(torch.empty_like(x), x, valid, alpha, weight, bias, stats, training,
                           row_programs=H200_SMS)
    return call


def _mba_call(mba, dtype, dim, padding):
    def call():
        rows = 100_000
        weight = torch.empty(rows, dim, dtype=DTYPES[dtype])
        ids = torch.randint(0, rows, (4096, 50))
        counts = torch.ones(rows, dtype=torch.int64)
        mba.mba_scatter_(torch.empty_like(weight), weight, ids, counts, 0.01, 0 if padding == "padding" else None)
    return call


def all_cases():
    """{case id: call} for sm90_build.py; imports the kernels with the interpreter off."""
    from fastdin.kernels import dice, mba

    cases = {dice_case_id(*case): _dice_call(dice, *case) for case in DICE_CASES}
    cases.update({mba_case_id(*case): _mba_call(mba, *case) for case in MBA_CASES})
    return cases


@pytest.fixture(scope="module")
def builds():
    return sm90_build.builds_or_skip("test_sm90_builds:all_cases")


def check_builds(kernels, expected):
    failed = {name: build["error"] for name, build in kernels.items() if "error" in build}
    assert not failed, failed
    assert set(kernels) == expected  # every launch was captured and compiled
    for name, build in kernels.items():
        assert build["shared"] <= sm90_build.H200_SHARED_BYTES, (name, build)
        assert max(build["spill_stores"], build["spill_loads"]) <= SPILL_LIMIT_BYTES, (name, build)


@pytest.mark.parametrize("case", DICE_CASES, ids=[dice_case_id(*case) for case in DICE_CASES])
def test_dice_kernels_build_for_sm90(builds, case):
    expected = {"_dice_fwd_kernel", "_dice_bwd_reduce_kernel", "_dice_bwd_dx_kernel"}
    if case[2] == "train":
        expected.add("_dice_stats_kernel")
    check_builds(builds[dice_case_id(*case)], expected)


@pytest.mark.parametrize("case", MBA_CASES, ids=[mba_case_id(*case) for case in MBA_CASES])
def test_mba_kernel_builds_for_sm90(builds, case):
    check_builds(builds[mba_case_id(*case)], {"_mba_scatter_kernel"})


def test_no_build_under_the_interpreter(monkeypatch):
    """The reason the builds skip where the interpreter has replaced the kernels."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    assert "TRITON_INTERPRET" in sm90_build.toolchain_missing()
