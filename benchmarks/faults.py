"""Bad inputs and faults, tried as a demanding user would: commands, configs, data files, API
calls, run directories, concurrent runs and kills. Each case is classified:

- `clear`: refused with a one-line error that names the problem (the phrase the case expects);
- `recovered`: a fault the suite should survive (a kill, a corrupt shard, a stale lock), survived
  with correct results and nothing recomputed that was finished;
- `unclear`: refused, but the message does not name the problem;
- `traceback`: an exception escaped the command (or an API call raised an unrelated error);
- `silent`: accepted and gave a result where it should have refused (or a wrong result);
- `lost`: earlier results were removed or altered.

    .venv/bin/python benchmarks/faults.py            # writes benchmarks/results/faults.csv
    .venv/bin/python benchmarks/faults.py --only lock

Runs on the tiny random models (a few minutes on 2 cores); `tests/test_faults.py` runs it too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechinterp.tasks.niah import NEEDLES  # noqa: E402

OUTCOMES = ("clear", "recovered", "unclear", "traceback", "silent", "lost")


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    run: Callable[[Ctx], tuple[str, str]]  # → (outcome, detail)


class Ctx:
    """Shared fixtures: tiny models and finished runs, made once; `tmp()` gives a fresh folder."""

    def __init__(self, root: Path) -> None:
        from mechinterp.models.tiny import tiny_model

        self.root = root
        self.scrub = placeholders(str(root))  # machine paths → placeholders, for the table
        self.model = str(tiny_model(n_kv_heads=2, directory=root / "tiny").mechinterp_card.source)
        self.donor = str(tiny_model(n_kv_heads=2, seed=1,
                                    directory=root / "donor").mechinterp_card.source)  # fmt: skip
        self.mha = str(tiny_model(n_kv_heads=4, directory=root / "mha").mechinterp_card.source)
        self._runs: dict[str, Path] = {}
        self._n = 0
        self.scores = root / "scores.csv"
        rows = [{"layer": la, "head": h, "score": 0.5 if (la, h) == (1, 3) else 0.0}
                for la in range(2) for h in range(4)]  # fmt: skip
        pd.DataFrame(rows).to_csv(self.scores, index=False)
        self.study_yaml = root / "study.yaml"
        self.study_yaml.write_text(STUDY_YAML.format(model=self.model))

    def tmp(self) -> Path:
        self._n += 1
        path = self.root / f"case{self._n:03d}"
        path.mkdir()
        return path

    def run(self, name: str) -> Path:
        """A finished run (made once), copied into a fresh folder for the case to damage."""
        if name not in self._runs:
            root = self.root / f"made-{name}"
            argv = MADE[name](self)
            code, err = cli_call([*argv, "--root", str(root), "--no-png"])
            if code != 0:
                raise RuntimeError(f"could not make the {name} run: {err}")
            (self._runs[name],) = [p for p in root.iterdir() if p.is_dir()]
        copy = self.tmp() / "run"
        shutil.copytree(self._runs[name], copy)
        return copy

    def eval_args(self, *extra: str) -> list[str]:
        return ["eval", "--model", self.model, "--task", "mdqa", "--task.n", "2",
                "--task.n-docs", "2", "--max-new-tokens", "2", *extra]  # fmt: skip


STUDY_YAML = """\
model: {{name: {model}}}
detect: {{niah: {{needles: [0, 1], lengths: [500], depths: [0.5]}}, gate: null, top_k: 3,
          max_new_tokens: 8}}
knockout: {{niah: {{needles: [4, 5], lengths: [500], depths: [0.0, 1.0], seed: 1}},
            mdqa: {{n: 2, n_docs: 2}}, ks: [1, 2, 4], seeds: [0, 1], target: gold,
            max_new_tokens: 8, examples_per_shard: 2}}
