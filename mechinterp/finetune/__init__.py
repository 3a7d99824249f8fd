"""Fine-tuning on task variants: LoRA (peft) on the attention projections, and LoFiT (learned
per-head scaling for localisation, then per-head biases on the top heads)."""

from mechinterp.finetune.lofit import (
    LofitSpec,
    LofitVectors,
    apply_lofit,
    train_lofit_biases,
    train_lofit_scales,
)
from mechinterp.finetune.lora import DivergedError, LoraSpec, TrainResult, train_lora

__all__ = [
    "DivergedError",
    "LofitSpec",
    "LofitVectors",
    "LoraSpec",
    "TrainResult",
    "apply_lofit",
    "train_lofit_biases",
    "train_lofit_scales",
    "train_lora",
]
