"""Model loading: the embedded default, local HF models, LoRA checkpoints, tiny test models."""

from mechinterp.models.embedded import DEFAULT_MODEL, EMBEDDED
from mechinterp.models.load import ModelCard, load_model, model_card

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "ModelCard", "load_model", "model_card"]
