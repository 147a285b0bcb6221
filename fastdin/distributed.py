"""Multi-process training on torch.distributed: DDP, per-rank data shards, synchronized Dice.

Launch: `torchrun --nproc-per-node K fastdin train ...` (or `--no-python fastdin train`). `fastdin
train` sees WORLD_SIZE > 1 and then (`Context`):
- initialises the default process group: NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on
  the CPU;
- converts the Dice layers to synchronized Dice (`convert_sync_dice`) and wraps the model in DDP;
- gives each rank its own shard of the training batches (`shard`): batch i goes to rank i % K, and
  every rank takes the same number of batches (the remainder is dropped, as DistributedSampler's
  drop_last does), so that DDP's collectives stay in step. --batch-size is per rank: a step sees
  K x batch-size rows;
- evaluates on the whole test set on every rank (the parameters are equal, so are the metrics: the
  AUC is the global one, not an average of per-shard AUCs), averages the training loss over the
  ranks, and checks that the final parameters agree on every rank;
- writes the checkpoint and the metrics from rank 0 only, the metrics with world_size;
- destroys the process group at the end (after a barrier: gloo aborts a process whose peers are
  gone while it still holds the group).

Loaders: `shard(batches, rank, world)` calls `batches.shard(rank, world)` where a loader defines
it (the hook: return a re-iterable of this rank's batches, the same count on every rank); the
synthetic stream is sharded by batch index without generating the other ranks' batches; any other
re-iterable with len() is sharded by skipping.

Synchronized Dice (as nn.SyncBatchNorm for BatchNorm): in training, the batch mean and variance of
every Dice layer are taken over the valid rows of all ranks, two all_reduces per layer: (count,
sum), then the sum of squared deviations from the global mean (a two-pass variance, as the
single-process reference takes it). The backward is exact: the gradients that reach the mean and
the variance are summed over the ranks (one all_reduce) before they flow back to each rank's rows,
so K ranks on K parts of a batch give the outputs, gradients and running statistics of one process
on the whole batch. It runs in PyTorch ops (CPU and CUDA); the fused Triton path is not used under
sync. In eval mode, or with one process, the layers behave exactly as before.
"""
import inspect
import os
from typing import Dict, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastdin import reference
from fastdin.functional import check_dice_inputs
from fastdin.jagged import jagged_to_padded
from fastdin.layers import AttentionPooling, Dice


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _sync_active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


# ---------------------------------------------------------------------------------------------
# synchronized Dice


class _SyncMoments(torch.autograd.Function):
    """(mean, biased var, count) of rows [N, H] over all ranks of group, with the exact backward."""

    @staticmethod
    def forward(ctx, rows: Tensor, group):
        acc = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows
        count_sum = torch.cat([acc.new_full((1,), acc.shape[0]), acc.sum(0)])
        dist.all_reduce(count_sum, group=group)
        count, mean = count_sum[0], count_sum[1:] / count_sum[0]
        centered = acc - mean
        var = (centered * centered).sum(0)
        dist.all_reduce(var, group=group)
        var = var / count
        ctx.save_for_backward(centered, count)
        ctx.group, ctx.dtype = group, rows.dtype
        ctx.mark_non_differentiable(count)
        return mean.to(rows.dtype), var.to(rows.dtype), count

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_count):
        centered, count = ctx.saved_tensors
        width = centered.shape[1]
        grads = torch.cat([grad_mean.reshape(-1).to(centered.dtype) if grad_mean is not None else centered.new_zeros(width),
                           grad_var.reshape(-1).to(centered.dtype) if grad_var is not None else centered.new_zeros(width)])
        dist.all_reduce(grads, group=ctx.group)  # every rank's rows feed the one mean and variance
        grad_mean, grad_var = grads[:width], grads[width:]
        # d mean / d x_i = 1/N; d var / d x_i = 2 (x_i - mean) / N (the term through the mean sums to 0)
        grad_rows = (grad_mean + 2 * centered * grad_var) / count
        return grad_rows.to(ctx.dtype), None


