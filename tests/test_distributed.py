"""Multi-process training on the CPU with gloo: synchronized Dice over 2 ranks equals 1 process on the
whole batch, and `torchrun ... fastdin train` trains with agreeing ranks and one metrics file."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdin import DIN, AttentionPooling, Dice
from fastdin.distributed import SyncDice, convert_sync_dice, shard
from fastdin.data import SyntheticConfig, SyntheticDIN

WORLD = 2
ROWS = 12  # 6 per rank


def make_inputs():
    """The whole batch (float64, so that the comparison is tight) and the modules, from one seed."""
    g = torch.Generator().manual_seed(1)
    dice = Dice(5, affine=True).double()
    with torch.no_grad():
        dice.alpha.uniform_(-1, 1, generator=g)
        dice.weight.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(ROWS, 3, 5, generator=g, dtype=torch.float64) * 2 + 1
    x_mask = torch.rand(ROWS, 3, generator=g) < 0.7
    torch.manual_seed(2)
    attention = AttentionPooling(4, (6, 5), "dice", normalization="softmax").double()
    keys = torch.randn(ROWS, 7, 4, generator=g, dtype=torch.float64)
    query = torch.randn(ROWS, 4, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, 8, (ROWS,), generator=g)
    torch.manual_seed(3)
    din = DIN(num_items=41, num_categories=9, embed_dim=3, attention_hidden=(5,), attention_activation="dice",
              mlp_hidden=(6,)).double()
    batch = SyntheticDIN(SyntheticConfig(num_categories=8, items_per_category=5, max_history=5)).batch("train", 0, ROWS)
    weights = torch.randn(ROWS, 3, 5, generator=g, dtype=torch.float64)  # fixed weights of a sum loss
    return dice, (x, x_mask), attention, (query, keys, lengths), din, batch, weights


def run_case(dice, dice_in, attention, attention_in, din, batch, weights, rows, ddp=False):
    """Forward and backward of the three cases on the rows `rows`; returns everything to compare."""
    x, x_mask = (t[rows].clone() for t in dice_in)
    x.requires_grad_(True)
    out_dice = dice(x, x_mask)
    (out_dice * weights[rows]).sum().backward()
    query, keys = (t[rows].clone().requires_grad_(True) for t in attention_in[:2])
    out_att = attention(query, keys, lengths=attention_in[2][rows])
    (out_att * weights[rows, 0, :4]).sum().backward()
    part = {name: t[rows] for name, t in batch.items()}
    model = din
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(din)
    # DDP averages the gradients over ranks: with equal halves, the mean loss per rank gives the whole batch's
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(part), part["label"].double())
    loss.backward()
    result = {"dice_out": out_dice.detach(), "dice_dx": x.grad, "att_out": out_att.detach(), "att_dq": query.grad,
              "att_dk": keys.grad}
    for prefix, module in (("dice", dice), ("att", attention), ("din", din)):
        for name, p in module.named_parameters():
            result[f"{prefix}.grad.{name}"] = p.grad
        for name, b in module.named_buffers():
            result[f"{prefix}.buffer.{name}"] = b.clone()
    return result


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        dice, dice_in, attention, attention_in, din, batch, weights = make_inputs()
        for module in (dice, attention, din):
            convert_sync_dice(module)
        assert type(dice) is SyncDice
        half = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
        jagged_attention = copy.deepcopy(attention)
        result = run_case(dice, dice_in, attention, attention_in, din, batch, weights, half, ddp=True)
        # jagged keys (values [N, D], offsets [B + 1]) give the padded call's output under sync too
        query, keys, lengths = (t[half] for t in attention_in)
        valid = torch.arange(keys.shape[1]) < lengths[:, None]
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        torch.testing.assert_close(jagged_attention(query, keys[valid], offsets=offsets), result["att_out"])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_ranks_on_half_batches_equal_one_process_on_the_whole(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    whole = run_case(*make_inputs(), rows=slice(0, ROWS))  # one process, no sync: the plain layers
    for name in ("dice_out", "dice_dx", "att_out", "att_dq", "att_dk"):  # per row: the halves, in order
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]), whole[name], rtol=1e-10, atol=1e-12, msg=name)
    for name, want in whole.items():
        if ".grad." in name and not name.startswith("din"):  # a sum loss: the ranks' gradients add up
            got = sum(r[name] for r in ranks)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
        elif name.startswith("din.grad."):  # DDP: every rank holds the averaged gradient of the whole batch
            for r in ranks:
                torch.testing.assert_close(r[name], want, rtol=1e-9, atol=1e-12, msg=name)
        elif ".buffer." in name:  # running statistics and counters: the same on every rank, as one process
            for r in ranks:
                torch.testing.assert_close(r[name], want, rtol=1e-10, atol=1e-12, msg=name)
    assert any(".buffer." in n and "running_mean" in n and n.startswith("att") for n in whole)


def test_shard_gives_each_rank_its_batches():
    data = SyntheticDIN(SyntheticConfig(max_history=4))
    stream = data.stream("train", 5 * 8 + 3, 8)  # 6 batches, the last short
    parts = [list(shard(stream, r, 2)) for r in range(2)]
    assert [len(p) for p in parts] == [3, 3]
    everything = list(stream)
    for r in range(2):
        for step, b in enumerate(parts[r]):
            torch.testing.assert_close(b, everything[2 * step + r])
    listed = [{"i": torch.tensor([i])} for i in range(5)]  # any re-iterable with len(): the remainder is dropped
    assert [[b["i"].item() for b in shard(listed, r, 2)] for r in range(2)] == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world\)"):
        shard(listed, 2, 2)


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun is not on PATH")
def test_torchrun_trains_two_ranks_on_the_cpu(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    fastdin_cli = shutil.which("fastdin") or os.path.join(os.path.dirname(sys.executable), "fastdin")
    metrics, checkpoint = tmp_path / "metrics.json", tmp_path / "model.pt"
    run = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", fastdin_cli, "train", "--train-size", "800",
         "--test-size", "400", "--batch-size", "100", "--max-history", "6", "--embed-dim", "4", "--epochs", "2",
         "--no-progress", "--device", "cpu", "--metrics-out", str(metrics), "--save", str(checkpoint)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("wrote the metrics to") == 1 and run.stdout.count("saved the model to") == 1
    result = json.loads(metrics.read_text())
    assert result["world_size"] == 2
    assert result["max_parameter_difference_across_ranks"] == 0.0  # every rank ends with the same model
    assert len(result["train_loss"]) == 2 and 0 <= result["test_auc"] <= 1
    saved = torch.load(checkpoint)
    model = DIN(**saved["model_config"])
    model.load_state_dict(saved["state_dict"])  # synchronized Dice keeps the plain state-dict names
    assert not any(isinstance(m, SyncDice) for m in copy.deepcopy(model).modules())
