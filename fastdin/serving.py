"""One user x many candidates: score a single user's history against N candidate items.

At serving time one user's history (T behaviours) is scored against hundreds or thousands of
candidates. The naive way repeats the history N times and runs the model on N rows: N*T*D copied
keys, and in the reference an N*T*4D concat [q, k, q-k, q*k], before the first layer.

Here nothing of the history is copied (see docs/design.md, "Folding the first layer"):
x_t W1 = q (Wq + Wd) + k_t (Wk - Wd) + (q * k_t) Wp + b1, so
- k_t (Wk - Wd) [T, H1] depends on the history only: computed once for all candidates;
- q (Wq + Wd) + b1 [N, H1] depends on the candidate only;
- (q * k_t) Wp = q (diag(k_t) Wp): one GEMM [N, D] x [D, T*H1] against the per-position matrices
  diag(k_t) Wp, without building the [N, T, D] product.
This is the same sum as the reference's first layer, reassociated (exact up to rounding: about 1e-7
relative in fp32). The deeper layers, the activations (eval mode) and the pooling run on the
[N, T, H] rows as the reference does. Only the user's valid positions (its length) are scored.
Candidates go in chunks of at most `chunk_rows` (candidate, position) rows, so that peak memory
stays bounded as N grows instead of growing with N*T.

On CUDA (and with backend "triton") the attention layer runs instead on the history expanded to N
rows with stride 0 (`Tensor.expand`, no copy): the fused kernel reads the keys in place.
"""
from typing import Mapping

import torch
from torch import Tensor, nn

from fastdin.layers import AttentionPooling

DEFAULT_CHUNK_ROWS = 1 << 16  # (candidate, position) rows per chunk: 16 MB per fp32 hidden layer of width 64


def _first_layer_fold(linear: nn.Linear, dim: int):
    """(Wq + Wd, Wk - Wd, Wp), each [D, H1], from the first layer's [H1, 4D] weight."""
    wq, wk, wd, wp = linear.weight.t().split(dim, 0)
    return wq + wd, wk - wd, wp


def candidate_attention(attention: AttentionPooling, queries: Tensor, history: Tensor,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """The attention pooling of one history [T, D] (valid positions only) for each query [N, D] -> [N, D].

    Equal to `attention(queries, history.expand(N, T, D))` in eval mode.
    """
    if attention.training:
        raise ValueError("candidate_attention is an inference call: put the layer in eval mode (.eval()) first")
    num, dim = queries.shape
    seq_len = history.shape[0]
    if seq_len == 0 or num == 0:  # no valid behaviour: zero interest, as the layer gives
        return queries.new_zeros(num, dim)
    linears = list(attention.mlp.linears)
    first = linears[0]
    w_query, w_key, w_prod = _first_layer_fold(first, dim)
    hidden = first.out_features
    shared = history @ w_key  # [T, H1]: the same for every candidate
    per_candidate = torch.addmm(first.bias, queries, w_query)  # [N, H1]
    # diag(k_t) Wp for every position, laid out [D, T*H1] for one GEMM per chunk
    prod_weights = (history.t().unsqueeze(-1) * w_prod.unsqueeze(1)).reshape(dim, seq_len * hidden)
    out = queries.new_empty(num, dim)
    step = max(1, chunk_rows // seq_len)
    for start in range(0, num, step):
        q = queries[start:start + step]
        pre = (q @ prod_weights).view(-1, seq_len, hidden)
        pre += shared
        pre += per_candidate[start:start + step, None]
        # 2-D rows [rows, H]: nn.PReLU takes dim 1 as the feature dim, Dice the last dim
        h = attention.mlp.activations[0](pre.view(-1, hidden))
        for linear, act in zip(linears[1:], list(attention.mlp.activations)[1:]):
            h = act(linear(h))
        scores = attention.score(h).view(-1, seq_len)
        if attention.normalization == "softmax":
            scores = torch.softmax(scores, dim=-1)
        torch.mm(scores, history, out=out[start:start + step])
    return out


def _user_history(model: nn.Module, user_batch: Mapping[str, Tensor]) -> Tensor:
    """The user's valid behaviours [L, 2E] (item and category embeddings)."""
    for name in ("hist_items", "hist_categories", "lengths"):
        if name not in user_batch:
            raise ValueError(f"user_batch is missing {name!r}; it needs hist_items [1, T], hist_categories [1, T], lengths [1]")
    items, categories, lengths = user_batch["hist_items"], user_batch["hist_categories"], user_batch["lengths"]
    if items.dim() != 2 or items.shape[0] != 1 or categories.shape != items.shape:
        raise ValueError(f"user_batch's hist_items and hist_categories must both be [1, T] (one user), "
                         f"got {list(items.shape)} and {list(categories.shape)}")
    if lengths.numel() != 1 or lengths.is_floating_point():
        raise ValueError(f"user_batch['lengths'] must hold one integer (the user's history length), got {list(lengths.shape)} {lengths.dtype}")
    length = int(lengths.reshape(()).item())
    if not 0 <= length <= items.shape[1]:
        raise ValueError(f"user_batch['lengths'] must lie in [0, T] = [0, {items.shape[1]}], got {length}")
    return torch.cat([model.embeddings["item"](items[0, :length]), model.embeddings["category"](categories[0, :length])], -1)


def score_candidates(model: nn.Module, user_batch: Mapping[str, Tensor], candidate_items: Tensor,
                     candidate_categories: Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """Logits [N] of one user (a batch of one row, without item/category) for N candidates.

    Equal to the model on a batch of N rows holding the user's row N times with the candidates as
    "item"/"category", in eval mode, without building that batch. See `fastdin.DIN.score_candidates`.
    """
    if model.training:
        raise ValueError("score_candidates is an inference call: put the model in eval mode (model.eval()) first")
    for name, ids in (("candidate_items", candidate_items), ("candidate_categories", candidate_categories)):
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point():
            shape = list(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be a 1-D integer tensor [N] of ids, got {shape}")
    if candidate_items.shape != candidate_categories.shape:
        raise ValueError(f"candidate_items and candidate_categories must have one length N, got "
                         f"{candidate_items.shape[0]} and {candidate_categories.shape[0]}")
    num = candidate_items.shape[0]
    with torch.no_grad():
        candidates = torch.cat([model.embeddings["item"](candidate_items),
                                model.embeddings["category"](candidate_categories)], -1)
        history = _user_history(model, user_batch)
        attention = model.attention
        if attention is None or history.shape[0] == 0:  # sum pooling, or no behaviour: one interest for all
            interest = history.sum(0, keepdim=True).expand(num, -1)
        elif history.is_cuda or attention.backend == "triton":
            # the kernel reads stride-0 keys in place: no copy of the history
            keys = history.unsqueeze(0).expand(num, -1, -1)
            interest = attention(candidates, keys)
        else:
            interest = candidate_attention(attention, candidates, history, chunk_rows)
        parts = []
        if "user_sparse" in user_batch:
            ids = user_batch["user_sparse"].reshape(1, -1)
            parts += [model.embeddings[f"user_{f}"](ids[:, f]).expand(num, -1) for f in range(ids.shape[1])]
        parts += [candidates, interest]
        if model.num_dense:
            parts.append(user_batch["dense"].reshape(1, -1).expand(num, -1))
        return model.out(model.mlp(torch.cat(parts, -1))).squeeze(-1)
