"""Pieces the peer adapters share: the replacement base class, a Dice over a peer's own parameters,
and an AttentionPooling built around a peer's own nn.Linear / PReLU / Dice modules."""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastdin import functional
from fastdin.layers import AttentionPooling, Dice
from fastdin.reference import DiceParams


class Unsupported(Exception):
    """A peer module of a kind the adapter knows, that fastdin cannot compute with the same numbers."""


class Patched(nn.Module):
    """Base of every replacement: keeps the peer module it replaced (outside the module tree, so it
    is neither saved twice nor moved twice) for `fastdin.unpatch`. The replacement holds the peer's
    own leaf modules and parameters, so what is trained while patched is in the original too."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.__dict__["_fastdin_original"] = original
        self.peer_type = type(original)

    def restore(self) -> nn.Module:
        original = self.__dict__["_fastdin_original"]
        original.train(self.training)
        return original


class PeerDice(Dice):
    """fastdin's Dice reading a peer's alpha and its BatchNorm1d (statistics, momentum, eps, affine
    weight/bias) in place: nothing is copied, so the peer's module sees every update."""

    def __init__(self, alpha: nn.Parameter, bn: nn.BatchNorm1d, backend: Optional[str] = None):
        nn.Module.__init__(self)
        if not bn.track_running_stats or bn.momentum is None:
            raise Unsupported("its BatchNorm1d has no running statistics or a cumulative (momentum=None) average")
        if alpha.numel() != bn.num_features:
            raise Unsupported(f"alpha has {alpha.numel()} elements for {bn.num_features} features")
        self.num_features, self.affine, self.backend = bn.num_features, bn.affine, backend
        self.alpha = alpha
        self.bn = bn

    eps = property(lambda self: self.bn.eps)
    momentum = property(lambda self: self.bn.momentum)
    running_mean = property(lambda self: self.bn.running_mean)
    running_var = property(lambda self: self.bn.running_var)
    num_batches_tracked = property(lambda self: self.bn.num_batches_tracked)
    weight = property(lambda self: self.bn.weight)
    bias = property(lambda self: self.bn.bias)

    def params(self) -> DiceParams:
        return DiceParams(self.alpha.reshape(-1), self.running_mean, self.running_var, self.weight, self.bias,
                          self.training, self.momentum, self.eps)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        p = self.params()
        return functional.dice(x, p.alpha, p.running_mean, p.running_var, weight=p.weight, bias=p.bias,
                               training=self.training, momentum=p.momentum, eps=p.eps, mask=mask, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the state lives under bn.*, as in the peer; a fastdin Dice's state (running_mean, ..., alpha [H])
        # loads too, so fastdin weights can be put into a peer model through its patched view
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if prefix + name in state_dict:
                state_dict[prefix + "bn." + name] = state_dict.pop(prefix + name)
        if prefix + "alpha" in state_dict:
            state_dict[prefix + "alpha"] = state_dict[prefix + "alpha"].reshape(self.alpha.shape)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


def activation_name(activations: Sequence[nn.Module], peer_dice: tuple = ()) -> str:
    """fastdin's name for a list of peer activation modules, all of one kind; Unsupported otherwise."""
    kinds = set()
    for act in activations:
        if isinstance(act, nn.Sigmoid):
            kinds.add("sigmoid")
        elif isinstance(act, nn.ReLU):
            kinds.add("relu")
        elif isinstance(act, nn.PReLU):
            kinds.add("prelu")
        elif peer_dice and isinstance(act, peer_dice):
            kinds.add("dice")
        else:
            raise Unsupported(f"activation {type(act).__name__} is not one of fastdin's (sigmoid, relu, prelu, Dice)")
    if len(kinds) != 1:
        raise Unsupported(f"the hidden layers mix activations {sorted(kinds)}")
    return kinds.pop()


def shared_pool(linears: Sequence[nn.Linear], score: nn.Module, activation: str, activations: Sequence[nn.Module],
                normalization: Optional[str], dice_stats: str, backend: Optional[str]) -> AttentionPooling:
    """fastdin's AttentionPooling whose layers are the peer's own modules (shared, not copied)."""
    for i, linear in enumerate(list(linears) + [score]):
        if linear.bias is None:
            raise Unsupported(f"linear layer {i} has no bias")
    embed_dim = linears[0].in_features // 4
    pool = AttentionPooling(embed_dim, [m.out_features for m in linears], activation, normalization,
                            return_scores=True, dice_stats=dice_stats, backend=backend)
    pool.mlp.linears = nn.ModuleList(linears)
    pool.mlp.activations = nn.ModuleList(activations)
    pool.score = score
    return pool


def peer_padding_rows(out: Tensor, scores: Tensor, keys: Tensor, empty: Tensor, value: Optional[float] = None):
    """A peer's softmax over a row with no valid position: uniform weights over the padding (the mean
    of the keys), or `value` (RecBole's NaN). fastdin gives such rows zero weights."""
    seq_len = keys.shape[1]
    if value is None:
        row_out, row_scores = keys.sum(1) / seq_len, torch.full_like(scores, 1.0 / seq_len)
    else:
        row_out, row_scores = torch.full_like(out, value), torch.full_like(scores, value)
    row_out = row_out.reshape(out.shape)
    out = torch.where(empty.reshape((-1,) + (1,) * (out.dim() - 1)), row_out, out)
    scores = torch.where(empty.reshape(-1, 1), row_scores, scores)
    return out, scores
