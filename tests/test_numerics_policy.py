"""fastdin.testing's bound: it passes the kernels as they are and rejects a real error of 1e-3."""
import pytest
import test_attention_dice_train as training
import test_attention_kernel as inference
import torch
from attention_helpers import Case, cast_leaves, check_against_reference, make_inputs, run_reordered
from conftest import DEVICES

from fastdin.testing import FLOOR, assert_close_to_reference, error_bound, relative_error


def _perturbed(run, relative):
    """run, with every kernel result moved by a random perturbation of that relative size."""
    def perturbed_run(case, leaves, positions, backend, grad_out, grad_scores):
        results = run(case, leaves, positions, backend, grad_out, grad_scores)
        if backend != "triton":
            return results
        moved = []
        for r in results:
            noise = torch.randn(r.shape, dtype=torch.float64, device=r.device)
            noise *= r.double().abs() > 1e-6 * r.double().abs().max()  # zeros stay zeros: the relative bound rejects
            moved.append((r.double() + relative * r.double().norm() * noise / noise.norm().clamp_min(1e-30)).to(r.dtype))
        return moved
    return perturbed_run


@pytest.mark.usefixtures("on_kernel_device")
@pytest.mark.parametrize("module,case", [(inference, inference.CASES[2]), (training, training.CASES[0])],
                         ids=["prelu-softmax", "dice-train"])
def test_an_error_of_1e_3_fails_and_none_passes(module, case):
    leaves, positions = make_inputs(case, DEVICES[0])
    if module is training:
        positions = training.positions_with_two_counted(case, positions)
    check_against_reference(case, torch.float32, DEVICES[0], module.run, leaves, positions)
    with pytest.raises(AssertionError, match="relative error"):
        check_against_reference(case, torch.float32, DEVICES[0], _perturbed(module.run, 1e-3), leaves, positions)


def test_bound_and_message():
    want = torch.randn(1000, dtype=torch.float64)
    same = want.float()
    assert error_bound(torch.float32, 1e-7) == 2e-7 + FLOOR[torch.float32]
    assert assert_close_to_reference("exact", want.float(), want, same) < 0.5
    off = want * (1 + 1e-3)
    assert relative_error(off, want) == pytest.approx(1e-3)
    with pytest.raises(AssertionError, match=r"moved: relative error 1.00e-03 > .* \(the reference in float32\)"):
        assert_close_to_reference("moved", off.float(), want, same)
    # the largest error of several same-dtype runs counts
    noisy = want * (1 + 5e-4)  # bound 2 x 5e-4 + 1e-4 > 1e-3
    assert_close_to_reference("two runs", off.float(), want, [same, noisy.float()])


@pytest.mark.parametrize("layout", ["contiguous", "strided", "expanded", "transposed"])
@pytest.mark.parametrize("positions", ["lengths", "mask", None])
def test_the_reordered_reference_is_the_same_math(layout, positions):
    """The second same-dtype reference (users and positions reversed, results put back) equals the
    first in float64: were a result misplaced, the bound it sets would be loose."""
    case = Case(5, (7, 3), "prelu", positions=positions, normalization="softmax", layout=layout)
    leaves, where = make_inputs(case, "cpu")
    leaves = cast_leaves(leaves, torch.float64)
    grad_out, grad_scores = torch.randn(case.batch, case.dim, dtype=torch.float64), torch.randn(
        case.batch, case.seq_len, dtype=torch.float64)
    plain = inference.run(case, leaves, where, "reference", grad_out, grad_scores)
    reordered = run_reordered(case, inference.run, leaves, where, grad_out, grad_scores)
    assert len(plain) == len(reordered)
    for i, (a, b) in enumerate(zip(plain, reordered)):
        assert relative_error(b, a) < 1e-12 or a.abs().max() < 1e-12, i


def test_an_entry_zero_in_exact_math_gets_an_absolute_bound():
    """FASTDIN_TEST_SEED=7's bias gradient: four entries zero in exact math, computed as fp32 noise."""
    want = torch.tensor([2.8e-17, 2.2172e-4, 1.4e-17, 8.7e-19, -1.2e-17], dtype=torch.float64)
    same = torch.tensor([1e-9, 2.2172e-4, 0, 0, 0])
    noisy = torch.tensor([1.6e-7, 2.2172e-4, -5.2e-8, -1.1e-8, 2e-8])
    assert relative_error(noisy, want) > error_bound(torch.float32, relative_error(same, want))
    assert assert_close_to_reference("noise", noisy, want, same) < 0.1
    with pytest.raises(AssertionError, match=r"1.00e-04 where the result is zero in exact math > 1.00e-05"):
        assert_close_to_reference("garbage", torch.tensor([1e-4, 2.2172e-4, 0, 0, 0]), want, same)
    with pytest.raises(AssertionError, match="relative error"):  # the other entries keep the relative bound
        assert_close_to_reference("moved", torch.tensor([0, 2.3e-4, 0, 0, 0]), want, same)
    assert assert_close_to_reference("all zero", torch.zeros(3), torch.zeros(3, dtype=torch.float64),
                                     torch.zeros(3)) == 0
