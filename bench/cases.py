"""The benchmark cases, their inputs, and one step function per implementation.

Implementations:
- "fastdin": the modules with backend="auto" (the Triton kernels on CUDA where they cover the case,
  else the packed-rows PyTorch path "torch" for attention and the reference for Dice;
  `Workload.backend` says which ran);
- "eager": the same modules with backend="reference", the exact PyTorch reference;
- "compile": `torch.compile` of the eager modules;
- "deepctr": DeepCTR-Torch's `AttentionSequencePoolingLayer` loaded with the same weights
  (attention cases only, when `deepctr_torch` imports).
Every implementation of a case starts from a copy of one model, so all see the same weights.
"""
import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdin import DIN, AttentionPooling, Dice, functional
from fastdin.bench import counts
from fastdin.bench.measure import DTYPES

IMPLS = ("fastdin", "eager", "compile", "deepctr")
MODES = ("inference", "training")


@dataclass(frozen=True)
class Case:
    """kind "attention": B users (candidates), T history, D dims; "dice": B rows of `dim`
    features; "din": a DIN step with B rows, T behaviours and embed_dim `dim` (behaviours 2*dim)."""

    key: str
    kind: str
    batch: int
    seq_len: int
    dim: int
    hidden: Tuple[int, ...] = (80, 40)
    activation: str = "sigmoid"
    shared_history: bool = False  # one user's history [1, T, D] expanded (stride 0) to all B candidates
    sweep: bool = False  # a point of the time-versus-T series

    @property
    def shape(self) -> str:
        if self.kind == "dice":
            return f"{self.batch}x{self.dim}"
        hidden = "/".join(map(str, self.hidden))
        who = f"1 user x {self.batch} cand" if self.shared_history else f"{self.batch}"
        return f"{who}x{self.seq_len}x{self.dim} {hidden} {self.activation}"


def _attention(key, b, t, d, hidden=(80, 40), act="sigmoid", **kw) -> Case:
    return Case(key, "attention", b, t, d, tuple(hidden), act, **kw)


# The design notes' shapes, and the sweep over T for the plot.
FULL_CASES = [
    _attention("attention-sigmoid", 2048, 100, 32),
    _attention("attention-dice", 2048, 100, 32, act="dice"),
    _attention("attention-prelu", 1024, 200, 64, (256, 128, 64), "prelu"),
    _attention("attention-long", 256, 1000, 64),
    _attention("attention-one-user", 4096, 500, 64, shared_history=True),
    Case("dice-large", "dice", 204800, 0, 80),
    Case("dice-small", "dice", 4096, 0, 200),
    Case("din-step", "din", 2048, 100, 16, (80, 40), "sigmoid"),
] + [_attention(f"sweep-T{t}", 1024, t, 32, sweep=True) for t in (50, 100, 200, 500, 1000)]

# The same cases at small shapes, for CI's smoke run and `pytest bench/` on a CPU.
QUICK_CASES = [
    _attention("attention-sigmoid", 64, 20, 8),
    _attention("attention-dice", 64, 20, 8, act="dice"),
    _attention("attention-prelu", 32, 24, 16, (256, 128, 64), "prelu"),
    _attention("attention-long", 8, 100, 16),
    _attention("attention-one-user", 128, 50, 16, shared_history=True),
    Case("dice-large", "dice", 4096, 0, 80),
    Case("dice-small", "dice", 256, 0, 200),
    Case("din-step", "din", 64, 20, 8, (80, 40), "sigmoid"),
] + [_attention(f"sweep-T{t}", 16, t, 8, sweep=True) for t in (10, 20, 40)]


def select_cases(quick: bool, keys: Optional[Sequence[str]] = None, sweep: bool = True) -> List[Case]:
    cases = QUICK_CASES if quick else FULL_CASES
    if keys:
        unknown = set(keys) - {c.key for c in cases}
        if unknown:
            raise ValueError(f"unknown case(s) {sorted(unknown)}; choose from {[c.key for c in cases]}")
        return [c for c in cases if c.key in keys]
    return [c for c in cases if sweep or not c.sweep]


def deepctr_available() -> bool:
    try:
        import deepctr_torch.layers  # noqa: F401
    except ImportError:
        return False
    return True


