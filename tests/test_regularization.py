"""Mini-batch aware regularization: the paper's update, frequencies, dense/sparse, the Triton kernel."""
import copy
from collections import Counter

import pytest
import torch
from torch import nn

from conftest import DEVICES, TEST_SEED

from fastdin import DIN
from fastdin.functional import HAS_TRITON
from fastdin.regularization import FullL2Regularizer, MBARegularizer, count_frequencies

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
KERNEL_DEVICE = DEVICES[0]  # CUDA, or the CPU under Triton's interpreter


def device_for(backend: str) -> str:
    return KERNEL_DEVICE if backend == "triton" else "cpu"


class OneTable:
    """A minimal model for the hook: one table "t", a batch is a tensor of its ids."""

    def __init__(self, table):
        self.table = table

    def embedding_tables(self):
        return {"t": self.table}

    def batch_ids(self, batch):
        return {"t": batch}


# ---------------------------------------------------------------------------------------------
# the paper's update, by hand


@pytest.mark.parametrize("sparse, backend", [
    (False, "reference"), (True, "reference"), pytest.param(False, "triton", marks=needs_triton),
])
def test_two_sgd_steps_match_the_paper_by_hand(sparse, backend):
    # loss = mean_b c·w_{id_b}, so ∂loss/∂w_j = (occurrences of j in the batch / |B|) · c.
    # All numbers are dyadic, so the expected values below are exact.
    device = device_for(backend)
    table = nn.Embedding(4, 2, padding_idx=0, sparse=sparse).to(device)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.5], [4.0, -4.0]]))
    c = torch.tensor([1.0, -2.0], device=device)
    counts = {"t": torch.tensor([7, 2, 1, 4])}  # n_0 is ignored: id 0 is padding
    model = OneTable(table)
    reg = MBARegularizer(model.embedding_tables(), counts, lam=0.5, backend=backend)
    opt = torch.optim.SGD(table.parameters(), lr=0.5)
    for batch in (torch.tensor([1, 1, 3, 0], device=device), torch.tensor([2, 3, 3, 2], device=device)):
        opt.zero_grad()
        (table(batch) @ c).mean().backward()
        reg(model, batch)
        opt.step()
    # step 1, ids {1, 3}: grad_1 = (2/4)c + (0.5/2)w_1 = [0.75, -0.5]  -> w_1 = [0.625, 2.25]
    #                     grad_3 = (1/4)c + (0.5/4)w_3 = [0.75, -1.0]  -> w_3 = [3.625, -3.5]
    # step 2, ids {2, 3}: grad_2 = (2/4)c + (0.5/1)w_2 = [0, -0.75]     -> w_2 = [-1, 0.875]
    #                     grad_3 = (2/4)c + (0.5/4)w_3 = [0.953125, -1.4375] -> w_3 = [3.1484375, -2.78125]
    expected = torch.tensor([[0.0, 0.0], [0.625, 2.25], [-1.0, 0.875], [3.1484375, -2.78125]])
    assert torch.equal(table.weight.detach().cpu(), expected)


# ---------------------------------------------------------------------------------------------
# which rows get the term


def _random_setup(sparse=False, rows=13, dim=5, dtype=torch.float32):
    table = nn.Embedding(rows, dim, sparse=sparse).to(dtype)  # padding row 0 deliberately non-zero
    counts = torch.randint(0, 6, (rows,))
    counts[3] = 0  # an id never counted: treated as n = 1
    return table, counts


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_only_distinct_batch_rows_change_once_and_padding_never(backend):
    table, counts = _random_setup()
    table.to(device_for(backend))
    grad = torch.randn_like(table.weight)
    table.weight.grad = grad.clone()
    ids = torch.tensor([[5, 3, 5, 0, 0], [7, 5, 0, 3, 12]], device=table.weight.device)
    lam = 0.7
    MBARegularizer({"t": table}, {"t": counts}, lam, backend=backend).regularize({"t": ids})
    expected = grad.clone()
    w = table.weight.detach()
    for j in (3, 5, 7, 12):  # each distinct id once, whatever its multiplicity
        expected[j] += lam * w[j] / max(counts[j].item(), 1)
    torch.testing.assert_close(table.weight.grad, expected, rtol=1e-6, atol=1e-7)
    absent = [j for j in range(13) if j not in (3, 5, 7, 12)]  # includes padding row 0
    assert torch.equal(table.weight.grad[absent], grad[absent])


