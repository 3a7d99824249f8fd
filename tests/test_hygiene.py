"""What the repository says stands on its own: no tracked file points at something users do not
have (a file outside the repository, an issue tracker's numbers, a path on one machine) or keeps
a first-person work note.

Every file `git ls-files` lists is read, except binary files and this one (it has to spell the
patterns out). A hit names the file, the line, the offending text and what to write instead. A
line that must keep such text (a test fixture, a shell default) goes in `ALLOWED`, with the exact
text it may hold and the reason.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()

#: Suffixes never read as text (git's own binary check covers the rest).
BINARY_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".ico", ".pdf", ".parquet",
                   ".safetensors", ".pt", ".bin", ".gguf", ".npy", ".npz", ".zip", ".gz",
                   ".whl", ".pkl")  # fmt: skip


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    fix: str


DOC_PAGES = (
    "docs/concepts/scores.md, docs/concepts/interventions.md, docs/concepts/patching.md, "
    "docs/concepts/statistics.md, docs/experiments/extension.md, docs/experiments/study.md, "
    "docs/experiments/long-context.md"
)

#: What users of the repository cannot follow, each with what to write instead.
RULES = (
    Rule(
        "point outside the repository",
        re.compile(r"\.\./shared\b|\bDESIGN\.md\b"),
        "users have only the repository: point at the page under docs/ that holds the "
        f"definition ({DOC_PAGES}), or state the definition where it is used",
    ),
    Rule(
        "name an issue number",
        re.compile(r"\b[Ii]ssues?[ -]?#?\d+\b"),
        "users cannot look the number up: drop it and say what the change or measurement is",
    ),
    Rule(
        "record a path of one machine",
        # an absolute path under a machine's scratch or home folders, not part of a URL or a
        # longer path (`https://host/home/`, `runs/tmp/`)
        re.compile(r"(?<![\w.~/])/(?:tmp|work|root|home|Users)(?:/|\b)"),
        "the path exists on one machine only: record a path relative to the repository, a run "
        "directory's name or a placeholder (`<tmp>`, `/path/to/run`)",
    ),
    Rule(
        "keep a first-person or work-session note",
        re.compile(
            r"\bI['’](?:ve|m|d|ll)\b"
            r"|\bI (?:have|haven't|had|am|was|did|didn't|do|don't|think|thought|found|measured"
            r"|could|couldn't|can|cannot|can't|will|would|tried|ran|used|saw|checked|believe"
            r"|guess|wrote|added|kept|noticed|expect|suspect|got|need|want|also|then|just"
            r"|should|might|made|changed|fixed|left|chose|decided|assume|assumed|know|knew"
            r"|looked|suggest|recommend|hope)\b"
            r"|\b[Mm]y (?:machine|laptop|computer|box|runs?|notes?|measurements?)\b"
            r"|\b[Nn]o GPU (?:was|is|were) lent\b"
            r"|\b(?:work|this|previous|next|earlier|later) sessions?\b"
        ),
        "state the fact impersonally (what was measured, on what, with what result) or remove "
        "the note",
    ),
)


@dataclass(frozen=True)
class Allowed:
    path: str
    text: str  # the exact text on the line that may hold the hit (the hit must lie inside it)
    reason: str


ALLOWED = (
    Allowed("tools/canary", "${TMPDIR:-/tmp}",
            "the shell's default temporary folder when TMPDIR is unset, not a recorded path"),
    Allowed("tests/test_config.py", 'Path("/tmp/somewhere")',
            "a fixture value: an absolute path must round-trip through to_dict and from_dict"),
)  # fmt: skip


@dataclass(frozen=True)
class Hit:
    path: str
    line: int  # 0: the file's name
    column: int
    rule: Rule
    found: str
    text: str

    def __str__(self) -> str:
        where = (f"{self.path} (its name)" if self.line == 0
                 else f"{self.path}:{self.line}:{self.column}")  # fmt: skip
        text = self.text.strip()
        if len(text) > 140:
            text = text[:137] + "..."
        return f"  {where}: {self.found!r} in: {text}"


def _allowed_spans(path: str, line: str) -> list[tuple[int, int, Allowed]]:
    spans = []
    for entry in ALLOWED:
        if entry.path == path:
            spans += [(m.start(), m.end(), entry) for m in re.finditer(re.escape(entry.text), line)]
    return spans


def scan_line(path: str, number: int, line: str, following: str = "") -> tuple[
        list[Hit], set[Allowed]]:  # fmt: skip
    """The rules' hits that start on one line, and the allow-list entries that excused any.

    The start of the `following` line is read too, so that a note wrapped across two lines
    ("and I" / "have not found") is caught; it is reported on the line where it starts."""
    text = f"{line} {following.lstrip()[:60]}" if following.strip() else line
    hits, used = [], set()
    spans = _allowed_spans(path, text)
    for rule in RULES:
        for m in rule.pattern.finditer(text):
            if m.start() >= len(line):
                continue  # found on the following line: reported there
            excused = [e for s, t, e in spans if s <= m.start() and m.end() <= t]
            if excused:
                used.add(excused[0])
            else:
                hits.append(Hit(path, number, m.start() + 1, rule, m.group(0), line))
    return hits, used


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: there is no list of tracked files to check")
    return sorted(p for p in out.decode().split("\0") if p)


def read_text(root: Path, path: str) -> str | None:
    """The file's text, or None for a binary file, a link or one missing from the work tree."""
    full = root / path
    if path.lower().endswith(BINARY_SUFFIXES) or full.is_symlink() or not full.is_file():
        return None
    data = full.read_bytes()
    if b"\0" in data[:8000]:  # git's own test for a binary file
        return None
    return data.decode("utf-8", errors="replace")


