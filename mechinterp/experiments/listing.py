"""The run directories under a root, as a table (`mechinterp runs`).

    list_runs("runs")   # one row per run directory: what wrote it, its model, status, verdicts

A run directory is named by its config's hash, so this is how to find one: the command that wrote
it (read from the keys of its `config.json`, which differ between experiments), the model, whether
it finished (`provenance.json` is written last), is being written now (a live `.lock`) or stopped
part-way (rerun the same command to resume it), its wall time and its headline verdicts.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from functools import cache
from pathlib import Path

import pandas as pd

from mechinterp.errors import InputError
from mechinterp.experiments.rundir import RunLock, read_json

COLUMNS = ["run", "command", "model", "status", "wall_s", "created", "verdicts"]


def experiment_configs() -> dict[str, type]:
    """Every command that runs an experiment (`knockout`, ..., `study`, `study extension`) → its
    config class."""
    from mechinterp.experiments import COMMANDS
    from mechinterp.experiments.extension import ExtensionConfig
    from mechinterp.experiments.study import StudyConfig

    classes = {name: c.config for name, c in COMMANDS.items()}
    return classes | {"study": StudyConfig, "study extension": ExtensionConfig}


@cache
def _experiments() -> dict[frozenset[str], str]:
    """Each experiment's config keys → its command name."""
    keys = {n: frozenset(f.name for f in dataclasses.fields(c) if f.init)
            for n, c in experiment_configs().items()}  # fmt: skip
    clash = [k for k, n in Counter(keys.values()).items() if n > 1]
    assert not clash, f"two experiments share config keys {sorted(clash[0])}"
    return {v: k for k, v in keys.items()}


def run_kind(run: str | Path, config: dict | None = None) -> str:
    """The command that wrote a run directory (`knockout`, `study`, `study extension`, ...;
    `study extension` with several tasks is `study extension (tasks)`); `config` is its
    config.json when the caller has read it already."""
    run = Path(run)
    if config is None:
        config = read_json(run / "config.json", what="run directory")
    name = _experiments().get(frozenset(config)) if isinstance(config, dict) else None
    if name is None:
        raise InputError(f"{run}/config.json is not the config of any mechinterp command (its "
                         f"keys: {sorted(config)[:8]}); is this a run directory?")  # fmt: skip
    if name == "study extension" and config.get("tasks"):
        return "study extension (tasks)"
    return name


def run_status(run: str | Path) -> str:
    """`running (PID n)` while a live process holds the run, else `finished` when provenance.json
    was written, else `partial` (rerun the same command to resume it)."""
    run = Path(run)
    holder = RunLock(run).live_holder()
    if holder is not None:
        return f"running (PID {holder.get('pid')})"
    return "finished" if (run / "provenance.json").is_file() else "partial"


def _verdicts(run: Path) -> str:
    path = run / "claims_headline.csv"
    if not path.is_file():
        return ""
    counts = Counter(pd.read_csv(path)["verdict"])
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))


def _row(run: Path) -> dict:
    config = read_json(run / "config.json", what="run directory")
    model = config.get("model", {})
    prov = json.loads(p.read_text()) if (p := run / "provenance.json").is_file() else {}
    timings = prov.get("timings", {})
    wall = timings.get("total_s", sum(v for k, v in timings.items() if k.endswith("_s")) or None)
    return {"run": run.name, "command": run_kind(run, config),
            "model": model.get("name") if isinstance(model, dict) else model,
            "status": run_status(run), "wall_s": None if wall is None else round(float(wall), 1),
            "created": prov.get("created"), "verdicts": _verdicts(run)}  # fmt: skip


def format_runs(frame: pd.DataFrame) -> str:
    """`list_runs`'s table as `mechinterp runs` prints it: wall time as 1h02m or 3m05s, columns
    left-aligned so each run's name starts its line."""
    shown = frame.assign(wall=[_duration(s) for s in frame["wall_s"]])
    shown = shown[["run", "command", "model", "status", "wall", "created", "verdicts"]]
    cells = [[str(v) for v in row] for row in shown.fillna("").itertuples(index=False)]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(shown.columns)]
    rows = [list(shown.columns), *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


def runs_text(root: str | Path = "runs") -> str:
    """What `mechinterp runs` prints: `format_runs(list_runs(root))`, or that there are none."""
    frame = list_runs(root)
    return format_runs(frame) if not frame.empty else f"no run directories under {root}"


def _duration(seconds) -> str:
    if seconds is None or seconds != seconds:
        return ""
    m, s = divmod(round(float(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def list_runs(root: str | Path = "runs") -> pd.DataFrame:
    """One row per run directory directly under `root` (columns `COLUMNS`), newest first;
    folders without a config.json are not runs and are left out."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a directory: give the root the runs were written under "
                         "(the commands' --root, default 'runs')")  # fmt: skip
    runs = sorted(p for p in root.iterdir() if (p / "config.json").is_file())
    rows = [_row(p) for p in runs]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    mtime = [max((p / f).stat().st_mtime for f in ("config.json", "provenance.json")
                 if (p / f).exists()) for p in runs]  # fmt: skip
    return frame.assign(_t=mtime).sort_values("_t", ascending=False).drop(columns="_t").reset_index(
        drop=True
    )
