"""A GPU that refuses a program the shared-memory estimate let through. Triton raises OutOfResources
at launch, before anything runs; here a launcher raises it. The call then goes to the next kernel, and
a refused backward recomputes its gradients on the torch path. The case is remembered, with one
warning, and a call that has nowhere left to go fails with an error that says why."""
import pytest
import torch
from attention_helpers import Case, check_against_reference, make_inputs
from conftest import DEVICES
from test_attention_kernel import run

from fastdin import functional
from fastdin.ops import attention_packed as packed_ops
from fastdin.ops import backend
from fastdin.ops.attention import attention_kernel_gap
from fastdin.reference import DiceParams

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from fastdin.kernels import attention_packed as packed_kernels  # noqa: E402
from fastdin.kernels import attention_pool as per_user_kernels  # noqa: E402

NEEDED, LIMIT = 262144, 232448
# the packed kernels' dtypes: on CUDA fp32 runs on the per-user kernels, and the interpreter's bf16 is wrong
DTYPE = torch.float32 if DEVICES[0] == "cpu" else torch.bfloat16


@pytest.fixture(autouse=True)
def no_refusals(monkeypatch):
    monkeypatch.setattr(backend, "_REFUSED", {})


def small_mlp(dim: int = 4, hidden: int = 6):
    """Weights and biases of a one-hidden-layer attention MLP, in DTYPE."""
    weights = [torch.randn(hidden, 4 * dim, dtype=DTYPE), torch.randn(1, hidden, dtype=DTYPE)]
    return weights, [torch.randn(hidden, dtype=DTYPE), torch.randn(1, dtype=DTYPE)]


def refused(calls: list):
    """A launcher that the GPU refuses, counting its calls."""
    def launcher(*args, **kwargs):
        calls.append(1)
        raise OutOfResources(NEEDED, LIMIT, "shared memory")
    return launcher


CASES = [Case(6, (10, 5), "prelu", positions="lengths", normalization="softmax"),
         Case(5, (8, 3), "dice", positions="mask"),
         Case(4, (7,), "sigmoid", positions=None)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_refused_packed_forward_runs_the_per_user_kernels(case, monkeypatch):
    calls = []
    monkeypatch.setattr(packed_kernels, "packed_attention_forward", refused(calls))
    leaves, positions = make_inputs(case, DEVICES[0])
    with pytest.warns(RuntimeWarning, match=f"packed-rows kernels needs {NEEDED} B of shared memory"):
        check_against_reference(case, DTYPE, DEVICES[0], run, leaves, positions)
    assert len(calls) == 1
    keys = leaves["keys_base"].to(DTYPE)
    assert f"allows {LIMIT} B" in packed_ops.packed_gap(keys, leaves["weights"], "sigmoid", None)
    check_against_reference(case, DTYPE, DEVICES[0], run, leaves, positions)  # no second try
    assert len(calls) == 1


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_refused_packed_backward_recomputes_on_the_torch_path(case, monkeypatch):
    """The forward ran packed; the gradients come from fastdin.packed's forward, recomputed."""
    calls = []
    monkeypatch.setattr(packed_kernels, "packed_attention_backward", refused(calls))
    leaves, positions = make_inputs(case, DEVICES[0])
    with pytest.warns(RuntimeWarning, match="packed-rows kernels"):
        check_against_reference(case, DTYPE, DEVICES[0], run, leaves, positions)
    assert len(calls) == 1
    keys = leaves["keys_base"].to(DTYPE)
    assert packed_ops.packed_gap(keys, leaves["weights"], "sigmoid", None) is not None


def compiled_run(case, leaves, positions, backend, grad_out, grad_scores):
    """`run`, with the fast path's attention_pool compiled (aot_eager, one graph: the packed custom ops)."""
    if backend == "reference":
        return run(case, leaves, positions, backend, grad_out, grad_scores)
    eager = functional.attention_pool
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    try:
        functional.attention_pool = compiled
        return run(case, leaves, positions, backend, grad_out, grad_scores)
    finally:
        functional.attention_pool = eager


@pytest.mark.parametrize("refused_launcher", ["packed_attention_forward", "packed_attention_backward"])
@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_a_compiled_graph_runs_a_refused_case_on_the_torch_path(case, refused_launcher, monkeypatch):
    """The graph calls the packed custom ops whatever the GPU refuses: the ops run a refused case on
    the torch path themselves (a refused forward's backward recomputes, as its lse is not the kernels')."""
    torch._dynamo.reset()
    calls = []
    monkeypatch.setattr(packed_kernels, refused_launcher, refused(calls))
    leaves, positions = make_inputs(case, DEVICES[0])
    with pytest.warns(RuntimeWarning, match=f"packed-rows kernels needs {NEEDED} B"):
        check_against_reference(case, DTYPE, DEVICES[0], compiled_run, leaves, positions)
    assert len(calls) == 1
    check_against_reference(case, DTYPE, DEVICES[0], compiled_run, leaves, positions)  # the same graph, no retry
    assert len(calls) == 1


def test_a_refused_jagged_call_names_the_shared_memory(monkeypatch, on_kernel_device):
    """Only the packed kernels take jagged keys: backend="triton" has nowhere else to go."""
    monkeypatch.setattr(packed_kernels, "packed_attention_forward", refused([]))
    offsets = torch.tensor([0, 3, 3, 7])
    query, values = torch.randn(3, 4, dtype=DTYPE), torch.randn(7, 4, dtype=DTYPE)
    weights, biases = small_mlp()
    with pytest.warns(RuntimeWarning), pytest.raises(NotImplementedError, match=f"allows {LIMIT} B"):
        functional.attention_pool(query, values, weights, biases, offsets=offsets, backend="triton")
    out = functional.attention_pool(query, values, weights, biases, offsets=offsets, backend="torch")
    assert out.shape == (3, 4)


def test_refused_everywhere_names_the_shared_memory(monkeypatch, on_kernel_device):
    monkeypatch.setattr(packed_kernels, "packed_attention_forward", refused([]))
    monkeypatch.setattr(per_user_kernels, "attention_pool_forward", refused([]))
    query, keys = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, 5, 4, dtype=DTYPE)
    weights, biases = small_mlp()
    with pytest.warns(RuntimeWarning), pytest.raises(NotImplementedError, match="per-user kernels needs"):
        functional.attention_pool(query, keys, weights, biases, lengths=torch.tensor([5, 0, 2]), backend="triton")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_refused_per_user_backward_recomputes_on_the_torch_path(case, monkeypatch):
    """The forward ran on the per-user kernels; the gradients come from fastdin.packed, recomputed."""
    calls = []
    monkeypatch.setattr(packed_ops, "packed_gap", lambda *args: "the test forces the per-user kernels")
    monkeypatch.setattr(per_user_kernels, "attention_pool_backward", refused(calls))
    leaves, positions = make_inputs(case, DEVICES[0])
    with pytest.warns(RuntimeWarning, match="per-user kernels needs"):
        check_against_reference(case, DTYPE, DEVICES[0], run, leaves, positions)
    assert len(calls) == 1


