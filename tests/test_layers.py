"""The modules: Dice against nn.BatchNorm1d and DeepCTR-Torch's Dice, AttentionPooling against the
reference and DeepCTR-Torch's own local activation unit (when installed), and MLP."""
import pytest
import torch
from torch import nn

from fastdin import functional, reference
from fastdin.layers import MLP, AttentionPooling, Dice

F64 = torch.float64


def dice_formula(x, x_hat, alpha):
    p = torch.sigmoid(x_hat)
    return p * x + (1 - p) * alpha * x


# ---------------------------------------------------------------------------------------------
# Dice


@pytest.mark.parametrize("affine", [False, True])
def test_dice_follows_batchnorm_over_steps(affine):
    features = 6
    dice = Dice(features, affine=affine).double()
    bn = nn.BatchNorm1d(features, eps=1e-8, momentum=0.1, affine=affine).double()
    with torch.no_grad():
        dice.alpha.copy_(torch.randn(features))
        if affine:
            dice.weight.copy_(1 + 0.5 * torch.randn(features))
            dice.bias.copy_(0.5 * torch.randn(features))
            bn.weight.copy_(dice.weight)
            bn.bias.copy_(dice.bias)
    for step in range(4):
        x = torch.randn(9 + step, features, dtype=F64) * (1 + step) + step
        torch.testing.assert_close(dice(x), dice_formula(x, bn(x), dice.alpha))
        torch.testing.assert_close(dice.running_mean, bn.running_mean)
        torch.testing.assert_close(dice.running_var, bn.running_var)
        assert dice.num_batches_tracked.item() == bn.num_batches_tracked.item() == step + 1
    dice.eval(), bn.eval()
    x = torch.randn(5, features, dtype=F64)
    torch.testing.assert_close(dice(x), dice_formula(x, bn(x), dice.alpha))
    # eval leaves the statistics alone, and a single row is fine
    mean_before = dice.running_mean.clone()
    torch.testing.assert_close(dice(x[:1]), dice_formula(x[:1], bn(x[:1]), dice.alpha))
    assert torch.equal(dice.running_mean, mean_before) and dice.num_batches_tracked.item() == 4


def test_dice_3d_with_mask_takes_statistics_over_valid_rows():
    features = 4
    dice = Dice(features).double()
    bn = nn.BatchNorm1d(features, eps=1e-8, affine=False).double()
    with torch.no_grad():
        dice.alpha.copy_(torch.randn(features))
    for _ in range(3):
        x = torch.randn(3, 5, features, dtype=F64)
        mask = torch.rand(3, 5) < 0.6
        mask[0, :2] = True
        out = dice(x, mask)
        bn(x[mask])  # the running statistics of the valid rows alone
        var, mean = torch.var_mean(x[mask], dim=0, unbiased=False)
        expected = dice_formula(x, (x - mean) / torch.sqrt(var + 1e-8), dice.alpha)
        assert out.shape == x.shape
        torch.testing.assert_close(out, expected)  # masked rows get an output, from the valid rows' statistics
        torch.testing.assert_close(dice.running_mean, bn.running_mean)
        torch.testing.assert_close(dice.running_var, bn.running_var)
    # without a mask, [B, T, H] is [B*T, H]
    flat = Dice(features).double()
    flat.load_state_dict(dice.state_dict())
    x = torch.randn(3, 5, features, dtype=F64)
    torch.testing.assert_close(dice(x), flat(x.reshape(15, features)).reshape(3, 5, features))


class DeepCTRDice(nn.Module):
    """DeepCTR-Torch's Dice as that library writes it (a BatchNorm1d named bn, alpha [H] or [H, 1])."""

    def __init__(self, features, dim=2, epsilon=1e-8):
        super().__init__()
        self.bn = nn.BatchNorm1d(features, eps=epsilon)
        self.dim = dim
        self.alpha = nn.Parameter(torch.zeros((features,) if dim == 2 else (features, 1)))

    def forward(self, x):
        if self.dim == 3:  # [B, T, H] -> [B, H, T]: statistics over all B*T positions
            x = x.transpose(1, 2)
        p = torch.sigmoid(self.bn(x))
        out = self.alpha * (1 - p) * x + p * x
        return out.transpose(1, 2) if self.dim == 3 else out


