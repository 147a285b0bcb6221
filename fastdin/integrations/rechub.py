"""torch-rechub 0.9.0: DIN's ActivationUnit.

From torch-rechub's source: the attention MLP is Linear -> BatchNorm1d -> activation -> Dropout per
hidden layer, then Linear to 1, on all B*T rows; there is no length mask at all (padding is scored
and pooled), and use_softmax is a plain softmax over T. fastdin's attention MLP has no BatchNorm.
In eval the BatchNorm is a fixed affine map, folded into its Linear on every call
(W * g / sqrt(var + eps), (b - mean) * g / sqrt(var + eps) + beta: the same parameters, the same
gradients), so inference runs on fastdin. In training the BatchNorm needs the batch statistics of
the pre-activations, which fastdin's kernels do not take: training runs torch-rechub's own code.
torch-rechub's Dice (a per-row normalisation over the features, with one alpha) is not fastdin's
Dice: an ActivationUnit with it (the default activation) is left alone, as are its softmax and
leakyrelu activations. exact=False changes nothing here: the unit gets no lengths to mask with.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from fastdin.integrations._common import Patched, Unsupported, activation_name, shared_pool


class FoldedLinear(nn.Module):
    """Linear followed by an eval-mode BatchNorm1d, as one affine map read in place from both."""

    def __init__(self, linear: nn.Linear, bn: nn.BatchNorm1d):
        super().__init__()
        self.linear, self.bn = linear, bn
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _scale(self) -> Tensor:
        scale = torch.rsqrt(self.bn.running_var + self.bn.eps)
        return scale * self.bn.weight if self.bn.affine else scale

    @property
    def weight(self) -> Tensor:
        return self.linear.weight * self._scale().unsqueeze(1)

    @property
    def bias(self) -> Tensor:
        bias = (self.linear.bias - self.bn.running_mean) * self._scale()
        return bias + self.bn.bias if self.bn.affine else bias


class RecHubActivationUnit(Patched):
    """ActivationUnit on fastdin in eval (its own code in training): forward(history [B, T, E],
    target [B, E]) -> [B, E]."""

    def __init__(self, unit, backend: Optional[str] = None, exact: bool = True):
        super().__init__(unit)
        layers = list(unit.attention.mlp)
        if not layers or not isinstance(layers[-1], nn.Linear) or layers[-1].out_features != 1:
            raise Unsupported("the attention MLP does not end in a Linear to one score")
        hidden = layers[:-1]
        if len(hidden) % 4 or not hidden:
            raise Unsupported("the attention MLP is not Linear -> BatchNorm1d -> activation -> Dropout per layer")
        folded, activations = [], []
        for i in range(0, len(hidden), 4):
            linear, bn, act, dropout = hidden[i:i + 4]
            if not (isinstance(linear, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and isinstance(dropout, nn.Dropout)):
                raise Unsupported("the attention MLP is not Linear -> BatchNorm1d -> activation -> Dropout per layer")
            if not bn.track_running_stats:
                raise Unsupported("a BatchNorm1d without running statistics")
            folded.append(FoldedLinear(linear, bn))
            activations.append(act)
        activation = activation_name(activations)
        self.pool = shared_pool(folded, layers[-1], activation, activations,
                                "softmax" if unit.use_softmax else None, "valid", backend)

    def forward(self, history: Tensor, target: Tensor) -> Tensor:
        if self.training:
            original = self.__dict__["_fastdin_original"]
            original.train(True)
            return original(history, target)
        return self.pool(target, history)[0]


def convert(module: nn.Module, backend: Optional[str] = None, exact: bool = True) -> Optional[nn.Module]:
    from torch_rechub.basic.activation import Dice
    from torch_rechub.models.ranking.din import ActivationUnit

    if isinstance(module, ActivationUnit):
        return RecHubActivationUnit(module, backend, exact)
    if isinstance(module, Dice):
        raise Unsupported("torch-rechub's Dice normalises each row over its features, not over the batch")
    return None