robustness: {{scopes: [], generate: false}}
patch: {{n_pairs: 2, seeds: [0, 1], max_tries: 2}}
claims: {{k: 2}}
"""

MADE: dict[str, Callable[[Ctx], list[str]]] = {
    "eval": lambda c: c.eval_args("--examples-per-shard", "1"),
    "study": lambda c: ["study", "--config", str(c.study_yaml)],
}


def cli_call(argv: list[str]) -> tuple[int | str, str]:
    """(exit status, or "traceback: ..." for an escaped exception; stderr)."""
    from mechinterp.cli import main

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as e:  # argparse's own errors: usage + one message line
        code = e.code if isinstance(e.code, int) else 2
    except BaseException as e:  # noqa: BLE001 - what escapes is what we classify
        return f"traceback: {type(e).__name__}", traceback.format_exc(limit=3)
    return code, err.getvalue()


def refuses(argv: list[str] | Callable[[Ctx], list[str]], phrase: str, root: bool = True):
    """A CLI case that must exit 2 with `phrase` in its error, leaving no output behind."""

    def run(ctx: Ctx) -> tuple[str, str]:
        args = argv(ctx) if callable(argv) else list(argv)
        out = ctx.tmp()
        code, err = cli_call([*args, *(["--root", str(out / "runs")] if root else [])])
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if isinstance(code, str):
            return "traceback", f"{code}: {last}"
        if code == 0:
            return "silent", "exit 0"
        if (out / "runs").exists() and any((out / "runs").rglob("provenance.json")):
            return "silent", "a finished run was written"
        return ("clear" if phrase in err else "unclear"), last[:300]

    return run


def raises(fn: Callable[[Ctx], object], phrase: str, kind: type = Exception) -> Callable:
    """An API case that must raise `kind` naming the problem."""

    def run(ctx: Ctx) -> tuple[str, str]:
        try:
            fn(ctx)
        except kind as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            return ("clear" if phrase in str(e) else "unclear"), f"{type(e).__name__}: {text[:250]}"
        except Exception as e:  # noqa: BLE001
            return "traceback", f"{type(e).__name__}: {str(e)[:250]}"
        return "silent", "no error"

    return run


def with_model(fn: Callable) -> Callable[[Ctx], object]:
    def call(ctx: Ctx):
        from mechinterp.models import load_model

        return fn(load_model(ctx.model), ctx)

    return call


# ----------------------------------------------------------------------------- the cases


def _cli_cases() -> list[Case]:
    e = lambda *a: lambda c: c.eval_args(*a)  # noqa: E731
    m = lambda cmd, *a: lambda c: [cmd, "--model", c.model, *a]  # noqa: E731
    rows = [
        ("eval-lengths-text", e("--lengths", "abc"), "lengths: expected a list of int"),
        ("eval-lengths-tiny", e("--lengths", "8"), "lengths must be token counts >= 16"),
        ("eval-depth-range", e("--depths", "1.5"), "depths must lie in [0, 1]"),
        ("eval-needles-0", e("--needles", "0"), f"needles must lie in [1, {len(NEEDLES)}]"),
        ("eval-needles-99", e("--needles", "99"), f"needles must lie in [1, {len(NEEDLES)}]"),
        ("eval-haystack", e("--task.haystack", "web"),
         "haystack: expected one of 'essays', 'filler'"),
        ("eval-task", e("--task", "summarise"), "task: expected one of"),
        ("eval-variant", e("--task.variant", "fancy-high"), "unknown variant 'fancy-high'"),
        ("eval-n-0", e("--task.n", "0"), "n and n_docs must be >= 1"),
        ("eval-n-docs-0", e("--task.n-docs", "0"), "n and n_docs must be >= 1"),
        ("eval-max-new-0", e("--max-new-tokens", "0"), "max_new_tokens"),
        ("eval-batch-neg", e("--batch-size", "-1"), "batch_size"),
        ("eval-shard-0", e("--examples-per-shard", "0"), "examples_per_shard"),
        ("eval-template", e("--template", "html"), "template: expected one of 'chat', 'plain'"),
        ("eval-dtype", e("--dtype", "int8"), "dtype: expected one of"),
        ("eval-device-name", e("--device", "gpu"), "not a torch device"),
        ("eval-device-tpu", e("--device", "xla"), "only cpu, cuda and mps"),
        ("eval-rope-neg", e("--model.rope-theta", "-5"), "rope_theta must be > 0"),
        ("eval-data-missing", e("--data", "/nonexistent.jsonl"), "does not exist"),
        ("eval-data-niah", lambda c: ["eval", "--model", c.model, "--data", str(c.scores)],
         "applies to mdqa and multihop"),
        ("eval-set-unknown", e("--set", "colour=blue"), "unknown key 'colour'"),
        ("eval-set-typo", e("--set", "task.sed=1"), "did you mean 'seed'"),
        ("eval-set-nested-at-top", e("--set", "lengths=[256]"), "did you mean 'task.lengths'"),
        ("eval-set-no-equals", e("--set", "novalue"), "not of the form key=value"),
        ("eval-set-bad-yaml", e("--set", "task.lengths=[1,2"), "not valid YAML"),
        ("eval-flag-and-set", e("--task.n", "3", "--set", "task.n=4"), "both set 'task.n'"),
        ("eval-rows-0", e("--rows", "0"), "--rows must be >= 1"),
        ("eval-rows-negative", e("--rows", "-3"), "--rows must be >= 1"),
        ("eval-device-missing-gpu", e("--device", "cuda:99"), "device 'cuda:99'"),
        ("eval-engine", e("--engine", "spark"), "invalid choice: 'spark'"),
        ("eval-bogus-flag", e("--colour", "blue"), "unrecognized flag --colour"),
        ("eval-model-unknown", lambda c: ["eval", "--model", "gpt-17"], "unknown model 'gpt-17'"),
        ("eval-model-empty-dir", lambda c: ["eval", "--model", str(c.root)],
         "is not an HF model directory"),
        ("eval-window", e("--task", "niah", "--lengths", "4000", "--depths", "0.5", "--needles",
                          "1"), "longer than the model's context window"),
        ("detect-detector", m("detect", "--detector", "magic"), "detector: expected one of"),
        ("detect-gate-high", m("detect", "--gate", "1.5"), "gate must lie in [0, 1)"),
        ("detect-gate-neg", m("detect", "--gate", "-0.1"), "gate must lie in [0, 1)"),
        ("detect-convention", m("detect", "--convention", "both"), "convention: expected one of"),
        ("detect-keys", m("detect", "--keys", "all"), "keys: expected one of"),
        ("detect-seq-len", m("detect", "--detector", "induction", "--seq-len", "0"), ">= 1"),
        ("detect-n-seq", m("detect", "--detector", "induction", "--n-sequences", "0"), ">= 1"),
        ("detect-calibrate-text", m("detect", "--calibrate", "yes"), "unrecognized arguments"),
        ("detect-no-instance-passes", m("detect", "--lengths", "300", "--depths", "0.5",
                                        "--needles", "1", "--max-new-tokens", "2"),
         "no detection instance passed the success gate"),
        ("knockout-no-ranking", m("knockout"), "give exactly one of --heads"),
        ("knockout-both-rankings", lambda c: ["knockout", "--model", c.model, "--heads", "L0H0",
                                              "--scores", str(c.scores)], "exactly one of"),
        ("knockout-head-outside", m("knockout", "--heads", "L9H0", "--ks", "1"),
         "outside the model"),
        ("knockout-head-repeat", m("knockout", "--heads", "L0H0,L0H0"), "repeats L0H0"),
        ("knockout-head-syntax", m("knockout", "--heads", "head-one"), "head-one"),
        ("knockout-ks-0", m("knockout", "--heads", "L0H0", "--ks", "0"), "ks must be positive"),
        ("knockout-k-exceeds", m("knockout", "--heads", "L0H0", "--ks", "3"),
         "k=3 exceeds the 1 ranked heads"),
        ("knockout-seeds-empty", m("knockout", "--heads", "L0H0", "--seeds", ","),
         "has an empty item between commas"),
        ("knockout-mode", m("knockout", "--heads", "L0H0", "--modes", "mean"),
         "one of 'zero', 'uniform_attention'"),
        ("knockout-mode-repeat", m("knockout", "--heads", "L0H0", "--modes", "zero,zero"),
         "modes repeats zero"),
        ("knockout-scores-missing", m("knockout", "--scores", "/nonexistent.parquet"),
         "does not exist"),
        ("knockout-scores-columns", lambda c: ["knockout", "--model", c.model, "--scores",
                                               str(c.study_yaml)], "is not a head-score table"),
        ("knockout-scores-empty-dir", lambda c: ["knockout", "--model", c.model, "--scores",
                                                 str(c.root / "tiny")], "does not exist"),
        ("patch-threshold-and-topk", lambda c: ["patch", "--model", c.model, "--scores",
                                                str(c.scores), "--threshold", "0.2", "--top-k",
                                                "2"], "not both"),
        ("patch-topk-0", lambda c: ["patch", "--model", c.model, "--scores", str(c.scores),
                                    "--top-k", "0"], "top_k must be >= 1"),
        ("patch-topk-no-table", m("patch", "--top-k", "2"), "give --scores"),
        ("patch-heads-and-table", lambda c: ["patch", "--model", c.model, "--heads", "L0H0",
                                             "--scores", str(c.scores)], "not both"),
        ("patch-selects-nothing", lambda c: ["patch", "--model", c.model, "--scores",
                                             str(c.scores), "--threshold", "0.9"],
         "picks no heads"),
        ("patch-direction", m("patch", "--direction", "sideways"), "direction: expected one of"),
        ("patch-batch-0", m("patch", "--batch-size", "0"), "batch_size must be >= 1"),
        ("patch-donor-flag", lambda c: ["patch", "--model", c.model, "--donor", c.donor],
         "unrecognized flag --donor"),
        ("cross-no-heads", lambda c: ["cross-patch", "--model", c.model, "--donor", c.donor],
         "needs heads"),
        ("cross-donor-table-only", lambda c: ["cross-patch", "--model", c.model, "--donor",
                                              c.donor, "--scores", str(c.scores)],
         "need the recipient's scores"),
        ("cross-recipient-only", lambda c: ["cross-patch", "--model", c.model, "--donor", c.donor,
                                            "--heads", "L0H0", "--recipient-scores",
                                            str(c.scores)], "goes with --scores"),
        ("cross-shapes-differ", lambda c: ["cross-patch", "--model", c.model, "--donor", c.mha,
                                           "--heads", "L0H0"], "differ in shape"),
        ("cross-donor-unknown", lambda c: ["cross-patch", "--model", c.model, "--donor",
                                           "gpt-17", "--heads", "L0H0"], "unknown model"),
        ("study-claims-k", lambda c: ["study", "--config", str(c.study_yaml), "--knockout.ks",
                                      "1,4"],
         "claims.k=2 must be one of knockout.ks"),
        ("study-ks-exceed", lambda c: ["study", "--config", str(c.study_yaml), "--knockout.ks",
                                       "2,500"],
         "knockout.ks goes up to 500 but the model has 8 heads"),
        ("study-threshold-neg", lambda c: ["study", "--config", str(c.study_yaml),
                                           "--detect.threshold", "-0.1"],
         "threshold must lie in [0, 1)"),
        ("study-lengths-short", lambda c: ["study", "--config", str(c.study_yaml),
                                           "--detect.niah.lengths", "32"],
         "lengths must be token counts >= 64"),
        ("study-lengths-window", lambda c: ["study", "--config", str(c.study_yaml),
                                            "--detect.niah.lengths", "9000"],
         "longer than the model's context window"),
        ("study-needle-index", lambda c: ["study", "--config", str(c.study_yaml), "--set",
                                          "detect.niah.needles=[0,99]"], "needles are indices"),
        ("study-version", lambda c: ["study", "--set", "version=9"], "study version 9"),
        ("study-robustness-seed", lambda c: ["study", "--set", "robustness.seeds=[99]"],
         "must be among knockout.seeds"),
        ("study-heldout-overlap", lambda c: ["study", "--knockout.niah.seed", "0",
                                             "--knockout.niah.needles", "0,1"],
         "would repeat detection instances"),
        ("study-level", lambda c: ["study", "--claims.level", "1.5"], "level must lie in (0, 1)"),
        ("study-max-share", lambda c: ["study", "--set", "claims.max_share=1.5"],
         "claims.max_share must lie in (0, 1)"),
        ("study-draws", lambda c: ["study", "--knockout.draws", "uniform"],
         "draws must start with"),
        ("study-config-missing", lambda c: ["study", "--config", "/nonexistent.yaml"],
         "does not exist"),
        ("study-config-list", lambda c: ["study", "--config", str(_write(c, "- a\n- b\n"))],
         "must hold a mapping"),
        ("study-config-yaml", lambda c: ["study", "--config", str(_write(c, "a: [1,\n"))],
         "is not valid YAML"),
        ("study-config-unknown", lambda c: ["study", "--config", str(_write(c, "knockot: {}\n"))],
         "did you mean 'knockout'"),
        ("study-config-bool-text", lambda c: ["study", "--config",
                                              str(_write(c, "robustness: {generate: yes}\n"))],
         "robustness.generate: expected a bool"),
        ("data-not-json", lambda c: _data(c, "mdqa", "{not json}\n"), ":1: invalid JSON"),
        ("data-empty", lambda c: _data(c, "mdqa", ""), "no records"),
        ("data-missing-fields", lambda c: _data(c, "mdqa", '{"question": "q"}\n'), "answers"),
        ("data-mdqa-as-multihop", lambda c: _data(c, "multihop", _fixture("mdqa_sample.jsonl")),
         ":1: missing key 'answer'"),
        ("data-mdqa-as-citation", lambda c: _data(c, "citation", _fixture("mdqa_sample.jsonl")),
         "not a readable SummHay haystack"),
        ("data-summhay-as-mdqa", lambda c: _data(c, "mdqa", _fixture("summhay_sample.json")),
         ":1: invalid JSON"),
        ("data-directory", lambda c: c.eval_args("--data", str(c.root)), "is not a file"),
        ("extension-no-variants", lambda c: ["study", "extension", "--set", "variants=[]"],
         "variants is empty, so it selects nothing"),
        ("extension-reference-repeat", lambda c: ["study", "extension", "--set",
                                                  "variants=[realistic-high]"],
         "repeat the reference variant"),
        ("extension-limited", lambda c: ["study", "extension", "--limited", "64"],
         "limited must lie in [1, n_train)"),
        ("extension-task-repeat", lambda c: ["study", "extension", "--set",
                                             "tasks=[{task: mdqa}, {task: mdqa}]"],
         "tasks repeat a task"),
        ("extension-task-name", lambda c: ["study", "extension", "--task", "niah"],
         "task: expected one of 'mdqa', 'multihop', 'citation'"),
        # one rule for selections: a repeat is refused, an empty list selects nothing
        ("eval-lengths-repeat", e("--task", "niah", "--lengths", "128,128", "--depths", "0.5",
                                  "--needles", "1"), "task.lengths repeats 128"),
        ("eval-depths-empty-item", e("--depths", "0.5,,1.0"), "has an empty item between commas"),
        ("knockout-ks-repeat", m("knockout", "--heads", "L0H0,L0H1", "--ks", "1,1"),
         "ks repeats 1"),
        ("knockout-ks-empty", m("knockout", "--heads", "L0H0", "--set", "ks=[]"),
         "ks is empty, so it selects nothing"),
        ("knockout-head-case-repeat", m("knockout", "--heads", "L0H1 l0h1"), "repeats L0H1"),
        ("study-seeds-repeat", lambda c: ["study", "--config", str(c.study_yaml), "--set",
                                          "knockout.seeds=[0,0]"], "knockout.seeds repeats 0"),
        ("study-scopes-repeat", lambda c: ["study", "--config", str(c.study_yaml), "--set",
                                           "robustness.scopes=[all,all]"], "repeats all"),
        # score tables and data files that would otherwise rank or score silently wrong
        ("knockout-scores-nan", lambda c: ["knockout", "--model", c.model, "--scores",
                                           str(_table(c, "0,0,0.5\n0,1,nan\n"))],
         "score is missing, NaN or not a finite number at line 3"),
        ("knockout-scores-text", lambda c: ["knockout", "--model", c.model, "--scores",
                                            str(_table(c, "0,0,high\n"))], "at line 2"),
        ("knockout-scores-repeat", lambda c: ["knockout", "--model", c.model, "--scores",
                                              str(_table(c, "0,0,0.5\n0,0,0.1\n"))],
         "heads listed twice: L0H0"),
        ("knockout-scores-layer", lambda c: ["knockout", "--model", c.model, "--scores",
                                             str(_table(c, "0.5,0,0.5\n"))],
         "layer is not a non-negative integer at line 2"),
        ("data-duplicate-id", lambda c: _data(c, "mdqa", _mdqa_lines(("a", "q1"), ("a", "q2"))),
         ":2: id 'a' was already used on line 1"),
        ("data-duplicate-record", lambda c: _data(c, "mdqa", _mdqa_lines((None, "q"),
                                                                         (None, "q"))),
         ":2: repeats the record on line 1 exactly"),
        ("data-empty-question", lambda c: _data(c, "mdqa", _mdqa_lines(("a", " "))),
         ":1: question is empty"),
        ("data-not-utf8", lambda c: _data(c, "mdqa", _mdqa_lines(("a", "caf\u00e9")),
                                          encoding="latin-1"), ":1: not UTF-8 (byte 0xe9"),
        ("data-before-model", lambda c: ["eval", "--model", "/nonexistent-model", "--task",
                                         "mdqa", "--data", _data(c, "mdqa", "")[-3]],
         "no records"),
        ("plan-budget-negative", lambda c: ["plan", "study", "--budget-gib", "-1"],
         "positive number of GiB"),
        ("plan-budget-nan", lambda c: ["plan", "study", "--budget-gib", "nan"],
         "positive number of GiB"),
    ]
    cases = [Case(f"cli/{name}", name, refuses(argv, phrase, root=not name.startswith("plan")))
             for name, argv, phrase in rows]  # fmt: skip
    cases.append(Case("cli/knockout-heads-spaces", "--heads separated by spaces", _heads_spaces))
    return cases


def _heads_spaces(ctx: Ctx) -> tuple[str, str]:
    """`--heads "L1H3 L0H2"` (as the docs and `parse_heads` write lists) is two heads, in order."""
    from mechinterp.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["knockout", "--heads", "L1H3 L0H2", "--print-config"])
    heads = [line for line in out.getvalue().splitlines() if line.startswith("heads:")]
    ok = code == 0 and heads == ["heads: [L1H3, L0H2]"]
    return ("recovered" if ok else "silent"), f"exit {code}, {heads}"


def _table(ctx: Ctx, rows: str) -> Path:
    path = ctx.tmp() / "scores.csv"
    path.write_text("layer,head,score\n" + rows)
    return path


def _mdqa_lines(*records: tuple[str | None, str]) -> str:
    """JSONL of MDQA records, each (id or None, question)."""
    out = []
    for rid, question in records:
        rec = {"question": question, "answers": ["x"],
               "ctxs": [{"title": "t", "text": "x is here.", "isgold": True}]}  # fmt: skip
        out.append(json.dumps({"id": rid, **rec} if rid else rec, ensure_ascii=False))
    return "\n".join(out) + "\n"


def _fixture(name: str) -> str:
    return (Path(__file__).parent.parent / "tests" / "fixtures" / name).read_text()


def _data(ctx: Ctx, task: str, text: str, encoding: str = "utf-8") -> list[str]:
    path = ctx.tmp() / "data.jsonl"
    path.write_text(text, encoding=encoding)
    return ["eval", "--model", ctx.model, "--task", task, "--data", str(path),
            "--max-new-tokens", "1"]  # fmt: skip


def _write(ctx: Ctx, text: str) -> Path:
    path = ctx.tmp() / "config.yaml"
    path.write_text(text)
    return path


def _api_cases() -> list[Case]:
    from mechinterp.heads import HeadShape, parse_heads

    def patch(clean, corrupt, **kw):
        def call(model, ctx):
            from mechinterp.interventions.patching import logit_diff_metric, patch_heads

            return patch_heads(model, clean, corrupt, logit_diff_metric(1, 2), **kw)

        return with_model(call)

    def knock(heads, mode="zero"):
        def call(model, ctx):
            from mechinterp.interventions.knockout import KnockoutSpec, knockout

            with knockout(model, KnockoutSpec(heads=parse_heads(heads), mode=mode)):
                model([[1, 2, 3]])

        return with_model(call)

    def load(**kw):
        return lambda c: __import__("mechinterp.models", fromlist=["x"]).load_model(c.model, **kw)

    rows = [
        ("parse-heads-none", lambda c: parse_heads(None), "parse_heads"),  # (beartype under pytest)
        ("parse-heads-outside", lambda c: parse_heads("L0H9", HeadShape(2, 4, 2)),
         "outside the model"),
        ("patch-oov", patch([1, 2, 99999], [1, 2, 3]), "outside the model's vocabulary"),
        ("patch-negative-id", patch([1, -2, 3], [1, 2, 3]), "outside the model's vocabulary"),
        ("patch-lengths", patch([1, 2, 3], [1, 2]), "must have the same length"),
        ("patch-direction", patch([1, 2, 3], [1, 2, 4], direction="up"),
         "direction must be 'denoise' or 'noise'"),
        ("patch-positions", patch([1, 2, 3], [1, 2, 4], positions=[7]), "positions must lie in"),
        ("patch-batch", patch([1, 2, 3], [1, 2, 4], batch_size=0), "batch_size must be >= 1"),
        ("knockout-outside", knock("L9H0"), "outside"),
        ("knockout-mode", knock("L0H0", mode="nuke"), "nuke"),
        ("load-unknown", lambda c: __import__("mechinterp.models", fromlist=["x"]).load_model(
            "gpt-17"), "unknown model 'gpt-17'"),
        ("load-dtype", load(dtype="int4"), "int4"),
        ("load-device-gpu", load(device="cuda:7"), "cuda:7"),
        ("load-device-name", load(device="gpu"), "not a torch device"),
        ("detect-needs-examples", with_model(lambda m, c: __import__(
            "mechinterp.detect", fromlist=["x"]).detect(m, None, "retrieval")),
         "needs task examples"),
        ("detect-unknown", with_model(lambda m, c: __import__(
            "mechinterp.detect", fromlist=["x"]).detect(m, None, "telepathy")),
         "unknown detector 'telepathy'"),
        ("sweep-ks-0", with_model(lambda m, c: __import__(
            "mechinterp.interventions.sweep", fromlist=["x"]).knockout_sweep(
            m, [], ["L0H0"], ks=[0])), "ks must be positive"),
        ("sweep-mode", with_model(lambda m, c: __import__(
            "mechinterp.interventions.sweep", fromlist=["x"]).knockout_sweep(
            m, [], ["L0H0"], ks=[1], modes=["mean"])), "sweep modes must be among"),
        ("config-not-mapping", lambda c: __import__("mechinterp.config", fromlist=["x"]).from_dict(
            __import__("mechinterp.experiments", fromlist=["x"]).EvalConfig, {"task": "niah"}),
         "expected a mapping of TaskSpec fields"),
        ("correlate-lengths", lambda c: __import__(
            "mechinterp.analysis.stats", fromlist=["x"]).correlate([1, 2, 3], [1, 2]), "length"),
        ("run-study-unknown-option", lambda c: __import__(
            "mechinterp.experiments.study", fromlist=["x"]).run_study(None, engines="x"),
         "unexpected keyword argument 'engines'"),
        ("run-options-engine", lambda c: __import__(
            "mechinterp.experiments.rundir", fromlist=["x"]).RunOptions(engine="spark"),
         "engine must be 'local' or 'ray'"),
        ("patch-positions-empty", patch([1, 2, 3], [1, 2, 4], positions=[]),
         "positions=[] selects no position"),
        ("patch-positions-repeat", patch([1, 2, 3], [1, 2, 4], positions=[2, 2]),
         "positions repeat [2]"),
        ("patch-ragged-batch", patch([[1, 2, 3], [4]], [[1, 2, 4], [5]]), "(a batch?)"),
        ("patch-2d-tensor", patch(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 4]])),
         "a 1-D tensor; got shape (1, 3)"),
        ("patch-not-loaded", with_model(lambda m, c: __import__(
            "mechinterp.interventions", fromlist=["x"]).patch_heads(
            _Bare(m), [1, 2, 3], [1, 2, 4], lambda logits: logits[:, 0])),
         "not loaded by mechinterp.load_model"),
        ("knockout-not-loaded", with_model(lambda m, c: _knock_bare(m)),
         "not loaded by mechinterp.load_model"),
        ("sweep-ks-repeat", with_model(lambda m, c: __import__(
            "mechinterp.interventions.sweep", fromlist=["x"]).knockout_sweep(
            m, [], ["L0H0", "L0H1"], ks=[1, 1])), "ks repeats 1"),
        ("sweep-no-examples", with_model(lambda m, c: __import__(
            "mechinterp.interventions.sweep", fromlist=["x"]).knockout_sweep(
            m, [], ["L0H0"], ks=[1])), "examples is empty"),
        ("niah-lengths-repeat", with_model(lambda m, c: __import__(
            "mechinterp.tasks.niah", fromlist=["x"]).niah_grid(
            m.tokenizer, lengths=[256, 256], depths=[0.5], needles=1)), "lengths repeats 256"),
        ("stats-level", lambda c: __import__("mechinterp.analysis.stats", fromlist=["x"])
         .correlate([1, 2, 3, 4], [2, 1, 4, 3], level=95), "level must lie in (0, 1)"),
        ("plan-budget", lambda c: __import__("mechinterp.experiments.plan", fromlist=["x"]).plan(
            __import__("mechinterp.experiments.study", fromlist=["x"]).StudyConfig(),
            budget_gib=-1.0), "positive number of GiB"),
    ]
    cases = [Case(f"api/{name}", name, raises(fn, phrase)) for name, fn, phrase in rows]
    cases += [
        Case("api/knockout-entered-twice", "one knockout(...) object entered twice",
             raises(with_model(lambda m, c: _knock_twice(m)), "was already entered once",
                    RuntimeError)),
        Case("api/full-disk", "a table written to a full disk",
             raises(_full_disk, "No space left on device while writing", OSError)),
    ]
    return cases


class _Bare:
    """A bridge's config without the model card `load_model` attaches."""

    def __init__(self, model) -> None:
        self.cfg = model.cfg


