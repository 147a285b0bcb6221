"""Jagged input: keys [N, D] packed user after user with offsets [B + 1] (the values+offsets
convention of TorchRec and FBGEMM), through the reference, the torch path, AttentionPooling and DIN;
the checks of offsets."""
import pytest
import torch
import torch.nn.functional as F
from fastdin.testing import error_bound, relative_errors

from fastdin import DIN, AttentionPooling, functional, reference, set_value_checks
from fastdin.jagged import jagged_to_padded
from fastdin.reference import DiceParams

F64 = torch.float64


def jagged_inputs(counts, dim, hidden, activation, dice_training=False, seed=0):
    """Fresh float64 leaves for the users' row counts: query [B, D], values [N, D], offsets, weights."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    offsets = F.pad(counts.cumsum(0), (1, 0))
    batch, rows = counts.shape[0], int(counts.sum())
    leaves = {"query": torch.randn(batch, dim, generator=g, dtype=F64),
              "values": torch.randn(rows, dim, generator=g, dtype=F64)}
    fan_in, weights, biases = 4 * dim, [], []
    for width in list(hidden) + [1]:
        weights.append(torch.randn(width, fan_in, generator=g, dtype=F64) * (2.0 / fan_in) ** 0.5)
        biases.append(torch.randn(width, generator=g, dtype=F64) * 0.5)
        fan_in = width
    leaves["weights"], leaves["biases"] = weights, biases
    if activation == "prelu":
        leaves["slopes"] = [torch.rand(h, generator=g, dtype=F64) * 0.5 for h in hidden]
    if activation == "dice":
        leaves["alpha"] = [torch.rand(h, generator=g, dtype=F64) for h in hidden]
    running = [(torch.randn(h, generator=g, dtype=F64) * 0.3, torch.rand(h, generator=g, dtype=F64) + 0.5)
               for h in hidden] if activation == "dice" else []
    return leaves, offsets, running


def flat(leaves):
    return [t for v in leaves.values() for t in (v if isinstance(v, list) else [v])]


def run(leaves, offsets, running, activation, normalization, dice_training, backend, dtype, grad_seed=1,
        reverse_users=False):
    """[out, scores, *grads of every leaf, *running statistics] for the leaves cast to dtype.

    reverse_users: the same math with the users in reverse order (per-user and per-row results put
    back in order), i.e. summed in another order: a second same-dtype reference run."""
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(offsets.numel() - 1, leaves["query"].shape[1], generator=g, dtype=F64)
    grad_scores = torch.randn(int(offsets[-1]), generator=g, dtype=F64)
    users, rows = torch.arange(offsets.numel() - 1), torch.arange(int(offsets[-1]))
    if reverse_users:
        users = users.flip(0)
        rows = torch.cat([torch.arange(int(offsets[b]), int(offsets[b + 1])) for b in users.tolist()])
        offsets = F.pad(offsets.diff()[users].cumsum(0), (1, 0))
        leaves = {**leaves, "query": leaves["query"][users], "values": leaves["values"][rows]}
        grad_out, grad_scores = grad_out[users], grad_scores[rows]
    x = {k: ([t.to(dtype).requires_grad_() for t in v] if isinstance(v, list) else v.to(dtype).requires_grad_())
         for k, v in leaves.items()}
    stats = [(m.clone().to(dtype), v.clone().to(dtype)) for m, v in running]
    act_params = None
    if activation == "prelu":
        act_params = x["slopes"]
    if activation == "dice":
        act_params = [DiceParams(a, m, v, training=dice_training, momentum=0.3, eps=1e-5)
                      for a, (m, v) in zip(x["alpha"], stats)]
    out, scores = functional.attention_pool(
        x["query"], x["values"], x["weights"], x["biases"], activation=activation, act_params=act_params,
        offsets=offsets, normalization=normalization, return_scores=True, backend=backend,
    )
    loss = (out * grad_out.to(dtype)).sum() + (scores * grad_scores.to(dtype)).sum()
    grads = list(torch.autograd.grad(loss, flat(x)))
    out, scores = out[users.argsort()], scores[rows.argsort()]
    grads[0], grads[1] = grads[0][users.argsort()], grads[1][rows.argsort()]  # query, values
    return [out, scores, *grads, *[t for pair in stats for t in pair]]


CASES = [
    # (counts per user, D, hidden, activation, normalization, Dice training)
    ([3, 0, 5, 1], 7, (5,), "sigmoid", None, False),
    ([4, 2, 0, 6, 1], 13, (37, 5), "relu", "softmax", False),
    ([1, 1, 1], 8, (16, 8, 5), "prelu", "softmax", False),  # every history of length 1
    ([5, 3, 0, 7], 7, (13, 5), "dice", None, False),
    ([5, 3, 0, 7], 7, (13, 5), "dice", "softmax", True),
    ([9, 2], 5, (6, 7, 8, 9), "dice", None, True),
    ([31, 12, 40, 0], 32, (80, 40), "sigmoid", "softmax", False),
]


@pytest.mark.parametrize("counts,dim,hidden,activation,normalization,dice_training", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_path_matches_reference(counts, dim, hidden, activation, normalization, dice_training, dtype):
    """The torch path on jagged input against the float64 reference (which pads and reuses the
    padded form): within twice the same-dtype reference's error plus a floor; finite; scores [N]."""
    leaves, offsets, running = jagged_inputs(counts, dim, hidden, activation)
    want = run(leaves, offsets, running, activation, normalization, dice_training, "reference", F64)
    got = run(leaves, offsets, running, activation, normalization, dice_training, "torch", dtype)
    # the same-dtype reference in two orders of summation (fastdin.testing): the larger error counts
    same = [run(leaves, offsets, running, activation, normalization, dice_training, "reference", dtype,
                reverse_users=reverse) for reverse in (False, True)]
    assert got[1].shape == (sum(counts),)
    same_errors = [max(pair) for pair in zip(relative_errors(same[0], want), relative_errors(same[1], want))]
    errors, bounds = relative_errors(got, want), [error_bound(dtype, e) for e in same_errors]
    score_bias = 2 + 2 + 2 * len(hidden) + 1
    if normalization == "softmax":  # a shift does not change the softmax: an exact zero, up to rounding
        assert got[score_bias].abs().max() < (1e-5 if dtype == torch.float32 else 1e-2)
        errors[score_bias] = 0.0
    for i, (g, err, bound) in enumerate(zip(got, errors, bounds)):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert err <= bound, f"result {i}: relative error {err:.2e} > {bound:.2e}"


