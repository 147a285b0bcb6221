"""Training-mode Dice inside the fused attention kernel against the float64 reference.

Batch statistics over the valid positions (dice_stats="valid") or over all B*T ("all"): the output,
the scores, every gradient (through the batch statistics too) and the updated running statistics.
On the CPU the kernels run under TRITON_INTERPRET=1 (conftest.py) in fp32 and fp16, so the cases
are few and tiny; on CUDA bf16 is added. Every buffer the launchers allocate starts as NaN.
"""
from dataclasses import dataclass

import pytest
import sm90_build
import torch
from attention_helpers import (Case, assert_modules_match, cast_leaves, check_against_reference, dtype_params,
                               fake_bf16_inputs, float64_copy, keys_from_base, make_inputs, make_module_pair,
                               outputs_and_grads)
from conftest import DEVICES

# tests without a device parameter build their tensors on the kernels' device
pytestmark = pytest.mark.usefixtures("on_kernel_device")

from fastdin import functional
from fastdin.ops import attention as functional_attention
from fastdin.kernels import attention_pool as attention_kernels
from fastdin.layers import AttentionPooling
from fastdin.reference import DiceParams

MOMENTUM = 0.3  # large, so that a wrong running-statistics update shows


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output, statistic and partial starts as NaN: an unwritten element fails."""
    monkeypatch.setattr(attention_kernels, "POISON_OUTPUTS", True)


@dataclass
class TrainCase(Case):
    activation: str = "dice"
    dice_stats: str = "valid"

    def __str__(self):
        return f"{super().__str__()}-{self.dice_stats}-{'affine' if self.dice_affine else 'plain'}"


CASES = [
    TrainCase(5, (6, 4), seq_len=7),
    TrainCase(5, (6, 4), seq_len=7, dice_stats="all", normalization="softmax", dice_affine=True),
    TrainCase(7, (13,), seq_len=9, positions="mask", normalization="softmax", dice_affine=True, layout="strided"),
    TrainCase(7, (13,), seq_len=9, dice_stats="all", positions="mask", return_scores=False),
    TrainCase(6, (9, 5, 3), seq_len=6, batch=2, normalization="softmax", dice_affine=True),
    TrainCase(3, (5,), seq_len=1),
    TrainCase(4, (7, 3), seq_len=5, batch=2, dice_stats="all", positions=None, dice_affine=True),
]
LOW_PRECISION_CASES = [CASES[1], CASES[2]]


def positions_with_two_counted(case: Case, positions):
    """Training needs at least two counted positions: make the first row full (and the second
    non-empty); the last row keeps its length 0 (or empty mask)."""
    if "lengths" in positions:
        positions["lengths"][0] = case.seq_len
        positions["lengths"][1] = max(int(positions["lengths"][1]), 1)
    if "mask" in positions:
        positions["mask"][0] = True
    return positions


def run(case: Case, leaves, positions, backend, grad_out, grad_scores):
    """Training forward + backward; returns [out, (scores,) *grads of the trainable leaves,
    *running means, *running vars] (running buffers cloned, so both sides start alike)."""
    running = [[t.detach().clone() for t in leaves[name]] for name in ("running_mean", "running_var")]
    hidden = range(len(case.hidden))
    params = [DiceParams(leaves["alpha"][i], running[0][i], running[1][i],
                         leaves["dice_weight"][i] if case.dice_affine else None,
                         leaves["dice_bias"][i] if case.dice_affine else None,
                         training=True, momentum=MOMENTUM, eps=1e-5) for i in hidden]
    result = functional.attention_pool(
        leaves["query"], keys_from_base(case, leaves["keys_base"]), leaves["weights"], leaves["biases"],
        activation="dice", act_params=params, normalization=case.normalization, return_scores=case.return_scores,
        dice_stats=case.dice_stats, backend=backend, **positions,
    )
    trainable = [leaves["query"], leaves["keys_base"], *leaves["weights"], *leaves["biases"], *leaves["alpha"]]
    if case.dice_affine:
        trainable += [*leaves["dice_weight"], *leaves["dice_bias"]]
    return outputs_and_grads(result, case.return_scores, grad_out, grad_scores, trainable) + running[0] + running[1]


def check_case(case: Case, dtype, device):
    leaves, positions = make_inputs(case, device)
    positions = positions_with_two_counted(case, positions)
    check_against_reference(case, dtype, device, run, leaves, positions)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,dtype", dtype_params(CASES, LOW_PRECISION_CASES))
def test_matches_reference(case, dtype, device):
    check_case(case, dtype, device)


def test_several_tiles(monkeypatch):
    """16-row tiles over T = 37: statistics, sums and gradients accumulate across tiles and programs."""
    monkeypatch.setattr(attention_kernels, "_pick_block_t", lambda seq_len, widths, budget: 16)
    check_case(TrainCase(5, (6, 4), seq_len=37, dice_stats="all", positions="mask", normalization="softmax"),
               torch.float32, DEVICES[0])


@pytest.mark.parametrize("dice_stats", ["valid", "all"])
def test_histories_that_end_early(dice_stats, monkeypatch):
    """16-row tiles over T = 45, histories of 45, 33, 16 and 3 positions and an empty one: the loops stop
    at each user's last tile, except when the statistics count the padding too ("all")."""
    monkeypatch.setattr(attention_kernels, "_pick_block_t", lambda seq_len, widths, budget: 16)
    case = TrainCase(5, (6, 4), seq_len=45, batch=5, dice_stats=dice_stats, normalization="softmax")
    leaves, positions = make_inputs(case, DEVICES[0])
    positions["lengths"] = torch.tensor([45, 33, 16, 3, 0], device=DEVICES[0])
    check_against_reference(case, torch.float32, DEVICES[0], run, leaves, positions)


