"""The one run path of the single commands (`eval`, `detect`, `knockout`, `patch`,
`cross-patch`): a frozen config → shards on the shard runner → tidy tables, figures and a sealed
provenance, in one run directory.

    out = run_command(EVAL, EvalConfig(task=TaskSpec(task="mdqa", n=8)), "runs")

Each command is a `Command`: `plan(config, model)` checks the config against the model and cuts
the work into shards (example chunks, or one instance pair each); `finish(config, table, plan,
card, out)` turns the shards' rows into the command's tables and returns their file names;
`draw(out, png)` draws its figures from those tables alone (`mechinterp figures` reruns it).
As in the studies, a rerun reuses every finished shard whose inputs (the examples, the heads,
the model's weights) are unchanged, after a kill too, in this process or on Ray.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mechinterp import store
from mechinterp.experiments import rundir
from mechinterp.runner import Engine, Shard, ShardStats, run_shards


@dataclass
class Plan:
    """What a command computes: its shards, the examples (written to examples.jsonl), facts for
    the provenance, and whatever `finish` needs besides the shard rows."""

    shards: list[Shard]
    examples: list | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)  # fingerprints of inputs besides the model


@dataclass(frozen=True)
class Command:
    name: str
    config: type
    help: str
    plan: Callable[..., Plan]
    finish: Callable[..., list[str]]
    draw: Callable[[Path, bool], list[Path]]
    summary: Callable[[Path, int], str]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def model_key(card) -> dict:
    """The model's identity for shard hashes: its card (weights' hash where there is one) and a
    fingerprint of the files it was loaded from."""
    facts = card.to_dict()
    facts.pop("device", None)
    files = {"files": rundir.fingerprint(card.source), "lora": rundir.fingerprint(card.lora)}
    return {**facts, **files}


def run_command(
    command: Command,
    config,
    root: str | Path = "runs",
    *,
    out: str | Path | None = None,
    model=None,
    engine: Engine = "local",
    ray_address: str | None = None,
    png: bool = True,
    progress: bool = True,
    wait: bool = False,
    force: bool = False,
) -> Path:
    """Run (or resume) `command` on `config` and write its run directory; return it.

    Everything that can be checked is checked before the directory is written: the output
    location, the model, the config against the model, the examples. `force` recomputes every
    shard. A run that fails before any shard finished leaves no directory behind.
    """
    from mechinterp.models import model_card
    from mechinterp.models.load import tune_allocator
    from mechinterp.tasks.example import write_jsonl

    out = Path(out) if out is not None else store.run_dir(root, config.slug, config)
    rundir.check_writable(out)
    t0 = time.perf_counter()
    model = config.model.load() if model is None else model
    t_load = time.perf_counter() - t0
    card = model_card(model)
    plan = command.plan(config, model)
    created = not out.exists()
    try:
        with rundir.RunLock(out, wait=wait):
            rundir.claim(out, config, what=f"{command.name} run")
            if force:
                shutil.rmtree(out / "shards", ignore_errors=True)
            stats = ShardStats()
            t_shards = time.perf_counter()
            table = run_shards(plan.shards, out / "shards", model=model, model_spec=config.model,
                               engine=engine, ray_address=ray_address, desc=command.name,
                               progress=progress, stats=stats,
                               key={"model": model_key(card), **plan.key})  # fmt: skip
            t_shards = time.perf_counter() - t_shards
            tables = command.finish(config, table, plan, card, out)
            if plan.examples is not None:
                write_jsonl(plan.examples, out / "examples.jsonl")
            task = getattr(config, "task", None)
            store.write_json(out / "provenance.json", store.provenance(
                command=command.name, model_card=card.to_dict(), malloc_tuned=tune_allocator(),
                seed=getattr(task, "seed", None), engine=engine, inputs=inputs(config),
                n_examples=len(plan.examples) if plan.examples is not None else None,
                **plan.facts,
                shards={"computed": len(stats.computed), "skipped": len(stats.skipped),
                        "repaired": stats.repaired},
                shard_seconds={n: round(s, 2) for n, s in stats.seconds.items()},
                timings={"load_s": round(t_load, 3), "shards_s": round(t_shards, 3),
                         "total_s": round(time.perf_counter() - t0, 3)},
                seal=rundir.seal(out, tables),
            ))  # fmt: skip
            command.draw(out, png)
    except BaseException:
        if created and not any((out / "shards").rglob("*.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def inputs(config) -> dict[str, str | None]:
    """Fingerprints of the files a config names (data files, score tables), for provenance."""
    from mechinterp.config import to_dict

    found: dict[str, str | None] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif path.split(".")[-1] in ("data", "scores", "recipient_scores") and node:
            found[path] = rundir.fingerprint(node)

    walk(to_dict(config), "")
    return found


def read_run(out: str | Path, command: Command):
    """A finished run's config (as `command.config`), after `rundir.verify`."""
    import json

    from mechinterp.config import from_dict

    out = Path(out)
    rundir.verify(out, what=f"{command.name} run")
    return from_dict(command.config, json.loads((out / "config.json").read_text()))


def figure_formats(png: bool) -> tuple[str, ...]:
    return ("html", "png") if png else ("html",)


def table_text(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda x: f"{x:.3f}")