def scan_files(root: Path, paths: list[str]) -> tuple[list[Hit], set[Allowed], list[str]]:
    """Every hit in `paths` (relative to `root`), the allow-list entries used, the files read."""
    hits, used, read = [], set(), []
    for path in paths:
        if path == SELF:
            continue
        name_hits, name_used = scan_line(path, 0, path)
        hits += name_hits
        used |= name_used
        text = read_text(root, path)
        if text is None:
            continue
        read.append(path)
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            following = lines[number] if number < len(lines) else ""
            line_hits, line_used = scan_line(path, number, line, following)
            hits += line_hits
            used |= line_used
    return hits, used, read


@functools.cache
def scan() -> tuple[list[Hit], set[Allowed], list[str]]:
    """The scan of every tracked file, made once for all the tests."""
    return scan_files(ROOT, tracked_files())


def report(rule: Rule, hits: list[Hit] | None = None) -> str:
    """The failure message for `rule`: what to fix, then each hit; empty when none."""
    hits = [h for h in (scan()[0] if hits is None else hits) if h.rule == rule]
    if not hits:
        return ""
    files = sorted({h.path for h in hits})
    head = (f"{len(hits)} line(s) in {len(files)} tracked file(s) {rule.name} "
            f"({', '.join(files)}).\nFix: {rule.fix}.\n"
            "(If a line must keep the text, add it to ALLOWED in tests/test_hygiene.py with "
            "the exact text and the reason.)\n")  # fmt: skip
    return head + "\n".join(str(h) for h in hits)


def _rule(name: str) -> Rule:
    (rule,) = [r for r in RULES if r.name == name]
    return rule


def check(rule_name: str) -> None:
    message = report(_rule(rule_name))
    if message:
        pytest.fail(message, pytrace=False)


def test_no_tracked_file_points_outside_the_repository():
    check("point outside the repository")


def test_no_tracked_file_names_an_issue_number():
    check("name an issue number")


def test_no_tracked_file_records_a_path_of_one_machine():
    check("record a path of one machine")


def test_no_tracked_file_keeps_a_first_person_or_work_session_note():
    check("keep a first-person or work-session note")


def test_the_scan_reads_the_documentation_and_the_code():
    read = set(scan()[2])
    for path in ("README.md", "pyproject.toml", "mechinterp/__init__.py", "tests/conftest.py"):
        assert path in read, f"{path} was not read as a text file"
    assert SELF not in read
    assert not any(p.endswith(".png") for p in read)


def test_every_allow_list_entry_still_excuses_a_line():
    stale = [e for e in ALLOWED if e not in scan()[1]]
    assert not stale, (
        "these ALLOWED entries in tests/test_hygiene.py excuse no line any more; remove them: "
        + "; ".join(f"{e.path}: {e.text!r}" for e in stale)
    )


