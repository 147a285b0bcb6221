"""RecBole 1.2.1: DIN's SequenceAttLayer.

From RecBole's source: an MLPLayers (Dropout -> Linear -> activation per layer) on
[q, k, q-k, q*k], `dense` to one score; positions with mask_mat >= keys_length are masked (0
without softmax_stag, -inf with it), then every score is divided by sqrt(E). fastdin folds that
scale into the score layer (dense.weight / sqrt(E), dense.bias / sqrt(E): the same parameters,
the same gradients). With softmax_stag a row with no valid position gives NaN in RecBole (softmax
of all -inf; exact keeps the NaN in the forward pass) and zeros in fastdin (exact=False).
RecBole's Dice (sigmoid(s) * s with a constant alpha, no statistics) is not fastdin's Dice:
left alone, as are dropout > 0, bn=True and tanh / leakyrelu / no activation in the attention MLP.
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastdin.integrations._common import Patched, Unsupported, activation_name, peer_padding_rows, shared_pool


class ScaledScore(nn.Module):
    """RecBole's score layer with its 1/sqrt(E) scale folded in; reads `dense` in place."""

    def __init__(self, dense: nn.Linear, scale: float):
        super().__init__()
        self.dense, self.scale, self.out_features = dense, scale, dense.out_features

    weight = property(lambda self: self.dense.weight * self.scale)
    bias = property(lambda self: self.dense.bias * self.scale)


class RecBoleSequenceAttention(Patched):
    """SequenceAttLayer on fastdin: forward(queries [B, E], keys [B, T, E], keys_length [B]) ->
    [B, 1, E], or the weights [B, 1, T] with return_seq_weight."""

    def __init__(self, layer, backend: Optional[str] = None, exact: bool = True):
        super().__init__(layer)
        linears, activations = [], []
        for module in layer.att_mlp_layers.mlp_layers:
            if isinstance(module, nn.Dropout):
                if module.p > 0:
                    raise Unsupported(f"dropout {module.p} in the attention MLP")
            elif isinstance(module, nn.Linear):
                if len(linears) != len(activations):
                    raise Unsupported("a hidden layer without activation")
                linears.append(module)
            elif isinstance(module, nn.BatchNorm1d):
                raise Unsupported("bn=True in the attention MLP")
            else:
                activations.append(module)
        if not linears or len(activations) != len(linears):
            raise Unsupported("a hidden layer without activation")
        activation = activation_name(activations)
        if layer.dense.bias is None:
            raise Unsupported("the score layer has no bias")
        scale = 1.0 / math.sqrt(linears[0].in_features // 4)
        self.softmax, self.return_seq_weight, self.exact = bool(layer.softmax_stag), layer.return_seq_weight, exact
        self.mask_mat = layer.mask_mat
        self.pool = shared_pool(linears, ScaledScore(layer.dense, scale), activation, activations,
                                "softmax" if self.softmax else None, "valid", backend)

    def forward(self, queries: Tensor, keys: Tensor, keys_length: Tensor) -> Tensor:
        valid = self.mask_mat.to(keys_length.device).reshape(1, -1) < keys_length.reshape(-1, 1)
        valid = valid.expand(keys.shape[0], -1)
        out, scores = self.pool(queries, keys, mask=valid)
        if self.softmax and self.exact:
            out, scores = peer_padding_rows(out, scores, keys, ~valid.any(dim=1), value=float("nan"))
        return scores.unsqueeze(1) if self.return_seq_weight else out.unsqueeze(1)


def convert(module: nn.Module, backend: Optional[str] = None, exact: bool = True) -> Optional[nn.Module]:
    from recbole.model.layers import Dice, SequenceAttLayer

    if isinstance(module, SequenceAttLayer):
        return RecBoleSequenceAttention(module, backend, exact)
    if isinstance(module, Dice):
        raise Unsupported("RecBole's Dice is sigmoid(s) * s with a constant alpha and no batch statistics")
    return None
