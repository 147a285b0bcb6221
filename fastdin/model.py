"""DIN (Zhou et al. 2018): embeddings, attention pooling of the history, and the top MLP."""
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from fastdin import functional, packed, reference
from fastdin.layers import MLP, AttentionPooling, check_hidden_units
from fastdin.ops.backend import checking_values
from fastdin.ops.checks import check_offsets
from fastdin.schema import FeatureSchema, SparseField

POOLINGS = ("attention", "sum")


class DIN(nn.Module):
    """Deep Interest Network for CTR prediction.

    Built from a `fastdin.schema.FeatureSchema` (`DIN(schema=...)` or `DIN.from_schema`), or, as a
    shorthand for the two-field case, `DIN(num_items, num_categories, ...)`: the candidate item and
    the behaviour history share an item-id and a category-id embedding (id 0 is padding).

    Each behaviour is the concatenation of its paired fields' embeddings (shorthand: [item emb,
    category emb]); the history is pooled against the candidate by `AttentionPooling`
    (pooling="attention") or summed (pooling="sum", the paper's BaseModel). The top MLP sees
    [sparse field embs, pooled multi-hot embs, candidate, pooled interest, dense] and gives one logit
    per row.

    Shorthand batch (a dict of tensors): "item" [B], "category" [B], "hist_items" [B, T],
    "hist_categories" [B, T], "lengths" [B]; optional "user_sparse" [B, F] (ids per user field,
    sizes in `user_sparse_sizes`) and "dense" [B, num_dense]. A schema's batch is described in
    `fastdin.schema`. Positions: "lengths" [B], or a bool "mask" [B, T], or neither (then id 0 of the
    first sequence marks padding). padding="left" reads lengths of left-padded histories.

    Ids are checked against each table's size while `fastdin.set_value_checks` is on (the default;
    on CUDA the check costs one synchronisation per batch).
    A jagged history instead: every sequence field flat [N] with "hist_offsets" [B + 1] (int64, user
    b's behaviours at offsets[b]:offsets[b+1]), TorchRec's values + offsets.

    """

    def __init__(self, num_items: Optional[int] = None, num_categories: Optional[int] = None, embed_dim: int = 16,
                 user_sparse_sizes: Sequence[int] = (), num_dense: int = 0, pooling: str = "attention",
                 attention_hidden: Sequence[int] = (80, 40), attention_activation: str = "sigmoid",
                 normalization: Optional[str] = None, mlp_hidden: Sequence[int] = (200, 80),
                 mlp_activation: str = "dice", dropout: float = 0.0, sparse_embeddings: bool = False,
                 backend: Optional[str] = None, schema: Union[FeatureSchema, dict, None] = None,
                 padding: str = "right"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        attention_hidden = check_hidden_units("attention_hidden (the hidden_units of the attention MLP)", attention_hidden)
        mlp_hidden = check_hidden_units("mlp_hidden (the hidden_units of the top MLP)", mlp_hidden)
        if schema is None:
            if num_items is None or num_categories is None:
                raise ValueError("DIN needs either schema=... or num_items and num_categories")
            for name, size in (("num_items", num_items), ("num_categories", num_categories)):
                if isinstance(size, bool) or not isinstance(size, int) or size < 2:
                    raise ValueError(f"{name} must be an integer >= 2 (id 0 is padding), got {size!r}")
            if isinstance(num_dense, bool) or not isinstance(num_dense, int) or num_dense < 0:
                raise ValueError(f"num_dense must be a non-negative integer, got {num_dense!r}")
            for i, size in enumerate(user_sparse_sizes):
                if isinstance(size, bool) or not isinstance(size, int) or size < 2:
                    raise ValueError(f"user_sparse_sizes[{i}] must be an integer >= 2 (id 0 is padding), got {size!r}")
            schema = FeatureSchema.two_field(num_items, num_categories, embed_dim, user_sparse_sizes, num_dense, padding)
        else:
            if num_items is not None or num_categories is not None or user_sparse_sizes or num_dense:
                raise ValueError("pass either schema=... or num_items/num_categories/user_sparse_sizes/num_dense, not both")
            schema = FeatureSchema.from_dict(schema) if isinstance(schema, dict) else schema
            if not isinstance(schema, FeatureSchema):
                raise TypeError(f"schema must be a FeatureSchema or a dict, got {type(schema).__name__}")
        self.schema = schema
        self.pooling, self.num_dense = pooling, sum(f.dim for f in schema.dense)
        # the constructor's arguments, so that a checkpoint rebuilds the model (see `config`)
        self._config = dict(
            schema=schema.to_dict(), pooling=pooling, attention_hidden=attention_hidden,
            attention_activation=attention_activation, normalization=normalization, mlp_hidden=mlp_hidden,
            mlp_activation=mlp_activation, dropout=dropout, sparse_embeddings=sparse_embeddings, backend=backend,
        )
        self.vocabulary = None  # set by `from_checkpoint` where the checkpoint holds one
        self.embeddings = nn.ModuleDict()
        for f in [*schema.candidates, *schema.sparse, *schema.multi_hot]:
            self.embeddings[f.name] = nn.Embedding(f.vocab_size, schema.dim_of(f), padding_idx=0,
                                                   sparse=sparse_embeddings)
        for table in self.embeddings.values():
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()
        behaviour_dim = schema.behaviour_dim
        self.attention = (
            AttentionPooling(behaviour_dim, attention_hidden, attention_activation, normalization, backend=backend)
            if pooling == "attention" else None
        )
        self.mlp = MLP(schema.top_features, mlp_hidden, mlp_activation, dropout=dropout, backend=backend)
        self.out = nn.Linear(self.mlp.out_features, 1)

    # -- building and saving

    @classmethod
    def from_schema(cls, schema: Union[FeatureSchema, dict, str, Path], **kwargs) -> "DIN":
        """DIN for a schema (a FeatureSchema, its dict, or a .json/.yaml file); kwargs as for `DIN`."""
        if isinstance(schema, (str, Path)):
            from fastdin.schema import load_schema

            schema = load_schema(schema)
        return cls(schema=schema, **kwargs)

    def config(self) -> Dict[str, object]:
        """The keyword arguments that rebuild this model: `DIN(**model.config())`."""
        return dict(self._config)

    def checkpoint(self, **extra) -> Dict[str, object]:
        """A dict for `torch.save` that `DIN.from_checkpoint` reads: state dict, config, vocabulary, extras."""
        out = {"state_dict": self.state_dict(), "model_config": self.config()}
        if self.vocabulary is not None:
            out["vocabulary"] = self.vocabulary
        out.update(extra)
        return out

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path, dict], map_location: Union[str, torch.device] = "cpu") -> "DIN":
        """The model saved by `fastdin train --save` or `torch.save(model.checkpoint(), path)`.

        Checkpoints written before schemas existed (model_config with num_items, num_categories)
        load too. The vocabulary, if saved, is on `model.vocabulary` (a dict, see fastdin.data.Vocabulary).
        """
        checkpoint = path if isinstance(path, dict) else torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "model_config" not in checkpoint:
            raise ValueError(f"{path}: not a fastdin checkpoint (expected a dict with state_dict and model_config)")
        model = cls(**checkpoint["model_config"])
        model.load_state_dict(checkpoint["state_dict"])
        model.vocabulary = checkpoint.get("vocabulary")
        return model

    def embedding_tables(self) -> Dict[str, nn.Embedding]:
        """The embedding tables by name ("item", "category", "user_0", ...)."""
        return dict(self.embeddings.items())

    # -- batches

    def _sparse_ids(self, batch: Mapping[str, Tensor]) -> List[Tuple[SparseField, Tensor]]:
        """(field, ids [B]) of each sparse field, from its own key or from packed "user_sparse" [B, F]."""
        fields = self.schema.sparse
        if not fields:
            return []
        if all(f.name in batch for f in fields):
            return [(f, batch[f.name]) for f in fields]
        if "user_sparse" not in batch:
            missing = [f.name for f in fields if f.name not in batch]
            raise ValueError(f"batch is missing the sparse fields {missing}; give each as [B] under its name "
                             f"or all {len(fields)} packed as 'user_sparse' [B, {len(fields)}]")
        packed = batch["user_sparse"]
        if packed.dim() != 2 or packed.shape[1] != len(fields):
            raise ValueError(f"batch['user_sparse'] must have shape [B, {len(fields)}] (one column per declared field "
                             f"{[f.name for f in fields]}), got {list(packed.shape)}")
        return [(f, packed[:, i]) for i, f in enumerate(fields)]

    def batch_ids(self, batch: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The ids each embedding table looks up for this batch (padding included), by table name."""
        ids = {c.name: torch.cat([batch[c.name].reshape(-1), batch[s.name].reshape(-1)]) for s, c in self.schema.pairs()}
        if self.schema.sparse and ("user_sparse" in batch or all(f.name in batch for f in self.schema.sparse)):
            ids.update({f.name: t for f, t in self._sparse_ids(batch)})
        for f in self.schema.multi_hot:
            if f.name in batch:
                ids[f.name] = batch[f.name].reshape(-1)
        return ids

    def _pool_jagged(self, candidate: Tensor, history: Tensor, offsets: Tensor) -> Tensor:
        """Pool a jagged history (rows [N, 2 * embed_dim], user b's at offsets[b]:offsets[b+1])."""
        if self.attention is not None:
            return self.attention(candidate, history, offsets=offsets)
        if check_offsets(offsets, history.shape[0], None, None) != candidate.shape[0]:
            raise ValueError(f"hist_offsets must have B + 1 = {candidate.shape[0] + 1} entries, got {offsets.shape[0]}")
        user = packed.rows_from_offsets(offsets, history.shape[0])
        return history.new_zeros(candidate.shape).index_add_(0, user, history)

    def score_candidates(self, user_batch: Mapping[str, Tensor], candidate_items: Tensor,
                         candidate_categories: Tensor) -> Tensor:
        """Logits [N] of one user (user_batch: a batch of one row, no item/category needed) for N
        candidates, in eval mode, without copying the history N times; see `fastdin.serving`."""
        from fastdin.serving import score_candidates

        return score_candidates(self, user_batch, {"item": candidate_items, "category": candidate_categories})

    def _check_ids(self, name: str, t: Tensor, shape: Sequence[int], what: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"batch[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"batch[{name!r}] holds ids and must be an integer tensor, got {t.dtype}")
        # None in shape: any size there
        if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            expected = "" if None in shape else f" = {list(shape)}"
            raise ValueError(f"batch[{name!r}] must have shape {what}{expected}, got {list(t.shape)}")

    def _check_batch(self, batch: Mapping[str, Tensor]):
        """Shapes, dtypes and (while value checks are on) id ranges of a batch; returns (B, T), with
        T = N, the number of behaviours, for a jagged history."""
        s = self.schema
        pairs = s.pairs()
        for seq, cand in pairs:
            for name in (cand.name, seq.name):
                if name not in batch:
                    raise ValueError(f"batch is missing {name!r}; DIN needs "
                                     f"{[n for q, c in pairs for n in (c.name, q.name)]} and lengths, mask or padding id 0")
        first_cand, first_seq = pairs[0][1].name, pairs[0][0].name
        lead = batch[first_cand]
        self._check_ids(first_cand, lead, (None,), "[B]")
        b = lead.shape[0]
        hist = batch[first_seq]
        jagged = "hist_offsets" in batch  # flat [N] histories; t is then N
        if jagged:
            self._check_ids(first_seq, hist, (None,), "[N] (flat, with hist_offsets)")
        else:
            self._check_ids(first_seq, hist, (b, None), f"[B, T] with B = {b} (or flat [N] with hist_offsets)")
        t = hist.shape[-1]
        seq_shape, seq_what = ((t,), f"[N] like {first_seq!r}") if jagged else ((b, t), f"[B, T] like {first_seq!r}")
        checked = []  # (name, ids, vocab size) for the range check
        for seq, cand in pairs:
            self._check_ids(cand.name, batch[cand.name], (b,), "[B]")
            self._check_ids(seq.name, batch[seq.name], seq_shape, seq_what)
            checked += [(cand.name, batch[cand.name], cand.vocab_size), (seq.name, batch[seq.name], cand.vocab_size)]
        sparse = self._sparse_ids(batch)
        for f, ids in sparse:
            self._check_ids(f.name if f.name in batch else "user_sparse", ids, (b,), "[B]")
            checked.append((f.name, ids, f.vocab_size))
        for f in s.multi_hot:
            if f.name not in batch:
                raise ValueError(f"batch is missing the multi-hot field {f.name!r} [B, K]")
            ids = batch[f.name]
            self._check_ids(f.name, ids, (b, None), f"[B, K] with B = {b}")
            checked.append((f.name, ids, f.vocab_size))
        for f in s.dense:
            if f.name not in batch:
                raise ValueError(f"batch is missing the dense field {f.name!r} [B, {f.dim}] (the model declares "
                                 f"{f.dim} dense feature{'s' if f.dim > 1 else ''})")
            x = batch[f.name]
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"batch[{f.name!r}] must be a floating-point tensor [B, {f.dim}], "
                                f"got {getattr(x, 'dtype', type(x).__name__)}")
            if tuple(x.shape) != (b, f.dim) and not (f.dim == 1 and tuple(x.shape) == (b,)):
                raise ValueError(f"batch[{f.name!r}] must have shape [B, {f.dim}] = [{b}, {f.dim}], got {list(x.shape)}")
        if checked and checking_values(lead):
            self._check_id_ranges(checked)
        return b, t

    @staticmethod
    def _check_id_ranges(checked) -> None:
        # one synchronisation for all fields: stack every field's min and max, then read them once
        nonempty = [(n, ids, size) for n, ids, size in checked if ids.numel()]
        if not nonempty:
            return
        bounds = torch.stack([torch.stack(torch.aminmax(ids)) for _, ids, _ in nonempty]).tolist()
        for (name, _, size), (low, high) in zip(nonempty, bounds):
            if low < 0 or high >= size:
                raise ValueError(f"batch[{name!r}] ids must lie in [0, {size}) (the table's vocab_size is {size}, "
                                 f"0 = padding), got values in [{low}, {high}]")

    def _positions(self, batch: Mapping[str, Tensor], b: int, t: int):
        """(lengths [B] or None, mask [B, T] or None) of the history, from lengths, mask or padding id 0."""
        lengths, mask = batch.get("lengths"), batch.get("mask")
        if lengths is None and mask is None:
            return None, batch[self.schema.sequences[0].name] != 0
        lengths = functional.check_positions(lengths, mask, b, t)
        if lengths is None:
            return None, mask
        if self.schema.padding == "left":
            return None, torch.arange(t, device=lengths.device) >= (t - lengths).unsqueeze(1)
        if 0 < t and checking_values(lengths):
            self._refuse_left_padded(batch[self.schema.sequences[0].name], lengths)
        return lengths, None

    def _refuse_left_padded(self, hist: Tensor, lengths: Tensor) -> None:
        # a left-padded row read as right-padded has padding (id 0) at position 0 and real ids at the end
        t = hist.shape[1]
        looks_left = (lengths > 0) & (lengths < t) & (hist[:, 0] == 0) & (hist[:, -1] != 0)
        if looks_left.any().item():
            row = int(looks_left.nonzero()[0, 0])
            name = self.schema.sequences[0].name
            raise ValueError(
                f"batch[{name!r}] row {row} looks left-padded: lengths[{row}] = {int(lengths[row])} but position 0 "
                f"holds padding id 0 and position {t - 1} a real id. Build DIN with padding='left' for histories "
                f"padded on the left (Keras pad_sequences' default), or pad them on the right")

    # -- the model

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        jagged = "hist_offsets" in batch
        b, t = self._check_batch(batch)
        pairs = self.schema.pairs()
        candidate = torch.cat([self.embeddings[c.name](batch[c.name]) for _, c in pairs], -1)
        history = torch.cat([self.embeddings[c.name](batch[s.name]) for s, c in pairs], -1)
        if jagged:
            interest = self._pool_jagged(candidate, history, batch["hist_offsets"])
        elif self.attention is not None:
            lengths, mask = self._positions(batch, b, t)
            interest = self.attention(candidate, history, lengths=lengths, mask=mask)
        else:
            lengths, mask = self._positions(batch, b, t)
            valid = reference.valid_positions(lengths, mask, b, t, history.device)
            interest = (history * valid.unsqueeze(-1)).sum(1)
        parts = [self.embeddings[f.name](ids) for f, ids in self._sparse_ids(batch)]
        parts += [self._pool_multi_hot(f.name, f.pooling, batch[f.name]) for f in self.schema.multi_hot]
        parts += [candidate, interest]
        parts += [batch[f.name].reshape(b, f.dim).to(candidate.dtype) for f in self.schema.dense]
        return self.out(self.mlp(torch.cat(parts, -1))).squeeze(-1)

    def _pool_multi_hot(self, name: str, pooling: str, ids: Tensor) -> Tensor:
        summed = self.embeddings[name](ids).sum(1)  # padding rows are zero and stay zero
        if pooling == "sum":
            return summed
        count = (ids != 0).sum(1, keepdim=True).clamp_min(1).to(summed.dtype)
        return summed / count
