"""The packed-rows PyTorch path (backend "torch", fastdin/packed.py) against the float64 reference on
padded input: forward, scores, every gradient and Dice's running statistics, for every activation,
softmax or none, lengths / mask / neither, strided and expanded keys, NaN in the padding, and the
dense form that torch.compile runs."""
import shutil
from dataclasses import dataclass

import pytest
import torch
from attention_helpers import Case, KeysOn, cast_leaves, check_against_reference, keys_from_base, make_inputs

from fastdin import AttentionPooling, functional, packed, reference
from fastdin.ops import attention as attention_op
from fastdin.testing import relative_errors
from fastdin.reference import DiceParams

F64 = torch.float64


@dataclass
class PackedCase(Case):
    dice_training: bool = False
    dice_stats: str = "valid"
    zero_padding: bool = False  # padded keys exactly zero (as embeddings of the padding id are)

    def __str__(self):
        extra = f"-train-{self.dice_stats}" if self.dice_training else ""
        return super().__str__() + extra + ("-zeropad" if self.zero_padding else "")


CASES = [
    PackedCase(7, (5,), "sigmoid", seq_len=1),  # T = 1
    PackedCase(13, (37, 5), "relu", seq_len=23, normalization="softmax", layout="strided"),
    PackedCase(7, (13, 5), "prelu", seq_len=20, positions="mask", normalization="softmax", return_scores=False),
    PackedCase(8, (16, 8, 5), "prelu", layout="expanded", shared_slope=False, batch=5),  # one user x 5 candidates
    PackedCase(11, (7, 3), "prelu", layout="transposed", normalization="softmax"),
    PackedCase(7, (13, 5), "dice", seq_len=20, positions="mask", normalization="softmax"),  # Dice eval
    PackedCase(13, (5,), "dice", seq_len=11, dice_affine=True, layout="transposed"),
    PackedCase(7, (13, 5), "dice", seq_len=10, batch=5, dice_training=True),
    PackedCase(5, (11, 7), "dice", seq_len=9, batch=4, dice_training=True, normalization="softmax", positions="mask"),
    PackedCase(7, (13, 5), "dice", seq_len=10, batch=5, dice_training=True, dice_stats="all", dice_affine=True),
    PackedCase(7, (13, 5), "dice", seq_len=10, batch=5, dice_training=True, dice_stats="all", zero_padding=True),
    # (with batch=4 one seed in 20 put the bias gradients, which nearly cancel under batch statistics,
    # at 1.1x the bound; 5 rows condition the statistics better)
    PackedCase(6, (5, 3), "dice", seq_len=8, batch=5, dice_training=True, dice_stats="all", zero_padding=True,
               normalization="softmax", layout="expanded"),
    PackedCase(32, (80, 40), "sigmoid", seq_len=31, normalization="softmax"),
    PackedCase(16, (20, 12, 6), "sigmoid", positions=None, batch=2),
    PackedCase(5, (6, 7, 8, 9), "relu", seq_len=17, positions="mask"),
    PackedCase(3, (2,), "sigmoid", seq_len=6, zero_padding=True),
]
LOW_PRECISION_CASES = [CASES[1], CASES[3], CASES[7], CASES[12]]


def act_params(case: PackedCase, leaves):
    if case.activation == "prelu":
        return leaves["slopes"]
    if case.activation == "dice":
        return [
            DiceParams(leaves["alpha"][i], leaves["running_mean"][i], leaves["running_var"][i],
                       leaves.get("dice_weight", [None] * len(case.hidden))[i],
                       leaves.get("dice_bias", [None] * len(case.hidden))[i], training=case.dice_training, eps=1e-5)
            for i in range(len(case.hidden))
        ]
    return None


def trainable(leaves):
    flat = []
    for name, value in leaves.items():
        if name not in ("running_mean", "running_var"):
            flat += value if isinstance(value, list) else [value]
    return flat


