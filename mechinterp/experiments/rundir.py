"""What every run directory guarantees, for every experiment:

- **One config.** `claim(out, config)` records the config in `config.json`, and refuses a
  directory that holds another config's results.
- **One writer.** `RunLock(out)` is held while a run (or `report` / `figures`) writes the
  directory. A second process refuses, naming the holder's PID, or waits for it with
  `wait=True`. A lock left by a process that no longer exists is taken over.
- **Tables that match their config.** `seal(out, config, tables)` records the config's hash and
  each stage table's SHA-256 in `provenance.json`; `verify(out)` refuses a directory whose
  config.json was replaced or whose tables were removed or altered since, before anything is
  recomputed from them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mechinterp import store
from mechinterp.errors import InputError, MechinterpError


@dataclass(frozen=True)
class RunOptions:
    """How a run runs, the same for every experiment (`run_study(config, **options)`, ...)."""

    out: str | Path | None = None
    """the run directory (None: `root/<slug>-<config hash>`)"""
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    """an existing Ray cluster (None: start a local one)"""
    png: bool | None = True
    """static PNG figures beside the HTML (False: HTML only; None: no figures)"""
    progress: bool = True
    wait: bool = False
    """when another process holds the run directory, wait for it instead of refusing"""
    force: bool = False
    """recompute every shard"""

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise InputError(f"engine must be 'local' or 'ray', got {self.engine!r}")

    def directory(self, root: str | Path, config: Any) -> Path:
        return Path(self.out) if self.out is not None else store.run_dir(root, config.slug, config)


@contextmanager
def open_run(out: Path, config: Any, options: RunOptions, *, what: str,
             replace: bool = False) -> Iterator[Path]:  # fmt: skip
    """Hold `out` for one run of `config`: the lock, the config check, `force`."""
    with RunLock(out, wait=options.wait):
        claim(out, config, what=what, replace=replace)
        if options.force:
            shutil.rmtree(out / "shards", ignore_errors=True)
        yield out


class RunDirError(InputError):
    """The run directory holds another config's results, or is not a finished run."""


class RunLockedError(MechinterpError, RuntimeError):
    """Another live process is writing the run directory."""


LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """`with RunLock(out): ...`: exclusive use of a run directory by this process."""

    def __init__(self, directory: str | Path, *, wait: bool = False, poll: float = 2.0) -> None:
        self.path = Path(directory) / LOCK
        self.wait, self.poll = wait, poll
        self.held = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[:6],
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        announced = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released (or taken over) between our two looks
                if self._stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                if not self.wait:
                    raise RunLockedError(
                        f"{self.path.parent} is being written by PID {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('since')}): wait for it to "
                        "finish, rerun with --wait to queue behind it, or use another --out. "
                        f"If that process is gone, remove {self.path}."
                    ) from None
                if not announced:
                    print(f"waiting for PID {holder.get('pid')} to release {self.path.parent}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    announced = True
                time.sleep(self.poll)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self

    def live_holder(self) -> dict | None:
        """The live process holding the directory (`pid`, `host`, `argv`, `since`), or None."""
        holder = self._holder()
        return None if holder is None or self._stale(holder) else holder

    def _holder(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # being written this instant, or garbage from a crash
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            return {"pid": None, "host": None, "since": None, "garbled_for_s": age}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("pid") is None:
            return holder.get("garbled_for_s", 0.0) > 5.0
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: cannot tell, so it is live
        return not _alive(int(holder["pid"]))

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def claim(out: Path, config: Any, *, what: str = "run", replace: bool = False) -> None:
    """Record `config` in `out/config.json`, or check the one there is the same config.
    `replace`: a changed config takes the directory over (for pipelines whose shards hash only
    their own inputs, so a rerun recomputes just what the change touches)."""
    from mechinterp.config import to_dict

    path = out / "config.json"
    mine = to_dict(config)
    if not path.is_file() or (replace and _same_kind(path, mine)):
        store.write_json(path, mine)
        return
    try:
        theirs = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); remove the directory") from e
    if "version" in mine and theirs.get("version") != mine["version"]:
        raise RunDirError(
            f"{out} was written by {what} version {theirs.get('version')}, this is version "
            f"{mine['version']}: its shards cannot be reused. Use another --out or remove it."
        )
    if theirs != mine:
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise RunDirError(
            f"{out} holds a {what} with another config (differs in {changed}); use another "
            "--out, or omit --out to get a directory per config"
        )


def _same_kind(path: Path, mine: dict) -> bool:
    """Whether the config at `path` is one of the same experiment (the same keys)."""
    try:
        return set(json.loads(path.read_text())) == set(mine)
    except json.JSONDecodeError:
        return False


def config_digest(out: Path) -> str:
    """The hash of the config.json in `out` as stored."""
    return store.config_hash(read_json(out / "config.json", what="run directory"))


def read_json(path: Path, *, what: str) -> Any:
    """A run directory's JSON file, or a clear error naming it."""
    if not path.is_file():
        raise RunDirError(f"{path.parent} is not a {what} (no {path.name})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}): restore it or rerun the command "
                          "that wrote the directory") from None


def seal(out: Path, tables: list[str]) -> dict:
    """What `verify` checks later: the config's hash and each of `tables`' SHA-256 (files in
    `out`). Goes into provenance.json under `seal`."""
    from mechinterp.runner import sha256

    return {"config_hash": config_digest(out),
            "tables": {name: sha256(out / name) for name in sorted(tables)}}  # fmt: skip


def verify(out: str | Path, *, what: str = "run") -> dict:
    """Refuse a run directory whose config.json or stage tables are not the ones its run wrote;
    return its provenance."""
    from mechinterp.runner import sha256

    out = Path(out)
    digest = config_digest(out)
    prov_path = out / "provenance.json"
    try:
        prov = json.loads(prov_path.read_text())
    except (OSError, json.JSONDecodeError):
        prov = {}
    sealed = prov.get("seal")
    if not sealed:
        raise RunDirError(
            f"{out} holds no finished {what} (provenance.json has no seal): rerun its command "
            "to finish or resume it"
        )
    if sealed["config_hash"] != digest:
        raise RunDirError(
            f"{out}/config.json (hash {digest}) is not the config its tables were computed "
            f"from (hash {sealed['config_hash']}): it was replaced or edited. Restore it, or "
            "rerun the command that made the tables."
        )
    for name, checksum in sealed["tables"].items():
        path = out / name
        if not path.is_file():
            raise RunDirError(f"{path} is missing: the {what}'s tables are incomplete; rerun "
                              "its command (finished shards are reused)")  # fmt: skip
        if sha256(path) != checksum:
            raise RunDirError(f"{path} was altered after the {what} wrote it; rerun its "
                              "command to rewrite it")  # fmt: skip
    return prov


def check_writable(path: str | Path) -> None:
    """Refuse early an output location this process cannot create or write."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"cannot write to {path}: {probe} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise RunDirError(f"cannot write to {path}: {probe} is not writable ({e.strerror}); "
                          "choose another --root / --out") from None  # fmt: skip


#: Files larger than this are fingerprinted by size and modification time, not read whole.
HASH_UP_TO = 64 << 20


def fingerprint(path: str | Path | None) -> str | None:
    """A recorded fingerprint of an input that changes when it does: the SHA-256 of a file's
    content (size and modification time for files over 64 MiB, such as weights); for a
    directory, the names, sizes and modification times of its files."""
    from mechinterp.runner import sha256

    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return sha256(p) if st.st_size <= HASH_UP_TO else store.config_hash(
            [p.name, st.st_size, st.st_mtime_ns])  # fmt: skip
    if p.is_dir():
        entries = sorted(
            (str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
        )  # fmt: skip
        return store.config_hash(entries)
    return None


def model_fingerprint(name: str) -> str | None:
    """`fingerprint` of what a model name loads from (the embedded model's GGUF, a file, a
    directory), without loading it; None for a model id in the HF cache."""
    from mechinterp.models.embedded import gguf_path, resolve_embedded

    embedded = resolve_embedded(name)
    return fingerprint(gguf_path(embedded) if embedded is not None else name)
