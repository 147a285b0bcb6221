"""TorchRec: DIN over an EmbeddingCollection on KeyedJaggedTensor input, one process and sharded over 2
gloo ranks (DistributedModelParallel, CPU). Runs where torchrec and fbgemm-gpu-cpu are installed
(tests/requirements-serve.txt)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

from fastdin import DIN  # noqa: E402
from fastdin.data import SyntheticConfig, SyntheticDIN  # noqa: E402
from fastdin.distributed import convert_sync_dice  # noqa: E402
from fastdin.integrations.torchrec import TorchRecDIN, batch_to_features, jagged_attention  # noqa: E402
from fastdin.jagged import jagged_to_padded  # noqa: E402

ROWS = 10
CONFIG = dict(embed_dim=4, attention_hidden=(6,), attention_activation="dice", normalization="softmax", mlp_hidden=(5,))


def data():
    return SyntheticDIN(SyntheticConfig(num_categories=12, items_per_category=6, max_history=7))


def make_model() -> TorchRecDIN:
    torch.manual_seed(4)
    return TorchRecDIN(**data().vocab_sizes(), **CONFIG)


def test_matches_fastdin_din_on_the_same_batch():
    synthetic = data()
    din = DIN(**synthetic.vocab_sizes(), **CONFIG)
    model = TorchRecDIN(**synthetic.vocab_sizes(), **CONFIG).load_din(din)
    batch = synthetic.batch("test", 0, ROWS)
    batch["lengths"][0] = 0  # an empty history
    for mode in (True, False):  # training (Dice batch statistics) and eval
        din.train(mode), model.train(mode)
        torch.testing.assert_close(model(batch_to_features(batch)), din(batch), rtol=1e-6, atol=1e-7)


def test_jagged_attention_equals_the_padded_call():
    din = DIN(num_items=30, num_categories=5, embed_dim=3, attention_activation="prelu").eval()
    lengths = torch.tensor([3, 0, 5, 1])
    values, query = torch.randn(int(lengths.sum()), 6), torch.randn(4, 6)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    keys, got_lengths = jagged_to_padded(values, offsets)
    assert keys.shape == (4, 5, 6) and torch.equal(got_lengths, lengths)
    torch.testing.assert_close(keys[2, :5], values[3:8])
    torch.testing.assert_close(jagged_attention(din.attention, query, values, offsets),
                               din.attention(query, keys, lengths=lengths))
    with pytest.raises(ValueError, match="offsets must rise from 0 to N"):
        jagged_to_padded(values, offsets + 1)
    with pytest.raises(ValueError, match="1-D int64"):
        jagged_to_padded(values, offsets.int())


def worker(rank, init_file, out_dir):
    from torchrec.distributed.model_parallel import DistributedModelParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = convert_sync_dice(make_model())  # Dice statistics over both ranks' rows
        sharded = DistributedModelParallel(model, device=torch.device("cpu"))
        batch = data().batch("train", 0, ROWS)
        half = {name: t[rank * ROWS // 2:(rank + 1) * ROWS // 2] for name, t in batch.items()}
        logits = sharded(batch_to_features(half))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, half["label"])
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()
                 if not name.startswith("embeddings") and p.grad is not None}
        torch.save({"logits": logits.detach(), "grads": grads, "plan": str(sharded.plan)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_sharded_over_two_gloo_ranks_equals_one_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert "row_wise" in ranks[0]["plan"] or "table_wise" in ranks[0]["plan"]  # the tables were sharded
    model = make_model()
    batch = data().batch("train", 0, ROWS)
    logits = model(batch_to_features(batch))
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), logits.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if name.startswith("embeddings"):
            continue  # TorchRec fuses the tables' optimizer into the backward: no .grad to compare
        for r in ranks:  # DDP's averaged gradient of the two half-batch means: the whole batch's
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
