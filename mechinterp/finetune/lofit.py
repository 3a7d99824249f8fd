"""LoFiT (Yin et al. 2024): learned head localisation, then per-head bias tuning.

    scales = train_lofit_scales(base, examples, LofitSpec(l1=1e-3))    # step 1: every head
    ranking = scales.ranking()                                         # heads by ‖A_h‖₂
    biases = train_lofit_biases(base, examples, ranking[:k], LofitSpec()) # step 2: top-k only
    biases.save("ckpt/lofit"); LofitVectors.load("ckpt/lofit")
    with apply_lofit(bridge, biases): evaluate(bridge, examples)

Step 1 learns a scaling vector A_h per head (z_h ← (1 + A_h) ⊙ z_h, A = 0 at start) with an L1
penalty. The penalty is applied as a proximal step after each optimiser step (soft-threshold by
lr·λ), so unimportant heads reach exactly zero rather than hovering near it. Heads are ranked by
‖A_h‖₂: a learned importance score comparable with retrieval scores. Step 2 freezes everything
but a bias vector v_h (z_h ← z_h + v_h) on the chosen heads. Vectors are stored as safetensors plus
a JSON record (heads, spec, losses), never pickle.

The hooks act on the input of each layer's `o_proj` (the concatenated z of all heads), on the
HF model while training and on the bridge's `hook_z` when applied.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechinterp import store
from mechinterp.errors import InputError, UnsupportedError
from mechinterp.heads import Head, parse_heads
from mechinterp.tasks.example import Example

Kind = Literal["scale", "bias"]


@dataclass(frozen=True)
class LofitSpec:
    lr: float = 5e-3
    l1: float = 1e-3  # step 1 only
    steps: int = 100
    batch_size: int = 1
    max_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.l1 < 0 or self.steps < 1 or self.batch_size < 1:
            raise InputError("lr must be > 0, l1 >= 0, steps and batch_size >= 1")


@dataclass
class LofitVectors:
    """Per-head vectors of one kind: `vectors[layer, head, d_head]` (heads not trained are 0)."""

    kind: Kind
    vectors: torch.Tensor
    heads: tuple[Head, ...]
    spec: LofitSpec
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def norms(self) -> pd.DataFrame:
        """One row per head: layer, head, head_name, norm (‖v_h‖₂), rank (1 = largest)."""
        norm = self.vectors.norm(dim=-1)
        n_layers, n_heads = norm.shape
        rows = [{"layer": la, "head": h, "head_name": str(Head(la, h)), "norm": float(norm[la, h])}
                for la in range(n_layers) for h in range(n_heads)]  # fmt: skip
        df = pd.DataFrame(rows).sort_values(
            ["norm", "layer", "head"], ascending=[False, True, True]
        )
        df["rank"] = range(1, len(df) + 1)
        return df.reset_index(drop=True)

    def ranking(self) -> list[Head]:
        return [
            Head(int(a), int(b))
            for a, b in zip(*[self.norms()[c] for c in ("layer", "head")], strict=True)
        ]

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with store.atomic_path(directory / f"lofit_{self.kind}.safetensors") as tmp:
            save_file({"vectors": self.vectors.contiguous()}, str(tmp))
        store.write_json(directory / f"lofit_{self.kind}.json",
                         {"kind": self.kind, "heads": [str(h) for h in self.heads],
                          "spec": asdict(self.spec), "losses": self.losses,
                          "seconds": round(self.seconds, 3)})  # fmt: skip
        store.write_table(self.norms(), directory / f"lofit_{self.kind}_norms.csv")
        return directory

    @classmethod
    def load(cls, directory: str | Path, kind: Kind = "bias") -> LofitVectors:
        from safetensors.torch import load_file

        directory = Path(directory)
        record = directory / f"lofit_{kind}.json"
        if not record.is_file():
            raise InputError(f"{directory} holds no LoFiT {kind} vectors (no {record.name})")
        meta = json.loads(record.read_text())
        vectors = load_file(str(directory / f"lofit_{kind}.safetensors"))["vectors"]
        return cls(kind, vectors, tuple(parse_heads(meta["heads"])), LofitSpec(**meta["spec"]),
                   meta["losses"], meta["seconds"])  # fmt: skip


def _o_proj_hooks(hf_model, vectors: torch.Tensor, kind: Kind) -> list:
    """Forward pre-hooks on each layer's o_proj: scale ((1 + A) ⊙ z) or shift (z + v) per head."""
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(b, "self_attn", None), "o_proj") for b in layers):
        raise UnsupportedError(
            f"{hf_model.config.model_type}: LoFiT hooks each layer's `model.layers[i].self_attn."
            "o_proj` (Llama-style decoders); this model has no such modules"
        )
    handles = []
    for layer, block in enumerate(layers):

        def hook(module, args, layer=layer):
            (z,) = args  # [batch, pos, n_heads * d_head]
            v = vectors[layer].reshape(-1).to(z.dtype)
            return ((z * (1 + v)) if kind == "scale" else (z + v),)

        handles.append(block.self_attn.o_proj.register_forward_pre_hook(hook))
    return handles


