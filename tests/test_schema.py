"""FeatureSchema and DIN built from one: fields, dims, positions, serialisation, old checkpoints."""
import json
from pathlib import Path

import pytest
import torch

from fastdin.model import DIN
from fastdin.schema import DenseField, FeatureSchema, MultiHotField, SequenceField, SparseField, load_schema

HERE = Path(__file__).parent


def three_field_schema(padding="right"):
    return FeatureSchema(
        candidates=[SparseField("item", 20, embed_dim=6), SparseField("category", 7), SparseField("shop", 9, embed_dim=2)],
        sequences=[SequenceField("hist_item", "item"), SequenceField("hist_cate", "category"),
                   SequenceField("hist_shop", "shop")],
        sparse=[SparseField("gender", 3, embed_dim=2), SparseField("hour", 25)],
        multi_hot=[MultiHotField("tags", 11, pooling="mean"), MultiHotField("genres", 6, embed_dim=3)],
        dense=[DenseField("price"), DenseField("stats", 3)],
        embed_dim=4, padding=padding,
    )


def three_field_batch(b=5, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4, 1, 0, 3, 2])[:b]
    valid = torch.arange(t) < lengths[:, None]
    ids = lambda n, shape: torch.randint(1, n, shape, generator=g)  # noqa: E731
    tags = ids(11, (b, 3))
    tags[0, 1:] = 0
    return {
        "item": ids(20, (b,)), "category": ids(7, (b,)), "shop": ids(9, (b,)),
        "hist_item": ids(20, (b, t)) * valid, "hist_cate": ids(7, (b, t)) * valid, "hist_shop": ids(9, (b, t)) * valid,
        "gender": ids(3, (b,)), "hour": ids(25, (b,)), "tags": tags, "genres": ids(6, (b, 2)),
        "price": torch.rand(b, generator=g), "stats": torch.randn(b, 3, generator=g), "lengths": lengths,
    }


def small(**kwargs):
    return dict(attention_hidden=(5,), mlp_hidden=(6,), **kwargs)


def test_dims_and_tables():
    schema = three_field_schema()
    assert schema.behaviour_dim == 6 + 4 + 2
    assert schema.top_features == (2 + 4) + (4 + 3) + 2 * 12 + (1 + 3)
    model = DIN(schema=schema, **small())
    tables = model.embedding_tables()
    assert set(tables) == {"item", "category", "shop", "gender", "hour", "tags", "genres"}
    assert tables["item"].weight.shape == (20, 6) and tables["shop"].weight.shape == (9, 2)
    assert model.attention.embed_dim == 12 and model.mlp.linears[0].in_features == schema.top_features


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_forward_backward_every_table(pooling):
    model = DIN(schema=three_field_schema(), pooling=pooling, **small())
    batch = three_field_batch()
    logits = model(batch)
    assert logits.shape == (5,) and torch.isfinite(logits).all()
    logits.sum().backward()
    for name, table in model.embedding_tables().items():
        used = model.batch_ids(batch)[name].unique()
        used = used[used != 0]
        assert (table.weight.grad[used].abs().sum(1) > 0).all(), name
        assert table.weight.grad[0].abs().sum() == 0, name


def test_history_shares_the_candidate_table():
    """A behaviour equal to the candidate embeds exactly as the candidate: the tables are shared."""
    model = DIN(schema=three_field_schema(), **small())
    batch = three_field_batch()
    emb = model.embeddings
    hist = torch.cat([emb["item"](batch["hist_item"]), emb["category"](batch["hist_cate"]), emb["shop"](batch["hist_shop"])], -1)
    assert hist.shape[-1] == model.attention.embed_dim
    assert not any(name.startswith("embeddings.hist") for name, _ in model.named_parameters())


def test_multi_hot_pooling():
    model = DIN(schema=three_field_schema(), **small())
    ids = torch.tensor([[3, 0, 0], [2, 5, 0]])
    table = model.embeddings["tags"].weight
    mean = model._pool_multi_hot("tags", "mean", ids)
    torch.testing.assert_close(mean[0], table[3])
    torch.testing.assert_close(mean[1], (table[2] + table[5]) / 2)
    torch.testing.assert_close(model._pool_multi_hot("genres", "sum", torch.tensor([[1, 2]]))[0],
                               model.embeddings["genres"].weight[1] + model.embeddings["genres"].weight[2])