def padded_keys(case: PackedCase, leaves, positions):
    keys = keys_from_base(case, leaves["keys_base"])
    if case.zero_padding:
        valid = reference.valid_positions(positions.get("lengths"), positions.get("mask"), case.batch, case.seq_len,
                                          keys.device)
        keys = torch.where(valid.unsqueeze(-1), keys, 0)
    return keys


def run(case: PackedCase, leaves, positions, backend, grad_out, grad_scores):
    """[out, (scores,) *gradients of every trainable leaf, *running statistics after the call]."""
    params = act_params(case, leaves)
    result = functional.attention_pool(
        leaves["query"], padded_keys(case, leaves, positions), leaves["weights"], leaves["biases"],
        activation=case.activation, act_params=params, normalization=case.normalization,
        return_scores=case.return_scores, dice_stats=case.dice_stats, backend=backend, **positions,
    )
    out, scores = result if case.return_scores else (result, None)
    loss = (out * grad_out.to(out.dtype)).sum()
    if scores is not None:
        loss = loss + (scores * grad_scores.to(scores.dtype)).sum()
    grads = torch.autograd.grad(loss, trainable(leaves))
    stats = [t for p in params for t in (p.running_mean, p.running_var)] if case.dice_training else []
    return [out] + ([scores] if scores is not None else []) + list(grads) + stats


def inputs(case: PackedCase, device="cpu"):
    leaves, positions = make_inputs(case, device)
    if "lengths" in positions:
        positions["lengths"][0] = case.seq_len  # a full row beside the empty last one
    return leaves, positions


@pytest.mark.parametrize("case,dtype", [pytest.param(c, torch.float32, id=f"{c}-float32") for c in CASES]
                         + [pytest.param(c, torch.float16, id=f"{c}-float16") for c in LOW_PRECISION_CASES])
def test_matches_reference(case, dtype):
    leaves, positions = inputs(case)
    check_against_reference(case, dtype, "cpu", run, leaves, positions, backend="torch")


@pytest.mark.parametrize("case", [c for c in CASES if not c.dice_training], ids=str)
def test_nan_in_padding_never_counts(case):
    """NaN and inf in padded keys: the same results as with zeros there (selected out, not multiplied by 0)."""
    leaves, positions = inputs(case)
    if case.positions is None:
        pytest.skip("no padding")
    x = cast_leaves(leaves, F64)
    keys = keys_from_base(case, x["keys_base"])
    valid = reference.valid_positions(positions.get("lengths"), positions.get("mask"), case.batch, case.seq_len, "cpu")
    poison = torch.full_like(keys, float("nan"))
    poison[..., 0] = float("inf")
    results = []
    for padding in (0.0, poison):
        x_keys = torch.where(valid.unsqueeze(-1), keys, padding).detach().requires_grad_()
        result = functional.attention_pool(
            x["query"], x_keys, x["weights"], x["biases"], activation=case.activation,
            act_params=act_params(case, x), normalization=case.normalization, return_scores=True, backend="torch",
            **positions,
        )
        weights = [t for name, t in x.items() if name != "keys_base" for t in (t if isinstance(t, list) else [t])
                   if name not in ("running_mean", "running_var")]
        grads = torch.autograd.grad(result[0].square().sum() + result[1].sum(), [x_keys] + weights)
        grads = [torch.where(valid.unsqueeze(-1), grads[0], 0)] + list(grads[1:])  # padded keys' grads: any
        results.append(list(result) + grads)
    for got, want in zip(results[1], results[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.layout == "contiguous"], ids=str)
