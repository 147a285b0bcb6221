"""fastdin.testing's bound: it passes the kernels as they are and rejects a real error of 1e-3."""
import pytest
import test_attention_dice_train as training
import test_attention_kernel as inference
import torch
from attention_helpers import check_against_reference, make_inputs
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
            moved.append((r.double() + relative * r.double().norm() * noise / noise.norm()).to(r.dtype))
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
