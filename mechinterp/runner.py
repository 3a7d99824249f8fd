"""Sweeps as shards: one unit of work per shard, written atomically, skipped on rerun.

    shards = [Shard("knockout/niah-000-zero", knockout_shard, {"examples": [...], ...}), ...]
    table = run_shards(shards, run / "shards", model=ModelSpec(), engine="local")

A shard is a name, a module-level function `fn(model, **args) -> pd.DataFrame` and JSON-able
`args`. A finished shard is `<name>.parquet` plus `<name>.json` (its rows, the parquet's SHA-256,
the hash of its args, wall time, and the process's peak resident memory while it ran, which
`mechinterp plan` predicts). On rerun a shard whose record matches is read back instead of
recomputed; a shard whose parquet is missing, truncated or altered, or whose args changed, is
recomputed (with a warning), never silently read. A killed sweep therefore resumes where it
stopped: at most the shards in flight are lost.

Engines:

- `local`: in this process, one shard at a time (the model is loaded once, only if some shard
  needs computing).
- `ray`: Ray tasks (`pip install 'mechinterp[ray]'`); connects to `ray_address` (an existing
  cluster) or starts a local instance. Each worker loads the model once from its `ModelSpec`,
  uses the driver's torch thread count, and returns the table; the driver writes each shard as it
  arrives, so resume works the same on both engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from tqdm.auto import tqdm

from mechinterp import store
from mechinterp.errors import InputError, SetupError

Engine = Literal["local", "ray"]
ENGINES: tuple[Engine, ...] = ("local", "ray")


@dataclass(frozen=True)
class Shard:
    """One unit of work: `fn(model, **args)` returns a tidy table."""

    name: str
    fn: Callable[..., pd.DataFrame]
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = self.name.split("/")
        if not self.name or any(not p or p in (".", "..") or p.startswith(".") for p in parts):
            raise InputError(f"bad shard name {self.name!r}: use 'stage/slice' path parts")

    @property
    def args_hash(self) -> str:
        return self.input_hash()

    def input_hash(self, key: Any = None) -> str:
        """The hash of what the shard computes from: its function, its args and `key` (the
        fingerprints of inputs that are not in its args, e.g. the model's weights)."""
        fn = f"{self.fn.__module__}.{self.fn.__qualname__}"
        return store.config_hash({"fn": fn, **self.args, **({"key": key} if key else {})})


@dataclass
class ShardStats:
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # found corrupt or stale, then recomputed
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)  # peak RSS while each shard ran


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _paths(directory: Path, shard: Shard) -> tuple[Path, Path]:
    return directory / f"{shard.name}.parquet", directory / f"{shard.name}.json"


def shard_status(directory: str | Path, shard: Shard, key: Any = None) -> tuple[str, str]:
    """("done" | "missing" | "corrupt", why) for one shard's files."""
    table, record = _paths(Path(directory), shard)
    if not record.is_file():
        return "missing", ""
    try:
        meta = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return "corrupt", f"unreadable record ({e})"
    if not table.is_file():
        return "corrupt", "its table is missing"
    if meta.get("args_hash") != shard.input_hash(key):
        return "corrupt", "it was computed from other inputs"
    if sha256(table) != meta.get("sha256"):
        return "corrupt", "its table does not match the recorded checksum (truncated or altered)"
    return "done", ""


def read_shard(directory: str | Path, shard: Shard) -> pd.DataFrame:
    table, _ = _paths(Path(directory), shard)
    return pd.read_parquet(table)


