"""Fine-tuning on task variants: LoRA (peft) on the attention projections."""

from mechinterp.finetune.lora import DivergedError, LoraSpec, TrainResult, train_lora

__all__ = ["DivergedError", "LoraSpec", "TrainResult", "train_lora"]
