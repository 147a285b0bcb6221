"""Modules: Dice, MLP and AttentionPooling (DIN's local activation unit).

They hold plain `nn.Linear` / `nn.PReLU` parameters in the order DeepCTR-Torch, FuxiCTR and the
paper's code use, so their weights load unchanged, and call `fastdin.functional` for the math.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastdin import functional
from fastdin.reference import ACTIVATIONS, DiceParams


class Dice(nn.Module):
    """Dice activation (Zhou et al. 2018) over the last dim of [N, H] or [B, T, H].

    Training uses batch statistics over the rows where `mask` is true (all rows without a mask) and
    updates running statistics as `nn.BatchNorm1d` does; eval uses the running statistics.
    `affine=True` adds BatchNorm's weight and bias inside the sigmoid, as DeepCTR-Torch's Dice does;
    DeepCTR-Torch's state dict (`alpha`, `bn.*`) loads directly.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, affine: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features, self.eps, self.momentum, self.affine, self.backend = num_features, eps, momentum, affine, backend
        self.alpha = nn.Parameter(torch.zeros(num_features))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def params(self) -> DiceParams:
        return DiceParams(self.alpha, self.running_mean, self.running_var, self.weight, self.bias,
                          self.training, self.momentum, self.eps)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[-1] != self.num_features):
            raise ValueError(f"Dice({self.num_features}) takes x of shape [N, {self.num_features}] or "
                             f"[B, T, {self.num_features}], got {list(x.shape)}")
        if self.training:
            self.num_batches_tracked.add_(1)
        return functional.dice(
            x, self.alpha, self.running_mean, self.running_var, weight=self.weight, bias=self.bias,
            training=self.training, momentum=self.momentum, eps=self.eps, mask=mask, backend=self.backend,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # DeepCTR-Torch keeps the statistics in a BatchNorm1d called `bn` and alpha as [H] or [H, 1]
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if prefix + "bn." + name in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + "bn." + name)
        if prefix + "alpha" in state_dict:
            state_dict[prefix + "alpha"] = state_dict[prefix + "alpha"].reshape(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


def check_hidden_units(name: str, hidden_units) -> tuple:
    """hidden_units as a tuple of positive ints, or a ValueError/TypeError naming `name`."""
    if isinstance(hidden_units, (int, str)) or not hasattr(hidden_units, "__iter__"):
        raise TypeError(f"{name} must be a sequence of layer sizes such as (80, 40), got {hidden_units!r}")
    sizes = tuple(hidden_units)
    if not sizes:
        raise ValueError(f"{name} must name at least one layer size, got ()")
    for h in sizes:
        is_int = isinstance(h, int) or (hasattr(h, "__index__") and not isinstance(h, float))
        if isinstance(h, bool) or not is_int or int(h) < 1:
            raise ValueError(f"{name} must hold positive integer sizes, got {sizes}")
    return tuple(int(h) for h in sizes)


def make_activation(activation: str, features: int, backend: Optional[str] = None, dice_affine: bool = False) -> nn.Module:
    if activation == "sigmoid":
        return nn.Sigmoid()
    if activation == "relu":
        return nn.ReLU()
    if activation == "prelu":
        return nn.PReLU()  # one shared slope, as DeepCTR-Torch and FuxiCTR use
    if activation == "dice":
        return Dice(features, affine=dice_affine, backend=backend)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class MLP(nn.Module):
    """Linear → activation (→ dropout) per hidden size. Dice layers take the optional row mask."""

    def __init__(self, in_features: int, hidden_units: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, backend: Optional[str] = None, dice_affine: bool = False):
        super().__init__()
        hidden_units = check_hidden_units("hidden_units", hidden_units)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        sizes = (in_features,) + hidden_units
        self.activation = activation
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activations = nn.ModuleList(make_activation(activation, h, backend, dice_affine) for h in hidden_units)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def out_features(self) -> int:
        return self.linears[-1].out_features

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        for linear, act in zip(self.linears, self.activations):
            x = linear(x)
            x = act(x, mask) if isinstance(act, Dice) else act(x)
            x = self.dropout(x)
        return x


class AttentionPooling(nn.Module):
    """DIN's local activation unit: score each history item against the candidate, then sum.

    For each position t the MLP sees [q, k_t, q - k_t, q * k_t] and gives a score; positions past
    `lengths` (or where `mask` is false) are left out; the output is Σ_t w_t k_t with w the scores
    (normalization=None, as in the paper) or their softmax over the valid positions.

    forward(query [B, D] or [B, 1, D], keys [B, T, D], lengths [B] or [B, 1] or mask [B, T]) returns
    the pooled interest with the query's rank, and the weights [B, T] when return_scores=True.
    Jagged input: forward(query, keys [N, D], offsets=offsets [B + 1] int64), user b's history at
    rows offsets[b]:offsets[b+1]; the weights then come back packed, [N].

    backend None reads FASTDIN_BACKEND (default "auto": the fused Triton kernel on CUDA where it
    covers the case, else "torch", the packed-rows PyTorch path of `fastdin.packed`; "reference"
    runs the plain ground truth). The kernel covers float32/float16/bfloat16
    (and CUDA autocast), D <= 256, 1 to 4 hidden layers of width <= 512, sigmoid, relu, prelu and
    Dice, in eval mode (running statistics) and in training mode (batch statistics, with the exact
    gradient through them, and the running statistics updated on the device);
    `functional.attention_kernel_gap` names the reason for any uncovered case. float32 on CUDA with
    TF32 off is covered, but "auto" runs the torch path there (`functional.attention_slow_kernel`).
    In training,
    dice_stats="valid" takes Dice's statistics over the valid positions only; "all" over all B*T
    positions, as DeepCTR-Torch does.
    """

    def __init__(self, embed_dim: int, hidden_units: Sequence[int] = (80, 40), activation: str = "sigmoid",
                 normalization: Optional[str] = None, return_scores: bool = False, dice_stats: str = "valid",
                 backend: Optional[str] = None, dice_affine: bool = False):
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        if normalization not in functional.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {functional.NORMALIZATIONS}, got {normalization!r}")
        if dice_stats not in functional.DICE_STATS:
            raise ValueError(f"dice_stats must be one of {functional.DICE_STATS}, got {dice_stats!r}")
        self.embed_dim, self.normalization, self.return_scores = embed_dim, normalization, return_scores
        self.dice_stats, self.backend = dice_stats, backend
        self.mlp = MLP(4 * embed_dim, hidden_units, activation, backend=backend, dice_affine=dice_affine)
        self.score = nn.Linear(self.mlp.out_features, 1)

    def _act_params(self):
        activation = self.mlp.activation
        if activation == "prelu":
            return [a.weight for a in self.mlp.activations]
        if activation == "dice":
            return [a.params() for a in self.mlp.activations]
        return None

    def forward(self, query: Tensor, keys: Tensor, lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                offsets: Optional[Tensor] = None):
        act_params = self._act_params()
        if self.mlp.activation == "dice" and self.training:
            for a in self.mlp.activations:
                a.num_batches_tracked.add_(1)
        linears = list(self.mlp.linears) + [self.score]
        return functional.attention_pool(
            query, keys, [m.weight for m in linears], [m.bias for m in linears], activation=self.mlp.activation,
            act_params=act_params, lengths=lengths, mask=mask, normalization=self.normalization,
            return_scores=self.return_scores, dice_stats=self.dice_stats, backend=self.backend, offsets=offsets,
        )

    def backend_for(self, keys: Tensor, backend: Optional[str] = None) -> str:
        """The backend a forward with padded keys like these runs: "triton", "torch" or "reference"
        (`functional.choose_backend`, with the kernel gap and the fp32 rule of `attention_pool`), for
        the layer's backend or the one given."""
        weights = [m.weight for m in list(self.mlp.linears) + [self.score]]
        gap = functional.attention_kernel_gap(keys, weights, self.mlp.activation, self._act_params())
        return functional.choose_backend(backend or self.backend, keys.device, gap, "attention_pool",
                                         has_torch_path=True, slow_kernel=functional.attention_slow_kernel(keys))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, normalization={self.normalization}, dice_stats={self.dice_stats!r}"
