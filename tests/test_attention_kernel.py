"""The fused attention kernel against the float64 reference: forward, scores and every gradient.

On the CPU the kernels run under TRITON_INTERPRET=1 (see conftest.py), where every program instance
costs about a millisecond: batches are tiny and the cases are picked, not crossed.
"""
import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import pytest
import torch

from fastdin import functional, reference
from fastdin.kernels import attention_pool as attention_kernels
from fastdin.layers import AttentionPooling
from fastdin.reference import DiceParams

from conftest import DEVICES

CUDA = torch.cuda.is_available()
# Relative error vs the float64 reference: at most twice the error of the reference run in the same
# dtype, plus a small floor per dtype (design.md's numerics policy, flash-attention's rule).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FP32_TOL = 2e-5


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output and partial starts as NaN, so an element the kernel skips fails the test."""
    monkeypatch.setattr(attention_kernels, "POISON_OUTPUTS", True)


@dataclass
class Case:
    dim: int
    hidden: Sequence[int]
    activation: str = "sigmoid"
    seq_len: int = 9
    batch: int = 3
    positions: Optional[str] = "lengths"  # "lengths" | "mask" | None
    normalization: Optional[str] = None
    return_scores: bool = True
    layout: str = "contiguous"  # "contiguous" | "strided" | "expanded" | "transposed"
    shared_slope: bool = True  # PReLU: one slope per layer, else one per feature
    dice_affine: bool = False

    def __str__(self):
        return (f"D{self.dim}-H{'x'.join(map(str, self.hidden))}-{self.activation}-T{self.seq_len}-"
                f"{self.positions}-{self.normalization}-{self.layout}")


CASES = [
    Case(7, (5,), "sigmoid", seq_len=1),
    Case(13, (37, 5), "relu", seq_len=70, normalization="softmax", layout="strided"),  # two tiles of 64
    Case(7, (13, 5), "prelu", seq_len=20, positions="mask", normalization="softmax", return_scores=False),
    Case(8, (16, 8, 5), "prelu", positions="lengths", layout="expanded", shared_slope=False),
    Case(7, (13, 5), "dice", seq_len=20, positions="mask", normalization="softmax"),
    Case(13, (5,), "dice", seq_len=33, dice_affine=True, layout="transposed"),
    Case(32, (80, 40), "sigmoid", seq_len=70, normalization="softmax"),
    Case(16, (20, 12, 6), "sigmoid", positions=None, batch=2),
    Case(5, (6, 7, 8, 9), "relu", seq_len=17, positions="mask"),
]
LOW_PRECISION_CASES = [CASES[1], CASES[3], CASES[4], CASES[6]]


def make_inputs(case: Case, device):
    """Fresh random float64 leaves: query, the keys' base tensor, weights, biases and act params."""
    B, T, D = case.batch, case.seq_len, case.dim
    base_shape = {"contiguous": (B, T, D), "strided": (B, 2 * T, D + 3), "expanded": (1, T, D),
                  "transposed": (B, D, T)}[case.layout]
    leaves = {"query": torch.randn(B, D), "keys_base": torch.randn(base_shape)}
    fan_in = 4 * D
    weights, biases = [], []
    for width in list(case.hidden) + [1]:
        weights.append(torch.randn(width, fan_in) * (2.0 / fan_in) ** 0.5)
        biases.append(torch.randn(width) * 0.5)
        fan_in = width
    leaves["weights"], leaves["biases"] = weights, biases
    if case.activation == "prelu":
        leaves["slopes"] = [torch.rand(1 if case.shared_slope else h) * 0.5 for h in case.hidden]
    if case.activation == "dice":
        leaves["alpha"] = [torch.rand(h) for h in case.hidden]
        leaves["running_mean"] = [torch.randn(h) * 0.3 for h in case.hidden]
        leaves["running_var"] = [torch.rand(h) + 0.5 for h in case.hidden]
        if case.dice_affine:
            leaves["dice_weight"] = [1 + 0.3 * torch.randn(h) for h in case.hidden]
            leaves["dice_bias"] = [0.3 * torch.randn(h) for h in case.hidden]
    positions = {}
    if case.positions == "lengths":
        lengths = torch.randint(0, T + 1, (B,))
        lengths[-1] = 0  # a row with no valid position
        positions["lengths"] = lengths
    elif case.positions == "mask":
        mask = torch.rand(B, T) < 0.6
        mask[-1] = False
        positions["mask"] = mask
    leaves = {k: ([t.double().to(device) for t in v] if isinstance(v, list) else v.double().to(device))
              for k, v in leaves.items()}
    positions = {k: v.to(device) for k, v in positions.items()}
    return leaves, positions


