"""Host cost of calling a kernel through a torch.library custom op versus an autograd.Function.

Why fastdin's eager path uses autograd.Functions and keeps the custom ops for torch.compile: at the
attention unit's launch-bound sizes the host time per call decides the speed (design notes). Both
wrappers here have the attention op's argument shape and a trivial body (a clone), so only the
dispatch is timed. Run: python bench/dispatch_overhead.py
"""
from typing import Optional

import torch
import torch.utils.benchmark as torch_benchmark
from torch import Tensor


@torch.library.custom_op("fastdin_bench::dispatch_probe", mutates_args=())
def _probe_op(query: Tensor, keys: Tensor, weights: list[Tensor], lengths: Optional[Tensor], activation: str,
              softmax: bool) -> tuple[Tensor, Tensor]:
    return query.clone(), keys.new_empty(0)


@_probe_op.register_fake
def _probe_fake(query, keys, weights, lengths, activation, softmax):
    return query.new_empty(query.shape), keys.new_empty(0)


def _probe_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _probe_backward(ctx, grad, _grad_empty):
    return grad, None, None, None, None, None


_probe_op.register_autograd(_probe_backward, setup_context=_probe_setup)


class _ProbeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, lengths, activation, softmax, *weights):
        ctx.save_for_backward(query)
        return query.clone(), keys.new_empty(0)

    @staticmethod
    def backward(ctx, grad, _grad_empty):
        return (grad,) + (None,) * 10


def main() -> None:
    query = torch.randn(8, 32, requires_grad=True)
    keys, lengths = torch.randn(8, 10, 32), torch.full((8,), 10)
    weights = [torch.randn(80, 128), torch.randn(80), torch.randn(40, 80), torch.randn(40), torch.randn(1, 40),
               torch.randn(1)]
    calls = {
        "custom op": lambda: _probe_op(query, keys, weights, lengths, "sigmoid", False),
        "autograd.Function": lambda: _ProbeFunction.apply(query, keys, lengths, "sigmoid", False, *weights),
        "the body alone (clone)": lambda: query.clone(),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median host time per forward call")
    for name, call in calls.items():
        timer = torch_benchmark.Timer(stmt="call()", globals={"call": call})
        print(f"  {name:<24} {timer.blocked_autorange(min_run_time=1.0).median * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
