"""Train DIN with TorchRec-sharded embedding tables and fastdin's attention pooling.

    python examples/torchrec_din.py                                        # one process
    torchrun --standalone --nproc-per-node 2 examples/torchrec_din.py      # tables sharded over 2 ranks (gloo on the CPU)

Needs torchrec and fbgemm-gpu (tests/requirements-serve.txt lists a set that works on torch 2.13 CPU).
Each rank trains on its own shard of the synthetic stream; the embedding tables are sharded by
TorchRec's planner (`DistributedModelParallel`, with its fused optimizer for the tables), the dense
part (attention, top MLP) is data-parallel with synchronized Dice statistics.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastdin.data import SyntheticConfig, SyntheticDIN
from fastdin.distributed import convert_sync_dice, launched_by_torchrun, shard
from fastdin.integrations.torchrec import TorchRecDIN, batch_to_features
from fastdin.train import evaluate


class PaddedInput(torch.nn.Module):
    """The model on fastdin's padded batch dicts (what `fastdin.train.evaluate` passes)."""

    def __init__(self, model: TorchRecDIN):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(batch_to_features(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = 0, 1
    data = SyntheticDIN(SyntheticConfig())
    torch.manual_seed(0)
    model = TorchRecDIN(**data.vocab_sizes())
    train_batches = data.stream("train", args.train_size, args.batch_size)
    if launched_by_torchrun():
        from torchrec.distributed.model_parallel import DistributedModelParallel

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        train_batches = shard(train_batches, rank, world)
        net = DistributedModelParallel(convert_sync_dice(model), device=torch.device("cpu"))
        if rank == 0:
            print(net.plan)
    else:
        net = model
    dense = [p for name, p in model.named_parameters() if not name.startswith("embeddings")]
    tables = [] if world > 1 else [p for name, p in model.named_parameters() if name.startswith("embeddings")]
    optimizer = torch.optim.Adam(dense + tables, lr=args.lr)  # sharded tables: TorchRec's fused optimizer
    for step, batch in enumerate(train_batches):
        loss = F.binary_cross_entropy_with_logits(net(batch_to_features(batch)), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 20 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        return  # the sharded tables live on the ranks; evaluate the single-process run below
    metrics = evaluate(PaddedInput(model), data.stream("test", 5000, 1024), torch.device("cpu"))
    print(f"test AUC {metrics['auc']:.4f}, logloss {metrics['logloss']:.4f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