def test_reference_jagged_is_the_padded_form():
    """reference.attention_pool(offsets=...) is the padded computation, bit for bit, with the scores
    of the valid positions packed in order."""
    counts = [3, 0, 5, 1]
    leaves, offsets, _ = jagged_inputs(counts, 6, (7,), "sigmoid")
    keys, lengths = jagged_to_padded(leaves["values"], offsets)
    assert keys.shape == (4, 5, 6) and lengths.tolist() == counts
    out, scores = reference.attention_pool(leaves["query"], leaves["values"], leaves["weights"], leaves["biases"],
                                           offsets=offsets, normalization="softmax", return_scores=True)
    want_out, want_scores = reference.attention_pool(leaves["query"], keys, leaves["weights"], leaves["biases"],
                                                     lengths=lengths, normalization="softmax", return_scores=True)
    valid = torch.arange(5) < lengths.unsqueeze(1)
    assert torch.equal(out, want_out) and torch.equal(scores, want_scores[valid])
    assert torch.equal(keys[valid], leaves["values"]) and torch.equal(keys[~valid], torch.zeros(4 * 5 - 9, 6, dtype=F64))


def test_dice_all_is_valid_for_jagged_input():
    """Jagged input has no padding: Dice statistics over "all" positions are those over the valid ones."""
    leaves, offsets, running = jagged_inputs([4, 0, 3], 5, (6,), "dice")
    results = []
    for dice_stats in ("valid", "all"):
        stats = [(m.clone(), v.clone()) for m, v in running]
        params = [DiceParams(a, m, v, training=True) for a, (m, v) in zip(leaves["alpha"], stats)]
        for backend in ("torch", "reference"):
            out = functional.attention_pool(leaves["query"], leaves["values"], leaves["weights"], leaves["biases"],
                                            activation="dice", act_params=params, offsets=offsets,
                                            dice_stats=dice_stats, backend=backend)
            results.append(out)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_module_jagged_equals_padded(backend):
    """AttentionPooling(query, keys [N, D], offsets=...) gives the padded call's output, its scores
    packed [N], and the same gradients; the query's rank [B, 1, D] is kept."""
    pool = AttentionPooling(6, (7, 3), "prelu", normalization="softmax", return_scores=True, backend=backend).double()
    counts = torch.tensor([4, 0, 2, 5])
    offsets = F.pad(counts.cumsum(0), (1, 0))
    query = torch.randn(4, 1, 6, dtype=F64, requires_grad=True)
    keys = torch.randn(4, 5, 6, dtype=F64)
    valid = torch.arange(5) < counts.unsqueeze(1)
    values = keys[valid].clone().requires_grad_()
    out, scores = pool(query, values, offsets=offsets)
    assert out.shape == (4, 1, 6) and scores.shape == (11,)
    grads = torch.autograd.grad(out.square().sum() + scores.sum(), [query, values, *pool.parameters()])
    padded = torch.zeros_like(keys).masked_scatter(valid.unsqueeze(-1), values.detach()).requires_grad_()
    want_out, want_scores = pool(query, padded, lengths=counts)
    want = torch.autograd.grad(want_out.square().sum() + want_scores.sum(), [query, padded, *pool.parameters()])
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(scores, want_scores[valid], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[1], want[1][valid], rtol=1e-12, atol=1e-14)
    for g, w in zip(grads[:1] + grads[2:-1], want[:1] + want[2:-1]):  # the score bias: zero under softmax
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_empty_batch_rows():
    """Users without rows give zeros; N = 0 works too."""
    pool = AttentionPooling(4, (5,), normalization="softmax", backend="torch")
    out = pool(torch.randn(3, 4), torch.randn(0, 4), offsets=torch.zeros(4, dtype=torch.long))
    assert torch.equal(out, torch.zeros(3, 4))
    out = pool(torch.randn(3, 4), torch.randn(2, 4), offsets=torch.tensor([0, 0, 2, 2]))
    assert torch.equal(out[0], torch.zeros(4)) and torch.equal(out[2], torch.zeros(4)) and out[1].abs().sum() > 0