def test_sparse_term_touches_only_batch_rows_and_none_grad_is_filled():
    table, counts = _random_setup(sparse=True)
    reg = MBARegularizer({"t": table}, {"t": counts}, 0.25)
    ids = torch.tensor([4, 4, 0, 9])
    reg.regularize({"t": ids})  # .grad was None
    grad = table.weight.grad
    assert grad.is_sparse
    grad = grad.coalesce()
    assert grad.indices().flatten().tolist() == [4, 9]
    w = table.weight.detach()
    torch.testing.assert_close(grad.values(), torch.stack([0.25 * w[j] / max(counts[j].item(), 1) for j in (4, 9)]))
    dense_table = nn.Embedding(13, 5)
    MBARegularizer({"t": dense_table}, {"t": counts}, 0.25).regularize({"t": ids})
    assert not dense_table.weight.grad.is_sparse
    assert dense_table.weight.grad[[0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12]].abs().max() == 0


def test_tables_not_regularized_are_skipped():
    table, counts = _random_setup()
    other = nn.Embedding(3, 5)
    reg = MBARegularizer({"t": table}, {"t": counts}, 1.0)
    reg.regularize({"t": torch.tensor([1]), "other": torch.tensor([2])})
    assert other.weight.grad is None and table.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# frequencies


def test_count_frequencies_of_a_hand_made_stream():
    model = OneTable(nn.Embedding(6, 2))
    stream = [torch.tensor([1, 1, 0, 4]), torch.tensor([[4, 0], [5, 1]]), torch.tensor([], dtype=torch.long)]
    counts = count_frequencies(stream, model)
    assert counts["t"].dtype == torch.int64
    assert counts["t"].tolist() == [0, 3, 0, 0, 2, 1]  # padding 0 is not counted
    assert count_frequencies(stream, model, padding_idx=None)["t"].tolist() == [2, 3, 0, 0, 2, 1]
    with pytest.raises(ValueError, match=r"ids of table 't' must lie in \[0, 6\)"):
        count_frequencies([torch.tensor([6])], model)
    with pytest.raises(TypeError, match="integer tensor"):
        count_frequencies([torch.tensor([1.0])], model)


def _din_batches(num_batches=3, batch=5, seq_len=4, items=17, categories=7, user_sizes=(5,)):
    out = []
    for _ in range(num_batches):
        lengths = torch.randint(0, seq_len + 1, (batch,))
        valid = torch.arange(seq_len) < lengths[:, None]
        out.append({
            "item": torch.randint(1, items, (batch,)),
            "category": torch.randint(1, categories, (batch,)),
            "hist_items": torch.randint(1, items, (batch, seq_len)) * valid,  # 0 pads past the length
            "hist_categories": torch.randint(1, categories, (batch, seq_len)) * valid,
            "lengths": lengths,
            "user_sparse": torch.randint(1, user_sizes[0], (batch, 1)),
        })
    return out


def test_count_frequencies_of_din_batches():
    model = DIN(17, 7, embed_dim=4, user_sparse_sizes=(5,), attention_hidden=(6,), mlp_hidden=(8,))
    batches = _din_batches()
    counts = count_frequencies(batches, model)
    assert set(counts) == {"item", "category", "user_0"}
    keys = {"item": ("item", "hist_items"), "category": ("category", "hist_categories"), "user_0": ("user_sparse",)}
    for name, fields in keys.items():
        expected = Counter(i for b in batches for f in fields for i in b[f].flatten().tolist() if i != 0)
        assert counts[name].tolist() == [expected.get(j, 0) for j in range(counts[name].numel())]
    reg = MBARegularizer.from_batches(model, batches, lam=0.1)
    assert all(torch.equal(reg.frequencies()[n], counts[n]) for n in counts)


def test_counts_round_trip_through_a_state_dict():
    table, counts = _random_setup()
    reg = MBARegularizer({"t": table}, {"t": counts}, 0.1)
    saved = copy.deepcopy(reg.state_dict())
    assert list(saved) == ["counts.t"]
    fresh = MBARegularizer({"t": table}, {"t": torch.zeros(13, dtype=torch.long)}, 0.1)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.frequencies()["t"], counts)
    rebuilt = MBARegularizer({"t": table}, reg.frequencies(), 0.1)
    assert torch.equal(rebuilt.frequencies()["t"], counts)


