"""LoRA fine-tuning (peft) on the attention projections of an HF causal LM, on task examples.

    result = train_lora("smollm2-135m", examples, LoraSpec(steps=200), "ckpt/realistic-high")
    model = load_model("ckpt/realistic-high")        # the base with the adapter merged

Each example is rendered as the model sees it at evaluation (`tasks.prompt.render`, chat template)
and followed by its gold answer and the end-of-turn token; the loss is the mean cross-entropy of
those answer tokens only. Deterministic from `spec.seed` (init, example order). The adapter is
saved with `mechinterp_finetune.json` (spec, base, RoPE θ, loss curve, wall time) so `load_model`
rebuilds the model exactly, RoPE change included. A non-finite loss stops training with
`DivergedError`; the last good checkpoint (saved every `save_every` steps) is kept.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mechinterp import store
from mechinterp.errors import InputError, MechinterpError
from mechinterp.tasks.example import Example

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class DivergedError(MechinterpError, RuntimeError):
    """Training produced a non-finite loss; the last good checkpoint was kept."""


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    """LoRA rank"""
    alpha: int = 16
    """LoRA scale numerator (the update is scaled by alpha / r)"""
    dropout: float = 0.0
    """dropout on the LoRA path while training"""
    targets: tuple[str, ...] = ATTENTION
    """modules LoRA adapts (the HF model's module names), comma-separated"""
    lr: float = 2e-4
    """AdamW learning rate (no weight decay)"""
    steps: int = 200
    """optimiser steps, one batch each (the examples are reshuffled every epoch)"""
    batch_size: int = 1
    """examples per step"""
    max_tokens: int = 1024
    """most tokens of a training example (prompt and answer); a longer one is an error"""
    grad_clip: float = 1.0
    """largest gradient norm; gradients are clipped to it every step"""
    save_every: int = 50
    """steps between checkpoints (and one at the last step); a diverged run keeps the last"""
    rope_theta: float | None = None
    """override the RoPE base frequency while training and in the saved model (context
    extension; none: the base's own)"""
    seed: int = 0
    """seed of the adapter's initialisation and of the example order"""

    def __post_init__(self) -> None:
        if self.r < 1 or self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise InputError("r, steps, batch_size and save_every must be >= 1")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if not self.targets:
            raise InputError("targets names the modules LoRA adapts (e.g. q_proj, v_proj)")


@dataclass
class TrainResult:
    directory: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_done: int = 0


def training_pairs(
    examples: Sequence[Example], tokenizer, *, max_tokens: int, template=None
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + end of turn) per example; too-long examples are an error."""
    from mechinterp.tasks.prompt import render

    if not examples:
        raise InputError("no training examples: the variant produced none")
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end = eot if isinstance(eot, int) and eot != tokenizer.unk_token_id else tokenizer.eos_token_id
    pairs = []
    for ex in examples:
        prompt = render(ex, tokenizer, template=template)
        answer = tokenizer.encode(ex.answers[0].strip(), add_special_tokens=False) + [end]
        if prompt.n_tokens + len(answer) > max_tokens:
            raise InputError(
                f"example {ex.id} has {prompt.n_tokens + len(answer)} tokens, over max_tokens="
                f"{max_tokens}: use shorter examples or raise max_tokens"
            )
        pairs.append((list(prompt.input_ids), answer))
    return pairs


def _batch(pairs, pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 except on answer tokens)."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (p, a) in enumerate(pairs):
        seq = p + a
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, len(p) : len(seq)] = torch.tensor(a)
    return ids.to(device), mask.to(device), labels.to(device)


def batches(pairs, *, steps: int, batch_size: int, pad: int, device, seed: int):
    """`steps` training batches (ids, mask, labels): seeded shuffles of the pairs, epoch after
    epoch."""
    order, queue = random.Random(seed), []
    for _ in range(steps):
        if len(queue) < batch_size:
            more = list(range(len(pairs)))
            order.shuffle(more)
            queue += more
        yield _batch([pairs[queue.pop(0)] for _ in range(batch_size)], pad, device)


def _save(peft_model, tokenizer, directory: Path, record: dict) -> None:
    """Adapter + tokenizer + record into `directory`, replacing it only once complete (a
    temp directory beside it, then renames), so a kill never leaves half a checkpoint."""
    from mechinterp.models.load import FINETUNE_RECORD

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        store.write_json(tmp / FINETUNE_RECORD, record)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def train_lora(
    base: str | Path,
    examples: Sequence[Example],
    spec: LoraSpec,
    directory: str | Path,
    *,
    device: str | None = None,
    template=None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune LoRA adapters of `base` on `examples`; save them to `directory`."""
    from peft import LoraConfig, get_peft_model

    from mechinterp.models.load import load_hf

    directory = Path(directory)
    torch.manual_seed(spec.seed)
    hf_model, tokenizer, _, base_id = load_hf(base, rope_theta=spec.rope_theta)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = training_pairs(examples, tokenizer, max_tokens=spec.max_tokens, template=template)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)
    model = get_peft_model(hf_model, config).to(device)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = TrainResult(directory)
    record = {"base": str(base), "base_id": base_id, "spec": asdict(spec),
              "rope_theta": spec.rope_theta, "n_examples": len(pairs)}  # fmt: skip
    t0 = time.perf_counter()
    data = batches(pairs, steps=spec.steps, batch_size=spec.batch_size, pad=pad, device=device,
                   seed=spec.seed)  # fmt: skip
    bar = tqdm(data, total=spec.steps, desc=f"LoRA {directory.name}", disable=not progress)
    for step, (ids, mask, labels) in enumerate(bar):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not math.isfinite(loss.item()):
            result.seconds = time.perf_counter() - t0
            kept = "the last good checkpoint is kept" if directory.exists() else "none was saved"
            raise DivergedError(
                f"LoRA training diverged at step {step} (loss {loss.item()}); {kept} in "
                f"{directory}. Lower lr (now {spec.lr}) or check the data."
            )
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        optim.step()
        if not all(bool(torch.isfinite(p).all()) for p in params):
            result.seconds = time.perf_counter() - t0
            kept = "the last good checkpoint is kept" if directory.exists() else "none was saved"
            raise DivergedError(
                f"LoRA weights became non-finite at step {step}; {kept} in {directory}. "
                f"Lower lr (now {spec.lr})."
            )
        result.losses.append(float(loss.item()))
        result.steps_done = step + 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if result.steps_done % spec.save_every == 0 or result.steps_done == spec.steps:
            result.seconds = time.perf_counter() - t0
            _save(model, tokenizer, directory,
                  {**record, "steps_done": result.steps_done, "losses": result.losses,
                   "seconds": round(result.seconds, 3)})  # fmt: skip
    return result