class DeepCTRAttention(nn.Module):
    """DeepCTR-Torch's AttentionSequencePoolingLayer with the weights of a fastdin AttentionPooling,
    called like it: forward(query [B, D], keys [B, T, D], lengths [B]) -> [B, D].

    DeepCTR's Dice is BatchNorm-affine and takes its statistics over all B*T positions; its affine
    weight is set to 1 and bias to 0 so that only the statistics' positions differ from fastdin's.
    """

    def __init__(self, pool: AttentionPooling):
        super().__init__()
        from deepctr_torch.layers import AttentionSequencePoolingLayer

        from fastdin.integrations.deepctr_torch import DeepCTRAttentionPooling

        hidden = [m.out_features for m in pool.mlp.linears]
        self.layer = AttentionSequencePoolingLayer(
            att_hidden_units=hidden, att_activation=pool.mlp.activation,
            weight_normalization=pool.normalization == "softmax", embedding_dim=pool.embed_dim,
        )
        # the adapter's view shares the layer's modules: loading fastdin's weights into it fills the layer
        loaded = DeepCTRAttentionPooling(self.layer).pool.load_state_dict(pool.state_dict(), strict=False)
        assert not loaded.unexpected_keys, loaded.unexpected_keys  # only a non-affine Dice's bn weight/bias stay 1/0
        for theirs in self.layer.local_att.dnn.activation_layers:
            if hasattr(theirs, "bn"):
                theirs.bn.momentum = pool.mlp.activations[0].momentum
        self.layer.to(pool.score.weight.device)

    def forward(self, query: Tensor, keys: Tensor, lengths: Tensor) -> Tensor:
        return self.layer(query.unsqueeze(1), keys, lengths.reshape(-1, 1)).squeeze(1)


def with_backend(module: nn.Module, backend: str) -> nn.Module:
    """A copy of module whose fastdin layers all use `backend`."""
    module = copy.deepcopy(module)
    for sub in module.modules():
        if hasattr(sub, "backend"):
            sub.backend = backend
    return module


