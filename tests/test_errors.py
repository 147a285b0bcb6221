"""Bad input gets a ValueError / TypeError whose message names the argument and what was expected."""
import re

import pytest
import torch

from fastdin import functional
from fastdin.ops import attention as attention_op
from fastdin.ops import dice as dice_op
from fastdin.layers import MLP, AttentionPooling, Dice, make_activation
from fastdin.model import DIN
from fastdin.reference import DiceParams

B, T, D, H = 3, 4, 5, 6


def attention_args(activation="sigmoid"):
    """Valid arguments of functional.attention_pool; each case below breaks one thing."""
    args = {
        "query": torch.randn(B, D),
        "keys": torch.randn(B, T, D),
        "weights": [torch.randn(H, 4 * D), torch.randn(1, H)],
        "biases": [torch.randn(H), torch.randn(1)],
        "activation": activation,
        "lengths": torch.tensor([4, 0, 2]),
    }
    if activation == "prelu":
        args["act_params"] = [torch.full((H,), 0.25)]
    if activation == "dice":
        args["act_params"] = [DiceParams(torch.zeros(H), torch.zeros(H), torch.ones(H))]
    return args


def _set(**changes):
    return lambda args: args.update(changes)


def _weights(layer, shape):
    return lambda args: args["weights"].__setitem__(layer, torch.randn(*shape))


def _biases(layer, shape):
    return lambda args: args["biases"].__setitem__(layer, torch.randn(*shape))


