"""Run directories, tidy tables and provenance; every write is atomic (temp file, then rename)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from mechinterp.errors import DiskFullError, InputError, SetupError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, else delete it. A
    full disk (or quota) is reported with the path that could not be written."""
    path = Path(path)
    with _naming_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming_full_disk(path):
            yield tmp_path
            if tmp_path.is_file():
                os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask
            os.replace(tmp_path, path)
    except BaseException:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def _naming_full_disk(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or str(path) in str(e):
            raise
        raise DiskFullError(e.errno, f"{os.strerror(e.errno)} while writing {path}: free space "
                      "there, or write the run elsewhere (--root)") from e  # fmt: skip


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a tidy table as parquet (or CSV if the suffix says so), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            raise InputError(f"table path must end in .parquet or .csv, got {path.name!r}")
    return path


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples and numpy scalars into plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def config_hash(config: Any) -> str:
    blob = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_dir(root: str | Path, slug: str, config: Any) -> Path:
    """`root/<slug>-<config hash>`: one directory per resolved config."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", slug).strip("-") or "run"
    return Path(root) / f"{safe}-{config_hash(config)}"


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


PROVENANCE_PACKAGES = ("mechinterp", "torch", "transformer-lens", "transformers", "numpy", "pandas")


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Each installed package's version; None for one not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def version_line() -> str:
    """What `mechinterp --version` prints: the suite's version and those it runs on."""
    from mechinterp import __version__

    others = [f"{n} {v or 'missing'}" for n, v in package_versions(VERSIONED).items()]
    return f"mechinterp {__version__} ({', '.join(others)}, Python {platform.python_version()})"


VERSIONED = ("torch", "transformers", "transformer-lens")


def provenance(**extra: Any) -> dict[str, Any]:
    """Package versions, git commit, host facts and whatever the caller adds (model card, seeds,
    timings)."""
    versions = package_versions(PROVENANCE_PACKAGES)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        **to_jsonable(extra),
    }


def write_figure(
    fig, stem: str | Path, *, formats: tuple[str, ...] = ("html", "png")
) -> list[Path]:
    """Write a plotly figure as `<stem>.html` and static images (kaleido; needs Chromium).

    Each file is written atomically. A missing browser is an error that says how to install it.
    """
    stem = Path(stem)
    written = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            if fmt == "html":
                fig.write_html(tmp, include_plotlyjs=True)
            else:
                try:
                    fig.write_image(tmp, format=fmt)
                except Exception as e:  # kaleido raises several types for a missing browser
                    if "chrom" in str(e).lower() or "browser" in str(e).lower():
                        raise SetupError(
                            f"static export needs Chromium: apt-get install -y chromium ({e})"
                        ) from e
                    raise
        written.append(path)
    return written