def _train(base, examples, spec: LofitSpec, kind: Kind, heads, progress: bool, device):
    from mechinterp.finetune.lora import batches, training_pairs
    from mechinterp.models.load import load_hf

    torch.manual_seed(spec.seed)
    hf_model, tokenizer, _, _ = load_hf(base)
    hf_model.to(device).train()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    cfg = hf_model.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    all_heads = [Head(la, h) for la in range(cfg.num_hidden_layers) for h in range(n_heads)]
    heads = tuple(all_heads if heads is None else parse_heads(heads))
    mask = torch.zeros(cfg.num_hidden_layers, n_heads, 1)
    for h in heads:
        mask[h.layer, h.head] = 1.0
    param = torch.zeros(cfg.num_hidden_layers, n_heads, d_head, device=device, requires_grad=True)
    pairs = training_pairs(examples, tokenizer, max_tokens=spec.max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optim = torch.optim.Adam([param], lr=spec.lr)
    losses: list[float] = []
    mask = mask.to(device)
    t0 = time.perf_counter()
    data = batches(pairs, steps=spec.steps, batch_size=spec.batch_size, pad=pad, device=device,
                   seed=spec.seed)  # fmt: skip
    bar = tqdm(data, total=spec.steps, desc=f"LoFiT {kind}", disable=not progress)
    for ids, att, labels in bar:
        handles = _o_proj_hooks(hf_model, param * mask, kind)
        try:
            loss = hf_model(input_ids=ids, attention_mask=att, labels=labels).loss
        finally:
            for h in handles:
                h.remove()
        optim.zero_grad()
        loss.backward()
        optim.step()
        if kind == "scale" and spec.l1 > 0:  # proximal L1 step: exact zeros for unused heads
            with torch.no_grad():
                param.copy_(param.sign() * (param.abs() - spec.lr * spec.l1).clamp(min=0))
        losses.append(float(loss.item()))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    vectors = (param * mask).detach().cpu()
    return LofitVectors(kind, vectors, heads, spec, losses, time.perf_counter() - t0)


def train_lofit_scales(
    base: str | Path,
    examples: Sequence[Example],
    spec: LofitSpec,
    *,
    progress: bool = True,
    device: str = "cpu",
) -> LofitVectors:
    """Step 1: a scaling vector per head, L1-penalised; rank heads with `.ranking()`."""
    return _train(base, examples, spec, "scale", None, progress, device)


def train_lofit_biases(
    base: str | Path,
    examples: Sequence[Example],
    heads: Sequence[Head] | str,
    spec: LofitSpec,
    *,
    progress: bool = True,
    device: str = "cpu",
) -> LofitVectors:
    """Step 2: a bias vector per chosen head (the top-k of step 1), everything else frozen."""
    if not parse_heads(heads):
        raise InputError("step 2 needs the heads to tune (e.g. the top-k of step 1's ranking)")
    return _train(base, examples, spec, "bias", heads, progress, device)


@contextmanager
def apply_lofit(model, vectors: LofitVectors) -> Iterator[None]:
    """Apply LoFiT vectors to a TransformerBridge (on `hook_z`) inside the block."""
    n_layers, n_heads, _ = vectors.vectors.shape
    if (n_layers, n_heads) != (model.cfg.n_layers, model.cfg.n_heads):
        raise InputError(
            f"LoFiT vectors are for {n_layers} layers × {n_heads} heads, the model has "
            f"{model.cfg.n_layers} × {model.cfg.n_heads}: trained on another base model?"
        )

    def edit(z, hook, layer):
        v = vectors.vectors[layer].to(z.device, z.dtype)
        shaped = z.view(*z.shape[:2], n_heads, -1)
        out = shaped * (1 + v) if vectors.kind == "scale" else shaped + v
        return out.view(z.shape)

    hooks = [(f"blocks.{la}.attn.hook_z", lambda z, hook, la=la: edit(z, hook, la))
             for la in range(n_layers)]  # fmt: skip
    with model.hooks(fwd_hooks=hooks):
        yield
