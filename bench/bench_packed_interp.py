"""The packed-rows attention kernels on a CPU: work in proportion to the lengths, and the host cost.

1. Under Triton's interpreter (TRITON_INTERPRET=1), forward + backward through the launchers at
   B=4, T=1024, D=32, hidden 80/40, sigmoid, fp32: every length T against every length 1, for the
   packed kernels and for the per-user ones (which stop at each user's last tile). The interpreter
   runs each tile's operations, so its time follows the work the kernels do.
2. Host time per call at the paper shape (B=2048, T=100, D=32, 80/40, sigmoid, lengths) with the
   @triton.jit kernels replaced by no-ops: what the launch path itself costs (argument building,
   allocations, caches), without Triton's own argument binding. Inference is one forward; a
   training step is a forward and a backward (through the public op when it is wired: checks,
   dispatch, autograd).

One thread, interleaved repeats, medians; appends to bench/results/packed_interp_cpu.csv.
Run: python bench/bench_packed_interp.py [--repeats N]
"""
import argparse
import csv
import datetime
import os
import platform
import statistics

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit function is defined

import torch  # noqa: E402
import triton  # noqa: E402

from fastdin.bench.measure import interleaved_times, kernels_replaced  # noqa: E402
from fastdin.kernels import attention_packed as packed  # noqa: E402
from fastdin.kernels import attention_pool as per_user  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "packed_interp_cpu.csv")


def make_inputs(batch, seq_len, dim, hidden, lengths_value, requires_grad=False):
    query = torch.randn(batch, dim, requires_grad=requires_grad)
    keys = torch.randn(batch, seq_len, dim, requires_grad=requires_grad)
    sizes = [4 * dim] + list(hidden) + [1]
    weights = [(torch.randn(o, i) * (2 / i) ** 0.5).requires_grad_(requires_grad) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.zeros(o, requires_grad=requires_grad) for o in sizes[1:]]
    lengths = torch.full((batch,), lengths_value, dtype=torch.int64)
    return query, keys, weights, biases, lengths


def per_user_step(query, keys, weights, biases, lengths):
    """Forward + backward through the per-user kernels' launchers (fp32 on CUDA, training-mode Dice)."""
    out, _scores, lse = per_user.attention_pool_forward(query, keys, weights, biases, [], lengths, None, "sigmoid",
                                                        0.0, False, False, False)
    per_user.attention_pool_backward(_grad_like(out), None, query, keys, weights, biases, [], lengths, None, lse, None,
                                     "sigmoid", 0.0, False, False)
    return out


def launcher_step(query, keys, weights, biases, lengths, backward=True):
    rows = packed.packed_rows(lengths=lengths)
    out, scores, lse = packed.packed_attention_forward(query, keys, weights, biases, [], rows, "sigmoid", 0.0, False,
                                                       False, False)
    if backward:
        packed.packed_attention_backward(_grad_like(out), None, query, keys, weights, biases, [], rows, out,
                                         scores, lse, "sigmoid", 0.0, False, False)
    return out


_GRADS = {}


def _grad_like(out):
    """One output gradient per shape, made once: filling it is not launch-path work."""
    if out.shape not in _GRADS:
        _GRADS[out.shape] = torch.ones_like(out)
    return _GRADS[out.shape]


def interleaved_medians(calls, repeats):
    """{name: median wall seconds}, the calls timed in turn, `repeats` times each."""
    wall, _cpu = interleaved_times(calls, repeats)
    return {name: statistics.median(t) for name, t in wall.items()}


