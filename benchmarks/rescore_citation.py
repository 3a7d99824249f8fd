"""Citation scores before and after the citation parser and gate of `mechinterp.tasks.citation`,
per model of an extension run's citation task, beside the cite-every-document baseline.

Before: only `[N]` reads as a citation, and an example is correct at citation F1 ≥ 0.5 (the scorer
the extension runs used until `parse_citations` and `citation_correct`). After: the current
`citation_scores` (every form `parse_citations` reads) and `citation_correct` (every insight
covered, citation precision and recall each ≥ 0.5). Both score the same responses with the same
bullet-to-insight matching; only the citation reading and the gate differ.

The evaluation examples are rebuilt from the run's config.json, so the baseline is scored for any
run. The models' rows need the run's `eval.parquet` (its `prediction` column); a directory of
committed report files does not hold it, and then only the baseline is scored.

    .venv/bin/python benchmarks/rescore_citation.py RUN_DIR [--json OUT]

RUN_DIR: an extension run's citation directory, or a multi-task run that holds `citation/`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from unittest import mock

import pandas as pd

from mechinterp.experiments.extension import ExtensionConfig, build_data, data_args
from mechinterp.experiments.extension.report import citation_baseline, label_of
from mechinterp.experiments.study.report import read_config
from mechinterp.tasks import citation

_OLD_CITE = re.compile(r"\[(\d+)\]")
SCORES = ["citation_precision", "citation_recall", "citation_f1", "coverage", "correct"]


def _old_scorer():
    """The scorer before: `[N]` citations only, and correct at citation F1 ≥ 0.5."""
    return mock.patch.multiple(
        citation,
        parse_citations=lambda text: frozenset(int(m) for m in _OLD_CITE.findall(text)),
        strip_citations=lambda text: " ".join(_OLD_CITE.sub(" ", text).split()),
        citation_correct=lambda scores, **_: scores["citation_f1"] >= 0.5,
    )


def _scored(run_dir: Path, config) -> pd.DataFrame:
    path = run_dir / "eval.parquet"
    if path.is_file():
        return citation_baseline({"eval": pd.read_parquet(path)}, config)
    base = citation.cite_all_baseline(build_data(**data_args(config, config.reference, "eval")))
    return pd.DataFrame([{"model_variant": "cite-all", "n": len(base), **base[SCORES].mean()}])


def rescore(run_dir: str | Path) -> pd.DataFrame:
    """One row per model (and the baseline, `cite-all`): `before_*` and `after_*` means of
    citation precision, recall, F1, coverage and correct, and `n` examples."""
    run_dir = Path(run_dir)
    if (run_dir / "citation" / "config.json").is_file():  # a multi-task run
        run_dir = run_dir / "citation"
    config = read_config(run_dir, ExtensionConfig, what="extension")
    if config.task != "citation":
        raise ValueError(f"{run_dir} is a {config.task} run; point at a citation run directory")
    with _old_scorer():
        before = _scored(run_dir, config).set_index("model_variant")
    after = _scored(run_dir, config).set_index("model_variant")
    out = pd.concat([before[SCORES].add_prefix("before_"), after[SCORES].add_prefix("after_"),
                     after["n"]], axis=1).reset_index()  # fmt: skip
    out.insert(1, "label", ["cite every document (baseline)" if v == "cite-all"
                            else label_of(v, config) for v in out["model_variant"]])  # fmt: skip
    return out


def markdown(table: pd.DataFrame) -> str:
    lines = [
        "| model | n | F1 before | correct before | precision | recall | F1 after | "
        "coverage | correct after |",
        "| --- " * 9 + "|",
    ]
    for r in table.itertuples():
        lines.append(f"| {r.label} | {r.n} | {r.before_citation_f1:.2f} | {r.before_correct:.2f} "
                     f"| {r.after_citation_precision:.2f} | {r.after_citation_recall:.2f} | "
                     f"{r.after_citation_f1:.2f} | {r.after_coverage:.2f} | "
                     f"{r.after_correct:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    table = rescore(args.run_dir)
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table.to_dict("records"), indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
