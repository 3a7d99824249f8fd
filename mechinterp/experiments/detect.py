"""`mechinterp detect`: a head detector on a model and task grid → one row per head, the
per-instance values behind it, Wu et al.'s JSON, and a layer × head heatmap. Shards: chunks of
`examples_per_shard` task instances (retrieval, qr); the pattern detectors' random sequences are
one shard. The retrieval score's success gate is applied over all instances, after the shards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pandas as pd
import torch

from mechinterp import store
from mechinterp.errors import InputError
from mechinterp.experiments.command import Command, Plan, chunks, table_text
from mechinterp.experiments.specs import (
    DEVICE_ALIASES,
    TASK_ALIASES,
    ModelSpec,
    TaskSpec,
    build_examples,
)
from mechinterp.runner import Shard
from mechinterp.tasks.example import Example

#: Detection's default grid: contexts the embedded model answers (≤ 1K tokens), 4 needles.
DETECT_TASK = TaskSpec(lengths=(256, 512, 1024), depths=(0.0, 0.5, 1.0), needles=4)


@dataclass(frozen=True)
class DetectConfig:
    """A detector on a model and task grid. Settings a detector does not use are ignored (and
    recorded as given). Pattern detectors use repeated random tokens, not the task."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {**TASK_ALIASES, **DEVICE_ALIASES}

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: DETECT_TASK)
    detector: Literal["retrieval", "qr", "previous_token", "duplicate_token", "induction"] = (
        "retrieval"
    )
    """which score"""
    convention: Literal["set", "per_step"] = "set"
    """retrieval: count each needle token once (set, the paper) or every copying step
    (per_step, Wu's reference code)"""
    keys: Literal["prompt", "context"] = "prompt"
    """retrieval: argmax over the prompt's keys, or over every visible key"""
    gate: float | None = 0.5
    """retrieval: count instances whose answer has ROUGE-1 recall above this (none: all)"""
    max_new_tokens: int = 32
    """retrieval: tokens to generate per instance"""
    calibrate: bool = False
    """qr: subtract a null question's attention mass"""
    seq_len: int = 50
    """pattern scores: length of each random sequence"""
    n_sequences: int = 8
    """pattern scores: number of random sequences"""
    batch_size: int = 4
    """instances per forward"""
    examples_per_shard: int = 8
    """instances per unit of work (finished shards are kept across kills and reruns)"""
    template: Literal["chat", "plain"] | None = None
    """prompt template (none: chat when the tokenizer has one)"""

    def __post_init__(self) -> None:
        if self.gate is not None and not 0.0 <= self.gate < 1.0:
            raise InputError(f"gate must lie in [0, 1) (or be none), got {self.gate}")
        sizes = (self.max_new_tokens, self.batch_size, self.seq_len, self.n_sequences,
                 self.examples_per_shard)  # fmt: skip
        if min(sizes) < 1:
            raise InputError("max_new_tokens, batch_size, seq_len, n_sequences and "
                             "examples_per_shard must be >= 1")  # fmt: skip

    @property
    def uses_task(self) -> bool:
        from mechinterp.detect import NEEDS_EXAMPLES

        return self.detector in NEEDS_EXAMPLES

    def settings(self) -> dict:
        """The keyword settings this config passes to its detector (the gate comes later)."""
        if self.detector == "retrieval":
            return {"convention": self.convention, "keys": self.keys, "gate": None,
                    "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                    "template": self.template}  # fmt: skip
        if self.detector == "qr":
            return {"calibrate": self.calibrate, "batch_size": self.batch_size,
                    "template": self.template}  # fmt: skip
        return {"seq_len": self.seq_len, "n_sequences": self.n_sequences, "seed": self.task.seed}

    @property
    def slug(self) -> str:
        what = self.task.slug if self.uses_task else "random"
        return f"detect-{self.detector}-{Path(self.model.name).name}-{what}"


def detect_shard(model, *, detector: str, examples: list[dict] | None, settings: dict):
    """The detector on some instances: one row per (instance, head) with the instance's columns
    and the detector's settings (JSON) beside each value."""
    from mechinterp.detect import detect

    exs = [Example.from_dict(d) for d in examples] if examples is not None else None
    quiet = {"progress": False} if exs else {}
    det = detect(model, exs, detector, **settings, **quiet)
    info = det.instances.drop(columns="counted")
    per = det.per_instance_frame().drop(columns="counted").merge(info, on="instance_id")
    kept = {k: v for k, v in det.settings.items() if k != "seconds"}  # timings: provenance
    return per.assign(detector_settings=json.dumps(kept, sort_keys=True))


def plan(config: DetectConfig, model) -> Plan:
    settings = config.settings()
    if not config.uses_task:
        shard = Shard("detect/random", detect_shard,
                      {"detector": config.detector, "examples": None, "settings": settings})
        return Plan([shard])  # fmt: skip
    examples = build_examples(config.task, model.tokenizer)
    parts = chunks(examples, config.examples_per_shard)
    return Plan([Shard(f"detect/{i:04d}", detect_shard, {
        "detector": config.detector, "examples": [e.to_dict() for e in part],
        "settings": settings}) for i, part in enumerate(parts)], examples)  # fmt: skip


def combine(config: DetectConfig, per: pd.DataFrame):
    """The shards' rows as one `Detection` (the retrieval gate applied over every instance)."""
    from mechinterp.detect import Detection
    from mechinterp.detect.retrieval import apply_gate

    order = list(dict.fromkeys(per["instance_id"]))
    n_layers, n_heads = int(per["layer"].max()) + 1, int(per["head"].max()) + 1
    rank = {iid: i for i, iid in enumerate(order)}
    per = per.assign(_i=per["instance_id"].map(rank)).sort_values(["_i", "layer", "head"])
    values = torch.tensor(per["value"].to_numpy()).reshape(len(order), n_layers, n_heads)
    info = [c for c in per.columns if c not in ("layer", "head", "value", "_i",
                                                 "detector_settings")]  # fmt: skip
    instances = per.drop_duplicates("instance_id")[info].reset_index(drop=True)
    settings = json.loads(per["detector_settings"].iloc[0])
    if config.detector == "retrieval":
        instances = apply_gate(instances, config.gate)
        settings["gate"] = config.gate
    else:
        instances = instances.assign(counted=True)
    counted = torch.tensor(instances["counted"].to_list(), dtype=torch.bool)
    return Detection(config.detector, values.float(), counted, instances, settings,
                     has_frequency=config.detector == "retrieval")  # fmt: skip


def finish(config: DetectConfig, per: pd.DataFrame, plan: Plan, card) -> dict:
    from mechinterp.analysis.wu_json import wu_scores

    detection = combine(config, per)
    task = config.task.task if config.uses_task else "repeated-random-tokens"
    cols = {"model": card.id, "task": task, "config_hash": store.config_hash(config)}
    plan.facts.update(detector=config.detector, settings=detection.settings,
                      n_instances=len(detection.instances), n_counted=detection.n_counted)
    return {"instances": detection.instances.assign(**cols),
            "per_instance": detection.per_instance_frame(),
            "scores": detection.scores_frame().assign(**cols),
            "scores_wu": wu_scores(detection.wu_lists())}  # fmt: skip


def draw(out: Path, config: DetectConfig) -> dict:
    from mechinterp.plots import head_heatmap

    scores = pd.read_parquet(out / "scores.parquet")
    title = (f"{scores['model'].iloc[0]} · {config.detector} score ({scores['task'].iloc[0]}, "
             f"n={scores['n_instances'].iloc[0]})")  # fmt: skip
    return {"heads": head_heatmap(scores, title=title)}


def summary(out: Path, top: int) -> str:
    scores = pd.read_parquet(out / "scores.parquet")
    cols = ["rank", "head_name", "score"] + (
        ["frequency"] if scores["frequency"].notna().any() else []
    )
    n = scores["n_instances"].iloc[0]
    n_all = len(pd.read_parquet(out / "instances.parquet"))
    detector = scores["detector"].iloc[0]
    return (f"{table_text(scores.nsmallest(top, 'rank')[cols])}\n"
            f"{detector}: {(scores['score'] > 0.1).mean():.1%} of {len(scores)} heads score "
            f"> 0.1, {(scores['score'] > 0).mean():.1%} > 0; {n} of {n_all} instances counted")


HELP = ("score every attention head (retrieval, qr, previous_token, duplicate_token, "
        "induction); write tidy tables and a layer x head heatmap")
DETECT = Command("detect", DetectConfig, HELP, plan, finish, draw, summary)