def test_positions_from_lengths_mask_or_padding_id():
    model = DIN(schema=three_field_schema(), **small()).eval()
    batch = three_field_batch()
    with torch.no_grad():
        by_lengths = model(batch)
        mask = torch.arange(4) < batch.pop("lengths")[:, None]
        by_padding = model(batch)
        by_mask = model({**batch, "mask": mask})
    torch.testing.assert_close(by_padding, by_lengths, rtol=0, atol=0)
    torch.testing.assert_close(by_mask, by_lengths, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_left_padding_option(pooling):
    """Left-padded histories with padding="left" give what the same rows right-padded give."""
    right = DIN(schema=three_field_schema(), pooling=pooling, **small()).eval()
    left = DIN(schema=three_field_schema("left"), pooling=pooling, **small()).eval()
    left.load_state_dict(right.state_dict())
    batch = three_field_batch()
    shifted = dict(batch)
    for name in ("hist_item", "hist_cate", "hist_shop"):
        rows = []
        for row, n in zip(batch[name], batch["lengths"].tolist()):
            rows.append(torch.cat([torch.zeros(4 - n, dtype=row.dtype), row[:n]]))
        shifted[name] = torch.stack(rows)
    with torch.no_grad():
        torch.testing.assert_close(left(shifted), right(batch))
        with pytest.raises(ValueError, match="padding='left'"):
            right(shifted)  # never silently mis-read


def test_schema_round_trips_through_json_yaml_and_checkpoints(tmp_path):
    schema = three_field_schema("left")
    assert FeatureSchema.from_dict(schema.to_dict()) == schema
    (tmp_path / "s.json").write_text(json.dumps(schema.to_dict()))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(schema.to_dict()))
    assert load_schema(tmp_path / "s.json") == schema == load_schema(tmp_path / "s.yaml")
    model = DIN.from_schema(tmp_path / "s.yaml", **small())
    torch.save(model.checkpoint(note="x"), tmp_path / "m.pt")
    again = DIN.from_checkpoint(tmp_path / "m.pt")
    assert again.schema == schema
    batch = three_field_batch()
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch), model(batch), rtol=0, atol=0)


def test_state_dict_of_main_loads():
    """A checkpoint written by main's DIN (commit 21fce64, before schemas) loads and gives its logits."""
    saved = torch.load(HERE / "data" / "din_main_21fce64.pt", weights_only=True)
    model = DIN.from_checkpoint(saved).eval()
    assert set(model.state_dict()) == set(saved["state_dict"])
    assert {"embeddings.item.weight", "embeddings.category.weight", "embeddings.user_0.weight",
            "embeddings.user_1.weight"} <= set(saved["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(model(saved["batch"]), saved["logits"], rtol=1e-6, atol=1e-7)


def test_shorthand_is_the_two_field_schema():
    model = DIN(13, 5, embed_dim=4, user_sparse_sizes=(3,), num_dense=2)
    assert model.schema == FeatureSchema.two_field(13, 5, 4, (3,), 2)
    assert DIN(**model.config()).schema == model.schema


@pytest.mark.parametrize("build, words", [
    (lambda: FeatureSchema([SparseField("item", 5)], []), "at least one behaviour-sequence"),
    (lambda: FeatureSchema([SparseField("item", 5)], [SequenceField("h", "cat")]), "not a candidate field"),
    (lambda: FeatureSchema([SparseField("item", 5), SparseField("cat", 3)], [SequenceField("h", "item")]),
     "have no behaviour sequence"),
    (lambda: FeatureSchema([SparseField("item", 5)], [SequenceField("item", "item")]), "unique"),
    (lambda: FeatureSchema([SparseField("item", 5)], [SequenceField("lengths", "item")]), "batch keys"),
    (lambda: SparseField("item", 1), "vocab_size of field 'item'"),
    (lambda: MultiHotField("tags", 5, pooling="max"), "pooling of multi-hot field 'tags'"),
    (lambda: DenseField("price", 0), "dim of dense field 'price'"),
    (lambda: FeatureSchema.from_dict({"candidates": [], "sequence": []}), "unknown schema keys ['sequence']"),
    (lambda: FeatureSchema.from_dict({"candidates": [{"name": "item"}], "sequences": []}), "schema key 'candidates'"),
    (lambda: FeatureSchema.two_field(5, 3, padding="middle"), "padding must be one of"),
])
def test_bad_schemas(build, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_bad_schema_files(tmp_path):
    (tmp_path / "bad.json").write_text('{"candidates": [\n  {"name": "item",}\n]}')
    with pytest.raises(ValueError, match=r"bad.json: line 2, column"):
        load_schema(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_schema(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_schema(tmp_path / "missing.yaml")


@pytest.mark.parametrize("positions", ["lengths", "padding-id"])
def test_schema_model_compiles_fullgraph(positions):
    """The batch checks stay out of the graph: torch.compile(fullgraph=True) traces a schema-built DIN."""
    model = DIN(schema=three_field_schema("left" if positions == "lengths" else "right"), **small()).eval()
    batch = three_field_batch()
    if positions == "padding-id":
        batch.pop("lengths")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), model(batch))


def test_shorthand_padding_option_round_trips():
    model = DIN(13, 5, embed_dim=4, padding="left", attention_hidden=(4,), mlp_hidden=(4,))
    assert model.schema.padding == "left" and DIN(**model.config()).schema.padding == "left"
    batch = {"item": torch.tensor([1, 2]), "category": torch.tensor([1, 2]), "lengths": torch.tensor([1, 2]),
             "hist_items": torch.tensor([[0, 3], [4, 5]]), "hist_categories": torch.tensor([[0, 1], [2, 3]])}
    right = DIN(13, 5, embed_dim=4, attention_hidden=(4,), mlp_hidden=(4,)).eval()
    right.load_state_dict(model.state_dict())
    flipped = {**batch, "hist_items": torch.tensor([[3, 0], [4, 5]]), "hist_categories": torch.tensor([[1, 0], [2, 3]])}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch), right(flipped))
