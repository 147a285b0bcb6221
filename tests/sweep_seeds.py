"""Sweep the numerics tests over many seeds and report the worst error / bound ratio per family.

Runs the cases of the kernel tests (test_attention_kernel.py, test_attention_dice_train.py,
test_dice_kernel.py) and of the property test's reference path (test_properties.py) directly, not
through pytest, once per seed, with fastdin.testing.RECORD collecting every comparison. A ratio
above 1 is a failure; above about 0.5 a case that another machine or seed may fail. It also prints
the largest (kernel error - 2 x same-dtype reference error) per dtype: what the floor must cover.

    nice -n 10 python tests/sweep_seeds.py --seeds 0:200 --families reference
    nice -n 10 python tests/sweep_seeds.py --seeds 0:30 --families kernels --time-limit 900
"""
import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (TRITON_INTERPRET before any kernel is defined)
import torch  # noqa: E402

from fastdin import testing  # noqa: E402


def kernel_cases():
    """(family, case id, callable) for every parametrized numerics case of the kernel tests."""
    import test_attention_dice_train as dice_train
    import test_attention_kernel as attention
    import test_dice_kernel as dice
    from attention_helpers import LOW_DTYPES

    device = conftest.DEVICES[0]
    for module, family in ((attention, "attention kernel"), (dice_train, "attention dice train")):
        pairs = [(c, torch.float32) for c in module.CASES]
        pairs += [(c, d) for d in LOW_DTYPES for c in module.LOW_PRECISION_CASES]
        for case, dtype in pairs:
            yield family, f"{case}-{str(dtype)[6:]}", lambda c=case, d=dtype, m=module: m.check_case(c, d, device)
    for dtype in (torch.float32, torch.float16):
        for shape, masked, affine in [((5, 80), False, False), ((300, 37), True, True), ((3, 70, 200), True, False),
                                      ((2, 9, 80), False, True)]:
            yield "dice kernel", f"train-{shape}-{str(dtype)[6:]}", (
                lambda s=shape, d=dtype, m=masked, a=affine: dice.test_training_matches_reference(device, d, s, m, a))
        for affine in (False, True):
            yield "dice kernel", f"eval-{affine}-{str(dtype)[6:]}", (
                lambda d=dtype, a=affine: dice.test_eval_matches_reference(device, d, a))


def reference_cases():
    """The property test's examples on the reference path, drawn from the seed."""
    import test_properties as properties

    yield "property reference", "examples", lambda: properties.sweep_reference_examples(count=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0:20", help="first:last (exclusive)")
    parser.add_argument("--families", choices=["kernels", "reference", "all"], default="all")
    parser.add_argument("--time-limit", type=float, default=float("inf"), help="seconds; stops after a whole seed")
    args = parser.parse_args()
    first, last = map(int, args.seeds.split(":"))
    torch.set_num_threads(1)
    cases = []
    if args.families in ("kernels", "all"):
        cases += list(kernel_cases())
    if args.families in ("reference", "all"):
        cases += list(reference_cases())
    worst = {}  # family -> (ratio, seed, case, result name)
    floor_need = collections.defaultdict(lambda: (0.0, None))  # dtype -> max(error - 2 x same-dtype error), where
    failures, start, seeds_done = [], time.time(), 0
    for seed in range(first, last):
        for family, case_id, run in cases:
            testing.RECORD = []
            torch.manual_seed(seed)
            try:
                run()
            except AssertionError as error:
                failures.append((seed, family, case_id, str(error).splitlines()[0]))
            for name, dtype, error, same in testing.RECORD:
                ratio = error / testing.error_bound(dtype, same)
                if ratio > worst.get(family, (-1,))[0]:
                    worst[family] = (ratio, seed, case_id, name)
                if error - 2 * same > floor_need[dtype][0]:
                    floor_need[dtype] = (error - 2 * same, f"seed {seed}, {case_id}: {name}")
        seeds_done += 1
        if time.time() - start > args.time_limit:
            break
    testing.RECORD = None
    print(f"seeds {first}..{first + seeds_done - 1} ({seeds_done}), {time.time() - start:.0f} s, "
          f"floors {({str(k)[6:]: v for k, v in testing.FLOOR.items()})}")
    for family, (ratio, seed, case_id, name) in sorted(worst.items()):
        print(f"{family:<22} max error/bound {ratio:.3f} (seed {seed}, {case_id}: {name})")
    for dtype, (need, where) in floor_need.items():
        print(f"{str(dtype)[6:]:<9} max(error - 2 x same-dtype error) = {need:.2e} ({where})")
    for failure in failures:
        print("FAILED", *failure)


if __name__ == "__main__":
    main()
