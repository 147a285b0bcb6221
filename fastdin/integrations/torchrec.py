"""TorchRec: DIN whose embedding tables are a TorchRec `EmbeddingCollection` on `KeyedJaggedTensor` input.

When the tables outgrow one device, TorchRec shards them (`DistributedModelParallel`: table-wise,
row-wise, ...), and its `EmbeddingCollection` hands back each feature's embeddings as a
`JaggedTensor`: values [N, E] with offsets [B + 1]. `TorchRecDIN` feeds the history's jagged
embeddings to fastdin's attention pooling (`jagged_attention`) and the rest of DIN as
`fastdin.DIN` does, so that a sharded model trains with the fastdin layers.

Features (keys of the KeyedJaggedTensor): "item" and "category" (the candidate, one id per row),
"hist_items" and "hist_categories" (the history, any length per row, the same lengths for both).
The candidate and the history share the "item" and the "category" tables, as in `fastdin.DIN`.
`batch_to_features` turns a fastdin batch dict (padded) into that KeyedJaggedTensor.

Needs torchrec (tested with torchrec 1.9.2 and fbgemm-gpu-cpu 1.8.0 on torch 2.13.0 CPU).
"""
import inspect
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from fastdin.jagged import jagged_to_padded
from fastdin.layers import MLP, AttentionPooling

CANDIDATE_FEATURES = ("item", "category")
HISTORY_FEATURES = ("hist_items", "hist_categories")


def jagged_attention(attention: AttentionPooling, query: Tensor, values: Tensor, offsets: Tensor) -> Tensor:
    """Attention pooling of jagged history embeddings: query [B, D], values [N, D], offsets [B + 1] -> [B, D].

    THE ONE PLACE TO SWAP: where `AttentionPooling.forward` takes jagged keys (`offsets=`), the
    packed rows go straight in, with no padding; until then they are padded here first
    (`fastdin.jagged.jagged_to_padded`), which gives the same result.
    """
    if "offsets" in inspect.signature(AttentionPooling.forward).parameters:
        return attention(query, values, offsets=offsets)
    keys, lengths = jagged_to_padded(values, offsets)
    return attention(query, keys, lengths=lengths)


class TorchRecDIN(nn.Module):
    """DIN (see `fastdin.DIN`) over a TorchRec `EmbeddingCollection`; forward(KeyedJaggedTensor) -> logits [B].

    The attention unit, the top MLP and the output layer have `fastdin.DIN`'s names and shapes, so
    `load_din(din)` takes a trained DIN's weights.
    """

    def __init__(self, num_items: int, num_categories: int, embed_dim: int = 16,
                 attention_hidden: Sequence[int] = (80, 40), attention_activation: str = "sigmoid",
                 normalization: Optional[str] = None, mlp_hidden: Sequence[int] = (200, 80),
                 mlp_activation: str = "dice", device: Optional[torch.device] = None):
        super().__init__()
        self.embeddings = EmbeddingCollection(tables=[
            EmbeddingConfig(name="item", embedding_dim=embed_dim, num_embeddings=num_items,
                            feature_names=["item", "hist_items"]),
            EmbeddingConfig(name="category", embedding_dim=embed_dim, num_embeddings=num_categories,
                            feature_names=["category", "hist_categories"]),
        ], device=device)
        behaviour_dim = 2 * embed_dim
        self.attention = AttentionPooling(behaviour_dim, attention_hidden, attention_activation, normalization)
        self.mlp = MLP(2 * behaviour_dim, mlp_hidden, mlp_activation)
        self.out = nn.Linear(self.mlp.out_features, 1)
        if device is not None and torch.device(device).type != "meta":
            self.attention.to(device), self.mlp.to(device), self.out.to(device)

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        embedded = self.embeddings(features)
        candidate = torch.cat([embedded[name].values() for name in CANDIDATE_FEATURES], -1)
        history = torch.cat([embedded[name].values() for name in HISTORY_FEATURES], -1)
        interest = jagged_attention(self.attention, candidate, history, embedded["hist_items"].offsets())
        return self.out(self.mlp(torch.cat([candidate, interest], -1))).squeeze(-1)

    @torch.no_grad()
    def load_din(self, din: nn.Module) -> "TorchRecDIN":
        """Take the weights of a `fastdin.DIN` (pooling="attention", without user features or dense inputs)."""
        if getattr(din, "attention", None) is None or getattr(din, "num_dense", 0) or len(din.embeddings) != 2:
            raise ValueError("load_din takes a DIN with attention pooling and only the item and category tables")
        for name in ("item", "category"):
            self.embeddings.embeddings[name].weight.copy_(din.embeddings[name].weight)
        for name in ("attention", "mlp", "out"):
            getattr(self, name).load_state_dict(getattr(din, name).state_dict())
        return self


def batch_to_features(batch: Mapping[str, Tensor]) -> KeyedJaggedTensor:
    """A fastdin batch dict (padded histories with "lengths") as the KeyedJaggedTensor `TorchRecDIN` takes."""
    for name in CANDIDATE_FEATURES + HISTORY_FEATURES + ("lengths",):
        if name not in batch:
            raise ValueError(f"batch is missing {name!r}; it needs item, category, hist_items, hist_categories, lengths")
    lengths = batch["lengths"].reshape(-1).to(torch.int64)
    seq_len = batch["hist_items"].shape[1]
    valid = torch.arange(seq_len, device=lengths.device) < lengths[:, None]
    ones = torch.ones_like(lengths)
    values = [batch["item"].reshape(-1), batch["category"].reshape(-1),
              batch["hist_items"][valid], batch["hist_categories"][valid]]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(CANDIDATE_FEATURES + HISTORY_FEATURES), values=torch.cat(values).to(torch.int64),
        lengths=torch.cat([ones, ones, lengths, lengths]),
    )