def write_shard(
    directory: str | Path,
    shard: Shard,
    df: pd.DataFrame,
    seconds: float,
    key: Any = None,
    peak_mib: float | None = None,
) -> None:
    """Table first, then the record that marks it finished (both atomic)."""
    table, record = _paths(Path(directory), shard)
    store.write_table(df.reset_index(drop=True), table)
    store.write_json(
        record,
        {
            "name": shard.name,
            "args_hash": shard.input_hash(key),
            "sha256": sha256(table),
            "rows": len(df),
            "seconds": round(seconds, 3),
            "peak_rss_mib": None if peak_mib is None else round(peak_mib, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def _clear_stale_temps(directory: Path) -> None:
    """Temp files a killed process left behind (`.<name>.<random>.tmp`)."""
    if directory.is_dir():
        for tmp in directory.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def run_shards(
    shards: Sequence[Shard],
    directory: str | Path,
    *,
    model=None,
    model_spec=None,
    engine: Engine = "local",
    ray_address: str | None = None,
    cpus_per_shard: float = 1,
    gpus_per_shard: float = 0,
    desc: str = "shards",
    progress: bool = True,
    stats: ShardStats | None = None,
    load: bool = True,
    key: Any = None,
) -> pd.DataFrame:
    """Run the unfinished shards, then return every shard's table concatenated in shard order.

    `model` (a loaded model) or `model_spec` (anything with `.load()`, e.g. `ModelSpec`) gives
    the model; the `ray` engine needs `model_spec`, since workers load their own copy. With
    `load=False` the shards get `model=None` (they load their own, e.g. fine-tuned checkpoints).
    `key` (JSON-able) enters every shard's input hash: fingerprints of inputs the args only name,
    such as the model's weights, so a changed input recomputes the shards.
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, got {engine!r}")
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"duplicate shard names {dup[:3]}")
    directory = Path(directory)
    _clear_stale_temps(directory)
    stats = ShardStats() if stats is None else stats
    todo = []
    for shard in shards:
        state, why = shard_status(directory, shard, key)
        if state == "done":
            stats.skipped.append(shard.name)
            continue
        if state == "corrupt":
            warnings.warn(f"shard {shard.name} is unusable ({why}); recomputing it", stacklevel=2)
            stats.repaired.append(shard.name)
        todo.append(shard)
    if todo:
        if not load:
            model, model_spec = None, _NoModel()
        if engine == "local":
            _run_local(todo, directory, model, model_spec, desc, progress, stats, key)
        else:
            if model_spec is None:
                raise InputError("the ray engine needs model_spec= (workers load their own model)")
            _run_ray(
                todo, directory, model_spec, ray_address, cpus_per_shard, gpus_per_shard, desc,
                progress, stats, key,
            )  # fmt: skip
    frames = [read_shard(directory, s) for s in shards]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class PeakMemory:
    """The peak resident memory (MiB) of this process while the block runs: exact (`ru_maxrss`)
    when the block sets the process's record, else sampled every 20 ms from /proc/self/statm;
    and the peak CUDA allocation (MiB) where a GPU is in use."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.rss_mib = 0.0
        self.cuda_mib: float | None = None
        self._stop = threading.Event()

    @staticmethod
    def current_mib() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.rss_mib = max(self.rss_mib, self.current_mib())

    def __enter__(self) -> PeakMemory:
        import torch

        self._record = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.rss_mib = self.current_mib()
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        record = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if record > self._record:  # the block set the process's record: that is its peak
            self.rss_mib = max(self.rss_mib, record / 1024)
        self.rss_mib = max(self.rss_mib, self.current_mib())
        if self._cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
            self.cuda_mib = torch.cuda.max_memory_allocated() / 2**20


class _NoModel:
    """The model "spec" of shards that load their own models."""

    def load(self) -> None:
        return None


def _run_local(todo, directory, model, model_spec, desc, progress, stats, key) -> None:
    if model is None:
        if model_spec is None:
            raise InputError("give model= or model_spec= to compute shards")
        model = model_spec.load()
    bar = tqdm(todo, desc=desc, disable=not progress)
    for shard in bar:
        bar.set_postfix_str(shard.name, refresh=False)
        t0 = time.perf_counter()
        with PeakMemory() as peak:
            df = shard.fn(model, **shard.args)
        seconds = time.perf_counter() - t0
        write_shard(directory, shard, df, seconds, key, peak.rss_mib)
        stats.computed.append(shard.name)
        stats.seconds[shard.name] = seconds
        stats.peak_mib[shard.name] = peak.rss_mib


# ---------------------------------------------------------------- ray

_WORKER_MODELS: dict[str, Any] = {}


def _ray_task(spec, fn, args: dict, threads: int) -> tuple[pd.DataFrame, float, float]:
    """What a Ray worker runs: the model cached per worker process, the driver's thread count.
    Returns the table, the wall time and the worker's peak RSS while the shard ran."""
    import torch

    torch.set_num_threads(threads)
    if isinstance(spec, _NoModel):
        model = None
    else:
        key = json.dumps(store.to_jsonable(spec), sort_keys=True)
        if key not in _WORKER_MODELS:
            _WORKER_MODELS.clear()
            _WORKER_MODELS[key] = spec.load()
        model = _WORKER_MODELS[key]
    t0 = time.perf_counter()
    with PeakMemory() as peak:
        df = fn(model, **args)
    return df, time.perf_counter() - t0, peak.rss_mib


def ray_init(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at `address`, or start a local instance (once per process)."""
    try:
        import ray
    except ImportError as e:
        raise SetupError(
            "the ray engine needs Ray: pip install 'mechinterp[ray]' (or use --engine local)"
        ) from e
    if ray.is_initialized():
        return
    env = {
        "env_vars": {
            k: os.environ[k] for k in ("HF_HUB_OFFLINE", "MECHINTERP_CACHE") if k in os.environ
        }
    }
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env)


def _run_ray(todo, directory, model_spec, address, cpus, gpus, desc, progress, stats, key) -> None:
    import ray
    import torch

    ray_init(address)
    task = ray.remote(_ray_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    threads = torch.get_num_threads()
    pending = {task.remote(model_spec, s.fn, s.args, threads): s for s in todo}
    bar = tqdm(total=len(todo), desc=f"{desc} (ray)", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                shard = pending.pop(ref)
                df, seconds, peak_mib = ray.get(ref)
                write_shard(directory, shard, df, seconds, key, peak_mib)
                stats.computed.append(shard.name)
                stats.seconds[shard.name] = seconds
                stats.peak_mib[shard.name] = peak_mib
                bar.update(1)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