def test_counts_attached_to_a_model_join_its_checkpoint():
    model = DIN(17, 7, embed_dim=4, user_sparse_sizes=(5,), attention_hidden=(6,), mlp_hidden=(8,))
    batches = _din_batches()
    model.mba = MBARegularizer.from_batches(model, batches, lam=0.1)
    state = model.state_dict()
    assert torch.equal(state["mba.counts.item"], count_frequencies(batches, model)["item"])
    assert "mba.tables" not in str(list(state))  # the tables are not saved twice
    fresh = DIN(17, 7, embed_dim=4, user_sparse_sizes=(5,), attention_hidden=(6,), mlp_hidden=(8,))
    fresh.mba = MBARegularizer(fresh.embedding_tables(), {n: torch.zeros_like(c) for n, c in
                                                          model.mba.frequencies().items()}, lam=0.1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mba.frequencies()["category"], model.mba.frequencies()["category"])


# ---------------------------------------------------------------------------------------------
# dense and sparse embeddings, optimizers


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_sparse_and_dense_din_reach_the_same_parameters(optimizer):
    batches = _din_batches(num_batches=3)
    models = []
    for sparse in (False, True):
        torch.manual_seed(TEST_SEED + 1)
        models.append(DIN(17, 7, embed_dim=4, user_sparse_sizes=(5,), attention_hidden=(6,), mlp_hidden=(8,),
                          mlp_activation="relu", sparse_embeddings=sparse).double())
    initial = models[0].embeddings["item"].weight.detach().clone()
    for model in models:
        reg = MBARegularizer.from_batches(model, batches, lam=0.3)
        opt = (torch.optim.SGD(model.parameters(), lr=0.5) if optimizer == "sgd"
               else torch.optim.Adagrad(model.parameters(), lr=0.1))
        for batch in batches:
            opt.zero_grad()
            logits = model(batch)
            target = (batch["item"] % 2).double()
            nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
            reg(model, batch)
            opt.step()
    dense, sparse = (dict(m.named_parameters()) for m in models)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.equal(dense["embeddings.item.weight"], initial)  # the steps did something


