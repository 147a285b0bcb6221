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

The rest of the model is the model's own forward, so it needs no change when the model does:
`score_candidates` runs it once on the user's row, with the attention replaced by a stand-in that
keeps the embedded history. Then it runs again on N rows: the user's row expanded with stride 0,
the candidates' features, and the history cut to one position. This time the stand-in answers
with each candidate's interest in the kept history. The stand-in goes into a view of the model
(`_ModelWithAttention`) rather than into the model, so concurrent calls stay safe.
"""
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from fastdin import reference
from fastdin.functional import check_positions
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


class _ModelWithAttention:
    """The model seen through its attributes with `attention` replaced, for `type(model).forward`.

    The model itself is not changed, so that concurrent calls on it stay safe."""

    def __init__(self, model: nn.Module, attention):
        self.__dict__.update(_model=model, attention=attention)

    def __getattr__(self, name):
        return getattr(self._model, name)


class _CaptureHistory:
    """Stands in for the attention in the user's own one-row forward: keeps the history it is given."""

    history = None

    def __call__(self, query, keys, lengths=None, mask=None, **_):
        lengths = check_positions(lengths, mask, keys.shape[0], keys.shape[1])  # as the attention would
        valid = reference.valid_positions(lengths, mask, keys.shape[0], keys.shape[1], keys.device)
        self.history = keys[0][valid[0]]  # the user's valid behaviours [L, D]
        return query.new_zeros(query.shape)


class _CandidateInterest:
    """Stands in for the attention in the N-row forward: the interest of each candidate in the captured history."""

    def __init__(self, attention: Optional[AttentionPooling], history: Tensor, chunk_rows: int):
        self.attention, self.history, self.chunk_rows = attention, history, chunk_rows

    def __call__(self, query, keys, lengths=None, mask=None, **_):
        num, history = query.shape[0], self.history
        if self.attention is None or history.shape[0] == 0:  # sum pooling, or no behaviour: one interest for all
            return history.sum(0, keepdim=True).expand(num, -1)
        keys = history.unsqueeze(0).expand(num, -1, -1)
        if self.attention.backend_for(keys) == "triton":
            # the kernel reads stride-0 keys in place: no copy of the history
            return self.attention(query, keys)
        # the PyTorch paths would gather N copies of the history: the shared part once, in chunks instead
        return candidate_attention(self.attention, query, history, self.chunk_rows)


def _history_names(model: nn.Module):
    """The batch keys of the behaviour sequences ([B, T] ids)."""
    schema = getattr(model, "schema", None)
    if schema is not None and hasattr(schema, "sequences"):
        return {f.name for f in schema.sequences}
    return {"hist_items", "hist_categories"}


def score_candidates(model: nn.Module, user_batch: Mapping[str, Tensor], candidates: Mapping[str, Tensor],
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """Logits [N] of one user (a batch of one row) for N candidates (candidate feature name -> ids [N]).

    Equal to the model on a batch of N rows holding the user's row N times with the candidates'
    features, in eval mode, without building that batch: the model's own forward runs once on the
    user's row (its history is taken from there), then on N rows whose history is cut to one
    position, with the attention answered from the kept history (`candidate_attention`). Works for
    any model whose forward calls `self.attention(candidate, history, lengths=..., mask=...)` when
    `self.attention` is not None, as `fastdin.DIN` does. See `fastdin.DIN.score_candidates`.
    """
    if model.training:
        raise ValueError("score_candidates is an inference call: put the model in eval mode (model.eval()) first")
    if not candidates:
        raise ValueError("candidates must name at least one candidate feature (e.g. item and category ids [N])")
    for name, ids in candidates.items():
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point():
            shape = list(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"candidate {name} must be a 1-D integer tensor [N] of ids, got {shape}")
    sizes = {name: ids.shape[0] for name, ids in candidates.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the candidate features must have one length N, got {sizes}")
    for name, t in user_batch.items():
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != 1:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"user_batch must hold one user (dim 0 of size 1): user_batch[{name!r}] is {shape}")
    num = next(iter(sizes.values()))
    forward = type(model).forward
    with torch.no_grad():
        capture = _CaptureHistory()
        forward(_ModelWithAttention(model, capture),
                dict(user_batch, **{name: ids[:1] for name, ids in candidates.items()}))
        if num == 0:
            return capture.history.new_zeros(0)
        history_names = _history_names(model)
        rows = {}
        for name, t in user_batch.items():
            if name in history_names or name == "mask":
                t = t[:, :1]  # the attention is answered from the captured history: one position suffices
            elif name == "lengths":
                t = t.clamp(max=1)
            rows[name] = t.expand(num, *t.shape[1:])  # stride 0: no copy of the user's row
        interest = _CandidateInterest(model.attention, capture.history, chunk_rows)
        return forward(_ModelWithAttention(model, interest), dict(rows, **candidates))