@pytest.mark.parametrize("refused_launcher", ["attention_pool_forward", "attention_pool_backward"])
@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_a_compiled_graph_runs_a_refused_per_user_case_on_the_torch_path(case, refused_launcher, monkeypatch):
    """As for the packed ops: the per-user custom ops run a refused case on the torch path themselves."""
    torch._dynamo.reset()
    calls = []
    monkeypatch.setattr(packed_ops, "packed_gap", lambda *args: "the test forces the per-user kernels")
    monkeypatch.setattr(per_user_kernels, refused_launcher, refused(calls))
    leaves, positions = make_inputs(case, DEVICES[0])
    with pytest.warns(RuntimeWarning, match=f"per-user kernels needs {NEEDED} B"):
        check_against_reference(case, DTYPE, DEVICES[0], compiled_run, leaves, positions)
    assert len(calls) == 1  # a later trace finds the refusal: backend="triton" then has nowhere to go


def test_a_refused_per_user_training_dice_backward_says_so(monkeypatch, on_kernel_device):
    """Training-mode Dice cannot recompute its backward: its batch statistics are this step's."""
    monkeypatch.setattr(per_user_kernels, "attention_pool_backward", refused([]))
    query, keys = torch.randn(3, 4, dtype=DTYPE, requires_grad=True), torch.randn(3, 5, 4, dtype=DTYPE)
    weights, biases = small_mlp()
    dice = [DiceParams(torch.rand(6, dtype=DTYPE), torch.zeros(6, dtype=DTYPE), torch.ones(6, dtype=DTYPE), training=True)]
    out = functional.attention_pool(query, keys, weights, biases, activation="dice", act_params=dice,
                                    lengths=torch.tensor([5, 1, 2]), backend="triton")
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="the attention backward: .* allows"):
        out.sum().backward()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_refused_training_dice_step_says_so(compiled, monkeypatch, on_kernel_device):
    """The statistics passes of the layers below may have updated their running statistics: no retry,
    in eager mode or in a compiled graph (the ops say so themselves)."""
    torch._dynamo.reset()
    monkeypatch.setattr(per_user_kernels, "attention_dice_batch_stats", refused([]))
    query, keys = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, 5, 4, dtype=DTYPE)
    weights, biases = small_mlp()
    dice = [DiceParams(torch.rand(6, dtype=DTYPE), torch.zeros(6, dtype=DTYPE), torch.ones(6, dtype=DTYPE), training=True)]
    pool = torch.compile(functional.attention_pool, backend="aot_eager", fullgraph=True) if compiled \
        else functional.attention_pool
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="training-mode Dice: .* allows"):
        pool(query, keys, weights, biases, activation="dice", act_params=dice, lengths=torch.tensor([5, 1, 2]),
             backend="triton")
    assert "allows" in attention_kernel_gap(keys, weights, "dice", dice)


def test_a_refusal_is_kept_by_compute_dtype():
    """The kernels see keys already in the autocast dtype, the dispatch sees them before: one case."""
    weights = [torch.zeros(6, 16), torch.zeros(1, 6)]
    with pytest.warns(RuntimeWarning):
        backend.record_refusal("per-user", torch.zeros(2, 3, 4, dtype=torch.bfloat16), weights,
                               OutOfResources(NEEDED, LIMIT, "shared memory"))
    assert backend.refusal("per-user", torch.zeros(2, 3, 4), weights) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f"allows {LIMIT} B" in backend.refusal("per-user", torch.zeros(2, 3, 4), weights)