def _knock_bare(model) -> None:
    from mechinterp.heads import Head
    from mechinterp.interventions.knockout import KnockoutSpec, knockout

    with knockout(_Bare(model), KnockoutSpec(heads=(Head(0, 0),), scope="all")):
        pass


def _knock_twice(model) -> None:
    from mechinterp.heads import Head
    from mechinterp.interventions.knockout import KnockoutSpec, knockout

    block = knockout(model, KnockoutSpec(heads=(Head(0, 0),), scope="all"))
    with block:
        model(torch.tensor([[1, 2, 3]]))
    with block:
        model(torch.tensor([[1, 2, 3]]))


def _full_disk(ctx: Ctx) -> None:
    """ENOSPC from the final rename of an atomic write; the message must name the file."""
    import errno

    from mechinterp import store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = store.os.replace
    store.os.replace = full
    try:
        store.write_table(pd.DataFrame({"a": [1]}), ctx.tmp() / "t.csv")
    finally:
        store.os.replace = real


# ---- run directories: refusals of damaged runs, and faults that must be survived


def _rundir_cases() -> list[Case]:
    def report(name: str, damage: Callable[[Path, Ctx], None], phrase: str, cmd="report"):
        def run(ctx: Ctx) -> tuple[str, str]:
            out = ctx.run(name)
            damage(out, ctx)
            keep = {p: p.read_bytes() for p in out.iterdir()
                    if p.suffix in (".md", ".csv") and p.is_file()}  # fmt: skip
            argv = [cmd, str(out)] + (["--no-png"] if cmd == "figures" else [])
            code, err = cli_call(argv)
            if any(p.read_bytes() != b for p, b in keep.items()):
                return "lost", "an existing report or table was rewritten"
            if isinstance(code, str):
                return "traceback", code
            if code == 0:
                return "silent", "exit 0"
            return ("clear" if phrase in err else "unclear"), err.strip().splitlines()[-1][:300]

        return run

    def other_config(out: Path, ctx: Ctx) -> None:
        cfg = json.loads((out / "config.json").read_text())
        if "claims" in cfg:
            cfg["claims"]["k"] = 4
        else:
            cfg["task"]["seed"] = 9
        (out / "config.json").write_text(json.dumps(cfg))

    def rm(name):
        return lambda out, ctx: (out / name).unlink()

    def alter(name):
        def damage(out, ctx):
            data = (out / name).read_bytes()
            (out / name).write_bytes(data[:-8] + b"\0" * 8)

        return damage

    rows = [
        ("report-study-other-config", "study", other_config, "is not the config its tables"),
        ("figures-study-other-config", "study", other_config, "is not the config its tables",
         "figures"),
        ("report-study-no-knockout", "study", rm("knockout.parquet"),
         "knockout.parquet is missing"),
        ("report-study-no-patch", "study", rm("patch.parquet"), "patch.parquet is missing"),
        ("report-study-altered", "study", alter("patch.parquet"), "patch.parquet was altered"),
        ("report-study-no-provenance", "study", rm("provenance.json"), "has no provenance.json"),
        ("report-study-bad-config-json", "study",
         lambda out, ctx: (out / "config.json").write_text("{not json"), "not valid JSON"),
        ("report-study-no-config", "study", rm("config.json"), "no config.json"),
        ("figures-eval-other-config", "eval", other_config, "is not the config its tables",
         "figures"),
        ("figures-eval-no-results", "eval", rm("results.parquet"), "results.parquet is missing",
         "figures"),
        ("figures-eval-altered", "eval", alter("results.parquet"), "was altered", "figures"),
        ("report-on-eval", "eval", lambda out, ctx: None, "has tables and figures, no claims"),
        ("figures-eval-no-provenance", "eval", rm("provenance.json"), "has no provenance.json",
         "figures"),
        ("figures-study-no-provenance", "study", rm("provenance.json"), "has no provenance.json",
         "figures"),
    ]
    cases = [Case(f"rundir/{r[0]}", r[0], report(r[1], r[2], r[3], *r[4:])) for r in rows]
    cases += [
        Case("rundir/figures-missing-dir", "figures on a missing directory",
             refuses(lambda c: ["figures", "/nonexistent-run"], "not a run directory",
                     root=False)),
        Case("rundir/root-is-file", "--root under a file",
             refuses(lambda c: c.eval_args("--out", str(c.study_yaml / "x")), "is a file")),
        Case("rundir/root-read-only", "--root on a read-only filesystem",
             refuses(lambda c: c.eval_args("--out", "/proc/mechinterp/x"), "is not writable")),
        Case("rundir/out-other-config", "--out holding another config's run", _other_out),
        Case("lock/live-holder", "a second writer while a live process holds the lock", _live),
        Case("lock/wait", "--wait behind a holder that finishes", _wait),
        Case("lock/two-processes", "two processes start the same run at once", _two_processes),
        Case("lock/stale", "a lock left by a dead process", _stale),
        Case("lock/garbage", "a lock file of garbage from a crash", _garbage),
        Case("lock/report-while-running", "report while a live process holds the lock",
             _report_locked),
        Case("kill/sigkill-eval", "SIGKILL mid-run, then rerun", _sigkill),
        Case("kill/ctrl-c", "Ctrl-C mid-run, then rerun", _ctrl_c),
        Case("kill/truncated-shard", "a truncated shard table", _truncated_shard),
        Case("kill/garbage-record", "a shard record of garbage", _garbage_record),
        Case("kill/stale-temps", "temp files a killed writer left", _stale_temps),
        Case("kill/results-deleted", "the results table deleted after a finished run",
             _results_deleted),
        Case("kill/config-deleted", "config.json deleted after a finished run", _config_deleted),
        Case("input/data-edited", "the --data file edited after a run", _data_edited),
        Case("input/model-retrained", "model weights replaced under the same path",
             _model_retrained),
        Case("input/scores-edited", "the --scores table edited after a run", _scores_edited),
        Case("input/force", "--force recomputes every shard", _force),
    ]
    return cases


