"""DIN.score_candidates: one user's history against N candidates equals the model on N repeated rows."""
import copy

import pytest
import torch

from fastdin import DIN


def make_model(activation="dice", normalization=None, pooling="attention", user_features=True, **kwargs) -> DIN:
    model = DIN(num_items=97, num_categories=13, embed_dim=5, user_sparse_sizes=(7,) if user_features else (),
                num_dense=2 if user_features else 0, pooling=pooling, attention_hidden=(11, 6),
                attention_activation=activation, normalization=normalization, mlp_hidden=(9,), **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var"):  # eval-mode Dice away from the initial (0, 1) statistics
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(-0.5, 0.5)
    return model.eval()


def user_and_candidates(model: DIN, seq_len: int, length: int, num: int, user_features=True):
    user = {"hist_items": torch.randint(1, 97, (1, seq_len)), "hist_categories": torch.randint(1, 13, (1, seq_len)),
            "lengths": torch.tensor([length])}
    user["hist_items"][0, length:] = 0
    user["hist_categories"][0, length:] = 0
    if user_features:
        user["user_sparse"] = torch.randint(1, 7, (1, 1))
        user["dense"] = torch.rand(1, 2)
    return user, torch.randint(1, 97, (num,)), torch.randint(1, 13, (num,))


def repeated_batch(user, items, categories, dtype=torch.float64):
    """The naive way: the user's row copied once per candidate (float inputs in the model's dtype)."""
    num = items.shape[0]
    batch = {name: t.expand(num, *t.shape[1:]).to(dtype if t.is_floating_point() else t.dtype).contiguous()
             for name, t in user.items()}
    return dict(batch, item=items, category=categories)


def reference64(model: DIN) -> DIN:
    """A float64 copy of the model on the reference backend."""
    model = copy.deepcopy(model).double()
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "reference"
    return model


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("activation, normalization", [("sigmoid", None), ("relu", "softmax"), ("prelu", None),
                                                       ("dice", "softmax"), ("dice", None)])
@pytest.mark.parametrize("seq_len, length", [(17, 17), (17, 9), (1, 1)])
def test_matches_the_model_on_repeated_rows(activation, normalization, seq_len, length):
    model = make_model(activation, normalization)
    user, items, categories = user_and_candidates(model, seq_len, length, num=23)
    want = reference64(model)(repeated_batch(user, items, categories))  # the float64 reference
    got = model.score_candidates(user, items, categories)
    assert got.shape == (23,) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5
    got64 = copy.deepcopy(model).double().score_candidates(dict(user, dense=user["dense"].double()), items, categories)
    assert rel_err(got64, want) < 1e-12


def test_chunks_an_empty_history_and_sum_pooling():
    model = make_model("sigmoid", "softmax", user_features=False)
    user, items, categories = user_and_candidates(model, 6, 6, num=10, user_features=False)
    whole = model.score_candidates(user, items, categories)
    from fastdin.serving import score_candidates

    torch.testing.assert_close(score_candidates(model, user, {"item": items, "category": categories}, chunk_rows=13), whole)  # 2 per chunk
    empty, _, _ = user_and_candidates(model, 6, 0, num=10, user_features=False)
    want = model(repeated_batch(empty, items, categories, torch.float32))
    torch.testing.assert_close(model.score_candidates(empty, items, categories), want)
    summed = make_model(pooling="sum")
    user, items, categories = user_and_candidates(summed, 8, 5, num=4)
    want = reference64(summed)(repeated_batch(user, items, categories))
    assert rel_err(summed.score_candidates(user, items, categories), want) < 1e-5


def test_stride0_keys_through_the_kernel_path():
    """backend "triton" (the CPU interpreter here, CUDA on a GPU): the history expanded with stride 0."""
    pytest.importorskip("triton")
    model = make_model("prelu", None, backend="triton")
    user, items, categories = user_and_candidates(model, 5, 4, num=3)
    want = reference64(model)(repeated_batch(user, items, categories))
    assert rel_err(model.score_candidates(user, items, categories), want) < 1e-5


@pytest.mark.parametrize("chosen", ["triton", "torch", "reference"])
def test_the_shared_history_path_follows_the_backend_a_call_runs(chosen, monkeypatch):
    """Only where the kernels run is the history handed to the layer expanded with stride 0: the
    PyTorch paths (on the CPU, or fp32 on CUDA with TF32 off) would gather N copies of it, so there
    the shared part is computed once (candidate_attention)."""
    from fastdin import AttentionPooling, serving

    model = make_model("prelu", None)
    user, items, categories = user_and_candidates(model, 5, 4, num=3)
    shared = []
    monkeypatch.setattr(AttentionPooling, "backend_for", lambda self, keys, backend=None: chosen)
    monkeypatch.setattr(serving, "candidate_attention", lambda attention, q, *args: shared.append(1) or torch.zeros_like(q))
    monkeypatch.setattr(AttentionPooling, "forward", lambda self, q, *args, **kwargs: torch.zeros_like(q))
    model.score_candidates(user, items, categories)
    assert shared == ([] if chosen == "triton" else [1])


def test_bad_input_names_the_argument():
    model = make_model()
    user, items, categories = user_and_candidates(model, 5, 4, num=3)
    with pytest.raises(ValueError, match="candidate item must be a 1-D integer tensor"):
        model.score_candidates(user, items.float(), categories)
    with pytest.raises(ValueError, match="must have one length N"):
        model.score_candidates(user, items, categories[:2])
    with pytest.raises(ValueError, match=r"one user \(dim 0 of size 1\): user_batch\['hist_items'\] is \[2, 5\]"):
        model.score_candidates(dict(user, hist_items=user["hist_items"].repeat(2, 1)), items, categories)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 5\]"):
        model.score_candidates(dict(user, lengths=torch.tensor([6])), items, categories)
    with pytest.raises(ValueError, match="missing 'hist_categories'"):
        model.score_candidates({"hist_items": user["hist_items"], "lengths": user["lengths"]}, items, categories)
    with pytest.raises(ValueError, match="eval mode"):
        model.train().score_candidates(user, items, categories)
