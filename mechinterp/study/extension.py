"""The synthetic-context-extension pipeline (DESIGN.md "The question", steps 1–4 and 6), as shards:

1. `finetune/<variant>`: LoRA on the variant's training examples (the reference variant too).
2. `eval/<variant>`: the fine-tuned model on the *reference* task's held-out examples.
3. `detect/<variant>`: Wu retrieval scores of the fine-tuned model on a NIAH grid.
4. analysis (no model): head recall / Jaccard / Spearman of every model's heads vs the reference
   model's, and the correlation of recall with task performance across variants (bootstrap CI).
5. `cross/<variant>`: cross-model patching from the reference model (donor) into each synthetic
   model (recipient) on Inter / Compl / Rand head sets.

Offline, the reference variant is `realistic-high` (realistic needles in real essay text) and is
labelled as such in every table; `reference_data` takes a user's real JSONL file instead.
Every stage resumes (finished shards are skipped) and runs in-process or on Ray.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from mechinterp import store
from mechinterp.finetune.lora import LoraSpec
from mechinterp.runner import Engine, Shard, ShardStats, run_shards
from mechinterp.runs.common import ModelSpec
from mechinterp.study.config import DetectStage

REFERENCE_LABEL = "reference (realistic needles in real essays)"


@dataclass(frozen=True)
class ExtensionConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    task: Literal["mdqa", "multihop"] = "mdqa"
    reference: str = "realistic-high"
    reference_data: str | None = None
    variants: tuple[str, ...] = ("realistic-low", "templated-high", "templated-low", "symbolic")
    n_train: int = 64
    n_eval: int = 16
    n_docs: int = 3
    doc_words: int = 100
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(steps=100, save_every=25))
    detect: DetectStage = field(default_factory=DetectStage)
    cross_seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 32
    template: Literal["chat", "plain"] | None = None

    def __post_init__(self) -> None:
        from mechinterp.runs.common import parse_variant

        for v in (self.reference, *self.variants):
            parse_variant(v)
        if self.reference in self.variants:
            raise ValueError(f"variants repeat the reference variant {self.reference!r}")
        if not self.variants:
            raise ValueError("at least one synthetic variant is needed")
        if self.n_train < 1 or self.n_eval < 1:
            raise ValueError("n_train and n_eval must be >= 1")

    @property
    def slug(self) -> str:
        return f"extension-{Path(self.model.name).name}-{self.task}"


def data_args(config: ExtensionConfig, variant: str, split: Literal["train", "eval"]) -> dict:
    """What builds one split of one variant (only these go into a shard's inputs, so changing
    another part of the config does not recompute the shard)."""
    return {
        "task": config.task,
        "variant": variant,
        "n": config.n_train if split == "train" else config.n_eval,
        "seed": 0 if split == "train" else 1,
        "n_docs": config.n_docs,
        "doc_words": config.doc_words,
        "data": config.reference_data if split == "eval" else None,
    }


def build_data(*, task, variant, n, seed, n_docs, doc_words, data) -> list:
    """A variant's synthetic examples, or a user's JSONL file (`data`)."""
    from mechinterp.runs.common import parse_variant
    from mechinterp.tasks.mdqa import load_mdqa, synthetic_mdqa
    from mechinterp.tasks.multihop import load_musique, synthetic_multihop

    if data:
        return (load_mdqa if task == "mdqa" else load_musique)(data, limit=n)
    realism, diversity = parse_variant(variant)
    make = synthetic_mdqa if task == "mdqa" else synthetic_multihop
    return make(n, n_docs=n_docs, realism=realism, diversity=diversity, seed=seed,
                doc_words=doc_words)  # fmt: skip


# ---------------------------------------------------------------- shard functions


def finetune_shard(
    model, *, base: dict, data: dict, lora: dict, template, directory: str
) -> pd.DataFrame:
    """Train one variant's LoRA adapter; one row per step (loss)."""
    from mechinterp.finetune.lora import train_lora

    result = train_lora(base["name"], build_data(**data), LoraSpec(**lora), directory,
                        device=base["device"], template=template, progress=False)  # fmt: skip
    return pd.DataFrame({"variant": data["variant"], "step": range(1, len(result.losses) + 1),
                         "loss": result.losses, "seconds": result.seconds})  # fmt: skip


def _load(base: dict, checkpoint: str):
    from mechinterp.models import load_model

    return load_model(checkpoint, dtype=base["dtype"], device=base["device"])


def eval_shard(
    model, *, base: dict, data: dict, variant: str, checkpoint: str, trained: str,
    max_new_tokens: int, template,
) -> pd.DataFrame:  # fmt: skip
    """The fine-tuned model on the reference task's held-out examples (`trained`: the
    checkpoint's fingerprint, part of the shard's inputs only)."""
    from mechinterp.evaluate import evaluate

    df = evaluate(_load(base, checkpoint), build_data(**data), max_new_tokens=max_new_tokens,
                  template=template, score=True, progress=False)  # fmt: skip
    return df.assign(model_variant=variant)