def test_dense_form_matches_packed(case):
    """The form torch.compile runs (all B*T positions as rows, no data-dependent shapes) gives the
    packed rows' numbers, gradients and running statistics, NaN padding included (but for Dice
    statistics over all positions, which the padding enters as it is)."""
    leaves, positions = inputs(case)
    grad_out = torch.randn(case.batch, case.dim, dtype=F64)
    grad_scores = torch.randn(case.batch, case.seq_len, dtype=F64)
    results = []
    for dense in (False, True):
        x = cast_leaves(leaves, F64)
        params = act_params(case, x)
        kwargs = dict(activation=case.activation, act_params=params, normalization=case.normalization,
                      return_scores=True, dice_stats=case.dice_stats, **positions)
        keys = padded_keys(case, x, positions)
        if dense:
            out, scores = packed._attention_pool_dense(x["query"], keys, x["weights"], x["biases"],
                                                       kwargs.pop("activation"), kwargs.pop("act_params"),
                                                       positions.get("lengths"), positions.get("mask"),
                                                       case.normalization, True, case.dice_stats)
        else:
            out, scores = packed.attention_pool(x["query"], keys, x["weights"], x["biases"], **kwargs)
        grads = torch.autograd.grad((out * grad_out).sum() + (scores * grad_scores).sum(), trainable(x))
        stats = [t for p in params for t in (p.running_mean, p.running_var)] if case.dice_training else []
        results.append([out, scores, *grads, *stats])
    errors = relative_errors(results[1], results[0])
    if case.normalization == "softmax":  # the score bias: an exact zero gradient, up to rounding
        bias = 2 + 2 + (len(case.hidden) + 1) + len(case.hidden)
        assert results[1][bias].abs().max() < 1e-12
        errors[bias] = 0.0
    assert max(errors) < 1e-12, errors


def test_lengths_zero_and_full_rows():
    """A row of length 0 gives exactly zero output and scores (also under softmax); length T uses every position."""
    B, T, D = 3, 5, 4
    query, keys = torch.randn(B, D, dtype=F64), torch.randn(B, T, D, dtype=F64)
    lengths = torch.tensor([T, 0, 2])
    for normalization in (None, "softmax"):
        pool = AttentionPooling(D, (6,), normalization=normalization, return_scores=True, backend="torch").double()
        want_pool = AttentionPooling(D, (6,), normalization=normalization, return_scores=True,
                                     backend="reference").double()
        want_pool.load_state_dict(pool.state_dict())
        out, scores = pool(query, keys, lengths)
        want_out, want_scores = want_pool(query, keys, lengths)
        assert torch.equal(out[1], torch.zeros(D, dtype=F64)) and torch.equal(scores[1], torch.zeros(T, dtype=F64))
        assert torch.equal(scores[2, 2:], torch.zeros(T - 2, dtype=F64))
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-14)
    empty = pool(query, keys, torch.zeros(B, dtype=torch.long))  # N = 0 rows
    assert torch.equal(empty[0], torch.zeros(B, D, dtype=F64))


