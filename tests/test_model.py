"""The DIN model: shapes, padding, gradients, batch_ids, train vs eval, and a short run that learns."""
import pytest
import torch
from conftest import TEST_SEED

from fastdin.model import DIN

NUM_ITEMS, NUM_CATEGORIES, USER_SIZES, NUM_DENSE = 30, 7, (5, 9), 3


def make_batch(batch=6, seq_len=5, user_features=True, dense=True):
    lengths = torch.randint(1, seq_len + 1, (batch,))
    lengths[0], lengths[1] = seq_len, 0
    valid = torch.arange(seq_len) < lengths.unsqueeze(1)
    out = {
        "item": torch.randint(1, NUM_ITEMS, (batch,)),
        "category": torch.randint(1, NUM_CATEGORIES, (batch,)),
        "hist_items": torch.randint(1, NUM_ITEMS, (batch, seq_len)) * valid,  # 0 = padding
        "hist_categories": torch.randint(1, NUM_CATEGORIES, (batch, seq_len)) * valid,
        "lengths": lengths,
    }
    if user_features:
        out["user_sparse"] = torch.stack([torch.randint(1, size, (batch,)) for size in USER_SIZES], dim=1)
    if dense:
        out["dense"] = torch.randn(batch, NUM_DENSE)
    return out


def make_model(pooling="attention", user_features=True, dense=True, **kwargs):
    kwargs.setdefault("embed_dim", 4)
    kwargs.setdefault("attention_hidden", (8, 4))
    kwargs.setdefault("mlp_hidden", (12, 6))
    return DIN(NUM_ITEMS, NUM_CATEGORIES, user_sparse_sizes=USER_SIZES if user_features else (),
               num_dense=NUM_DENSE if dense else 0, pooling=pooling, **kwargs)


@pytest.mark.parametrize("features", ["plain", "user-and-dense"])
@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_forward_backward_shapes_and_gradients(pooling, features):
    extra = features != "plain"
    model = make_model(pooling, user_features=extra, dense=extra)
    batch = make_batch(user_features=extra, dense=extra)
    logits = model(batch)
    assert logits.shape == (6,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(6).round()).backward()
    named = dict(model.named_parameters())
    assert set(model.embedding_tables()) == ({"item", "category", "user_0", "user_1"} if extra else {"item", "category"})
    for name, param in named.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if "embeddings" not in name and "alpha" not in name:  # alpha's gradient is 0 where inputs are >= 0
            assert param.grad.abs().sum() > 0, name
    for name, table in model.embedding_tables().items():
        assert torch.equal(table.weight.grad[0], torch.zeros_like(table.weight.grad[0])), f"padding row of {name}"
        used = model.batch_ids(batch)[name].unique()
        used = used[used != 0]
        assert (table.weight.grad[used].abs().sum(1) > 0).all(), name
        unused = torch.ones(table.num_embeddings, dtype=torch.bool)
        unused[model.batch_ids(batch)[name]] = False
        assert table.weight.grad[unused].abs().sum() == 0, name
    if pooling == "attention":
        assert all(named[f"attention.{n}"].grad.abs().sum() > 0 for n in ("score.weight", "mlp.linears.0.weight"))
    else:
        assert model.attention is None


@pytest.mark.parametrize("attention_activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_padding_contributes_nothing(pooling, attention_activation):
    """Ids past a row's length change nothing (also in training, where Dice takes batch statistics)."""
    model = make_model(pooling, attention_activation=attention_activation)
    model.train()
    batch = make_batch()
    before = model(batch)
    padded = dict(batch)
    valid = torch.arange(5) < batch["lengths"].unsqueeze(1)
    padded["hist_items"] = torch.where(valid, batch["hist_items"], torch.randint(1, NUM_ITEMS, (6, 5)))
    padded["hist_categories"] = torch.where(valid, batch["hist_categories"], torch.randint(1, NUM_CATEGORIES, (6, 5)))
    assert not torch.equal(padded["hist_items"], batch["hist_items"])
    torch.testing.assert_close(model(padded), before, rtol=0, atol=0)
    # while a change inside the history does change the output of that row
    changed = dict(batch)
    changed["hist_items"] = batch["hist_items"].clone()
    changed["hist_items"][0, 0] = batch["hist_items"][0, 0] % (NUM_ITEMS - 1) + 1
    assert not torch.allclose(model(changed)[0], before[0])


def test_batch_ids():
    model = make_model()
    batch = make_batch()
    ids = model.batch_ids(batch)
    assert set(ids) == {"item", "category", "user_0", "user_1"}
    assert torch.equal(ids["item"], torch.cat([batch["item"], batch["hist_items"].reshape(-1)]))
    assert torch.equal(ids["category"], torch.cat([batch["category"], batch["hist_categories"].reshape(-1)]))
    for field in range(len(USER_SIZES)):
        assert torch.equal(ids[f"user_{field}"], batch["user_sparse"][:, field])
    tables = model.embedding_tables()
    for name, looked_up in ids.items():
        assert int(looked_up.max()) < tables[name].num_embeddings


def test_train_and_eval():
    model = make_model(attention_activation="dice", mlp_activation="dice")
    dice_layers = [m for m in model.modules() if type(m).__name__ == "Dice"]
    assert len(dice_layers) == 4
    batch = make_batch()
    model.train()
    first = model(batch)
    for layer in dice_layers:
        assert layer.num_batches_tracked.item() == 1 and layer.running_mean.abs().sum() > 0
    # training: a row's output depends on the batch it is in (batch statistics)
    part = {k: v[:4] for k, v in batch.items()}
    assert not torch.allclose(model(part), first[:4])
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(batch)
        alone = torch.cat([model({k: v[i:i + 1] for k, v in batch.items()}) for i in range(6)])
    torch.testing.assert_close(alone, full)  # eval: per row, running statistics
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"eval changed {key}"


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_short_training_run_learns(pooling):
    """Toy task: click iff the candidate's category occurs in the history."""
    torch.manual_seed(TEST_SEED + 1)
    batch = make_batch(batch=64, seq_len=6, user_features=False, dense=False)
    valid = torch.arange(6) < batch["lengths"].unsqueeze(1)
    labels = ((batch["hist_categories"] == batch["category"].unsqueeze(1)) & valid).any(1).float()
    model = make_model(pooling, user_features=False, dense=False, embed_dim=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