def _finished(run: Path) -> dict:
    return json.loads((run / "provenance.json").read_text())


def _other_out(ctx: Ctx) -> tuple[str, str]:
    run = ctx.run("eval")
    before = (run / "results.parquet").read_bytes()
    code, err = cli_call(ctx.eval_args("--task.seed", "5", "--out", str(run)))
    if (run / "results.parquet").read_bytes() != before:
        return "lost", "the other config's results were overwritten"
    if code == 0:
        return "silent", "exit 0"
    clear = "holds a eval run with another config" in err
    return ("clear" if clear else "unclear"), ctx.scrub(err)[-200:]


def _hold(run: Path, pid: int) -> None:
    lock = {"pid": pid, "host": os.uname().nodename, "since": "now"}
    (run / ".lock").write_text(json.dumps(lock))


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _live(ctx: Ctx) -> tuple[str, str]:
    run, proc = ctx.run("eval"), _sleeper()
    try:
        _hold(run, proc.pid)
        before = (run / "results.parquet").read_bytes()
        code, err = cli_call(ctx.eval_args("--examples-per-shard", "1", "--out", str(run),
                                           "--force"))  # fmt: skip
        if (run / "results.parquet").read_bytes() != before:
            return "lost", "the held run was rewritten"
        if code == 0:
            return "silent", "exit 0 while another process held the directory"
        return ("clear" if f"PID {proc.pid}" in err else "unclear"), ctx.scrub(err)[-200:]
    finally:
        proc.kill()
        proc.wait()


