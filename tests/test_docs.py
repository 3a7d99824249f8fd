"""The README and the documentation site: the site builds in strict mode, every Python block runs,
shell blocks marked `<!-- docs-test: run -->` run, and every other `mechinterp ...` command line
in a shell block resolves its config (`--print-config`), so the docs cannot drift from the API."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_MARK = "<!-- docs-test: run -->"
#: A ```text block right after a Python block, introduced by this line, is its exact stdout.
PRINTS = "It prints:"
SHELLS = ("bash", "sh", "shell")
#: Commands whose arguments are a run directory or a planning request, not a config.
NO_CONFIG = ("figures", "report", "plan")
#: Flags whose value a config checks exists: the docs name the user's own files there.
PATH_FLAGS = ("--data", "--scores", "--recipient-scores")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    run: bool  # preceded by RUN_MARK
    prints: str | None = None  # the expected stdout of a Python block (PRINTS)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (fences at the start of a line)."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.relative_to(ROOT)}:{start + 1}: unclosed code fence"
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        code = "\n".join(lines[start + 1 : end]) + "\n"
        if lang == "text" and prev.strip() == PRINTS and out and out[-1].lang == "python":
            out[-1] = dataclasses.replace(out[-1], prints=code)
        out.append(Block(path, start + 1, lang, code, prev.strip() == RUN_MARK))
        i = end + 1
    return out


def _all_blocks() -> list[Block]:
    return [b for p in doc_files() for b in blocks(p)]


def _needs_model(code: str) -> bool:
    return "smollm2-135m" in code or "niah_grid" in code


def _python_pages():
    pages = {}
    for b in _all_blocks():
        if b.lang == "python":
            pages.setdefault(b.path, []).append(b)
    for path, bs in pages.items():
        marks = [pytest.mark.integration] if any(_needs_model(b.code) for b in bs) else []
        yield pytest.param(bs, id=str(path.relative_to(ROOT)), marks=marks)


def command_lines(code: str) -> list[list[str]]:
    """Each `mechinterp ...` command of a shell block as argv (continuations joined, comments
    dropped); `.venv/bin/mechinterp` counts too."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and Path(argv[0]).name == "mechinterp":
            out.append(argv[1:])
    return out


@pytest.fixture
def docs_cwd(tmp_path, monkeypatch):
    """A scratch working directory where `experiments/` is the repository's configs."""
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


@pytest.mark.parametrize("page", _python_pages())
def test_every_python_block_runs(page, docs_cwd):
    namespace: dict = {"__name__": "__docs__"}
    for block in page:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, block.where, "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - re-raised with the block's location
            raise AssertionError(f"the Python block at {block.where} fails: {e!r}") from e
        if block.prints is not None:
            assert out.getvalue() == block.prints, (
                f"{block.where} prints something else than the page says:\n{out.getvalue()}"
            )


def _run_blocks():
    for b in _all_blocks():
        if b.run:
            assert b.lang in SHELLS, f"{b.where}: {RUN_MARK} marks only shell blocks"
            yield pytest.param(b, id=b.where, marks=[pytest.mark.integration])  # whole commands


@pytest.mark.parametrize("block", _run_blocks())
def test_marked_shell_blocks_run(block, docs_cwd):
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"{block.where} exits {proc.returncode}:\n{proc.stderr[-3000:]}"


def _commands():
    for b in _all_blocks():
        if b.lang in SHELLS and not b.run:
            for argv in command_lines(b.code):
                yield pytest.param(argv, id=f"{b.where}:{' '.join(argv)[:60]}")


@pytest.mark.parametrize("argv", _commands())
def test_every_documented_command_resolves_its_config(argv, docs_cwd):
    """Flags and config keys as documented exist and resolve (nothing runs)."""
    from mechinterp.cli import _parser, main

    if not argv or argv[0] in NO_CONFIG or "--help" in argv or "--print-config" in argv:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                _parser().parse_args(argv)
            except SystemExit as e:
                assert e.code == 0, f"`mechinterp {' '.join(argv)}` does not parse"
        return
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in PATH_FLAGS and not Path(value).exists():  # stands for the user's file
            path = docs_cwd / value
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch() if path.suffix else path.mkdir()
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([*argv, "--print-config"])
    assert code == 0, f"`mechinterp {' '.join(argv)}`: {err.getvalue()}"


def test_docs_site_builds_strictly(tmp_path):
    """`make docs` in strict mode: a broken link, a page missing from the nav, a missing snippet
    or an unresolved API reference fails."""
    proc = subprocess.run(
        [str(BIN / "properdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_block_parser_reads_fences_and_marks(tmp_path):
    page = tmp_path / "x.md"
    page.write_text(f"text\n\n{RUN_MARK}\n```bash\nmechinterp eval \\\n  --n 2  # two\n```\n"
                    f"```python\nprint(1)\n```\n{PRINTS}\n\n```text\n1\n```\n")  # fmt: skip
    (shell, py, text) = blocks(page)
    assert (shell.lang, shell.run, shell.line) == ("bash", True, 4)
    assert (py.lang, py.run) == ("python", False)
    assert command_lines(shell.code) == [["eval", "--n", "2"]]
    assert (py.prints, text.prints) == ("1\n", None)