def detect_model_shard(
    model, *, base: dict, detect: dict, variant: str, checkpoint: str, trained: str, template
) -> pd.DataFrame:
    """Retrieval scores of the fine-tuned model on the detection grid (instance × head rows)."""
    from mechinterp.config import from_dict
    from mechinterp.study.stages import detect_shard
    from mechinterp.tasks.niah import niah_grid

    d, fine = from_dict(DetectStage, detect), _load(base, checkpoint)
    grid = d.niah
    exs = niah_grid(fine.tokenizer, lengths=grid.lengths, depths=grid.depths,
                    needles=list(grid.needles), haystack=grid.haystack, seed=grid.seed)  # fmt: skip
    return detect_shard(fine, examples=[e.to_dict() for e in exs], convention=d.convention,
                        gate=d.gate, max_new_tokens=d.max_new_tokens, batch_size=d.batch_size,
                        template=template).assign(model_variant=variant)  # fmt: skip


def cross_shard(
    model, *, base: dict, data: dict, variant: str, donor: str, recipient: str,
    sets: dict[str, list[str]], max_new_tokens: int, trained: list[str], template,
) -> pd.DataFrame:  # fmt: skip
    """Reference model's head outputs patched into a synthetic model on each head set."""
    from mechinterp.interventions.cross import cross_model_patching

    df = cross_model_patching(_load(base, donor), _load(base, recipient), build_data(**data),
                              sets, max_new_tokens=max_new_tokens, template=template,
                              progress=False)  # fmt: skip
    sizes = {name: len(hs) for name, hs in sets.items()}
    return df.assign(model_variant=variant, set_size=df["condition"].map(sizes).fillna(0))


# ---------------------------------------------------------------- analysis (tables only)


def head_sets(scores: pd.DataFrame, detect: DetectStage) -> dict[str, list[str]]:
    """Each model's retrieval heads (score > threshold, or its top_k), best first."""
    out = {}
    for variant, g in scores.groupby("model_variant", sort=False):
        g = g[g["score"].notna()]  # a model with no gated instance has no scores, no heads
        g = g.sort_values(["score", "layer", "head"], ascending=[False, True, True])
        chosen = g.head(detect.top_k) if detect.top_k else g[g["score"] > detect.threshold]
        out[variant] = list(chosen["head_name"])
    return out