def sync_dice(x: Tensor, dice: Dice, mask: Optional[Tensor] = None, group=None) -> Tensor:
    """Training-mode Dice with the batch statistics of all ranks (see the module docstring)."""
    check_dice_inputs(x, dice.alpha, dice.running_mean, dice.running_var, dice.weight, dice.bias, True, mask)
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    mean, var, count = _SyncMoments.apply(rows, group)
    if count.item() < 2:  # as nn.BatchNorm1d: one row has no variance
        raise ValueError(f"synchronized Dice needs more than one (valid) row over all ranks, got {int(count.item())}")
    with torch.no_grad():  # BatchNorm1d's update, from the global statistics
        momentum = dice.momentum
        dice.running_mean.mul_(1 - momentum).add_(mean.detach().to(dice.running_mean.dtype), alpha=momentum)
        unbiased = var.detach().to(dice.running_var.dtype) * (count / (count - 1))
        dice.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    x_hat = (x - mean) / torch.sqrt(var + dice.eps)
    if dice.weight is not None:
        x_hat = x_hat * dice.weight + dice.bias
    p = torch.sigmoid(x_hat)
    return p * x + (1 - p) * dice.alpha * x


class SyncDice(Dice):
    """`fastdin.layers.Dice` whose training-mode statistics span all ranks of `process_group`."""

    process_group = None

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if not (self.training and _sync_active(self.process_group)):
            return super().forward(x, mask)
        self.num_batches_tracked.add_(1)
        return sync_dice(x, self, mask, self.process_group)


class SyncDiceAttentionPooling(AttentionPooling):
    """`AttentionPooling` whose Dice layers (SyncDice) take their statistics over all ranks in
    training. The same math as `fastdin.reference.attention_pool`, with the MLP's modules."""

    def forward(self, query: Tensor, keys: Tensor, lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                **jagged):
        if not (self.training and self.mlp.activation == "dice" and _sync_active(self.mlp.activations[0].process_group)):
            return super().forward(query, keys, lengths, mask, **jagged)
        offsets = jagged.pop("offsets", None)
        if jagged:
            raise TypeError(f"unexpected arguments {sorted(jagged)}")
        if offsets is not None:  # jagged keys [N, D]: padded here, the weights packed back to [N] below
            keys, lengths = jagged_to_padded(keys, offsets)
        out, scores = self._padded(query, keys, lengths, mask)
        if offsets is not None and self.return_scores:
            scores = scores[reference.valid_positions(lengths, None, *scores.shape, scores.device)]
        return (out, scores) if self.return_scores else out

    def _padded(self, query: Tensor, keys: Tensor, lengths: Optional[Tensor], mask: Optional[Tensor]):
        linears = list(self.mlp.linears) + [self.score]
        query2d, lengths = self._checked(query, keys, linears, lengths, mask)
        batch, seq_len, _ = keys.shape
        valid = reference.valid_positions(lengths, mask, batch, seq_len, keys.device)
        q = query2d.unsqueeze(1).expand_as(keys)
        h = torch.cat([q, keys, q - keys, q * keys], dim=-1)
        h = self.mlp(h, valid if self.dice_stats == "valid" else None)
        scores = self.score(h).squeeze(-1)
        if self.normalization == "softmax":
            scores = torch.softmax(scores.masked_fill(~valid, torch.finfo(scores.dtype).min), dim=-1) * valid
        else:
            scores = scores.masked_fill(~valid, 0.0)
        out = torch.bmm(scores.unsqueeze(1), keys).squeeze(1)
        if query.dim() == 3:
            out = out.unsqueeze(1)
        return out, scores

    def _checked(self, query, keys, linears, lengths, mask):
        from fastdin.functional import check_attention_inputs

        return check_attention_inputs(query, keys, [m.weight for m in linears], [m.bias for m in linears], "dice",
                                      [a.params() for a in self.mlp.activations], lengths, mask,
                                      self.normalization, self.dice_stats)


