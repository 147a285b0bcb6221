"""DIN (Zhou et al. 2018): embeddings, attention pooling of the history, and the top MLP."""
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from fastdin import functional, reference
from fastdin.layers import MLP, AttentionPooling

POOLINGS = ("attention", "sum")


class DIN(nn.Module):
    """Deep Interest Network for CTR prediction.

    The candidate item and the behaviour history share an item-id and a category-id embedding (id 0
    is padding). Each behaviour is [item emb, category emb] (2 * embed_dim); the history is pooled
    against the candidate by `AttentionPooling` (pooling="attention") or summed (pooling="sum", the
    paper's BaseModel). The top MLP sees [user sparse embs, candidate, pooled interest, dense] and
    gives one logit per row.

    Batch (a dict of tensors): "item" [B], "category" [B], "hist_items" [B, T],
    "hist_categories" [B, T], "lengths" [B]; optional "user_sparse" [B, F] (ids per user field,
    sizes in `user_sparse_sizes`) and "dense" [B, num_dense].
    """

    def __init__(self, num_items: int, num_categories: int, embed_dim: int = 16,
                 user_sparse_sizes: Sequence[int] = (), num_dense: int = 0, pooling: str = "attention",
                 attention_hidden: Sequence[int] = (80, 40), attention_activation: str = "sigmoid",
                 normalization: Optional[str] = None, mlp_hidden: Sequence[int] = (200, 80),
                 mlp_activation: str = "dice", dropout: float = 0.0, sparse_embeddings: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling, self.num_dense = pooling, num_dense
        self.embeddings = nn.ModuleDict({
            "item": nn.Embedding(num_items, embed_dim, padding_idx=0, sparse=sparse_embeddings),
            "category": nn.Embedding(num_categories, embed_dim, padding_idx=0, sparse=sparse_embeddings),
        })
        for field, size in enumerate(user_sparse_sizes):
            self.embeddings[f"user_{field}"] = nn.Embedding(size, embed_dim, padding_idx=0, sparse=sparse_embeddings)
        for table in self.embeddings.values():
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()
        behaviour_dim = 2 * embed_dim
        self.attention = (
            AttentionPooling(behaviour_dim, attention_hidden, attention_activation, normalization, backend=backend)
            if pooling == "attention" else None
        )
        top_in = len(user_sparse_sizes) * embed_dim + 2 * behaviour_dim + num_dense
        self.mlp = MLP(top_in, mlp_hidden, mlp_activation, dropout=dropout, backend=backend)
        self.out = nn.Linear(self.mlp.out_features, 1)

    def embedding_tables(self) -> Dict[str, nn.Embedding]:
        """The embedding tables by name ("item", "category", "user_0", ...)."""
        return dict(self.embeddings.items())

    def batch_ids(self, batch: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The ids each embedding table looks up for this batch (padding included), by table name."""
        ids = {
            "item": torch.cat([batch["item"].reshape(-1), batch["hist_items"].reshape(-1)]),
            "category": torch.cat([batch["category"].reshape(-1), batch["hist_categories"].reshape(-1)]),
        }
        if "user_sparse" in batch:
            for field in range(batch["user_sparse"].shape[1]):
                ids[f"user_{field}"] = batch["user_sparse"][:, field]
        return ids

    def score_candidates(self, user_batch: Mapping[str, Tensor], candidate_items: Tensor,
                         candidate_categories: Tensor) -> Tensor:
        """Logits [N] of one user (user_batch: a batch of one row, no item/category needed) for N
        candidates, in eval mode, without copying the history N times; see `fastdin.serving`."""
        from fastdin.serving import score_candidates

        return score_candidates(self, user_batch, {"item": candidate_items, "category": candidate_categories})

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        for name in ("item", "category", "hist_items", "hist_categories", "lengths"):
            if name not in batch:
                raise ValueError(f"batch is missing {name!r}; DIN needs item, category, hist_items, hist_categories, lengths")
        for name in ("item", "category", "hist_items", "hist_categories", "user_sparse"):
            if name in batch and batch[name].is_floating_point():
                raise TypeError(f"batch[{name!r}] holds ids and must be an integer tensor, got {batch[name].dtype}")
        candidate = torch.cat([self.embeddings["item"](batch["item"]), self.embeddings["category"](batch["category"])], -1)
        history = torch.cat([self.embeddings["item"](batch["hist_items"]),
                             self.embeddings["category"](batch["hist_categories"])], -1)
        lengths = batch["lengths"]
        if self.attention is not None:
            interest = self.attention(candidate, history, lengths=lengths)
        else:
            # the same checks of lengths as attention pooling makes
            lengths = functional.check_positions(lengths, None, history.shape[0], history.shape[1])
            valid = reference.valid_positions(lengths, None, history.shape[0], history.shape[1], history.device)
            interest = (history * valid.unsqueeze(-1)).sum(1)
        parts = []
        if "user_sparse" in batch:
            ids = batch["user_sparse"]
            parts += [self.embeddings[f"user_{f}"](ids[:, f]) for f in range(ids.shape[1])]
        parts += [candidate, interest]
        if self.num_dense:
            parts.append(batch["dense"])
        return self.out(self.mlp(torch.cat(parts, -1))).squeeze(-1)