def test_sparse_adam_moves_only_batch_rows():
    table = nn.Embedding(20, 3, padding_idx=0, sparse=True)
    before = table.weight.detach().clone()
    reg = MBARegularizer({"t": table}, {"t": torch.ones(20, dtype=torch.long)}, 0.5)
    opt = torch.optim.SparseAdam(table.parameters(), lr=0.1)
    model = OneTable(table)
    for batch in (torch.tensor([2, 0, 5]), torch.tensor([5, 7])):
        opt.zero_grad()
        table(batch).sum().backward()
        reg(model, batch)
        opt.step()
    changed = (table.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [2, 5, 7]


def test_with_adam_the_term_changes_only_batch_rows():
    results = []
    for lam in (0.0, 2.0):
        torch.manual_seed(TEST_SEED + 3)
        table = nn.Embedding(10, 4, padding_idx=0)
        opt = torch.optim.Adam(table.parameters(), lr=0.1)
        model = OneTable(table)
        batch = torch.tensor([1, 4, 4, 0])
        (table(batch) ** 3).mean().backward()
        MBARegularizer({"t": table}, {"t": torch.arange(10)}, lam)(model, batch)
        opt.step()
        results.append(table.weight.detach().clone())
    changed = (results[0] != results[1]).any(1).nonzero().flatten().tolist()
    assert changed == [1, 4]


def test_full_l2_adds_lambda_w_everywhere():
    for sparse in (False, True):
        table = nn.Embedding(6, 3, sparse=sparse)
        model = OneTable(table)
        FullL2Regularizer({"t": table}, 0.2)(model, None)  # grad None
        torch.testing.assert_close(table.weight.grad, 0.2 * table.weight.detach())
        table.weight.grad = None
        table(torch.tensor([1, 1])).sum().backward()
        FullL2Regularizer({"t": table}, 0.2)(model, torch.tensor([1, 1]))
        expected = 0.2 * table.weight.detach()
        expected[1] += 2
        assert not table.weight.grad.is_sparse
        torch.testing.assert_close(table.weight.grad, expected)


# ---------------------------------------------------------------------------------------------
# the Triton kernel against torch's index ops


@needs_triton
@pytest.mark.parametrize("dtype, dim, num_ids, tol", [
    (torch.float32, 130, 53, 1e-6),  # dim > one column block (128), ids over several programs
    (torch.float32, 1, 7, 1e-6),
    (torch.float16, 37, 29, 1e-3),
])
def test_triton_kernel_matches_torch_index_ops(dtype, dim, num_ids, tol):
    rows = 41
    table = nn.Embedding(rows, dim).to(KERNEL_DEVICE, dtype)
    counts = torch.randint(0, 9, (rows,))
    ids = torch.randint(0, rows, (num_ids,))
    ids[:3] = 0
    ids[3:num_ids // 2] = 5  # a run of one id longer than a program's block of sorted ids
    ids = ids.to(KERNEL_DEVICE)
    grad = torch.randn(rows, dim).to(KERNEL_DEVICE, dtype)
    results = []
    for backend in ("reference", "triton"):
        table.weight.grad = grad.clone()
        MBARegularizer({"t": table}, {"t": counts}, 1.3, backend=backend).regularize({"t": ids})
        results.append(table.weight.grad.float())
    torch.testing.assert_close(results[1], results[0], rtol=tol, atol=tol)
    assert not torch.equal(results[0], grad.float())  # the term was added


@needs_triton
def test_triton_kernel_with_strided_grad_and_no_padding():
    table = nn.Embedding(9, 6).to(KERNEL_DEVICE)
    counts = torch.arange(9)
    ids = torch.tensor([0, 8, 8, 2], device=KERNEL_DEVICE)
    base = torch.randn(6, 9, device=KERNEL_DEVICE)
    results = []
    for backend in ("reference", "triton"):
        table.weight.grad = base.clone().t()  # column-major
        MBARegularizer({"t": table}, {"t": counts}, 0.9, padding_idx=None, backend=backend).regularize({"t": ids})
        results.append(table.weight.grad.clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0][0], base.t()[0])  # id 0 is regularized without padding


@needs_triton
def test_triton_backend_refuses_sparse_gradients():
    table = nn.Embedding(5, 2, sparse=True).to(KERNEL_DEVICE)
    reg = MBARegularizer({"t": table}, {"t": torch.ones(5, dtype=torch.long)}, 0.1, backend="triton")
    with pytest.raises(NotImplementedError, match="sparse gradients"):
        reg.regularize({"t": torch.tensor([1], device=KERNEL_DEVICE)})


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors():
    table = nn.Embedding(5, 2)
    good = {"t": torch.ones(5, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"no entry for the tables \['t'\]"):
        MBARegularizer({"t": table}, {}, 0.1)
    with pytest.raises(ValueError, match="unknown tables"):
        MBARegularizer({"t": table}, {**good, "u": torch.ones(5, dtype=torch.long)}, 0.1)
    with pytest.raises(ValueError, match=r"must have shape \[num_embeddings\] = \[5\], got \[4\]"):
        MBARegularizer({"t": table}, {"t": torch.ones(4, dtype=torch.long)}, 0.1)
    with pytest.raises(TypeError, match="integer occurrence counts"):
        MBARegularizer({"t": table}, {"t": torch.ones(5)}, 0.1)
    with pytest.raises(ValueError, match="must be >= 0"):
        MBARegularizer({"t": table}, {"t": -torch.ones(5, dtype=torch.long)}, 0.1)
    for lam in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            MBARegularizer({"t": table}, good, lam)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        FullL2Regularizer({"t": table}, -1.0)
    with pytest.raises(TypeError, match="lam must be a real number"):
        MBARegularizer({"t": table}, good, "0.1")
    with pytest.raises(TypeError, match=r"tables\['t'\] must be an nn.Embedding"):
        MBARegularizer({"t": nn.Linear(2, 2)}, good, 0.1)
    with pytest.raises(ValueError, match="padding_idx must be an id >= 0 or None"):
        MBARegularizer({"t": table}, good, 0.1, padding_idx=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        MBARegularizer({"t": table}, good, 0.1, backend="cuda")
    with pytest.raises(TypeError, match="ids of table 't' must be an integer tensor"):
        MBARegularizer({"t": table}, good, 0.1).regularize({"t": torch.tensor([1.0])})