@pytest.mark.parametrize("dim", [2, 3])
def test_dice_loads_deepctr_state_dict(dim):
    features = 5
    theirs = DeepCTRDice(features, dim).double()
    with torch.no_grad():
        theirs.alpha.normal_()
        theirs.bn.weight.normal_(1, 0.3)
        theirs.bn.bias.normal_(0, 0.3)
        theirs.bn.running_mean.normal_()
        theirs.bn.running_var.uniform_(0.5, 1.5)
        theirs.bn.num_batches_tracked.fill_(7)
    state = theirs.state_dict()
    assert set(state) == {"alpha", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    ours = Dice(features, affine=True).double()
    ours.load_state_dict(state)  # strict
    assert ours.num_batches_tracked.item() == 7 and ours.alpha.shape == (features,)
    x = torch.randn(4, 6, features, dtype=F64) if dim == 3 else torch.randn(7, features, dtype=F64)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.train(), ours.train()
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.bn.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.bn.running_var)


# ---------------------------------------------------------------------------------------------
# AttentionPooling


def _inputs(batch=4, seq_len=6, dim=5):
    query = torch.randn(batch, dim, dtype=F64)
    keys = torch.randn(batch, seq_len, dim, dtype=F64)
    lengths = torch.tensor([seq_len, 0, 3, 1])[:batch]
    return query, keys, lengths


def _module(activation="sigmoid", **kwargs):
    module = AttentionPooling(5, (7, 3), activation, **kwargs).double()
    with torch.no_grad():  # move Dice/PReLU away from their neutral initial values
        for name, p in module.named_parameters():
            if "activations" in name:
                p.add_(0.3 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_attention_query_rank_lengths_and_mask_agree(normalization):
    module = _module(normalization=normalization, return_scores=True)
    query, keys, lengths = _inputs()
    mask = torch.arange(keys.shape[1]) < lengths.unsqueeze(1)
    out, scores = module(query, keys, lengths=lengths)
    assert out.shape == query.shape and scores.shape == mask.shape
    out3, scores3 = module(query.unsqueeze(1), keys, lengths=lengths.unsqueeze(1))
    assert out3.shape == (4, 1, 5)
    out_mask, scores_mask = module(query, keys, mask=mask)
    for other_out, other_scores in ((out3.squeeze(1), scores3), (out_mask, scores_mask)):
        torch.testing.assert_close(other_out, out, rtol=0, atol=0)
        torch.testing.assert_close(other_scores, scores, rtol=0, atol=0)
    # the scores are the weights that were used
    torch.testing.assert_close(out, torch.einsum("bt,btd->bd", scores, keys))
    assert torch.equal(out[1], torch.zeros(5, dtype=F64)) and torch.equal(scores[1], torch.zeros(6, dtype=F64))
    module.return_scores = False
    torch.testing.assert_close(module(query, keys, lengths=lengths), out, rtol=0, atol=0)


@pytest.mark.parametrize("normalization", [None, "softmax"])
@pytest.mark.parametrize("activation,training,affine,dice_stats", [
    ("sigmoid", True, False, "valid"), ("relu", True, False, "valid"), ("prelu", True, False, "valid"),
    ("dice", True, False, "valid"), ("dice", True, True, "valid"), ("dice", True, False, "all"),
    ("dice", True, True, "all"), ("dice", False, False, "valid"), ("dice", False, True, "all"),
])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_attention_matches_reference(activation, training, affine, normalization, dice_stats, backend):
    """backend "reference" is the reference bit for bit; "torch" (what auto runs on the CPU) is the
    same math in another order: float64 rounding apart."""
    module = _module(activation, normalization=normalization, dice_stats=dice_stats, dice_affine=affine,
                     backend=backend)
    tol = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=1e-12, atol=1e-14)
    module.train(training)
    query, keys, lengths = _inputs()
    linears = list(module.mlp.linears) + [module.score]
    act_params = None
    if activation == "prelu":
        act_params = [a.weight for a in module.mlp.activations]
    if activation == "dice":
        act_params = [a.params()._replace(running_mean=a.running_mean.clone(), running_var=a.running_var.clone())
                      for a in module.mlp.activations]
    expected = reference.attention_pool(
        query, keys, [m.weight for m in linears], [m.bias for m in linears], activation=activation,
        act_params=act_params, lengths=lengths, normalization=normalization, dice_stats=dice_stats,
    )
    torch.testing.assert_close(module(query, keys, lengths), expected, **tol)
    if activation == "dice":
        for layer, params in zip(module.mlp.activations, act_params):
            torch.testing.assert_close(layer.running_mean, params.running_mean, **tol)
            torch.testing.assert_close(layer.running_var, params.running_var, **tol)
            assert layer.num_batches_tracked.item() == int(training)
            assert training != torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_attention_matches_deepctr_local_activation_unit(activation, normalization, training):
    pytest.importorskip("deepctr_torch", reason="deepctr-torch is not installed (tests/requirements-peers.txt)")
    from deepctr_torch.layers import AttentionSequencePoolingLayer

    from fastdin.integrations.deepctr_torch import DeepCTRAttentionPooling

    dim, hidden = 5, (8, 4)
    theirs = AttentionSequencePoolingLayer(hidden, activation, normalization == "softmax", embedding_dim=dim).double()
    with torch.no_grad():
        for name, t in theirs.state_dict().items():
            if name.endswith("alpha") or name.endswith("bn.bias") or name.endswith("running_mean"):
                t.normal_(0, 0.5)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    ours = AttentionPooling(dim, hidden, activation, normalization, dice_stats="all", dice_affine=True).double()
    ours.load_state_dict(DeepCTRAttentionPooling(theirs).pool.state_dict())  # strict: every tensor of ours is set
    theirs.train(training), ours.train(training)
    query, keys, _ = _inputs(dim=dim)
    lengths = torch.tensor([[6], [2], [3], [1]])  # DeepCTR-Torch gives empty rows uniform softmax weights
    torch.testing.assert_close(ours(query.unsqueeze(1), keys, lengths), theirs(query.unsqueeze(1), keys, lengths))
    if activation == "dice":
        for a, b in zip(ours.mlp.activations, theirs.local_att.dnn.activation_layers):
            torch.testing.assert_close(a.running_mean, b.bn.running_mean)
            torch.testing.assert_close(a.running_var, b.bn.running_var)