SLOW = """
import sys, time
from mechinterp import runner
real = runner.write_shard
def slow(*args, **kwargs):
    time.sleep(2)
    real(*args, **kwargs)
runner.write_shard = slow
from mechinterp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _two_processes(ctx: Ctx) -> tuple[str, str]:
    out = ctx.tmp() / "run"
    argv = ctx.eval_args("--examples-per-shard", "1", "--out", str(out), "--no-png")
    procs = [subprocess.Popen([sys.executable, "-c", SLOW, *argv], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True) for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code == 2]
    if codes == [0, 2] and "being written by PID" in refused[0]:
        same = pd.read_parquet(out / "results.parquet").equals(
            pd.read_parquet(ctx.run("eval") / "results.parquet"))  # fmt: skip
        return ("clear" if same else "lost"), refused[0].strip().splitlines()[-1][:200]
    if "Traceback" in "".join(err for _, err in results):
        return "traceback", str(codes)
    return "silent", f"exit codes {codes}: both wrote the run"


def _report_locked(ctx: Ctx) -> tuple[str, str]:
    run, proc = ctx.run("study"), _sleeper()
    try:
        _hold(run, proc.pid)
        code, err = cli_call(["report", str(run)])
        if code == 0:
            return "silent", "exit 0"
        return ("clear" if f"PID {proc.pid}" in err else "unclear"), ctx.scrub(err)[-200:]
    finally:
        proc.kill()
        proc.wait()


def _wait(ctx: Ctx) -> tuple[str, str]:
    run, proc = ctx.run("eval"), _sleeper()
    _hold(run, proc.pid)
    threading.Timer(1.0, lambda: (proc.kill(), proc.wait())).start()
    code, err = cli_call(ctx.eval_args("--examples-per-shard", "1", "--out", str(run), "--wait"))
    ok = code == 0 and _finished(run)["shards"]["computed"] == 0
    return ("recovered" if ok else "unclear"), f"exit {code}"


def _stale(ctx: Ctx) -> tuple[str, str]:
    run, proc = ctx.run("eval"), _sleeper()
    proc.kill()
    proc.wait()
    _hold(run, proc.pid)
    code, err = cli_call(ctx.eval_args("--examples-per-shard", "1", "--out", str(run)))
    ok = code == 0 and not (run / ".lock").exists()
    return ("recovered" if ok else "unclear"), f"exit {code} {ctx.scrub(err)[-200:]}"


def _garbage(ctx: Ctx) -> tuple[str, str]:
    run = ctx.run("eval")
    (run / ".lock").write_text("{\"pid\": 12")
    old = time.time() - 60
    os.utime(run / ".lock", (old, old))
    code, err = cli_call(ctx.eval_args("--examples-per-shard", "1", "--out", str(run)))
    return ("recovered" if code == 0 else "unclear"), f"exit {code} {ctx.scrub(err)[-200:]}"


KILL = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if inherited off
from mechinterp import runner
real = runner.write_shard
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIG{sig})
runner.write_shard = write_then_die
from mechinterp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed(ctx: Ctx, sig: str) -> tuple[str, str]:
    out = ctx.tmp() / "run"
    argv = ctx.eval_args("--examples-per-shard", "1", "--out", str(out), "--no-png")
    proc = subprocess.run([sys.executable, "-c", KILL.format(sig=sig), *argv],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if sig == "INT" and "Traceback" in proc.stderr:
        return "traceback", ctx.scrub(proc.stderr)[-300:]
    code, err = cli_call(argv)
    shards = _finished(out)["shards"] if code == 0 else {}
    ok = shards == {"computed": 1, "skipped": 1, "repaired": []}
    same = ok and pd.read_parquet(out / "results.parquet").equals(
        pd.read_parquet(ctx.run("eval") / "results.parquet"))  # fmt: skip
    return ("recovered" if same else "lost"), f"killed: {proc.returncode}; rerun: {shards}"


def _sigkill(ctx: Ctx) -> tuple[str, str]:
    return _killed(ctx, "KILL")


def _ctrl_c(ctx: Ctx) -> tuple[str, str]:
    return _killed(ctx, "INT")


def _rerun(ctx: Ctx, run: Path, expect: dict, **extra) -> tuple[str, str]:
    import warnings

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        code, err = cli_call(ctx.eval_args("--examples-per-shard", "1", "--out", str(run),
                                           *extra.get("args", ())))  # fmt: skip
    if code != 0:
        return ("traceback" if isinstance(code, str) else "unclear"), ctx.scrub(err)[-300:]
    shards = _finished(run)["shards"]
    got = {k: (len(v) if isinstance(v, list) else v) for k, v in shards.items()}
    return ("recovered" if got == expect else "silent"), str(shards)


def _truncated_shard(ctx: Ctx) -> tuple[str, str]:
    run = ctx.run("eval")
    shard = sorted((run / "shards").rglob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:40])
    return _rerun(ctx, run, {"computed": 1, "skipped": 1, "repaired": 1})


def _garbage_record(ctx: Ctx) -> tuple[str, str]:
    run = ctx.run("eval")
    sorted((run / "shards").rglob("*.json"))[0].write_text("{oops")
    return _rerun(ctx, run, {"computed": 1, "skipped": 1, "repaired": 1})


def _stale_temps(ctx: Ctx) -> tuple[str, str]:
    run = ctx.run("eval")
    (run / "shards" / "eval" / ".0000.parquet.abc.tmp").write_text("half")
    outcome = _rerun(ctx, run, {"computed": 0, "skipped": 2, "repaired": 0})
    left = list((run / "shards").rglob("*.tmp"))
    return (outcome if not left else ("unclear", f"left {left}")) if outcome[0] else outcome


def _results_deleted(ctx: Ctx) -> tuple[str, str]:
    run = ctx.run("eval")
    (run / "results.parquet").unlink()
    return _rerun(ctx, run, {"computed": 0, "skipped": 2, "repaired": 0})


def _config_deleted(ctx: Ctx) -> tuple[str, str]:
    run = ctx.run("eval")
    (run / "config.json").unlink()
    return _rerun(ctx, run, {"computed": 0, "skipped": 2, "repaired": 0})


def _force(ctx: Ctx) -> tuple[str, str]:
    return _rerun(ctx, ctx.run("eval"), {"computed": 2, "skipped": 0, "repaired": 0},
                  args=("--force",))  # fmt: skip


def _data_edited(ctx: Ctx) -> tuple[str, str]:
    import warnings

    folder = ctx.tmp()
    data = folder / "qa.jsonl"
    lines = Path("tests/fixtures/mdqa_sample.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines) + "\n")
    argv = ["eval", "--model", ctx.model, "--task", "mdqa", "--data", str(data),
            "--max-new-tokens", "2", "--no-png", "--root", str(folder / "runs")]  # fmt: skip
    cli_call(argv)
    first = json.loads(lines[0])
    first["answers"] = ["Mars"]
    data.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        cli_call(argv)
    (run,) = (folder / "runs").iterdir()
    answer = pd.read_parquet(run / "results.parquet")["answer"].iloc[0]
    return ("recovered" if answer == "Mars" else "silent"), f"answer after the edit: {answer}"


def _model_retrained(ctx: Ctx) -> tuple[str, str]:
    import warnings

    from mechinterp.models.tiny import tiny_model

    folder = ctx.tmp()
    model = folder / "m"
    tiny_model(n_kv_heads=2, directory=model)
    argv = ["eval", "--model", str(model), "--task", "mdqa", "--task.n", "2", "--task.n-docs", "2",
            "--max-new-tokens", "3", "--no-png", "--root", str(folder / "runs")]  # fmt: skip
    cli_call(argv)
    shutil.rmtree(model)
    tiny_model(n_kv_heads=2, seed=5, directory=model)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        cli_call(argv)
    (run,) = (folder / "runs").iterdir()
    computed = _finished(run)["shards"]["computed"]
    return ("recovered" if computed == 1 else "silent"), f"computed after retraining: {computed}"


def _scores_edited(ctx: Ctx) -> tuple[str, str]:
    import warnings

    folder = ctx.tmp()
    table = folder / "s.csv"
    shutil.copy(ctx.scores, table)
    argv = ["knockout", "--model", ctx.model, "--scores", str(table), "--ks", "1", "--seeds", "0",
            "--set", "task.task=mdqa", "--set", "task.n=1", "--set", "task.n_docs=2",
            "--set", "max_new_tokens=1", "--set", "target=gold", "--no-png",
            "--root", str(folder / "runs")]  # fmt: skip
    cli_call(argv)
    df = pd.read_csv(table)
    df["score"] = [0.9 if (la, h) == (0, 1) else 0.0
                   for la, h in zip(df["layer"], df["head"], strict=True)]  # fmt: skip
    df.to_csv(table, index=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        cli_call(argv)
    (run,) = (folder / "runs").iterdir()
    rows = pd.read_parquet(run / "knockout.parquet")
    top = set(rows.loc[rows.condition == "top", "heads"])
    return ("recovered" if top == {"L0H1"} else "silent"), f"top-1 after the edit: {top}"


def all_cases() -> list[Case]:
    return _cli_cases() + _api_cases() + _rundir_cases()


def placeholders(tmp: str) -> Callable[[str], str]:
    """A function writing this machine's paths in a message as placeholders: the cases' temporary
    folder as `<tmp>`, the repository as `<repo>`, the home folder as `~`, so that the recorded
    table reads the same on every machine."""
    repo = Path(__file__).resolve().parent.parent
    names = {}
    for path, name in ((Path.home(), "~"), (repo, "<repo>"), (Path(tmp), "<tmp>")):
        for form in {str(path), os.path.realpath(path)}:
            if len(form) > 1:  # never "/"
                names[form] = name
    order = sorted(names, key=len, reverse=True)  # the longest first: a repository in the home
    # folder is written `<repo>`, not `~/...`

    def scrub(text: str) -> str:
        for form in order:
            text = text.replace(form, names[form])
        return text

    return scrub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/faults.csv")
    ap.add_argument("--only", default=None, help="run the cases whose id contains this")
    args = ap.parse_args(argv)
    cases = [c for c in all_cases() if args.only is None or args.only in c.id]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mechinterp-faults-") as tmp:
        ctx = Ctx(Path(tmp))
        for i, case in enumerate(cases, 1):
            t0 = time.perf_counter()
            try:
                outcome, detail = case.run(ctx)
            except Exception as e:  # noqa: BLE001 - a case that breaks its own harness
                outcome, detail = "traceback", f"harness: {type(e).__name__}: {e}"
            rows.append({"id": case.id, "what": case.what, "outcome": outcome,
                         "detail": ctx.scrub(" ".join(str(detail).split()))[:300],
                         "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
            print(f"[{i:3d}/{len(cases)}] {outcome:>9}  {case.id}", file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    tally = df["outcome"].value_counts().reindex(OUTCOMES, fill_value=0)
    print(" / ".join(f"{k} {v}" for k, v in tally.items()), f"(of {len(df)} cases)")
    for r in df[~df["outcome"].isin(("clear", "recovered"))].itertuples():
        print(f"  {r.outcome:>9}  {r.id}: {r.detail}")
    return 0 if tally[["unclear", "traceback", "silent", "lost"]].sum() == 0 else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