@pytest.mark.parametrize("offsets,error,words", [
    (torch.tensor([0, 4, 4, 9]), ValueError, "end at N"),
    (torch.tensor([1, 4, 4, 10]), ValueError, "start at 0"),
    (torch.tensor([0, 5, 4, 10]), ValueError, "non-decreasing"),
    (torch.tensor([0, 4, 4, 10], dtype=torch.int32), TypeError, "int64"),
    (torch.tensor([0.0, 4.0, 4.0, 10.0]), TypeError, "int64"),
    (torch.tensor([[0, 4, 4, 10]]), ValueError, "1-D"),
    (torch.tensor([0, 4, 10]), ValueError, "query must be"),  # B + 1 = 3 entries for 3 users
    ([0, 4, 4, 10], TypeError, "offsets must be a torch.Tensor"),
])
def test_bad_offsets(offsets, error, words):
    pool = AttentionPooling(8, (5,), backend="torch")
    with pytest.raises(error, match=words):
        pool(torch.randn(3, 8), torch.randn(10, 8), offsets=offsets)


def test_bad_jagged_calls():
    pool = AttentionPooling(8, (5,), backend="torch")
    offsets = torch.tensor([0, 4, 4, 10])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        pool(torch.randn(3, 8), torch.randn(1, 10, 8), offsets=offsets)
    with pytest.raises(ValueError, match="offsets alone"):
        pool(torch.randn(3, 8), torch.randn(10, 8), lengths=torch.tensor([4, 0, 6]), offsets=offsets)
    with pytest.raises(ValueError, match="query must be"):
        pool(torch.randn(3, 7), torch.randn(10, 8), offsets=offsets)