# ---------------------------------------------------------------------------------------------
# MLP


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice"])
def test_mlp_is_linear_then_activation(activation):
    mlp = MLP(6, (5, 3), activation).double()
    assert mlp.out_features == 3 and len(mlp.linears) == 2
    x = torch.randn(4, 7, 6, dtype=F64)
    mask = torch.rand(4, 7) < 0.5
    mask[0, :2] = True
    expected = x
    for linear in mlp.linears:
        expected = linear(expected)
        var, mean = torch.var_mean(expected[mask], dim=0, unbiased=False)
        expected = {
            "sigmoid": torch.sigmoid,
            "relu": torch.relu,
            "prelu": lambda h: torch.where(h >= 0, h, 0.25 * h),  # nn.PReLU's initial slope
            "dice": lambda h: dice_formula(h, (h - mean) / torch.sqrt(var + 1e-8), 0.0),  # alpha starts at 0
        }[activation](expected)
    torch.testing.assert_close(mlp(x, mask), expected)


def test_mlp_dropout_only_in_training():
    mlp = MLP(6, (16,), "relu", dropout=0.5).double()
    x = torch.randn(32, 6, dtype=F64)
    mlp.eval()
    plain = torch.relu(mlp.linears[0](x))
    torch.testing.assert_close(mlp(x), plain, rtol=0, atol=0)
    mlp.train()
    dropped = mlp(x)
    assert (dropped == 0).sum() > (plain == 0).sum()
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * plain[kept])


def test_backend_for_names_what_a_forward_runs(monkeypatch):
    """AttentionPooling.backend_for answers as attention_pool chooses: the layer's backend or the one
    given, the kernel gap, and the fp32 rule (attention_slow_kernel), which it hands to the choice."""
    layer = AttentionPooling(8, (6,), "prelu")
    keys = torch.zeros(2, 3, 8)
    assert layer.backend_for(keys) == "torch"  # auto on the CPU
    assert layer.backend_for(keys, "reference") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if functional.HAS_TRITON:
        assert layer.backend_for(keys, "triton") == "triton"
    seen = []
    monkeypatch.setattr(functional, "attention_slow_kernel", lambda k: "fp32 reason" if k is keys else None)
    monkeypatch.setattr(functional, "choose_backend", lambda *a, slow_kernel=None, **kw: seen.append(slow_kernel) or "x")
    assert layer.backend_for(keys) == "x" and seen == ["fp32 reason"]