BAD = [
    ("point outside the repository", "Modes (see ../shared/DESIGN.md):"),
    ("point outside the repository", 'Optional (DESIGN.md "Learned localisation").'),
    ("name an issue number", "Cross-model patching has since been batched (issue 19)."),
    ("name an issue number", "# measured, Issue #3"),
    ("name an issue number", "Investigation notes for issue17."),
    ("record a path of one machine", '"run": "/tmp/demo/runs/study-smollm2-135m-816afcec59",'),
    ("record a path of one machine", "Nothing under /work/main was changed."),
    ("record a path of one machine", "weights in `/root/.cache/huggingface`"),
    ("record a path of one machine", "open('/home/alice/x.json')"),
    ("record a path of one machine", "the scripts lived in /tmp and are gone"),
    ("keep a first-person or work-session note", "I have not found where the memory goes."),
    ("keep a first-person or work-session note", "I measured 19 min on 2 cores."),
    ("keep a first-person or work-session note", "I've kept the old table."),
    ("keep a first-person or work-session note", "- No GPU was lent, so there is no GPU table."),
    ("keep a first-person or work-session note", "left for the next session"),
]

GOOD = [
    "Modes (docs/concepts/interventions.md):",
    "the retrieval score (Wu et al., arXiv 2404.15574)",
    "I = torch.eye(4)  # identity",
    "x = I @ y",
    "Head-set metrics, Wu head-score JSON I/O",
    "a Type I error rate of 0.05; phase I of the pipeline",
    "AtP* (attribution patching with its two corrections)",
    "see https://github.com/home/tmp/issues and https://example.org/work/x",
    'venv=$(mktemp -d "$TMPDIR/mechinterp-canary.XXXXXX")',
    "`--out runs/tmp/x` and .venv/bin/python; `<tmp>/case083/config.yaml`",
    "model.name=/path/to/model",
    "my = sum(y for _, y in pts) / len(pts)",
    "an issue the shard writer handles; issues of ordering",
    "Sessions of Ray workers",
]


@pytest.mark.parametrize(("name", "line"), BAD, ids=[b[1][:40] for b in BAD])
def test_the_rules_catch_a_planted_bad_line(name, line):
    hits, _ = scan_line("planted.md", 1, line)
    assert name in {h.rule.name for h in hits}, f"{line!r} was not caught as {name!r}"


@pytest.mark.parametrize("line", GOOD, ids=[g[:40] for g in GOOD])
def test_the_rules_pass_a_good_line(line):
    hits, _ = scan_line("planted.md", 1, line)
    assert not hits, "\n".join(str(h) for h in hits)


def test_a_note_wrapped_across_two_lines_is_caught_on_the_line_where_it_starts():
    (hit,) = scan_line("planted.md", 7, "peaks at 3.6 GB, and I", "  have not found where")[0]
    assert (hit.line, hit.found) == (7, "I have")
    assert scan_line("planted.md", 8, "have not found where", "")[0] == []
    assert scan_line("planted.md", 1, "x = I", "if x.any():")[0] == []


def test_an_allow_list_entry_excuses_only_its_own_text_in_its_own_file():
    line = 'venv=$(mktemp -d "${TMPDIR:-/tmp}/mechinterp-canary.XXXXXX")'
    assert scan_line("tools/canary", 1, line)[0] == []
    assert scan_line("tools/other", 1, line)[0]  # another file: not excused
    assert scan_line("tools/canary", 1, line + "  # copied to /tmp/out")[0]  # other text: not


def test_a_planted_file_fails_the_scan_with_its_line_and_the_fix(tmp_path):
    (tmp_path / "notes.md").write_text("fine\nsee issue 4 for the details\n")
    (tmp_path / "plot.png").write_bytes(b"\x89PNG issue 5")  # binary by its suffix
    (tmp_path / "blob.dat").write_bytes(b"issue 6 \0\1")  # binary by its content
    hits, _, read = scan_files(tmp_path, ["notes.md", "plot.png", "blob.dat"])
    message = report(_rule("name an issue number"), hits)
    assert read == ["notes.md"]
    assert "notes.md:2:5: 'issue 4' in: see issue 4 for the details" in message
    assert "drop it and say what the change or measurement is" in message
