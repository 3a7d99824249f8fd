"""Detection runs: a detector on a model and task grid → one row per head, and a heatmap."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mechinterp import store
from mechinterp.experiments.specs import ModelSpec, TaskSpec, _load, _run_facts, build_examples
from mechinterp.tasks.example import write_jsonl

#: Detection's default grid: contexts the embedded model answers (≤ 1K tokens), 4 needles.
DETECT_TASK = TaskSpec(lengths=(256, 512, 1024), depths=(0.0, 0.5, 1.0), needles=4)


@dataclass(frozen=True)
class DetectConfig:
    """A detector on a model and task grid. Settings a detector does not use are ignored (and
    recorded as given). Pattern detectors use repeated random tokens, not the task."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: DETECT_TASK)
    detector: str = "retrieval"
    # retrieval
    convention: Literal["set", "per_step"] = "set"
    keys: Literal["prompt", "context"] = "prompt"
    gate: float | None = 0.5
    max_new_tokens: int = 32
    # qr
    calibrate: bool = False
    # pattern scores
    seq_len: int = 50
    n_sequences: int = 8
    batch_size: int = 4
    template: Literal["chat", "plain"] | None = None

    def __post_init__(self) -> None:
        from mechinterp.detect import DETECTORS

        if self.detector not in DETECTORS:
            raise ValueError(
                f"unknown detector {self.detector!r}; expected one of {sorted(DETECTORS)}"
            )
        if self.convention not in ("set", "per_step"):
            raise ValueError(f"convention must be 'set' or 'per_step', got {self.convention!r}")
        if self.keys not in ("prompt", "context"):
            raise ValueError(f"keys must be 'prompt' or 'context', got {self.keys!r}")
        if self.gate is not None and not 0.0 <= self.gate < 1.0:
            raise ValueError(f"gate must lie in [0, 1) (or be None), got {self.gate}")
        if min(self.max_new_tokens, self.batch_size, self.seq_len, self.n_sequences) < 1:
            raise ValueError("max_new_tokens, batch_size, seq_len and n_sequences must be >= 1")

    @property
    def uses_task(self) -> bool:
        from mechinterp.detect import NEEDS_EXAMPLES

        return self.detector in NEEDS_EXAMPLES

    def settings(self) -> dict:
        """The keyword settings this config passes to its detector."""
        if self.detector == "retrieval":
            return {
                "convention": self.convention,
                "keys": self.keys,
                "gate": self.gate,
                "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size,
                "template": self.template,
            }
        if self.detector == "qr":
            return {
                "calibrate": self.calibrate,
                "batch_size": self.batch_size,
                "template": self.template,
            }
        return {"seq_len": self.seq_len, "n_sequences": self.n_sequences, "seed": self.task.seed}

    @property
    def slug(self) -> str:
        what = self.task.slug if self.uses_task else "random"
        return f"detect-{self.detector}-{Path(self.model.name).name}-{what}"


def run_detect(
    config: DetectConfig,
    root: str | Path = "runs",
    *,
    model=None,
    force: bool = False,
    png: bool = True,
    progress: bool = True,
) -> Path:
    """Run a detector and write its run directory; return the directory.

    Writes `scores.parquet` (+ `.csv`; one row per head), `instances.parquet` (one row per
    detection instance), `per_instance.parquet` (instance × head values), `scores_wu.json` (Wu
    et al.'s format), `heads.html/.png` (layer × head heatmap), config and provenance.
    """
    from mechinterp.detect import detect
    from mechinterp.models import model_card
    from mechinterp.plots import head_heatmap

    out = store.run_dir(root, config.slug, config)
    if (out / "scores.parquet").is_file() and not force:
        return out
    model, t0, t_load = _load(config, model)
    examples = build_examples(config.task, model.tokenizer) if config.uses_task else None
    settings = config.settings()
    if config.detector in ("retrieval", "qr"):
        settings["progress"] = progress
    detection = detect(model, examples, config.detector, **settings)
    card = model_card(model)
    task = config.task.task if config.uses_task else "repeated-random-tokens"
    provenance_cols = {
        "model": card.id,
        "task": task,
        "config_hash": store.config_hash(config),
    }
    scores = detection.scores_frame().assign(**provenance_cols)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", dataclasses.asdict(config))
    if examples is not None:
        write_jsonl(examples, out / "examples.jsonl")
    store.write_table(detection.instances.assign(**provenance_cols), out / "instances.parquet")
    store.write_table(detection.per_instance_frame(), out / "per_instance.parquet")
    store.write_table(scores, out / "scores.csv")
    from mechinterp.analysis.wu_json import write_wu_scores

    write_wu_scores(out / "scores_wu.json", detection.wu_lists())
    fig = head_heatmap(
        scores,
        title=f"{card.id} · {config.detector} score ({task}, n={detection.n_counted})",
    )
    store.write_figure(fig, out / "heads", formats=("html", "png") if png else ("html",))
    store.write_json(
        out / "provenance.json",
        store.provenance(
            **_run_facts(card, config),
            detector=config.detector,
            settings=detection.settings,
            n_instances=len(detection.instances),
            n_counted=detection.n_counted,
            timings={
                "load_s": round(t_load, 3),
                "detect_s": detection.settings.get("seconds"),
                "total_s": round(time.perf_counter() - t0, 3),
            },
        ),
    )
    store.write_table(scores, out / "scores.parquet")  # last: marks a complete run
    return out
