"""Measured error of the Triton kernels per dtype, against the float64 reference.

For each case the kernel (backend="triton") and the reference run in the same low precision are
both compared with the reference in float64, on the output and on every gradient (inputs and
parameters): relative error ||got - want|| / ||want||, the largest over the gradients (leaving
out a gradient that is zero in exact math, as the score bias's under softmax). The last column is
the tests' numerics policy (fastdin.testing): kernel error / (2 x reference error + floor), the
worse of output and gradients; above 1 the tests would fail.
Without a GPU the kernels run under Triton's interpreter (fp32 and fp16; its bf16 is wrong).
Run: python bench/accuracy.py
"""
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

from fastdin import AttentionPooling, Dice  # noqa: E402
from fastdin.testing import error_bound, relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _run(module, dtype, backend, inputs, grad_seeds):
    """Outputs and gradients of a copy of module in dtype; inputs are float64 leaves."""
    module = copy.deepcopy(module).to(dtype)
    module.backend = backend
    leaves = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    outs = module(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grad_seeds))
    loss.backward()
    grads = [t.grad for t in leaves if t.grad is not None] + [p.grad for p in module.parameters()]
    return outs[0], grads


def _errors(module, inputs, grad_seeds, dtype):
    want_out, want_grads = _run(module, torch.float64, "reference", inputs, grad_seeds)
    row = []
    for backend in ("triton", "reference"):
        out, grads = _run(module, dtype, backend, inputs, grad_seeds)
        # a gradient that is zero in exact math (the score bias under softmax) has no relative error
        row += [relative_error(out, want_out),
                max(relative_error(g, w) for g, w in zip(grads, want_grads) if w.norm() > 1e-9)]
    # the tests' bound (fastdin.testing): kernel error / (2 x reference error + floor), worst of out and grads
    row.append(max(k / error_bound(dtype, r) for k, r in ((row[0], row[2]), (row[1], row[3]))))
    return row


def attention_case(activation, normalization, training):
    torch.manual_seed(0)
    batch, seq_len, dim = 4, 50, 32
    module = AttentionPooling(dim, (80, 40), activation, normalization, return_scores=True).to(DEVICE).double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "activations" in name:
                p.uniform_(-0.5, 0.5)  # PReLU slopes, Dice alpha/weight/bias away from their init
    module.train(training)
    query, keys = torch.randn(batch, dim, device=DEVICE), torch.randn(batch, seq_len, dim, device=DEVICE)
    lengths = torch.tensor([seq_len, 17, 0, 33], device=DEVICE)
    seeds = [torch.randn(batch, dim, device=DEVICE), torch.randn(batch, seq_len, device=DEVICE)]
    return module, [query.double(), keys.double(), lengths], seeds


def dice_case(training):
    torch.manual_seed(0)
    module = Dice(80, affine=True).to(DEVICE).double()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
    module.train(training)
    x = (torch.randn(300, 80, device=DEVICE) * 2 + 1).double()
    mask = torch.rand(300, device=DEVICE) > 0.2
    return module, [x, mask], [torch.randn(300, 80, device=DEVICE)]


def main() -> None:
    cases = [
        ("attention sigmoid, none", lambda: attention_case("sigmoid", None, False)),
        ("attention prelu, softmax", lambda: attention_case("prelu", "softmax", False)),
        ("attention dice eval", lambda: attention_case("dice", None, False)),
        ("attention dice train (valid stats)", lambda: attention_case("dice", None, True)),
        ("dice train 300x80, mask, affine", lambda: dice_case(True)),
        ("dice eval 300x80, affine", lambda: dice_case(False)),
    ]
    print(f"{DEVICE}, torch {torch.__version__}; relative error vs the float64 reference")
    print(f"{'case':<46} {'dtype':<9} {'kernel out':>10} {'kernel grad':>11} {'ref out':>9} {'ref grad':>9} "
          f"{'err/bound':>9}")
    for name, make in cases:
        module, inputs, seeds = make()
        for dtype in DTYPES:
            errors = _errors(module, inputs, seeds, dtype)
            print(f"{name:<46} {str(dtype)[6:]:<9} " + " ".join(f"{e:>10.1e}" for e in errors[:4])
                  + f" {errors[4]:>9.2f}")


if __name__ == "__main__":
    main()
