"""The functional API: each op checks its inputs, then runs the backend chosen for the case.

The ops live one per module in `fastdin.ops` (attention pooling, Dice); the backend policy
("auto" | "triton" | "torch" | "reference", FASTDIN_BACKEND) in `fastdin.ops.backend`.
"""
from fastdin.ops.attention import attention_kernel_gap, attention_pool, attention_slow_kernel, check_attention_inputs
from fastdin.ops.backend import (BACKENDS, HAS_TRITON, choose_backend, default_backend, set_value_checks,
                                 triton_runnable)
from fastdin.ops.checks import check_positions
from fastdin.ops.dice import DICE_KERNEL_DTYPES, check_dice_inputs, dice, dice_kernel_gap
from fastdin.reference import ACTIVATIONS, DICE_STATS, NORMALIZATIONS

__all__ = [
    "ACTIVATIONS", "BACKENDS", "DICE_KERNEL_DTYPES", "DICE_STATS", "HAS_TRITON", "NORMALIZATIONS",
    "attention_kernel_gap", "attention_pool", "attention_slow_kernel", "check_attention_inputs", "check_dice_inputs",
    "check_positions", "choose_backend", "default_backend", "dice", "dice_kernel_gap", "set_value_checks", "triton_runnable",
]