def test_deterministic_and_saves_no_activations():
    """Two identical training steps give the same bits (fixed-order reductions), and autograd keeps
    nothing of [B, T, H] size (the keys [B, T, D] with D < H, the weights and O(L H) statistics)."""
    case = TrainCase(4, (16, 8), seq_len=20, dice_stats="all", normalization="softmax", dice_affine=True)
    leaves, positions = make_inputs(case, DEVICES[0])
    positions = positions_with_two_counted(case, positions)
    grad_out, grad_scores = torch.randn(case.batch, case.dim), torch.randn(case.batch, case.seq_len)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        first = run(case, cast_leaves(leaves, torch.float32), positions, "triton", grad_out, grad_scores)
    second = run(case, cast_leaves(leaves, torch.float32), positions, "triton", grad_out, grad_scores)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert case.batch * case.seq_len * case.dim in saved
    assert max(saved) < case.batch * case.seq_len * min(case.hidden)


def test_module_two_training_steps_then_eval():
    """AttentionPooling with Dice: two SGD steps (batch statistics, running-statistics updates) and
    then eval (running statistics) give the reference backend's numbers."""
    fast, slow = make_module_pair("dice", "softmax", dice_affine=True)
    modules = [fast, slow, float64_copy(slow)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in modules]
    query, keys, lengths = torch.randn(3, 1, 6).double(), torch.randn(3, 10, 6).double(), torch.tensor([10, 4, 0])
    score_bias = 2 + len(list(fast.parameters())) - 1  # its gradient is 0 in exact math under softmax
    for step in range(2):
        results = []
        for module, optimizer in zip(modules, optimizers):
            dtype = next(module.parameters()).dtype
            optimizer.zero_grad()
            out, scores = module(query.to(dtype), keys.to(dtype), lengths=lengths)
            (out.square().sum() + scores.sum()).backward()
            optimizer.step()
            results.append([out, scores] + [p.grad for p in module.parameters()] + list(module.buffers()))
        assert_modules_match(f"dice training step {step}", *results, skip={score_bias})
        keys = keys + 0.5  # the second batch shifts the statistics
    results = []
    for module in modules:
        dtype = next(module.parameters()).dtype
        results.append(list(module.eval()(query.to(dtype), keys.to(dtype), lengths=lengths)))
    assert_modules_match("dice eval after training", *results)
    assert int(fast.mlp.activations[0].num_batches_tracked) == 2


@pytest.mark.parametrize("dice_stats,batch,seq_len,lengths", [
    ("valid", 3, 4, [1, 0, 0]),  # one valid position
    ("all", 1, 1, None),  # one position at all
])
def test_fewer_than_two_counted_positions_raise(dice_stats, batch, seq_len, lengths):
    module = AttentionPooling(6, (5,), activation="dice", dice_stats=dice_stats, backend="triton")
    lengths = torch.tensor(lengths) if lengths is not None else None
    with pytest.raises(ValueError, match="more than one"):
        module(torch.randn(batch, 6), torch.randn(batch, seq_len, 6), lengths=lengths)


def test_torch_compile_fullgraph_training():
    """The statistics op (which updates the running statistics in place) and the attention op trace
    into one graph, and the compiled layer still gives the reference's numbers."""
    kwargs = dict(embed_dim=6, hidden_units=(7, 5), activation="dice", normalization="softmax",
                  return_scores=True, dice_affine=True)
    fast = AttentionPooling(backend="triton", **kwargs)
    slow = AttentionPooling(backend="reference", **kwargs)
    slow.load_state_dict(fast.state_dict())
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    query, keys = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 9, 6, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 0])
    results = []
    for module, dtype in ((compiled, torch.float32), (slow, torch.float32), (float64_copy(slow), torch.float64)):
        q = query.to(dtype).requires_grad_()
        out, scores = module(q, keys.to(dtype), lengths=lengths)
        grad = torch.autograd.grad(out.sum() + scores.square().sum(), q)[0]
        results.append([out, scores, grad] + list(module.buffers()))
    assert_modules_match("compiled dice training", *results)