def test_training_is_deterministic():
    """Two identical training steps give the same bits (the segmented sums run in a fixed order)."""
    pool = AttentionPooling(9, (13, 5), "dice", normalization="softmax", backend="torch")
    query, keys = torch.randn(6, 9), torch.randn(6, 17, 9)
    lengths = torch.randint(0, 18, (6,))
    state = {k: v.clone() for k, v in pool.state_dict().items()}
    results = []
    for _ in range(2):
        pool.load_state_dict(state)
        q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
        out = pool(q, k, lengths)
        grads = torch.autograd.grad(out.square().sum(), [q, k] + list(pool.parameters()))
        results.append([out, *grads, pool.mlp.activations[0].running_var.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_segment_sum_without_atomics_matches():
    """The CUDA form of the segmented sum (segment_reduce over the offsets, empty users included)
    gives the CPU form's sums."""
    counts = torch.tensor([3, 0, 1, 5, 0])
    offsets = packed.offsets_from_counts(counts)
    user = packed.rows_from_offsets(offsets, int(counts.sum()))
    values = torch.randn(int(counts.sum()), 4, dtype=F64)
    want = packed.segment_sum(values, user, offsets, 5)
    torch.testing.assert_close(packed.segment_sum_sorted(values, offsets), want, rtol=1e-15, atol=0)
    torch.testing.assert_close(packed.segment_sum_sorted(values[:, 0], offsets), want[:, 0], rtol=1e-15, atol=0)


def test_no_concat_of_the_mlp_input_is_kept():
    """Training memory: autograd keeps no [B, T, 4D] (or [N, 4D]) concat; what it keeps is a
    fraction of what the reference keeps."""
    B, T, D = 8, 50, 16
    pool = AttentionPooling(D, (12, 6), backend="torch")
    query, keys = torch.randn(B, D, requires_grad=True), torch.randn(B, T, D, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))

    def saved_numel(backend):
        pool.backend = backend
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pool(query, keys, lengths)
        # a concat has a row per position (the first weight, [12, 4D], has fewer rows than T)
        concat = any(t.dim() >= 2 and t.shape[-1] == 4 * D and t.numel() // (4 * D) >= T for t in saved)
        # count each storage once (views of one tensor are saved several times)
        return sum({t.untyped_storage().data_ptr(): t.numel() for t in saved if t.numel() > B * D}.values()), concat

    (packed_numel, packed_concat), (reference_numel, reference_concat) = saved_numel("torch"), saved_numel("reference")
    assert reference_concat and not packed_concat
    assert packed_numel < 0.5 * reference_numel


def test_auto_runs_the_torch_path_on_the_cpu():
    assert attention_op.IMPLEMENTATIONS["torch"] is not attention_op.IMPLEMENTATIONS["reference"]
    assert functional.choose_backend("auto", torch.device("cpu"), None, "attention_pool",
                                     has_torch_path="torch" in attention_op.IMPLEMENTATIONS) == "torch"


def test_auto_takes_the_torch_path_for_float32_on_cuda_without_tf32():
    """Full-precision fp32 products are FMAs in Triton, whose sm_90 builds spill KBs per thread: on
    CUDA with TF32 off (PyTorch's default) "auto" runs the torch path; with TF32 allowed, in fp16/bf16,
    and on the CPU it leaves the choice to the kernel gap."""
    matmul = torch.backends.cuda.matmul  # a module object whose attributes monkeypatch cannot restore
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert "TF32 off" in functional.attention_slow_kernel(KeysOn("cuda", torch.float32))
        for dtype in (torch.float16, torch.bfloat16):
            assert functional.attention_slow_kernel(KeysOn("cuda", dtype)) is None
        assert functional.attention_slow_kernel(torch.zeros(2, 3, 4)) is None
        matmul.allow_tf32 = True
        assert functional.attention_slow_kernel(KeysOn("cuda", torch.float32)) is None
    finally:
        matmul.allow_tf32 = before


def test_attention_pool_hands_the_slow_kernel_reason_to_the_choice(monkeypatch):
    """The op asks attention_slow_kernel about its keys and passes the answer to choose_backend."""
    seen = []

    def choose(*args, slow_kernel=None, **kwargs):
        seen.append(slow_kernel)
        return "torch"

    monkeypatch.setattr(attention_op, "choose_backend", choose)
    query, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
    weights, biases = [torch.randn(5, 16), torch.randn(1, 5)], [torch.randn(5), torch.randn(1)]
    monkeypatch.setattr(attention_op, "attention_slow_kernel", lambda k: "too slow" if k is keys else "other keys")
    functional.attention_pool(query, keys, weights, biases)
    monkeypatch.setattr(attention_op, "attention_slow_kernel", lambda k: None)
    functional.attention_pool(query, keys, weights, biases)
    assert seen == ["too slow", None]


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor on the CPU needs a C++ compiler")
def test_torch_compile_inductor_train_and_eval():
    """Inductor (CPU) compiles the layer whole (fullgraph: the dense form, no data-dependent shapes),
    Dice training with softmax, then eval; the numbers, gradients and running statistics are the reference's."""
    torch.manual_seed(1)
    kwargs = dict(embed_dim=6, hidden_units=(7, 5), activation="dice", normalization="softmax", return_scores=True)
    fast, slow = AttentionPooling(backend="torch", **kwargs), AttentionPooling(backend="reference", **kwargs)
    slow.load_state_dict(fast.state_dict())
    compiled = torch.compile(fast, backend="inductor", fullgraph=True)
    query, keys = torch.randn(4, 6), torch.randn(4, 9, 6)
    lengths = torch.tensor([9, 3, 0, 5])
    for training in (True, False):
        results = []
        for module in (compiled, slow):
            module.train(training)
            q = query.clone().requires_grad_()
            out, scores = module(q, keys, lengths)
            grads = torch.autograd.grad(out.square().sum() + scores.sum(), [q] + list(module.parameters()))
            results.append([out, scores, *grads[:-1]])  # the score bias: zero gradient under softmax
        for i, err in enumerate(relative_errors(results[0], results[1])):
            assert err < 2e-5, f"training={training}, result {i}: {err:.2e}"
    for a, b in zip(fast.mlp.activations, slow.mlp.activations):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "expanded", "transposed", "jagged"])
