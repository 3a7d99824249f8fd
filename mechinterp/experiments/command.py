"""The one run path of the single commands (`eval`, `detect`, `knockout`, `patch`,
`cross-patch`): a frozen config → shards on the shard runner → tidy tables, figures and a sealed
provenance, in one run directory.

    out = run_command(EVAL, EvalConfig(task=TaskSpec(task="mdqa", n=8)), "runs")

Each command is a `Command`: `plan(config, model)` checks the config against the model and cuts
the work into shards (example chunks, or one instance pair each; `Plan.then` cuts a second
stage from the first one's rows); `finish(config, table, plan, card, out)` turns the shards'
rows into the command's tables and returns their file names;
`draw(out, png)` draws its figures from those tables alone (`mechinterp figures` reruns it).
As in the studies, a rerun reuses every finished shard whose inputs (the examples, the heads,
the model's weights) are unchanged, after a kill too, in this process or on Ray.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from mechinterp import store
from mechinterp.experiments import rundir
from mechinterp.experiments.specs import check_inputs
from mechinterp.runner import Shard, ShardStats, run_shards


@dataclass
class Plan:
    """What a command computes: its shards, the examples (written to examples.jsonl), facts for
    the provenance, and whatever `finish` needs besides the shard rows."""

    shards: list[Shard]
    examples: list | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)  # fingerprints of inputs besides the model
    then: Callable[[pd.DataFrame], list[Shard]] | None = None
    """a second stage cut from the first stage's rows (knockout: the clean answers, then the
    conditions on the examples answered); the first stage's rows go to `context["first"]`"""


@dataclass(frozen=True)
class Command:
    """A single command: `plan(config, model) -> Plan`; `finish(config, rows, plan, card)` →
    its tables by name (DataFrames, written as parquet and CSV; anything else as JSON);
    `draw(out, config)` → its figures by file stem, from the stored tables alone;
    `summary(out, top)` → what the CLI prints."""

    name: str
    config: type
    help: str
    plan: Callable[..., Plan]
    finish: Callable[..., dict[str, Any]]
    draw: Callable[[Path, Any], dict[str, Any]]
    summary: Callable[[Path, int], str]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def model_key(card) -> dict:
    """The model's identity for shard hashes: its card (weights' hash where there is one) and a
    fingerprint of the files it was loaded from."""
    facts = card.to_dict()
    facts.pop("device", None)  # where the weights sit does not change what they compute
    facts.pop("device_map", None)
    files = {"files": rundir.fingerprint(card.source), "lora": rundir.fingerprint(card.lora)}
    return {**facts, **files}


def run_command(
    command: Command, config, root: str | Path = "runs", *, model=None, **options
) -> Path:
    """Run (or resume) `command` on `config` and write its run directory; return it.
    `options`: `rundir.RunOptions` (out, engine, ray_address, png, progress, wait, force).

    Everything that can be checked is checked before the directory is written: the output
    location, the model, the config against the model, the examples. A run that fails before
    any shard finished leaves no directory behind.
    """
    from mechinterp.models import model_card
    from mechinterp.models.load import tune_allocator
    from mechinterp.tasks.example import write_jsonl

    opts = rundir.RunOptions(**options)
    check_inputs(config)
    out = opts.directory(root, config)
    rundir.check_writable(out)
    t0 = time.perf_counter()
    model = config.model.load() if model is None else model
    t_load = time.perf_counter() - t0
    card = model_card(model)
    plan = command.plan(config, model)
    created = not out.exists()
    try:
        with rundir.open_run(out, config, opts, what=f"{command.name} run"):
            stats = ShardStats()
            t_shards = time.perf_counter()
            run = partial(run_shards, directory=out / "shards", model=model,
                          model_spec=config.model, engine=opts.engine,
                          ray_address=opts.ray_address, stats=stats, desc=command.name,
                          progress=opts.progress,
                          key={"model": model_key(card), **plan.key})  # fmt: skip
            rows = run(plan.shards)
            if plan.then is not None:
                plan.context["first"] = rows
                rows = run(plan.then(rows))
            t_shards = time.perf_counter() - t_shards
            written = write_tables(out, command.finish(config, rows, plan, card))
            if plan.examples is not None:
                write_jsonl(plan.examples, out / "examples.jsonl")
            task = getattr(config, "task", None)
            store.write_json(out / "provenance.json", store.provenance(
                command=command.name, model_card=card.to_dict(), malloc_tuned=tune_allocator(),
                seed=getattr(task, "seed", None), engine=opts.engine, inputs=inputs(config),
                n_examples=len(plan.examples) if plan.examples is not None else None,
                **plan.facts,
                shards={"computed": len(stats.computed), "skipped": len(stats.skipped),
                        "repaired": stats.repaired},
                shard_seconds={n: round(s, 2) for n, s in stats.seconds.items()},
                timings={"load_s": round(t_load, 3), "shards_s": round(t_shards, 3),
                         "total_s": round(time.perf_counter() - t0, 3)},
                seal=rundir.seal(out, written),
            ))  # fmt: skip
            if opts.png is not None:
                draw(command, out, png=opts.png)
    except BaseException:
        if created and not any((out / "shards").rglob("*.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def write_tables(out: Path, tables: dict[str, Any]) -> list[str]:
    """Each DataFrame as `<name>.parquet` and `<name>.csv`, anything else as `<name>.json`;
    returns the files the seal covers (parquet and JSON)."""
    written = []
    for name, table in tables.items():
        if isinstance(table, pd.DataFrame):
            store.write_table(table, out / f"{name}.csv")
            written.append(store.write_table(table, out / f"{name}.parquet").name)
        else:
            written.append(store.write_json(out / f"{name}.json", table).name)
    return written


def draw(command: Command, out: Path, *, png: bool = True) -> list[Path]:
    """The command's figures from its stored tables (after `rundir.verify`)."""
    config = read_run(out, command)
    formats = ("html", "png") if png else ("html",)
    return [path for stem, fig in command.draw(out, config).items()
            for path in store.write_figure(fig, out / stem, formats=formats)]  # fmt: skip


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


def table_text(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda x: f"{x:.3f}")


def summary_table(out: Path, top: int) -> str:
    """The run's `summary.csv` as text (the summary of knockout and cross-patch)."""
    return table_text(pd.read_csv(out / "summary.csv"))