def compare_heads(scores: pd.DataFrame, sets: dict[str, list[str]], reference: str) -> pd.DataFrame:
    """Per model: recall of the reference model's heads, Jaccard, Spearman of the score vectors."""
    from scipy import stats

    ref = set(sets[reference])
    ref_scores = scores[scores["model_variant"] == reference].set_index("head_name")["score"]
    rows = []
    for variant, heads in sets.items():
        mine = scores[scores["model_variant"] == variant].set_index("head_name")["score"]
        mine = mine.reindex(ref_scores.index)
        union = ref | set(heads)
        varied = mine.nunique() > 1 and ref_scores.nunique() > 1
        rows.append({
            "model_variant": variant,
            "n_heads": len(heads),
            "recall": len(ref & set(heads)) / len(ref) if ref else float("nan"),
            "jaccard": len(ref & set(heads)) / len(union) if union else float("nan"),
            "spearman": (
                float(stats.spearmanr(mine, ref_scores).statistic) if varied else float("nan")
            ),
            "synthetic_subset_of_reference": set(heads) <= ref,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _no_heads(per_instance: pd.DataFrame) -> pd.DataFrame:
    """The score table of a model none of whose detection instances passed the gate."""
    from mechinterp.heads import Head

    heads = per_instance.drop_duplicates(["layer", "head"])[["layer", "head"]]
    names = [str(Head(a, b)) for a, b in zip(heads["layer"], heads["head"], strict=True)]
    return heads.assign(head_name=names, score=float("nan"), frequency=float("nan"),
                        rank=range(1, len(heads) + 1), retrieval_head=False,
                        n_instances=0).reset_index(drop=True)  # fmt: skip


def run_extension(
    config: ExtensionConfig,
    root: str | Path = "runs",
    *,
    out: str | Path | None = None,
    engine: Engine = "local",
    ray_address: str | None = None,
    png: bool | None = True,
    progress: bool = True,
) -> Path:
    """Run (or resume) the pipeline; write the `losses`, `eval`, `detect_scores`, `heads` and
    `cross` tables, `correlation.json` and `recall_vs_performance.html/.png` (`png=False`: HTML
    only; `png=None`: no figure)."""
    from mechinterp.analysis.stats import correlate
    from mechinterp.config import to_dict
    from mechinterp.heads import HeadShape
    from mechinterp.interventions.cross import patch_head_sets
    from mechinterp.study.stages import combine_detect

    out = Path(out) if out is not None else store.run_dir(root, config.slug, config)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", to_dict(config))
    t0, stats = time.perf_counter(), ShardStats()
    shard_dir, ckpt = out / "shards", out / "checkpoints"
    everyone = (config.reference, *config.variants)
    common = {"model": None, "engine": engine, "ray_address": ray_address, "progress": progress,
              "stats": stats, "load": False}  # fmt: skip
    for v in everyone:  # a finished fine-tune shard needs its checkpoint too
        if not (ckpt / v / "adapter_config.json").is_file():
            for suffix in (".json", ".parquet"):
                (shard_dir / "finetune" / f"{v}{suffix}").unlink(missing_ok=True)
    base, ev = to_dict(config.model), data_args(config, config.reference, "eval")
    tpl = config.template
    finetune = [Shard(f"finetune/{v}", finetune_shard, {
        "base": base, "data": data_args(config, v, "train"), "lora": to_dict(config.lora),
        "template": tpl, "directory": str(ckpt / v)}) for v in everyone]  # fmt: skip
    losses = run_shards(finetune, shard_dir, desc="1/4 fine-tune", **common)
    point = {v: str(ckpt / v) for v in everyone}
    # a checkpoint's fingerprint: later shards that read it recompute when it is retrained
    trained = {s.args["data"]["variant"]: s.args_hash for s in finetune}
    evals = run_shards([Shard(f"eval/{v}", eval_shard, {
        "base": base, "data": ev, "variant": v, "checkpoint": point[v], "trained": trained[v],
        "max_new_tokens": config.max_new_tokens, "template": tpl}) for v in everyone],
        shard_dir, desc="2/4 evaluate", **common)  # fmt: skip
    per = run_shards([Shard(f"detect/{v}", detect_model_shard, {
        "base": base, "detect": to_dict(config.detect), "variant": v, "checkpoint": point[v],
        "trained": trained[v], "template": tpl}) for v in everyone],
        shard_dir, desc="3/4 detect", **common)  # fmt: skip
    frames = []
    for v, g in per.groupby("model_variant", sort=False):
        try:
            frames.append(combine_detect(g, config.detect.threshold, config.detect.top_k))
        except ValueError as e:  # no instance passed the gate: this model gets no heads
            warnings.warn(f"{v}: {e}; its head set is empty", stacklevel=2)
            frames.append(_no_heads(g))
        frames[-1] = frames[-1].assign(model_variant=v)
    scores = pd.concat(frames, ignore_index=True)
    sets = head_sets(scores, config.detect)
    heads = compare_heads(scores, sets, config.reference)
    perf = evals.groupby("model_variant", sort=False)["f1"].mean().rename("performance")
    heads = heads.merge(perf.reset_index(), on="model_variant")
    heads["label"] = heads["model_variant"].where(
        heads["model_variant"] != config.reference, REFERENCE_LABEL
    )
    syn = heads[heads["model_variant"] != config.reference]
    corr = None
    if len(syn) >= 3 and syn["recall"].nunique() > 1 and syn["performance"].nunique() > 1:
        c = correlate(syn["recall"], syn["performance"], method="spearman", n_boot=2000)
        corr = {"method": c.method, "estimate": c.estimate, "low": c.low, "high": c.high, "n": c.n}
    # the head grid, read from the score table (random heads only need layers × heads)
    n_layers, n_heads = int(scores["layer"].max()) + 1, int(scores["head"].max()) + 1
    shape = HeadShape(n_layers, n_heads, n_heads)
    cross_shards = []
    for v in config.variants if sets[config.reference] else ():
        built = patch_head_sets(sets[config.reference], sets[v], shape, seeds=config.cross_seeds)
        named = {k: [str(h) for h in hs] for k, hs in built.items()}
        cross_shards.append(Shard(f"cross/{v}", cross_shard, {
            "base": base, "data": ev, "variant": v, "donor": point[config.reference],
            "recipient": point[v], "sets": named, "max_new_tokens": config.max_new_tokens,
            "trained": [trained[config.reference], trained[v]], "template": tpl}))  # fmt: skip
    cross = run_shards(cross_shards, shard_dir, desc="4/4 cross-model patching", **common)
    store.write_table(losses, out / "losses.parquet")
    store.write_table(evals, out / "eval.parquet")
    store.write_table(scores, out / "detect_scores.parquet")
    store.write_table(heads, out / "heads.csv")
    store.write_table(heads.rename(columns={"label": "variant"}), out / "recall.csv")
    if len(cross):
        store.write_table(cross, out / "cross.parquet")
    store.write_json(out / "correlation.json", corr or {})
    drawable = heads.dropna(subset=["recall", "performance"])
    if png is not None and len(drawable):  # no recall when the reference model has no heads
        from mechinterp.plots import recall_scatter

        fig = recall_scatter(
            drawable.rename(columns={"label": "variant"}), reference=REFERENCE_LABEL,
            correlation=corr, title=f"{Path(config.model.name).name} · {config.task}: head recall "
            "vs task F1 per fine-tuning variant",
        )  # fmt: skip
        store.write_figure(
            fig, out / "recall_vs_performance", formats=("html", "png") if png else ("html",)
        )
    store.write_json(out / "provenance.json", store.provenance(
        engine=engine, spec=asdict(config.lora),
        shards={"computed": len(stats.computed), "skipped": len(stats.skipped)},
        timings={"total_s": round(time.perf_counter() - t0, 1)}))  # fmt: skip
    return out