ATTENTION_CASES = {
    # name: (how to break the valid arguments, exception, the words the message must hold)
    "query not a tensor": (_set(query=[[0.0] * D] * B), TypeError, "query"),
    "keys not a tensor": (_set(keys=None), TypeError, "keys"),
    "integer keys": (_set(keys=torch.ones(B, T, D, dtype=torch.long)), TypeError, "keys"),
    "keys rank 2": (_set(keys=torch.randn(B, D)), ValueError, "keys must be [B, T, D]"),
    "keys rank 4": (_set(keys=torch.randn(B, T, D, 1)), ValueError, "keys must be [B, T, D]"),
    "query dim mismatch": (_set(query=torch.randn(B, D + 1)), ValueError, "query must be"),
    "query batch mismatch": (_set(query=torch.randn(B + 1, D)), ValueError, "query must be"),
    "query [B, 2, D]": (_set(query=torch.randn(B, 2, D)), ValueError, "query must be"),
    "query rank 1": (_set(query=torch.randn(D)), ValueError, "query must be"),
    "query dtype mismatch": (_set(query=torch.randn(B, D, dtype=torch.float64)), TypeError, "query and keys"),
    "one weight only": (_set(weights=[torch.randn(1, 4 * D)], biases=[torch.randn(1)]), ValueError, "weights and biases"),
    "fewer biases": (lambda a: a["biases"].pop(), ValueError, "weights and biases"),
    "first weight fan-in": (_weights(0, (H, 3 * D)), ValueError, "weights[0]"),
    "first weight rank": (_weights(0, (H * 4 * D,)), ValueError, "weights[0]"),
    "score weight fan-in": (_weights(1, (1, H + 1)), ValueError, "weights[1]"),
    "score layer two outputs": (lambda a: (_weights(1, (2, H))(a), _biases(1, (2,))(a)), ValueError, "last weight"),
    "bias shape": (_biases(0, (H + 1,)), ValueError, "biases[0]"),
    "bias rank": (_biases(1, (1, 1)), ValueError, "biases[1]"),
    "integer weight": (lambda a: a["weights"].__setitem__(0, torch.ones(H, 4 * D, dtype=torch.long)), TypeError, "weights[0]"),
    "negative length": (_set(lengths=torch.tensor([4, -1, 2])), ValueError, "lengths must lie in [0, T]"),
    "length past T": (_set(lengths=torch.tensor([4, 5, 2])), ValueError, "lengths must lie in [0, T]"),
    "float lengths": (_set(lengths=torch.tensor([4.0, 0.0, 2.0])), TypeError, "lengths must be an integer"),
    "bool lengths": (_set(lengths=torch.tensor([True, False, True])), TypeError, "lengths must be an integer"),
    "lengths wrong batch": (_set(lengths=torch.tensor([4, 0])), ValueError, "lengths must have shape"),
    "lengths [B, 2]": (_set(lengths=torch.ones(B, 2, dtype=torch.long)), ValueError, "lengths must have shape"),
    "lengths [B, T]": (_set(lengths=torch.ones(B, T, dtype=torch.long)), ValueError, "lengths must have shape"),
    "lengths not a tensor": (_set(lengths=[4, 0, 2]), TypeError, "lengths"),
    "mask wrong shape": (_set(lengths=None, mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask must have shape"),
    "mask [B]": (_set(lengths=None, mask=torch.ones(B, dtype=torch.bool)), ValueError, "mask must have shape"),
    "uint8 mask": (_set(lengths=None, mask=torch.ones(B, T, dtype=torch.uint8)), TypeError, "mask must be a bool"),
    "float mask": (_set(lengths=None, mask=torch.ones(B, T)), TypeError, "mask must be a bool"),
    "lengths and mask": (_set(mask=torch.ones(B, T, dtype=torch.bool)), ValueError, "either lengths or mask"),
    "unknown activation": (_set(activation="tanh"), ValueError, "activation must be one of"),
    "unknown normalization": (_set(normalization="sum"), ValueError, "normalization must be one of"),
    "unknown dice_stats": (_set(dice_stats="batch"), ValueError, "dice_stats must be one of"),
    "unknown backend": (_set(backend="cuda"), ValueError, "backend must be one of"),
    "prelu without act_params": (_set(activation="prelu"), ValueError, "act_params"),
    "prelu wrong slope count": (_set(activation="prelu", act_params=[torch.ones(H - 1)]), ValueError, "act_params[0]"),
    "prelu slope not a tensor": (_set(activation="prelu", act_params=[0.25]), TypeError, "act_params[0]"),
    "dice params not DiceParams": (_set(activation="dice", act_params=[torch.zeros(H)]), TypeError, "act_params[0]"),
    "dice alpha size": (_set(activation="dice", act_params=[DiceParams(torch.zeros(H + 1), torch.zeros(H), torch.ones(H))]),
                        ValueError, "act_params[0].alpha"),
    "dice weight without bias": (
        _set(activation="dice", act_params=[DiceParams(torch.zeros(H), torch.zeros(H), torch.ones(H), torch.ones(H))]),
        ValueError, "act_params[0].weight and act_params[0].bias"),
    "dice training one valid position": (
        lambda a: a.update(attention_args("dice"), lengths=torch.tensor([1, 0, 0])), ValueError, "more than one"),
    "dice training no valid position": (
        lambda a: a.update(attention_args("dice"), lengths=None, mask=torch.zeros(B, T, dtype=torch.bool)),
        ValueError, "more than one"),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_pool_rejects(case):
    breaks, error, words = ATTENTION_CASES[case]
    args = attention_args()
    breaks(args)
    query, keys = args.pop("query"), args.pop("keys")
    with pytest.raises(error, match=re.escape(words)):
        functional.attention_pool(query, keys, args.pop("weights"), args.pop("biases"), **args)


def test_attention_cases_break_valid_arguments():
    """The valid arguments run: each case above fails for the one thing it breaks."""
    for activation in ("sigmoid", "prelu", "dice"):
        args = attention_args(activation)
        out = functional.attention_pool(args.pop("query"), args.pop("keys"), args.pop("weights"), args.pop("biases"), **args)
        assert out.shape == (B, D)
    args = attention_args("dice")  # two valid positions are enough for Dice's statistics, as for BatchNorm
    args["lengths"] = torch.tensor([1, 0, 1])
    functional.attention_pool(args.pop("query"), args.pop("keys"), args.pop("weights"), args.pop("biases"), **args)


META_CASES = {
    "query": lambda a: a.update(query=a["query"].to("meta")),
    "lengths": lambda a: a.update(lengths=a["lengths"].to("meta")),
    "mask": lambda a: a.update(lengths=None, mask=torch.ones(B, T, dtype=torch.bool, device="meta")),
    "weights[0]": lambda a: a["weights"].__setitem__(0, a["weights"][0].to("meta")),
    "biases[1]": lambda a: a["biases"].__setitem__(1, a["biases"][1].to("meta")),
}


@pytest.mark.parametrize("name", list(META_CASES))
def test_attention_pool_rejects_devices_that_disagree(name):
    """The meta device stands in for a second device on CPU-only machines."""
    args = attention_args()
    META_CASES[name](args)
    with pytest.raises(ValueError, match=re.escape(f"{name} on meta")):
        functional.attention_pool(args.pop("query"), args.pop("keys"), args.pop("weights"), args.pop("biases"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_pool_rejects_cuda_and_cpu():
    args = attention_args()
    with pytest.raises(ValueError, match="query on cuda"):
        functional.attention_pool(args.pop("query").cuda(), args.pop("keys"), args.pop("weights"), args.pop("biases"), **args)


# ---------------------------------------------------------------------------------------------
# Dice


def dice_args():
    return {"x": torch.randn(7, H), "alpha": torch.zeros(H), "running_mean": torch.zeros(H), "running_var": torch.ones(H)}


DICE_CASES = {
    "x rank 1": (_set(x=torch.randn(H)), ValueError, "x must be [N, H] or [B, T, H]"),
    "x rank 4": (_set(x=torch.randn(2, 2, 2, H)), ValueError, "x must be [N, H] or [B, T, H]"),
    "integer x": (_set(x=torch.ones(7, H, dtype=torch.long)), TypeError, "x must be a floating-point"),
    "alpha size": (_set(alpha=torch.zeros(H + 1)), ValueError, "alpha must have 6 elements"),
    "running_mean size": (_set(running_mean=torch.zeros(1)), ValueError, "running_mean must have 6 elements"),
    "running_var not a tensor": (_set(running_var=1.0), TypeError, "running_var"),
    "weight without bias": (_set(weight=torch.ones(H)), ValueError, "weight and bias"),
    "bias size": (_set(weight=torch.ones(H), bias=torch.ones(H - 1)), ValueError, "bias must have 6 elements"),
    "mask shape": (_set(mask=torch.ones(8, dtype=torch.bool)), ValueError, "mask must have shape [7]"),
    "mask dtype": (_set(mask=torch.ones(7, dtype=torch.long)), TypeError, "mask must be a bool"),
    "training on one row": (_set(x=torch.randn(1, H)), ValueError, "more than one"),
    "training on [1, 1, H]": (_set(x=torch.randn(1, 1, H)), ValueError, "more than one"),
    "mask leaves one row": (_set(mask=torch.arange(7) == 3), ValueError, "more than one"),
    "alpha on meta": (lambda a: a.update(alpha=a["alpha"].to("meta")), ValueError, "alpha on meta"),
    "mask on meta": (_set(mask=torch.ones(7, dtype=torch.bool, device="meta")), ValueError, "mask on meta"),
    "unknown backend": (_set(backend="gpu"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(DICE_CASES))
def test_dice_rejects(case):
    breaks, error, words = DICE_CASES[case]
    args = dice_args()
    breaks(args)
    with pytest.raises(error, match=re.escape(words)):
        functional.dice(args.pop("x"), args.pop("alpha"), args.pop("running_mean"), args.pop("running_var"), **args)


def test_dice_module_single_row():
    dice = Dice(H)
    with pytest.raises(ValueError, match="more than one"):
        dice(torch.randn(1, H))
    with pytest.raises(ValueError, match="more than one"):
        dice(torch.randn(2, 3, H), torch.tensor([[False, True, False], [False, False, False]]))
    dice(torch.randn(2, H))  # two rows are enough
    dice.eval()
    assert dice(torch.randn(1, H)).shape == (1, H)  # eval uses running statistics
    with pytest.raises(ValueError, match="num_features"):
        Dice(0)


# ---------------------------------------------------------------------------------------------
# backend choice


def test_choose_backend():
    cpu = torch.device("cpu")
    assert functional.choose_backend("reference", cpu, None, "op") == "reference"
    assert functional.choose_backend("auto", cpu, None, "op") == "reference"  # kernels need CUDA under auto
    assert functional.choose_backend("auto", cpu, "no kernel", "op") == "reference"
    # "torch" (and "auto" off CUDA) take an op's fast PyTorch path where it has one
    assert functional.choose_backend("torch", cpu, None, "op") == "reference"
    assert functional.choose_backend("torch", cpu, None, "op", has_torch_path=True) == "torch"
    assert functional.choose_backend("auto", cpu, None, "op", has_torch_path=True) == "torch"
    if functional.HAS_TRITON:  # a CUDA device object needs no GPU: the choice looks only at its type
        cuda = torch.device("cuda")
        assert functional.choose_backend("auto", cuda, None, "op", has_torch_path=True) == "triton"
        # a kernel the op calls the wrong choice: "auto" takes the torch path, "triton" still runs it
        assert functional.choose_backend("auto", cuda, None, "op", has_torch_path=True, slow_kernel="why") == "torch"
        assert functional.choose_backend("triton", cuda, None, "op", has_torch_path=True, slow_kernel="why") == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        functional.choose_backend("fast", cpu, None, "op")


def test_triton_backend_without_kernel_raises(monkeypatch):
    """Asking for triton where no kernel covers the case is an error, never a silent fallback."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if functional.HAS_TRITON:
        with pytest.raises(NotImplementedError, match="no Triton kernel for my_op in this case: why not"):
            functional.choose_backend("triton", cpu, "why not", "my_op")
        assert functional.choose_backend("triton", cpu, None, "my_op") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")  # the CPU without the interpreter cannot run triton at all
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        functional.choose_backend("triton", cpu, None, "my_op")
    # through the ops: with a kernel gap (as where no kernel covers a case), both raise
    monkeypatch.setattr(attention_op, "attention_kernel_gap", lambda *args, **kwargs: "test gap")
    monkeypatch.setattr(dice_op, "dice_kernel_gap", lambda *args, **kwargs: "test gap")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = attention_args()
    expected = NotImplementedError if functional.HAS_TRITON else RuntimeError
    with pytest.raises(expected, match="backend='triton'"):
        functional.attention_pool(args.pop("query"), args.pop("keys"), args.pop("weights"), args.pop("biases"),
                                  backend="triton", **args)
    args = dice_args()
    with pytest.raises(expected, match="backend='triton'"):
        functional.dice(*args.values(), backend="triton")


def test_bad_fastdin_backend_env(monkeypatch):
    monkeypatch.setenv("FASTDIN_BACKEND", "fastest")
    args = attention_args()
    with pytest.raises(ValueError, match="FASTDIN_BACKEND must be one of"):
        functional.attention_pool(args.pop("query"), args.pop("keys"), args.pop("weights"), args.pop("biases"), **args)
    with pytest.raises(ValueError, match="FASTDIN_BACKEND must be one of"):
        functional.dice(*dice_args().values())
    with pytest.raises(ValueError, match="FASTDIN_BACKEND must be one of"):
        AttentionPooling(D, (H,))(torch.randn(B, D), torch.randn(B, T, D))
    monkeypatch.setenv("FASTDIN_BACKEND", "reference")
    AttentionPooling(D, (H,))(torch.randn(B, D), torch.randn(B, T, D))


# ---------------------------------------------------------------------------------------------
# modules and model


MODULE_CASES = {
    "MLP empty hidden_units": (lambda: MLP(4, ()), "hidden_units"),
    "MLP zero size": (lambda: MLP(4, (3, 0)), "hidden_units"),
    "MLP unknown activation": (lambda: MLP(4, (3,), "gelu"), "activation must be one of"),
    "make_activation unknown": (lambda: make_activation("swish", 3), "activation must be one of"),
    "AttentionPooling empty hidden_units": (lambda: AttentionPooling(D, ()), "hidden_units"),
    "AttentionPooling unknown activation": (lambda: AttentionPooling(D, (H,), "tanh"), "activation must be one of"),
    "AttentionPooling unknown normalization": (lambda: AttentionPooling(D, (H,), normalization="l1"), "normalization"),
    "AttentionPooling unknown dice_stats": (lambda: AttentionPooling(D, (H,), dice_stats="batch"), "dice_stats"),
    "AttentionPooling embed_dim 0": (lambda: AttentionPooling(0), "embed_dim"),
    "DIN empty attention_hidden": (lambda: DIN(10, 5, attention_hidden=()), "hidden_units"),
    "DIN empty mlp_hidden": (lambda: DIN(10, 5, mlp_hidden=()), "hidden_units"),
    "DIN unknown pooling": (lambda: DIN(10, 5, pooling="max"), "pooling must be one of"),
    "DIN unknown attention activation": (lambda: DIN(10, 5, attention_activation="elu"), "activation must be one of"),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_construction_rejects(case):
    build, words = MODULE_CASES[case]
    with pytest.raises(ValueError, match=re.escape(words)):
        build()


def test_attention_module_rejects_bad_inputs_and_unknown_backend():
    module = AttentionPooling(D, (H,))
    with pytest.raises(ValueError, match="query must be"):
        module(torch.randn(B, D + 1), torch.randn(B, T, D))
    with pytest.raises(ValueError, match=re.escape("lengths must lie in [0, T]")):
        module(torch.randn(B, D), torch.randn(B, T, D), lengths=torch.tensor([1, 2, T + 1]))
    with pytest.raises(ValueError, match="backend must be one of"):
        AttentionPooling(D, (H,), backend="gpu")(torch.randn(B, D), torch.randn(B, T, D))


def din_batch():
    return {
        "item": torch.tensor([1, 2, 3]),
        "category": torch.tensor([1, 2, 1]),
        "hist_items": torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]]),
        "hist_categories": torch.tensor([[1, 1, 0], [2, 0, 0], [1, 2, 2]]),
        "lengths": torch.tensor([2, 1, 3]),
        "user_sparse": torch.tensor([[1], [2], [3]]),
    }


@pytest.mark.parametrize("pooling", ["attention", "sum"])
@pytest.mark.parametrize("field,value,error,words", [
    ("item", torch.tensor([1.0, 2.0, 3.0]), TypeError, "batch['item'] holds ids"),
    ("category", torch.tensor([1.0, 2.0, 1.0]), TypeError, "batch['category'] holds ids"),
    ("hist_items", torch.ones(3, 3), TypeError, "batch['hist_items'] holds ids"),
    ("hist_categories", torch.ones(3, 3), TypeError, "batch['hist_categories'] holds ids"),
    ("user_sparse", torch.ones(3, 1), TypeError, "batch['user_sparse'] holds ids"),
    ("lengths", torch.tensor([2.0, 1.0, 3.0]), TypeError, "lengths must be an integer"),
    ("lengths", torch.tensor([2, 1, 4]), ValueError, "lengths must lie in [0, T]"),
    ("item", None, ValueError, "batch is missing 'item'"),
])
def test_din_rejects_bad_batches(pooling, field, value, error, words):
    model = DIN(10, 5, embed_dim=4, user_sparse_sizes=(4,), pooling=pooling, attention_hidden=(4,), mlp_hidden=(4,))
    batch = din_batch()
    assert model(batch).shape == (3,)
    if value is None:
        del batch[field]
    else:
        batch[field] = value
    with pytest.raises(error, match=re.escape(words)):
        model(batch)


def test_din_single_row_in_training():
    model = DIN(10, 5, embed_dim=4, attention_hidden=(4,), mlp_hidden=(4,), mlp_activation="dice")
    one = {k: v[:1] for k, v in din_batch().items() if k != "user_sparse"}
    with pytest.raises(ValueError, match="more than one"):
        model(one)
    model.eval()
    assert model(one).shape == (1,)
