"""DeepCTR-Torch 0.3.0: AttentionSequencePoolingLayer, LocalActivationUnit and Dice (2-D and 3-D).

What DeepCTR-Torch computes, read from its source, and how it maps onto fastdin:
- LocalActivationUnit: DNN (Linear -> activation, per hidden layer) on [q, k, q-k, q*k], then
  `dense` (Linear to 1): fastdin's AttentionPooling on the same modules. use_bn or dropout > 0 in
  its DNN: left alone.
- Its Dice (dice_dim=3 in the unit): an affine BatchNorm1d over all B*T positions, padding
  included (exact: dice_stats="all"; exact=False: "valid").
- weight_normalization: padding gets -2**32+1, then softmax. A row with no valid position gets
  uniform weights 1/T over its padding, so its output is the mean of the keys (exact); fastdin
  gives zeros (exact=False). Lengths past T count as T, negative ones as 0 (exact clamps them).
- return_score: the weights [B, 1, T] instead of the pooled [B, 1, E].
"""
from typing import Optional

import torch
from torch import Tensor, nn

from fastdin.integrations._common import Patched, PeerDice, Unsupported, activation_name, peer_padding_rows, shared_pool


def _unit_pool(unit, backend, exact, normalization):
    """AttentionPooling on a LocalActivationUnit's own modules."""
    from deepctr_torch.layers.activation import Dice as DeepCTRDice

    dnn = unit.dnn
    if dnn.use_bn:
        raise Unsupported("use_bn=True puts a BatchNorm1d before each activation of the attention DNN")
    if dnn.dropout.p > 0:
        raise Unsupported(f"dropout_rate={dnn.dropout.p} in the attention DNN")
    activation = activation_name(dnn.activation_layers, (DeepCTRDice,))
    activations = list(dnn.activation_layers)
    if activation == "dice":
        if any(act.dim != 3 for act in activations):
            raise Unsupported("a 2-D Dice inside the [B, T, H] attention DNN (DeepCTR-Torch itself asserts on it)")
        activations = [PeerDice(act.alpha, act.bn, backend) for act in activations]
    return shared_pool(list(dnn.linears), unit.dense, activation, activations, normalization,
                       "all" if exact else "valid", backend)


class DeepCTRAttentionPooling(Patched):
    """AttentionSequencePoolingLayer on fastdin: forward(query [B, 1, E], keys [B, T, E],
    keys_length [B, 1], mask=None) -> [B, 1, E], or the weights [B, 1, T] with return_score."""

    def __init__(self, layer, backend: Optional[str] = None, exact: bool = True):
        super().__init__(layer)
        self.return_score, self.supports_masking, self.exact = layer.return_score, layer.supports_masking, exact
        self.softmax = bool(layer.weight_normalization)
        self.pool = _unit_pool(layer.local_att, backend, exact, "softmax" if self.softmax else None)

    def forward(self, query: Tensor, keys: Tensor, keys_length: Optional[Tensor] = None, mask: Optional[Tensor] = None):
        seq_len = keys.shape[1]
        if self.supports_masking:
            if mask is None:
                raise ValueError("When supports_masking=True,input must support masking")
            out, scores = self.pool(query, keys, mask=mask)
            empty = ~mask.any(dim=1)
        else:
            lengths = keys_length.reshape(-1)
            if self.exact:
                lengths = lengths.clamp(0, seq_len)
            out, scores = self.pool(query, keys, lengths=lengths)
            empty = lengths <= 0
        if self.softmax and self.exact:
            out, scores = peer_padding_rows(out, scores, keys, empty)
        return scores.unsqueeze(1) if self.return_score else out


class DeepCTRLocalActivationUnit(Patched):
    """LocalActivationUnit on fastdin: forward(query [B, 1, E], user_behavior [B, T, E]) -> scores [B, T, 1]."""

    def __init__(self, unit, backend: Optional[str] = None, exact: bool = True):
        super().__init__(unit)
        self.pool = _unit_pool(unit, backend, exact, None)

    def forward(self, query: Tensor, user_behavior: Tensor) -> Tensor:
        _, scores = self.pool(query, user_behavior)
        return scores.unsqueeze(-1)


class DeepCTRDice(Patched):
    """DeepCTR-Torch's Dice on fastdin's: [N, H] (dim=2) or [B, T, H] (dim=3), statistics per H."""

    def __init__(self, dice, backend: Optional[str] = None):
        super().__init__(dice)
        self.dim = dice.dim
        self.dice = PeerDice(dice.alpha, dice.bn, backend)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.dim:
            raise ValueError(f"x must have {self.dim} dims for this Dice (dim={self.dim}), got shape {list(x.shape)}")
        return self.dice(x)


def convert(module: nn.Module, backend: Optional[str] = None, exact: bool = True) -> Optional[nn.Module]:
    from deepctr_torch.layers.activation import Dice
    from deepctr_torch.layers.core import LocalActivationUnit
    from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer

    if isinstance(module, AttentionSequencePoolingLayer):
        return DeepCTRAttentionPooling(module, backend, exact)
    if isinstance(module, LocalActivationUnit):
        return DeepCTRLocalActivationUnit(module, backend, exact)
    if isinstance(module, Dice):
        return DeepCTRDice(module, backend)
    return None