def convert_sync_dice(model: nn.Module, process_group=None) -> nn.Module:
    """Make every Dice layer of model synchronized over process_group (default: the whole world), in place.

    As `nn.SyncBatchNorm.convert_sync_batchnorm`: the modules keep their parameters, buffers and
    state-dict names (a checkpoint loads into the unconverted model), only their class changes.
    Returns model.
    """
    for module in model.modules():
        if type(module) is Dice:
            module.__class__ = SyncDice
            module.process_group = process_group
        elif type(module) is AttentionPooling:
            module.__class__ = SyncDiceAttentionPooling
    return model


# ---------------------------------------------------------------------------------------------
# data shards


class _ShardedStream:
    """Rank `rank`'s batches of a `fastdin.data.BatchStream`: batch i for i % world == rank, generated directly."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def __len__(self) -> int:
        return len(self.stream) // self.world

    def __iter__(self) -> Iterator[Dict[str, Tensor]]:
        s = self.stream
        for step in range(len(self)):
            index = step * self.world + self.rank
            size = min(s.batch_size, s.num_rows - index * s.batch_size)
            batch = s.data.batch(s.split, index, s.batch_size)
            yield batch if size == s.batch_size else {name: t[:size] for name, t in batch.items()}


class _SkippingShard:
    """Rank `rank`'s batches of any re-iterable with len(): every world-th, the same count per rank."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches) // self.world

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            if index >= len(self) * self.world:
                return
            if index % self.world == self.rank:
                yield batch


def shard(batches: Iterable, rank: int, world: int) -> Iterable:
    """This rank's part of a re-iterable of batches (see the module docstring)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world) = [0, {world}), got {rank}")
    if hasattr(batches, "shard"):
        return batches.shard(rank, world)
    if not hasattr(batches, "__len__"):
        raise TypeError(f"batches ({type(batches).__name__}) must have len() or a shard(rank, world) method to be sharded")
    if all(hasattr(batches, a) for a in ("data", "split", "batch_size", "num_rows")):  # fastdin.data.BatchStream
        return _ShardedStream(batches, rank, world)
    return _SkippingShard(batches, rank, world)


# ---------------------------------------------------------------------------------------------
# the training run


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Context:
    """One rank of a torchrun launch: the process group, this rank's device, and the collectives of a run."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.rank = int(os.environ["RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        self.device = device
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, sync_dice: bool = True) -> nn.Module:
        """model on this rank's device, with synchronized Dice, in DDP."""
        model = model.to(self.device)
        if sync_dice:
            convert_sync_dice(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # synchronized Dice keeps equal running statistics on every rank: no buffer broadcast per step
        # (buffers are still broadcast once at construction); torch 2.13 renamed the option
        ddp = nn.parallel.DistributedDataParallel
        option = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
        return ddp(model, device_ids=ids, **{option: not sync_dice})

    def shard(self, batches: Iterable) -> Iterable:
        return shard(batches, self.rank, self.world_size)

    def mean(self, values) -> list:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def max_parameter_difference(self, model: nn.Module) -> float:
        """The largest |difference| of any parameter or buffer between this rank and rank 0 (max over ranks)."""
        state = unwrap(model).state_dict()
        flat = torch.cat([t.detach().reshape(-1).double() for t in state.values() if t.is_floating_point()])
        flat = flat.to(self._comm_device())
        reference_copy = flat.clone()
        dist.broadcast(reference_copy, src=0)
        diff = (flat - reference_copy).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return diff.item()

    def reduce_metrics(self, metrics: Dict, model: nn.Module) -> Dict:
        """The run's metrics over all ranks: mean training loss, the slowest rank's wall time, world_size."""
        metrics = dict(metrics)
        metrics["train_loss"] = self.mean(metrics["train_loss"])
        for epoch, loss in zip(metrics["epochs"], metrics["train_loss"]):
            epoch["train_loss"] = loss
        wall = torch.tensor([metrics["wall_time_s"]], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        metrics.update(wall_time_s=wall.item(), world_size=self.world_size,
                       max_parameter_difference_across_ranks=self.max_parameter_difference(model))
        return metrics

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        """Leave the process group cleanly (barrier, then destroy)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