def cast_leaves(leaves, dtype):
    """Copies of the leaves in dtype that require grad (Dice running statistics stay fixed)."""
    out = {}
    for name, value in leaves.items():
        trainable = name not in ("running_mean", "running_var")
        if isinstance(value, list):
            out[name] = [t.detach().to(dtype).requires_grad_(trainable) for t in value]
        else:
            out[name] = value.detach().to(dtype).requires_grad_(trainable)
    return out


def keys_from_base(case: Case, base):
    B, T, D = case.batch, case.seq_len, case.dim
    if case.layout == "strided":
        return base[:, ::2, 1:D + 1]
    if case.layout == "expanded":
        return base.expand(B, T, D)
    if case.layout == "transposed":
        return base.transpose(1, 2)
    return base


def act_params(case: Case, leaves):
    if case.activation == "prelu":
        return leaves["slopes"]
    if case.activation == "dice":
        return [
            DiceParams(leaves["alpha"][i], leaves["running_mean"][i], leaves["running_var"][i],
                       leaves.get("dice_weight", [None] * len(case.hidden))[i],
                       leaves.get("dice_bias", [None] * len(case.hidden))[i], training=False, eps=1e-5)
            for i in range(len(case.hidden))
        ]
    return None


def flat_trainable(leaves):
    flat = []
    for name, value in leaves.items():
        if name in ("running_mean", "running_var"):
            continue
        flat += value if isinstance(value, list) else [value]
    return flat


def run(case: Case, leaves, positions, backend, grad_out, grad_scores):
    """Forward through functional.attention_pool and the gradients of every trainable leaf."""
    keys = keys_from_base(case, leaves["keys_base"])
    result = functional.attention_pool(
        leaves["query"], keys, leaves["weights"], leaves["biases"], activation=case.activation,
        act_params=act_params(case, leaves), normalization=case.normalization,
        return_scores=case.return_scores, backend=backend, **positions,
    )
    out, scores = result if case.return_scores else (result, None)
    loss = (out * grad_out.to(out.dtype)).sum()
    if scores is not None:
        loss = loss + (scores * grad_scores.to(scores.dtype)).sum()
    grads = torch.autograd.grad(loss, flat_trainable(leaves))
    return [out] + ([scores] if scores is not None else []) + list(grads)


def relative_errors(got, want):
    return [((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-12)).item() for g, w in zip(got, want)]


def score_bias_index(case: Case):
    """Under softmax the score layer's bias gets an exact zero gradient (a shift does not change the
    softmax): the index of that gradient in `run`'s result, checked by absolute value instead."""
    if case.normalization != "softmax":
        return None
    return (2 if case.return_scores else 1) + 2 + (len(case.hidden) + 1) + len(case.hidden)


def check_case(case: Case, dtype, device):
    leaves, positions = make_inputs(case, device)
    out_shape = (case.batch, case.dim)
    grad_out = torch.randn(out_shape, dtype=torch.float64, device=device)
    grad_scores = torch.randn(case.batch, case.seq_len, dtype=torch.float64, device=device)
    # the float64 reference from exactly the inputs the kernel sees (rounded to dtype)
    want = run(case, cast_leaves(cast_leaves(leaves, dtype), torch.float64), positions, "reference",
               grad_out, grad_scores)
    got = run(case, cast_leaves(leaves, dtype), positions, "triton", grad_out, grad_scores)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert torch.isfinite(g).all(), "a NaN (unwritten poisoned element?) or inf in the kernel's result"
    errors = relative_errors(got, want)
    skip = score_bias_index(case)
    if skip is not None:
        assert got[skip].abs().max().item() < (1e-5 if dtype == torch.float32 else 1e-2)
        errors[skip] = 0.0
    same_dtype = run(case, cast_leaves(leaves, dtype), positions, "reference", grad_out, grad_scores)
    bounds = [2 * e + ATOL[dtype] for e in relative_errors(same_dtype, want)]
    for i, (err, bound) in enumerate(zip(errors, bounds)):
        assert err <= bound, f"result {i}: relative error {err:.2e} > {bound:.2e} ({case}, {dtype})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_matches_reference(case, device):
    check_case(case, torch.float32, device)


LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if CUDA else [])  # bf16 is wrong in the interpreter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_low_precision_matches_reference(case, dtype, device):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 runs on CUDA only")
    check_case(case, dtype, device)