def test_value_checks_off_skip_the_offsets_values():
    """With value checks off, offsets' values are not read (no sync); shape and dtype checks stay."""
    pool = AttentionPooling(8, (5,), backend="torch")
    previous = set_value_checks(False)
    try:
        out = pool(torch.randn(3, 8), torch.randn(10, 8), offsets=torch.tensor([0, 4, 4, 10]))
        assert out.shape == (3, 8)
        with pytest.raises(TypeError, match="int64"):
            pool(torch.randn(3, 8), torch.randn(10, 8), offsets=torch.tensor([0, 4, 4, 10], dtype=torch.int32))
    finally:
        set_value_checks(previous)


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_din_jagged_batch_equals_padded(pooling):
    """DIN on a jagged batch (flat hist_items / hist_categories and hist_offsets) gives the padded
    batch's logits and gradients, in training (Dice in the top MLP) and in eval."""
    torch.manual_seed(0)
    B, T = 6, 9
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0] = T
    valid = torch.arange(T) < lengths.unsqueeze(1)
    hist_items, hist_categories = torch.randint(1, 50, (B, T)) * valid, torch.randint(1, 10, (B, T)) * valid
    padded = {"item": torch.randint(1, 50, (B,)), "category": torch.randint(1, 10, (B,)),
              "hist_items": hist_items, "hist_categories": hist_categories, "lengths": lengths}
    jagged = {"item": padded["item"], "category": padded["category"], "hist_items": hist_items[valid],
              "hist_categories": hist_categories[valid], "hist_offsets": F.pad(lengths.cumsum(0), (1, 0))}
    model = DIN(50, 10, embed_dim=4, pooling=pooling, attention_activation="dice", backend="torch").double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for training in (True, False):
        results = []
        for batch in (padded, jagged):
            model.load_state_dict(state)
            model.train(training)
            logits = model(batch)
            grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()), allow_unused=True)
            results.append([logits] + [g for g in grads if g is not None])
        assert len(results[0]) == len(results[1])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_din_jagged_batch_errors():
    model = DIN(50, 10, embed_dim=4, pooling="sum")
    batch = {"item": torch.tensor([1, 2]), "category": torch.tensor([1, 2]), "hist_items": torch.tensor([3, 4, 5]),
             "hist_categories": torch.tensor([1, 1, 2]), "hist_offsets": torch.tensor([0, 1, 2, 3])}
    with pytest.raises(ValueError, match="hist_offsets must have B \\+ 1 = 3"):
        model(batch)
    del batch["hist_offsets"]
    with pytest.raises(ValueError, match="hist_offsets"):
        model(batch)


def test_torch_compile_jagged():
    """The jagged path has static shapes (N = keys.shape[0]): compiled whole, training and eval."""
    kwargs = dict(embed_dim=6, hidden_units=(7, 5), activation="dice", normalization="softmax", return_scores=True)
    fast, slow = AttentionPooling(backend="torch", **kwargs), AttentionPooling(backend="reference", **kwargs)
    slow.load_state_dict(fast.state_dict())
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    query, values, offsets = torch.randn(4, 6), torch.randn(13, 6), torch.tensor([0, 6, 6, 9, 13])
    for training in (True, False):
        results = []
        for module in (compiled, slow):
            module.train(training)
            q = query.clone().requires_grad_()
            out, scores = module(q, values, offsets=offsets)
            grads = torch.autograd.grad(out.square().sum() + scores.sum(), [q] + list(module.parameters()))
            results.append([out, scores, *grads[:-1]])
        for i, err in enumerate(relative_errors(results[0], results[1])):
            assert err < 2e-5, f"training={training}, result {i}: {err:.2e}"
