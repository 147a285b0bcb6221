"""fastdin: Deep Interest Network layers for PyTorch, fast on NVIDIA GPUs through fused Triton kernels."""
from fastdin import functional, reference
from fastdin.functional import attention_pool, dice, set_value_checks
from fastdin.layers import MLP, AttentionPooling, Dice
from fastdin.model import DIN
from fastdin.reference import DiceParams
from fastdin.integrations import patch, unpatch
from fastdin.regularization import FullL2Regularizer, MBARegularizer, count_frequencies
from fastdin.schema import FeatureSchema

__version__ = "0.1.0"

__all__ = [
    "AttentionPooling", "Dice", "DiceParams", "DIN", "FeatureSchema", "FullL2Regularizer", "MBARegularizer",
    "MLP", "attention_pool", "count_frequencies", "dice", "functional", "patch", "reference", "set_value_checks",
    "unpatch",
]