class Workload:
    """One case at one dtype on one device: inputs and a model built once from a fixed seed."""

    def __init__(self, case: Case, dtype: str, device: torch.device, seed: int = 0):
        self.case, self.dtype_name, self.device = case, dtype, device
        self.dtype = DTYPES[dtype]
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        getattr(self, f"_build_{case.kind}")(generator)
        self.model.to(device)
        for module in self.model.modules():  # Dice's alpha starts at 0; random values exercise the blend
            if isinstance(module, Dice):
                with torch.no_grad():
                    module.alpha.uniform_(-0.5, 0.5)

    def _rand(self, generator, *shape, dtype=None) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype or self.dtype).to(self.device)

    def _build_attention(self, g) -> None:
        c = self.case
        if c.shared_history:
            self.keys_leaf = self._rand(g, 1, c.seq_len, c.dim)
            self.lengths = torch.full((c.batch,), c.seq_len, device=self.device)
        else:
            self.keys_leaf = self._rand(g, c.batch, c.seq_len, c.dim)
            self.lengths = torch.randint(1, c.seq_len + 1, (c.batch,), generator=g).to(self.device)
        self.query = self._rand(g, c.batch, c.dim)
        self.model = AttentionPooling(c.dim, c.hidden, c.activation, backend="auto")

    def _build_dice(self, g) -> None:
        self.x = self._rand(g, self.case.batch, self.case.dim)
        self.model = Dice(self.case.dim, backend="auto")

    def _build_din(self, g) -> None:
        c = self.case
        num_items, num_categories = 100_000, 1_000
        lengths = torch.randint(1, c.seq_len + 1, (c.batch,), generator=g)
        valid = torch.arange(c.seq_len) < lengths.unsqueeze(1)
        self.batch = {
            "item": torch.randint(1, num_items, (c.batch,), generator=g),
            "category": torch.randint(1, num_categories, (c.batch,), generator=g),
            "hist_items": torch.randint(1, num_items, (c.batch, c.seq_len), generator=g) * valid,
            "hist_categories": torch.randint(1, num_categories, (c.batch, c.seq_len), generator=g) * valid,
            "lengths": lengths,
        }
        self.batch = {k: v.to(self.device) for k, v in self.batch.items()}
        self.labels = torch.randint(0, 2, (c.batch,), generator=g).float().to(self.device)
        self.lengths = self.batch["lengths"]
        self.model = DIN(num_items, num_categories, embed_dim=c.dim, attention_hidden=c.hidden,
                         attention_activation=c.activation, mlp_hidden=(200, 80), mlp_activation="dice",
                         backend="auto")

    # -- what ran, and how much work it is

    def backend(self, mode: str) -> str:
        """The backend fastdin's dispatch picks for this case on this device ("triton", "torch" or "reference")."""
        c, training = self.case, mode == "training"
        if c.kind == "dice":
            return functional.choose_backend("auto", self.device, functional.dice_kernel_gap(self.x, training), "dice")
        if c.kind == "attention":
            pool, keys = self.model, self.keys()
        else:
            pool = self.model.attention
            keys = torch.empty(c.batch, c.seq_len, 2 * c.dim, device=self.device, dtype=self.dtype)
        attention = pool.backend_for(keys, "auto")
        if c.kind == "attention":
            return attention
        rows = torch.empty(c.batch, self.model.mlp.linears[0].out_features, device=self.device, dtype=self.dtype)
        dice = functional.choose_backend("auto", self.device, functional.dice_kernel_gap(rows, training), "dice")
        return attention if attention == dice else f"attention:{attention} dice:{dice}"

    def flops(self, mode: str) -> int:
        c, training = self.case, mode == "training"
        if c.kind == "dice":
            return counts.dice_flops(c.batch * c.dim, training)
        positions = int(self.lengths.sum())
        if c.kind == "attention":
            return counts.attention_flops(c.batch, positions, c.dim, c.hidden, training)
        top = self.model.mlp.linears
        return counts.din_flops(c.batch, positions, c.dim, c.hidden, top[0].in_features,
                                [m.out_features for m in top], training)

    def bytes(self, mode: str) -> int:
        c, training = self.case, mode == "training"
        itemsize = self.dtype.itemsize
        if c.kind == "dice":
            return counts.dice_bytes(c.batch, c.dim, itemsize, training)
        positions = int(self.lengths.sum())
        if c.kind == "attention":
            act_params = sum(p.numel() for a in self.model.mlp.activations for p in a.parameters())
            # a shared history is read once and its gradient is [1, T, D]; else the gradient is all of [B, T, D]
            read_rows, grad_rows = (c.seq_len, c.seq_len) if c.shared_history else (positions, c.batch * c.seq_len)
            return counts.attention_bytes(c.batch, c.seq_len, c.dim, c.hidden, read_rows, grad_rows, itemsize,
                                          training, act_params)
        tables = sum(t.weight.numel() for t in self.model.embedding_tables().values())
        dense = sum(p.numel() for p in self.model.parameters()) - tables
        return counts.din_bytes(c.batch, c.seq_len, positions, c.dim, dense, training)

    # -- implementations

    def keys(self) -> Tensor:
        c = self.case
        return self.keys_leaf.expand(c.batch, c.seq_len, c.dim) if c.shared_history else self.keys_leaf

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def implementation(self, impl: str, max_autotune: bool = False) -> nn.Module:
        """A fresh copy of the model for `impl`."""
        if impl == "fastdin":
            return with_backend(self.model, "auto")
        eager = with_backend(self.model, "reference")
        if impl == "eager":
            return eager
        if impl == "compile":
            torch._dynamo.reset()  # each case compiles afresh instead of piling up recompiles
            return torch.compile(eager, mode="max-autotune" if max_autotune else None)
        if impl == "deepctr":
            if self.case.kind != "attention":
                raise ValueError("deepctr covers only the attention cases")
            return DeepCTRAttention(eager)
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def applies(self, impl: str) -> bool:
        """Whether impl has a version of this case at all (DeepCTR-Torch only of the attention unit)."""
        return impl != "deepctr" or self.case.kind == "attention"

    def forward(self, module: nn.Module) -> Tensor:
        with self.autocast():
            if self.case.kind == "attention":
                return module(self.query, self.keys(), lengths=self.lengths)
            if self.case.kind == "dice":
                return module(self.x)
            return module(self.batch)

    def step(self, module: nn.Module, mode: str) -> Callable[[], object]:
        """A zero-argument function doing one inference or training step of module."""
        if mode == "inference":
            module.eval()

            def infer():
                with torch.no_grad():
                    return self.forward(module)

            return infer
        if mode != "training":
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        module.train()
        if self.case.kind == "din":
            optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

            def train_din():
                optimizer.zero_grad(set_to_none=True)
                loss = F.binary_cross_entropy_with_logits(self.forward(module).float(), self.labels)
                loss.backward()
                optimizer.step()
                return loss

            return train_din
        inputs = [self.x] if self.case.kind == "dice" else [self.query, self.keys_leaf]
        targets = [t.requires_grad_() for t in inputs] + [p for p in module.parameters() if p.requires_grad]
        grad_out = torch.randn_like(self.forward(module))  # random, never ones or zeros

        def train():
            return torch.autograd.grad(self.forward(module), targets, grad_out, allow_unused=True)

        return train

    def reference_output(self, module: nn.Module) -> Tensor:
        """The inference output of module, to compare implementations (call before any training step,
        which moves Dice's running statistics)."""
        module.eval()
        with torch.no_grad():
            return self.forward(module).float()
