import pytest
import torch
from conftest import TEST_SEED

from fastdin.data import SyntheticConfig, SyntheticDIN
from fastdin.model import DIN

CONFIG = SyntheticConfig(num_categories=30, items_per_category=7, max_history=12, min_history=2,
                         interests_per_user=3, noise=0.1, seed=TEST_SEED + 5)
KEYS = ("item", "category", "hist_items", "hist_categories", "lengths", "label")


@pytest.fixture(scope="module")
def data():
    return SyntheticDIN(CONFIG)


@pytest.fixture(scope="module")
def batch(data):
    return data.batch("train", 3, 512, with_interests=True)


def test_shapes_dtypes_and_vocab(data, batch):
    assert data.vocab_sizes() == {"num_items": 1 + 30 * 7, "num_categories": 31}
    assert set(batch) == set(KEYS) | {"interests"}
    for name in ("item", "category", "lengths", "label"):
        assert batch[name].shape == (512,)
    assert batch["hist_items"].shape == batch["hist_categories"].shape == (512, 12)
    assert batch["label"].dtype == torch.float32
    for name in ("item", "category", "hist_items", "hist_categories", "lengths"):
        assert not batch[name].is_floating_point()
    assert 1 <= batch["item"].min() and batch["item"].max() < data.num_items
    assert 1 <= batch["category"].min() and batch["category"].max() < data.num_categories


def test_same_seed_same_data_and_splits_differ(data, batch):
    again = SyntheticDIN(CONFIG).batch("train", 3, 512, with_interests=True)
    for name in batch:
        assert torch.equal(batch[name], again[name]), name
    other_index = data.batch("train", 4, 512)
    test = data.batch("test", 3, 512)
    other_seed = SyntheticDIN(SyntheticConfig(**{**vars(CONFIG), "seed": CONFIG.seed + 1})).batch("train", 3, 512)
    for different in (other_index, test, other_seed):
        assert not torch.equal(batch["hist_items"], different["hist_items"])


def test_lengths_and_padding(batch):
    lengths, items, categories = batch["lengths"], batch["hist_items"], batch["hist_categories"]
    assert lengths.min() >= CONFIG.min_history and lengths.max() <= CONFIG.max_history
    assert lengths.unique().numel() > 5  # lengths really vary
    beyond = torch.arange(CONFIG.max_history) >= lengths[:, None]
    assert (items[beyond] == 0).all() and (categories[beyond] == 0).all()
    assert (items[~beyond] > 0).all() and (categories[~beyond] > 0).all()


def test_items_belong_to_their_categories(data, batch):
    assert torch.equal(data.category_of(batch["item"]), batch["category"])
    assert torch.equal(data.category_of(batch["hist_items"]), batch["hist_categories"])


def test_planted_structure(batch):
    interests, label = batch["interests"], batch["label"].bool()
    assert 0.4 < label.float().mean() < 0.6
    candidate_is_interest = (batch["category"][:, None] == interests).any(1)
    # positives come from the user's interests, negatives never do
    assert candidate_is_interest[label].all() and not candidate_is_interest[~label].any()
    # the history mostly reflects the interests: all but about the noise share
    valid = torch.arange(CONFIG.max_history) < batch["lengths"][:, None]
    in_interests = (batch["hist_categories"][:, :, None] == interests[:, None, :]).any(-1)
    share = in_interests[valid].float().mean().item()
    assert 1 - 2 * CONFIG.noise < share < 1.0


def test_candidate_alone_is_uninformative(data):
    """Positives and negatives share the popularity law, so the candidate's category barely tells the label."""
    big = data.batch("train", 0, 20000)
    counts = torch.zeros(2, data.num_categories)
    counts.index_put_((big["label"].long(), big["category"]), torch.ones(20000), accumulate=True)
    share = counts / counts.sum(1, keepdim=True)
    assert 0.5 * (share[0] - share[1]).abs().sum() < 0.2  # total variation distance


def test_stream(data):
    stream = data.stream("test", 1000, 384)
    batches = list(stream)
    assert len(stream) == len(batches) == 3
    assert [len(b["label"]) for b in batches] == [384, 384, 232]
    # re-iterable and the same each time; a short last batch is a prefix of the full batch
    assert all(torch.equal(a["item"], b["item"]) for a, b in zip(batches, stream))
    assert torch.equal(batches[2]["hist_items"], data.batch("test", 2, 384)["hist_items"][:232])


@pytest.mark.parametrize("kwargs, message", [
    ({"min_history": 5, "max_history": 4}, "min_history"),
    ({"interests_per_user": 30}, "interests_per_user"),
    ({"noise": 1.5}, "noise"),
    ({"num_categories": 0}, "num_categories"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**{**vars(CONFIG), **kwargs})


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="split"):
        data.batch("valid", 0, 4)
    with pytest.raises(ValueError, match="batch_size"):
        data.batch("train", 0, 0)
    with pytest.raises(ValueError, match="num_rows"):
        data.stream("train", 0, 4)


def test_user_features_feed_din():
    data = SyntheticDIN(SyntheticConfig(**{**vars(CONFIG), "user_features": True}))
    batch = data.batch("train", 0, 64, with_interests=True)
    assert batch["user_sparse"].shape == (64, 1) and batch["dense"].shape == (64, 1)
    assert (batch["user_sparse"] == batch["interests"]).any(1).all()
    assert torch.allclose(batch["dense"][:, 0], batch["lengths"] / CONFIG.max_history)
    assert "user_sparse" not in SyntheticDIN(CONFIG).batch("train", 0, 4)
    batch.pop("interests")
    logits = DIN(**data.vocab_sizes(), embed_dim=4, attention_hidden=(8,), mlp_hidden=(8,))(batch)
    assert logits.shape == (64,) and torch.isfinite(logits).all()