def test_several_tiles_and_programs_forced():
    """Force 16-row tiles and one program for all users: the online softmax and the grid-stride loop."""
    case = Case(7, (13, 5), "sigmoid", seq_len=37, batch=3, normalization="softmax")
    leaves, positions = make_inputs(case, "cpu")
    x = cast_leaves(leaves, torch.float32)
    keys = keys_from_base(case, x["keys_base"]).detach()
    weights = [w.detach() for w in x["weights"]]
    biases = [b.detach() for b in x["biases"]]
    out, scores, lse = attention_kernels.attention_pool_forward(
        x["query"].detach(), keys, weights, biases, [], positions["lengths"], None, "sigmoid", 0.0, False,
        True, True, block_t=16, num_programs=1,
    )
    want_out, want_scores = reference.attention_pool(
        x["query"].double(), keys.double(), [w.double() for w in weights], [b.double() for b in biases],
        lengths=positions["lengths"], normalization="softmax", return_scores=True,
    )
    assert max(relative_errors([out, scores], [want_out, want_scores])) <= FP32_TOL
    assert out[-1].abs().max() == 0 and scores[-1].abs().max() == 0  # length 0: zeros, not NaN


def make_module_pair(activation, normalization, dice_affine=False):
    kwargs = dict(embed_dim=6, hidden_units=(11, 5), activation=activation, normalization=normalization,
                  return_scores=True, dice_affine=dice_affine)
    fast = AttentionPooling(backend="triton", **kwargs)
    slow = AttentionPooling(backend="reference", **kwargs)
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0, 0.5)
        for m in fast.modules():
            if hasattr(m, "running_var"):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.mark.parametrize("activation,normalization,affine", [
    ("prelu", None, False), ("dice", "softmax", True), ("sigmoid", "softmax", False),
])
def test_module_triton_equals_reference(activation, normalization, affine):
    fast, slow = make_module_pair(activation, normalization, affine)
    fast.eval(), slow.eval()  # Dice in eval mode: running statistics
    query, keys = torch.randn(3, 1, 6), torch.randn(3, 10, 6)
    lengths = torch.tensor([10, 4, 0])
    results = []
    for module in (fast, slow):
        out, scores = module(query, keys, lengths=lengths)
        assert out.shape == (3, 1, 6)
        (out.square().sum() + scores.sum()).backward()
        results.append([out, scores] + [p.grad for p in module.parameters()])
    for i, err in enumerate(relative_errors(results[0], results[1])):
        if normalization is None or i != len(results[0]) - 1:  # score bias grad is 0 under softmax
            assert err < 1e-4, f"result {i}: {err:.2e}"


def test_torch_compile_fullgraph():
    fast, slow = make_module_pair("prelu", "softmax")
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    query, keys = torch.randn(2, 6, requires_grad=True), torch.randn(2, 9, 6)
    mask = torch.rand(2, 9) < 0.7
    out, scores = compiled(query, keys, mask=mask)
    want_out, want_scores = slow(query, keys, mask=mask)
    grad = torch.autograd.grad(out.sum() + scores.square().sum(), query)[0]
    want_grad = torch.autograd.grad(want_out.sum() + want_scores.square().sum(), query)[0]
    assert max(relative_errors([out, scores, grad], [want_out, want_scores, want_grad])) < 1e-4


def test_kernel_gap_names_each_uncovered_case():
    keys = torch.zeros(2, 3, 8)
    weights = [torch.zeros(80, 32), torch.zeros(40, 80), torch.zeros(1, 40)]
    gap = functional.attention_kernel_gap
    assert gap(keys, weights, "sigmoid", None) is None
    assert gap(keys, weights, "prelu", [torch.zeros(1), torch.zeros(40)]) is None
    eval_dice = [DiceParams(torch.zeros(h), torch.zeros(h), torch.ones(h), training=False) for h in (80, 40)]
    assert gap(keys, weights, "dice", eval_dice) is None
    train_dice = [p._replace(training=True) for p in eval_dice]
    assert gap(keys, weights, "dice", train_dice) is None
    assert "mix training and eval" in gap(keys, weights, "dice", [train_dice[0], eval_dice[1]])
    assert "D = 300" in gap(torch.zeros(2, 3, 300), weights, "sigmoid", None)
    assert "600 > 512" in gap(keys, [torch.zeros(600, 32), torch.zeros(1, 600)], "sigmoid", None)
    assert "5 hidden layers" in gap(keys, [torch.zeros(4, 32)] + [torch.zeros(4, 4)] * 4 + [torch.zeros(1, 4)],
                                    "sigmoid", None)
    assert "float64" in gap(keys.double(), weights, "sigmoid", None)


