"""Each peer's DIN, built through the peer's own API, with a batch of inputs: for bench_patch.py and
the tests/test_patch_*.py tests. Every batch has lengths 0, 1 and T (then repeats 3)."""
import os

import numpy as np
import torch
from torch import nn


def lengths_0_1_t(batch: int, seq_len: int) -> np.ndarray:
    return np.resize(np.array([0, 1, seq_len, 3]), batch)


# DeepCTR-Torch ---------------------------------------------------------------------------------


def deepctr_din(batch=8, seq_len=6, dim=4, att_activation="Dice", weight_normalization=False, att_hidden=(8, 4),
                dnn_hidden=(8,), items=9, seed=0, **kwargs):
    """DeepCTR-Torch's DIN on its example's features (examples/run_din.py); returns (model, x dict, y)."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN

    rng = np.random.default_rng(seed)
    cates = max(items // 2, 3)
    columns = [SparseFeat("user", 5, embedding_dim=dim), SparseFeat("item_id", items, embedding_dim=dim),
               SparseFeat("cate_id", cates, embedding_dim=dim - 1), DenseFeat("pay_score", 1),
               VarLenSparseFeat(SparseFeat("hist_item_id", items, embedding_dim=dim, embedding_name="item_id"),
                                seq_len, length_name="seq_length"),
               VarLenSparseFeat(SparseFeat("hist_cate_id", cates, embedding_dim=dim - 1, embedding_name="cate_id"),
                                seq_len, length_name="seq_length")]
    lengths = lengths_0_1_t(batch, seq_len)
    valid = np.arange(seq_len)[None, :] < lengths[:, None]
    x = {"user": rng.integers(1, 5, batch), "item_id": rng.integers(1, items, batch),
         "cate_id": rng.integers(1, cates, batch), "pay_score": rng.random(batch),
         "hist_item_id": rng.integers(1, items, (batch, seq_len)) * valid,
         "hist_cate_id": rng.integers(1, cates, (batch, seq_len)) * valid, "seq_length": lengths}
    y = rng.integers(0, 2, batch).astype(np.float64)
    model = DIN(columns, ["item_id", "cate_id"], att_activation=att_activation, att_hidden_size=att_hidden,
                dnn_hidden_units=dnn_hidden, att_weight_normalization=weight_normalization, init_std=0.5, **kwargs)
    return model, x, y


def deepctr_input(model, x) -> torch.Tensor:
    """The input tensor DeepCTR-Torch's fit / predict build from the feature dict."""
    rows = len(x["user"])
    return torch.from_numpy(np.concatenate([np.asarray(x[name]).reshape(rows, -1) for name in model.feature_index], -1))


# FuxiCTR ---------------------------------------------------------------------------------------


class FuxiDIN(nn.Module):
    """FuxiCTR's DIN model class ships in its GitHub model_zoo, not on PyPI: this is that model's shape
    from the package's parts, DIN_Attention over the history and an MLP_Block with Dice."""

    def __init__(self, dim=5, items=11, attention_activation="Dice", use_softmax=False, attention_units=(8, 4),
                 dnn_units=(8,)):
        super().__init__()
        from fuxictr.pytorch.layers import MLP_Block
        from fuxictr.pytorch.layers.attentions import DIN_Attention

        self.items = items
        self.embedding = nn.Embedding(items, dim, padding_idx=0)
        self.attention = DIN_Attention(dim, attention_units=list(attention_units), hidden_activations=attention_activation,
                                       use_softmax=use_softmax)
        self.dnn = MLP_Block(2 * dim, hidden_units=list(dnn_units), hidden_activations="Dice", output_dim=1)

    def forward(self, target, history):
        target_emb, history_emb = self.embedding(target), self.embedding(history)
        pooled = self.attention(target_emb, history_emb, mask=(history != 0).float())
        return torch.sigmoid(self.dnn(torch.cat([target_emb, pooled], dim=-1))).squeeze(-1)


def fuxictr_batch(batch=8, seq_len=6, items=11, seed=0):
    """(target ids [B], history ids [B, T] with 0 as padding, labels [B] float64)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.from_numpy(lengths_0_1_t(batch, seq_len))
    history = torch.randint(1, items, (batch, seq_len), generator=g) * (torch.arange(seq_len) < lengths[:, None])
    return torch.randint(1, items, (batch,), generator=g), history, torch.randint(0, 2, (batch,), generator=g).double()


# torch-rechub ----------------------------------------------------------------------------------


def rechub_din(dim=4, items=11, activation="prelu", use_softmax=False, attention_dims=(8, 4), mlp_dims=(8,)):
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.ranking import DIN

    features = [SparseFeature("user", 7, embed_dim=dim)]
    target = [SparseFeature("target_item", items, embed_dim=dim)]
    history = [SequenceFeature("hist_item", items, embed_dim=dim, pooling="concat", shared_with="target_item")]
    return DIN(features, history, target, mlp_params={"dims": list(mlp_dims)},
               attention_mlp_params={"dims": list(attention_dims), "activation": activation, "use_softmax": use_softmax})


def rechub_batch(batch=8, seq_len=6, items=11, seed=0):
    """(x dict, labels): torch-rechub has no mask, so the padding (id 0) is scored and pooled."""
    target, history, labels = fuxictr_batch(batch, seq_len, items, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return {"user": torch.randint(0, 7, (batch,), generator=g), "target_item": target, "hist_item": history}, labels


# RecBole ---------------------------------------------------------------------------------------


def recbole_numpy2_aliases() -> None:
    """RecBole 1.2.1's Config aliases NumPy 1 names that NumPy 2 removed; give it the NumPy 2 spellings."""
    for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, old):
            setattr(np, old, new)


def recbole_ml100k(checkpoint_dir: str, seq_len=6, dim=4, hidden=(8, 8), batch=16, batches=3):
    """RecBole's Config / dataset / DIN on the ml-100k data RecBole ships: (config, dataset, first batches)."""
    recbole_numpy2_aliases()
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation

    settings = {
        "data_path": os.path.join(os.path.dirname(recbole.__file__), "dataset_example"),
        "checkpoint_dir": checkpoint_dir, "MAX_ITEM_LIST_LENGTH": seq_len, "embedding_size": dim,
        "mlp_hidden_size": list(hidden), "train_batch_size": batch, "device": "cpu", "use_gpu": False,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}, "threshold": {"rating": 4},
        "train_neg_sample_args": None, "metrics": ["AUC"], "valid_metric": "AUC", "show_progress": False,
        "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "labeled"},
        "seed": 0, "reproducibility": True,
    }
    config = Config(model="DIN", dataset="ml-100k", config_dict=settings)
    train, _, _ = data_preparation(config, create_dataset(config))
    first = []
    for inter in train:
        first.append(inter)
        if len(first) == batches:
            break
    return config, train.dataset, first
