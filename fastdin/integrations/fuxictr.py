"""FuxiCTR 2.3.10: DIN_Attention (DIN's target attention) and its Dice.

From FuxiCTR's source: the attention MLP (MLP_Block: Linear -> activation per hidden layer, then
Linear to 1) runs on the [B*T, 4E] rows; the scores are multiplied by the mask (masked -> 0);
with use_softmax, -1e9 is added at masked positions and softmax taken over T, so a row with no
valid position gets uniform weights (the mean of its keys; exact) where fastdin gives zeros
(exact=False). Its Dice is a non-affine BatchNorm1d (eps 1e-9, momentum 0.01) over all B*T rows,
padding included (exact: dice_stats="all"; exact=False: "valid"). batch_norm, dropout or an
output activation in the attention MLP: left alone.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from fastdin.integrations._common import Patched, PeerDice, Unsupported, activation_name, peer_padding_rows, shared_pool


def _mlp_layers(block):
    """(hidden linears, hidden activations, score linear) of a DIN attention MLP_Block."""
    layers = list(block.mlp)
    if not layers or not isinstance(layers[-1], nn.Linear) or layers[-1].out_features != 1:
        raise Unsupported("the attention MLP does not end in a Linear to one score (output_activation set?)")
    linears, activations = [], []
    for layer in layers[:-1]:
        if isinstance(layer, nn.Linear):
            if len(linears) != len(activations):
                raise Unsupported("two Linear layers without an activation between them")
            linears.append(layer)
        elif isinstance(layer, (nn.BatchNorm1d, nn.Dropout)):
            raise Unsupported(f"{type(layer).__name__} inside the attention MLP (batch_norm or dropout_rate set)")
        else:
            if len(activations) != len(linears) - 1:
                raise Unsupported("an activation that does not follow a Linear layer")
            activations.append(layer)
    if not linears or len(activations) != len(linears):
        raise Unsupported("a hidden layer without activation")
    return linears, activations, layers[-1]


class FuxiCTRTargetAttention(Patched):
    """DIN_Attention on fastdin: forward(target_item [B, E], history_sequence [B, T, E], mask [B, T]
    of 0/1 or bool, or None) -> [B, E]."""

    def __init__(self, attention, backend: Optional[str] = None, exact: bool = True):
        super().__init__(attention)
        from fuxictr.pytorch.layers.activations import Dice

        linears, activations, score = _mlp_layers(attention.attention_layer)
        activation = activation_name(activations, (Dice,))
        if activation == "dice":
            activations = [PeerDice(act.alpha, act.bn, backend) for act in activations]
        self.softmax, self.exact = bool(attention.use_softmax), exact
        self.pool = shared_pool(linears, score, activation, activations, "softmax" if self.softmax else None,
                                "all" if exact else "valid", backend)

    def forward(self, target_item: Tensor, history_sequence: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if mask is None:
            return self.pool(target_item, history_sequence)[0]
        if mask.dtype != torch.bool:
            # FuxiCTR multiplies the scores by the mask: only a 0/1 mask is a set of valid positions
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("mask must hold only 0 and 1 (or be bool) for fastdin's DIN_Attention")
            mask = mask != 0
        out, scores = self.pool(target_item, history_sequence, mask=mask)
        if self.softmax and self.exact:
            out, scores = peer_padding_rows(out, scores, history_sequence, ~mask.any(dim=1))
        return out


class FuxiCTRDice(Patched):
    """FuxiCTR's Dice ([N, H], BatchNorm1d statistics over the rows) on fastdin's."""

    def __init__(self, dice, backend: Optional[str] = None):
        super().__init__(dice)
        self.dice = PeerDice(dice.alpha, dice.bn, backend)

    def forward(self, X: Tensor) -> Tensor:
        return self.dice(X)


def convert(module: nn.Module, backend: Optional[str] = None, exact: bool = True) -> Optional[nn.Module]:
    from fuxictr.pytorch.layers.activations import Dice
    from fuxictr.pytorch.layers.attentions.target_attention import DIN_Attention

    if isinstance(module, DIN_Attention):
        return FuxiCTRTargetAttention(module, backend, exact)
    if isinstance(module, Dice):
        return FuxiCTRDice(module, backend)
    return None
