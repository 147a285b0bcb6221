"""Property-based tests of attention pooling (hypothesis): random B, T, D, hidden sizes, activations,
normalization, lengths or mask, layouts and NaN in the padding.

- reference path (many examples): fastdin.reference against the independent loop version of
  test_reference.py in float64, and the same output and gradients with NaN written into the padding;
- the Triton kernels (few examples; on the CPU under the interpreter): against the float64
  reference under fastdin.testing's bound, with NaN in the padding.

Runtime is bounded by max_examples; the examples follow FASTDIN_TEST_SEED (hypothesis.seed), so a
run is reproducible and another seed draws other examples.
"""
import pytest
import torch
from attention_helpers import Case, check_against_reference, keys_from_base, make_inputs
from conftest import DEVICES, TEST_SEED
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from fastdin import reference

ACTIVATIONS = ["sigmoid", "relu", "prelu", "dice-eval", "dice-train-valid", "dice-train-all"]
LAYOUTS = ["contiguous", "strided", "expanded", "transposed"]


@st.composite
def cases(draw, max_batch=4, max_len=9, max_dim=8, max_width=9):
    activation = draw(st.sampled_from(ACTIVATIONS))
    positions = draw(st.sampled_from(["lengths", "mask", None]))
    case = dict(
        dim=draw(st.integers(1, max_dim)),
        hidden=tuple(draw(st.lists(st.integers(1, max_width), min_size=1, max_size=3))),
        activation=activation.split("-")[0], seq_len=draw(st.integers(1, max_len)),
        batch=draw(st.integers(2, max_batch)), positions=positions,
        normalization=draw(st.sampled_from([None, "softmax"])), layout=draw(st.sampled_from(LAYOUTS)),
        shared_slope=draw(st.booleans()), dice_affine=draw(st.booleans()),
    )
    mode = activation.split("-", 1)[1] if activation.startswith("dice") else None
    # NaN in the padding: where there is padding, and not under Dice statistics over all positions
    # (which count padding by definition) or an expanded layout (one history for every user)
    nan_padding = (positions is not None and mode != "train-all" and case["layout"] != "expanded"
                   and draw(st.booleans()))
    return Case(**case), mode, nan_padding, draw(st.integers(0, 2**31 - 1))


def _valid(case: Case, positions):
    return reference.valid_positions(positions.get("lengths"), positions.get("mask"), case.batch, case.seq_len, "cpu")


def _poison_padding(case: Case, keys_base, valid):
    """NaN into keys_base wherever it holds a padded position of the keys (the layouts of keys_from_base)."""
    poisoned = keys_base.detach().clone()
    for b, t in (~valid).nonzero().tolist():
        if case.layout == "strided":
            poisoned[b, 2 * t, 1:case.dim + 1] = float("nan")
        elif case.layout == "transposed":
            poisoned[b, :, t] = float("nan")
        else:
            poisoned[b, t] = float("nan")
    return poisoned


def _with_two_counted(case, mode, positions):
    """Training-mode Dice needs two counted positions: the first row full, and the second with T = 1."""
    if mode and mode.startswith("train"):
        rows = 1 if case.seq_len > 1 else 2
        if "lengths" in positions:
            positions["lengths"][:rows] = case.seq_len
        if "mask" in positions:
            positions["mask"][:rows] = True
    return positions  # without positions every one of B >= 2 rows counts


def check_reference_example(case: Case, mode, nan_padding, example_seed):
    """The float64 reference against the loop version, and unchanged by NaN in the padding."""
    import test_reference as loops

    torch.manual_seed(example_seed)
    leaves, positions = make_inputs(case, "cpu")
    positions = _with_two_counted(case, mode, positions)
    valid = _valid(case, positions)
    act = None
    if case.activation == "prelu":
        act = leaves["slopes"]
    elif case.activation == "dice":
        act = loops.make_act_params("dice", {"training": mode.startswith("train"), "affine": case.dice_affine},
                                    case.hidden)
    dice_stats = "all" if mode == "train-all" else "valid"
    kwargs = dict(activation=case.activation, normalization=case.normalization, return_scores=True,
                  dice_stats=dice_stats, **positions)

    def run(keys_base):
        base = keys_base.detach().requires_grad_()
        query = leaves["query"].detach().requires_grad_()
        out, scores = reference.attention_pool(query, keys_from_base(case, base), leaves["weights"], leaves["biases"],
                                               act_params=loops.clone_params(act), **kwargs)
        grads = torch.autograd.grad((out * out.detach().cos()).sum() + scores.sum(), [query, base])
        return out, scores, grads

    out, scores, grads = run(leaves["keys_base"])
    loop_out, loop_scores, _ = loops.loop_attention(leaves["query"], keys_from_base(case, leaves["keys_base"]).detach(),
                                                    leaves["weights"], leaves["biases"], case.activation,
                                                    loops.clone_params(act), valid.tolist(), case.normalization,
                                                    dice_stats)
    torch.testing.assert_close(out, torch.tensor(loop_out, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scores, torch.tensor(loop_scores, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    if nan_padding:
        out_p, scores_p, grads_p = run(_poison_padding(case, leaves["keys_base"], valid))
        assert torch.equal(out_p, out) and torch.equal(scores_p, scores)
        assert torch.equal(grads_p[0], grads[0])
        finite = ~torch.isnan(_poison_padding(case, leaves["keys_base"], valid))
        assert torch.equal(grads_p[1][finite], grads[1][finite]) and torch.isfinite(grads_p[1]).all()


def check_kernel_example(case: Case, mode, nan_padding, example_seed):
    """The kernels against the float64 reference (attention_helpers.check_against_reference)."""
    import test_attention_dice_train as training
    import test_attention_kernel as inference

    torch.manual_seed(example_seed)
    device = DEVICES[0]
    if mode and mode.startswith("train"):
        case = training.TrainCase(**{**vars(case), "dice_stats": mode.split("-")[1]})
        run = training.run
    else:
        run = inference.run
    leaves, positions = make_inputs(case, device)
    positions = _with_two_counted(case, mode, positions)
    if nan_padding:
        leaves["keys_base"] = _poison_padding(case, leaves["keys_base"].cpu(), _valid(case, {
            k: v.cpu() for k, v in positions.items()})).to(device)
    check_against_reference(case, torch.float32, device, run, leaves, positions)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@seed(TEST_SEED)
@settings(max_examples=60, **SETTINGS)
@given(cases())
def test_reference_matches_loops_and_ignores_padding(example):
    check_reference_example(*example)


@pytest.mark.usefixtures("on_kernel_device")
@seed(TEST_SEED)
@settings(max_examples=6, **SETTINGS)
@given(cases(max_batch=3, max_len=6, max_dim=6, max_width=6))
def test_kernels_match_reference(example):
    check_kernel_example(*example)


def sweep_reference_examples(count: int) -> None:
    """For tests/sweep_seeds.py: `count` reference-path examples drawn from the current torch seed."""
    @seed(int(torch.randint(0, 2**31 - 1, ())))
    @settings(max_examples=count, **SETTINGS)
    @given(cases())
    def examples(example):
        check_reference_example(*example)

    examples()