@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice"])
def test_inference_in_chunks_matches_reference(monkeypatch, layout, activation):
    """Without autograd the rows are scored and pooled chunk by chunk (chunks of 7 rows here: users
    cut across chunks), NaN padding included; the numbers are the reference's."""
    monkeypatch.setattr(packed, "INFERENCE_CHUNK", 7)
    case = PackedCase(6, (5, 3), activation, seq_len=8, batch=5,
                      layout="contiguous" if layout == "jagged" else layout)
    leaves, positions = inputs(case)
    x = cast_leaves(leaves, F64)
    keys = keys_from_base(case, x["keys_base"])
    valid = reference.valid_positions(positions["lengths"], None, case.batch, case.seq_len, "cpu")
    kwargs = dict(activation=activation, act_params=act_params(case, x))
    with torch.no_grad():
        want = reference.attention_pool(x["query"], torch.where(valid.unsqueeze(-1), keys, 0), x["weights"],
                                        x["biases"], lengths=positions["lengths"], **kwargs)
        if layout == "jagged":
            offsets = packed.offsets_from_counts(positions["lengths"])
            got = functional.attention_pool(x["query"], keys[valid], x["weights"], x["biases"], offsets=offsets,
                                            backend="torch", **kwargs)
        else:
            poisoned = torch.where(valid.unsqueeze(-1), keys, float("nan"))
            got = functional.attention_pool(x["query"], poisoned, x["weights"], x["biases"],
                                            lengths=positions["lengths"], backend="torch", **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_inference_in_chunks_only_on_the_cpu():
    """The chunks are a CPU cache measure: on CUDA they would multiply the launches and sum with
    index_add_'s atomics (run-to-run order), so there every call takes the whole, fixed-order rows."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with torch.no_grad():
        assert packed.pools_in_chunks(cpu, False, None, False)
        assert not packed.pools_in_chunks(cuda, False, None, False)
        assert not packed.pools_in_chunks(cpu, True, None, False)
        assert not packed.pools_in_chunks(cpu, False, "softmax", False)
        assert not packed.pools_in_chunks(cpu, False, None, True)
    assert not packed.pools_in_chunks(cpu, False, None, False)  # autograd on


def test_jit_trace_records_plain_ops():
    """torch.jit.trace (the TorchScript export) takes the reference's plain ops, whose trace replays
    on other lengths."""
    pool = AttentionPooling(6, (7, 5), "prelu", normalization="softmax", backend="torch").eval()
    query, keys = torch.randn(4, 6), torch.randn(4, 9, 6)
    with torch.no_grad():
        traced = torch.jit.trace(pool, (query, keys, torch.tensor([9, 3, 0, 5])), check_trace=False)
        lengths = torch.tensor([2, 9, 4, 0])
        torch.testing.assert_close(traced(query, keys, lengths), pool(query, keys, lengths), rtol=1e-6, atol=1e-7)