def test_empty_batch():
    case = Case(5, (4,), seq_len=3, batch=0, positions=None)
    leaves, _ = make_inputs(case, "cpu")
    x = cast_leaves(leaves, torch.float32)
    out, scores = functional.attention_pool(x["query"], x["keys_base"], x["weights"], x["biases"],
                                            return_scores=True, backend="triton")
    assert out.shape == (0, 5) and scores.shape == (0, 3)
    grads = torch.autograd.grad(out.sum() + scores.sum(), x["weights"])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_shared_memory_estimate_matches_ptxas_builds():
    """The estimate behind attention_kernel_gap's shared-memory reason, against sm_90 ptxas builds
    of the backward (bytes): it must admit what fits an H200 (227 KB) and refuse what does not."""
    h200 = 232448
    estimate = attention_kernels.shared_memory_estimate
    measured = [((32, (80, 40), torch.bfloat16), 51200), ((64, (256, 128, 64), torch.bfloat16), 200704),
                ((64, (512,), torch.bfloat16), 163840), ((128, (256, 128), torch.bfloat16), 266240)]
    for args, bytes_ in measured:
        assert (estimate(*args) <= h200) == (bytes_ <= h200), args
        assert abs(estimate(*args) - bytes_) < 0.15 * bytes_, args
    assert estimate(256, (512, 512, 512, 512), torch.float16) > h200


# ---------------------------------------------------------------------------------------------
# Opt-in (FASTDIN_SM90_BUILD=1, a few minutes): build both kernels for sm_90 with Triton's compiler
# and ptxas, no GPU needed, for the design notes' shapes. This catches what the interpreter cannot:
# front-end errors of the compiled language and programs that need more shared memory than an
# H100/H200 block may use (227 KB).

SM90_SHAPES = [(32, (80, 40), "sigmoid"), (64, (256, 128, 64), "prelu")]


def sm90_build(dim, hidden, activation):
    """Capture the launchers' kernel arguments on fake bf16 inputs, then compile for sm_90;
    returns {kernel name: shared memory bytes}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kinds = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64"}
    launches = {}

    class Capture:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.setdefault(self.fn.__name__, (self.fn, args, kwargs))

    batch, seq_len = 4, 100
    keys, query = torch.randn(batch, seq_len, dim).bfloat16(), torch.randn(batch, dim).bfloat16()
    sizes = [4 * dim] + list(hidden) + [1]
    weights = [torch.randn(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.randn(o) for o in sizes[1:]]
    slopes = [torch.rand(1) for _ in hidden] if activation == "prelu" else []
    lengths = torch.full((batch,), seq_len)
    fwd, bwd = attention_kernels._attention_pool_fwd_kernel, attention_kernels._attention_pool_bwd_kernel
    try:
        attention_kernels._attention_pool_fwd_kernel, attention_kernels._attention_pool_bwd_kernel = (
            Capture(fwd), Capture(bwd))
        attention_kernels.attention_pool_forward(query, keys, weights, biases, slopes, lengths, None, activation,
                                                 0.0, False, True, True)
        attention_kernels.attention_pool_backward(
            torch.randn(batch, dim).bfloat16(), torch.randn(batch, seq_len).bfloat16(), query, keys, weights, biases,
            slopes, lengths, None, torch.zeros(batch), torch.zeros(batch), activation, 0.0, False, True)
    except Exception:
        pass  # summing the never-written partials may fail; the launches are captured
    finally:
        attention_kernels._attention_pool_fwd_kernel, attention_kernels._attention_pool_bwd_kernel = fwd, bwd
    shared = {}
    for name, (fn, args, kwargs) in launches.items():
        kwargs = dict(kwargs)
        options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages")}
        signature, constants = {}, dict(kwargs)
        for arg, value in zip(fn.arg_names, args):
            if value is None:
                signature[arg], constants[arg] = "constexpr", None
            elif isinstance(value, torch.Tensor):
                signature[arg] = "*" + kinds[value.dtype]
            else:
                signature[arg] = "fp32" if isinstance(value, float) else "i32"
        signature.update({k: "constexpr" for k in kwargs})
        compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        shared[name] = compiled.metadata.shared
    return shared


@pytest.mark.skipif(os.environ.get("FASTDIN_SM90_BUILD") != "1", reason="opt-in: FASTDIN_SM90_BUILD=1")
@pytest.mark.parametrize("dim,hidden,activation", SM90_SHAPES)
def test_kernels_build_for_sm90(dim, hidden, activation):
    script = ("import sys; sys.path.insert(0, 'tests'); import test_attention_kernel as t; "
              f"print(t.sm90_build({dim}, {hidden}, {activation!r}))")
    env = dict(os.environ, TRITON_INTERPRET="0")  # conftest keeps a set value; the compiler needs it off
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    shared = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert set(shared) == {"_attention_pool_fwd_kernel", "_attention_pool_bwd_kernel"}
    assert max(shared.values()) <= 232448, shared
    assert max(shared.values()) <= attention_kernels.shared_memory_estimate(dim, hidden, torch.bfloat16) * 1.15