class _NoLaunch:
    """A stubbed kernel: `kernel[grid](...)` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def op_step(query, keys, weights, biases, lengths, backward):
    """One call through the public op with the triton backend: checks, dispatch, autograd.Function
    and launchers; the backward through autograd.grad (no accumulation into .grad, which on a CPU
    would be real arithmetic, not launch-path work)."""
    from fastdin import functional

    out = functional.attention_pool(query, keys, weights, biases, lengths=lengths, backend="triton")
    if backward:
        torch.autograd.grad(out, [query, keys, *weights, *biases], _grad_like(out))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the interpreter runs")
    parser.add_argument("--host-calls", type=int, default=300, help="calls per host-time sample")
    parser.add_argument("--host-repeats", type=int, default=15, help="interleaved host-time samples")
    parser.add_argument("--host-only", action="store_true", help="skip the interpreter runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    print(f"value checks: {'on' if value_checks_on() else 'off'} (FASTDIN_VALUE_CHECKS)")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    base = dict(date=stamp, device=platform.processor() or platform.machine(), torch=torch.__version__,
                triton=triton.__version__, threads=torch.get_num_threads(), value_checks=value_checks_on())

    if not args.host_only:
        rows += interpreter_rows(base, args.repeats)
    rows += host_rows(base, args)
    new_file = not os.path.exists(RESULTS)
    with open(RESULTS, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {RESULTS}")


def interpreter_rows(base, repeats):
    """1. length-proportional work under the interpreter: the packed kernels, then the per-user ones."""
    rows = []
    shape = dict(batch=4, seq_len=1024, dim=32, hidden=(80, 40))
    full = make_inputs(**shape, lengths_value=1024)
    short = make_inputs(**shape, lengths_value=1)
    for kernels, step in (("packed", launcher_step), ("per-user", per_user_step)):
        step(*short)  # warm-up (Triton's interpreter builds its function cache)
        medians = interleaved_medians({"lengths T": lambda: step(*full), "lengths 1": lambda: step(*short)}, repeats)
        ratio = medians["lengths T"] / medians["lengths 1"]
        print(f"interpreter fwd+bwd, {kernels} kernels, B=4 T=1024 D=32 80/40: lengths T "
              f"{medians['lengths T'] * 1e3:.1f} ms, lengths 1 {medians['lengths 1'] * 1e3:.1f} ms, ratio {ratio:.1f}x")
        label = "" if kernels == "packed" else "per-user kernels, "
        for name, seconds in medians.items():
            rows.append(dict(base, measure="interpreter fwd+bwd",
                             config=f"B4 T1024 D32 80/40 sigmoid fp32, {label}{name}",
                             median_us=round(seconds * 1e6, 1), ratio=round(ratio, 2) if name == "lengths T" else ""))
    return rows


def host_rows(base, args):
    """2. host time per call, kernels stubbed, paper shape; with two yardsticks of this machine's
    speed timed in the same run (an empty Python call, a torch.empty)."""
    rows = []
    shape = dict(batch=2048, seq_len=100, dim=32, hidden=(80, 40))
    plain = make_inputs(**shape, lengths_value=50)
    leaves = make_inputs(**shape, lengths_value=50, requires_grad=True)
    calls = {"yardstick: empty Python call": lambda: None,
             "yardstick: torch.empty(1)": lambda: torch.empty(1),
             "launchers inference": lambda: launcher_step(*plain, backward=False),
             "launchers training step": lambda: launcher_step(*plain, backward=True)}
    try:
        from fastdin.ops import attention_packed  # noqa: F401  (the packed kernels wired as backend "triton")

        wired = True
    except ImportError:
        wired = False
    if wired:
        calls["op inference (no grad)"] = lambda: _no_grad(op_step, *leaves, backward=False)
        calls["op training step"] = lambda: op_step(*leaves, backward=True)

    def per_call(call):
        def run():
            for _ in range(args.host_calls):
                call()
        return run

    with kernels_replaced(lambda name, kernel: _NoLaunch()):
        for call in calls.values():
            call()
        medians = interleaved_medians({name: per_call(call) for name, call in calls.items()}, args.host_repeats)
    for name, seconds in medians.items():
        us = seconds / args.host_calls * 1e6
        print(f"host time per call, kernels stubbed, 2048x100x32 80/40: {name:<26} {us:7.1f} us")
        rows.append(dict(base, measure="host time, kernels stubbed", config=f"B2048 T100 D32 80/40 sigmoid fp32, {name}",
                         median_us=round(us, 2), ratio=""))
    return rows


def value_checks_on():
    from fastdin.ops import backend

    previous = backend.set_value_checks(True)
    backend.set_value_checks(previous)
    return previous


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


if __name__ == "__main__":
    main()