# ---------------------------------------------------------------------------------------------
# sm_90 builds (tests/sm90_build.py): every launch of a training step compiled with Triton's compiler
# and ptxas, no GPU needed. The interpreter cannot catch front-end errors of the compiled language in
# the statistics and sums modes, nor shared memory past an H200 block's 227 KB.

SM90_TRAINING_SHAPES = [(32, (80, 40), True), (64, (256, 128, 64), False)]


def sm90_case_id(dim, hidden, affine):
    return f"dice-train-D{dim}-H{'x'.join(map(str, hidden))}-{'affine' if affine else 'plain'}"


def _sm90_training_call(dim, hidden, affine, dtype=torch.bfloat16):
    """The launches of a training step (statistics, merge, forward, sums, backward) on fake inputs."""
    def call():
        query, keys, weights, biases, lengths = fake_bf16_inputs(dim, hidden, dtype=dtype)
        batch, seq_len = keys.shape[:2]
        stats = torch.zeros(len(hidden), 3, max(hidden))
        running, batch_stats = [], []
        for layer, h in enumerate(hidden):
            extra = [torch.ones(h), torch.zeros(h)] if affine else []
            running += [torch.rand(h), torch.zeros(h), torch.ones(h)] + extra
            batch_stats += [torch.rand(h), stats[layer, 0, :h], stats[layer, 1, :h]] + extra
        attention_kernels.attention_dice_batch_stats(query, keys, weights, biases, running, lengths, None, 1e-8,
                                                     affine, False, [0.1] * len(hidden))
        attention_kernels.attention_pool_forward(query, keys, weights, biases, batch_stats, lengths, None, "dice",
                                                 1e-8, affine, True, True)
        attention_kernels.attention_pool_backward(
            torch.randn(batch, dim).to(dtype), torch.randn(batch, seq_len).to(dtype), query, keys, weights, biases,
            batch_stats, lengths, None, torch.zeros(batch), torch.zeros(batch), "dice", 1e-8, affine, True,
            stats[0, 2, :1], False)
    return call


def sm90_cases():
    """{case id: call} for sm90_build.py."""
    return {sm90_case_id(*shape): _sm90_training_call(*shape) for shape in SM90_TRAINING_SHAPES}


@pytest.fixture(scope="module")
def sm90_builds():
    return sm90_build.builds_or_skip("test_attention_dice_train:sm90_cases")


@pytest.mark.parametrize("dim,hidden,affine", SM90_TRAINING_SHAPES)
def test_training_kernels_build_for_sm90(sm90_builds, dim, hidden, affine):
    builds = sm90_builds[sm90_case_id(dim, hidden, affine)]
    assert not {name: b["error"] for name, b in builds.items() if "error" in b}
    # per layer a statistics pass and a merge, the forward, per layer a sums pass, the backward and
    # the reduction of its weight-gradient partials
    assert len(builds) == 3 * len(hidden) + 3
    assert max(b["shared"] for b in builds.values()) <= sm90_build.H200_SHARED_BYTES, builds
    # the estimate behind attention_kernel_gap covers every variant the step launches
    estimate = attention_kernels.shared_memory_estimate(dim, tuple(hidden), torch.bfloat16, dice_training=True)
    assert max(b["shared"] for b in builds.values()) <= estimate * 1.15, builds


def test_gap_refuses_fp32_training_dice_past_the_shared_memory_limit(monkeypatch):
    """fp32 training-mode Dice whose sums passes need more than an H200 block (344 and 377 KB by ptxas,
    issue 9) is refused; the same layers in eval, and in bf16, are not."""
    monkeypatch.setattr(functional_attention, "_shared_memory_limit", lambda device: sm90_build.H200_SHARED_BYTES)
    for dim, hidden in ((64, (200, 80)), (32, (256, 128, 64))):
        sizes = [4 * dim, *hidden, 1]
        weights = [torch.zeros(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
        train = [DiceParams(torch.zeros(h), torch.zeros(h), torch.ones(h), training=True) for h in hidden]
        evals = [p._replace(training=False) for p in train]
        keys = torch.zeros(2, 3, dim)
        assert "shared memory" in functional.attention_kernel_gap(keys, weights, "dice", train)
        assert functional.attention_kernel_gap(keys, weights, "dice", evals) is None
        assert functional.attention_kernel_gap(keys.bfloat16(), weights, "dice", train) is None
