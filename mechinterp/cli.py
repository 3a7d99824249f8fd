"""The `mechinterp` command: a table of experiments. Each one's flags, `--config FILE.yaml`,
`--set key=value` and `--print-config` are generated from its config dataclass
(`mechinterp.config.add_config_flags`); every run goes through the shard runner, so each resumes
after a kill and runs on Ray."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: What a user can get wrong; reported as one line, exit status 2 (never a traceback).
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError, KeyError, TypeError)


def _run_options(p, *, single: bool) -> None:
    p.add_argument("--config", default=None, help="a YAML config (its keys: --print-config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set task.seed=3 (repeatable)")  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved YAML and exit")
    p.add_argument("--out", default=None, help="run directory (default: ROOT/<slug>-<hash>)")
    p.add_argument("--root", default="runs", help="root folder for run directories")
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: local)")
    p.add_argument("--no-png", action="store_true", help="skip static PNGs (needs Chromium)")
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing the run directory, wait for it")  # fmt: skip
    p.add_argument("--force", action="store_true", help="recompute every shard")
    if single:
        p.add_argument("--top", type=int, default=10, help="rows of the summary to print")


def _experiment(sub, name: str, cls: type, help: str, run: Callable, single: bool, **kw):
    from mechinterp.config import add_config_flags

    p = sub.add_parser(name, help=help, description=help, **kw)
    add_config_flags(p.add_argument_group(f"{cls.__name__} (also as --config / --set keys)"), cls)
    _run_options(p, single=single)
    p.set_defaults(handler=_run_experiment, config_cls=cls, run=run, single=single)
    return p


def _run_experiment(args) -> int:
    from mechinterp.config import config_from_flags, dump_yaml

    if args.single and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    config = config_from_flags(args.config_cls, args.config, args.overrides, vars(args))
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    try:
        out = args.run(config, args.root, out=args.out, engine=args.engine, png=not args.no_png,
                       ray_address=args.ray_address, wait=args.wait, force=args.force)  # fmt: skip
    except KeyboardInterrupt:
        print(f"mechinterp {args.command}: interrupted. Finished shards are kept; rerun the same "
              "command to resume.", file=sys.stderr)  # fmt: skip
        return 130
    if args.single:
        from mechinterp.experiments import COMMANDS

        print(COMMANDS[args.command].summary(out, args.top))
        print(f"wrote {out}")
    else:
        _print_headline(out)
        print(f"wrote {out}/report.md")
    return 0


def _print_headline(out) -> None:
    import pandas as pd

    for r in pd.read_csv(Path(out) / "claims_headline.csv").itertuples():
        print(f"{r.verdict:>14}  {r.statement}")


def _kind(run: Path) -> str:
    """What wrote a run directory: a single command's name, study, extension or tasks."""

    from mechinterp.experiments.extension.report import is_extension_run
    from mechinterp.experiments.extension.tasks import is_tasks_run
    from mechinterp.experiments.rundir import read_json

    read_json(run / "config.json", what="run directory")  # there, and valid JSON
    if is_tasks_run(run):
        return "tasks"
    if is_extension_run(run):
        return "extension"
    prov = run / "provenance.json"
    if not prov.is_file():  # written last: a study and a single command differ only there
        raise ValueError(f"{run} has no provenance.json, so it is not a finished run (or the file "
                         "was removed): rerun the command that wrote it; finished shards are "
                         "reused")  # fmt: skip
    return read_json(prov, what="run provenance").get("command") or "study"


def cmd_figures(args) -> int:
    from mechinterp.experiments import COMMANDS, command, rundir
    from mechinterp.experiments.extension import report, tasks
    from mechinterp.experiments.study import draw_figures

    run, png = Path(args.run), not args.no_png
    draw = {"tasks": tasks.draw_figures, "extension": report.draw_figures,
            "study": draw_figures}  # fmt: skip
    kind = _kind(run)
    with rundir.RunLock(run, wait=args.wait):
        if kind in COMMANDS:
            written = command.draw(COMMANDS[kind], run, png=png)
        else:
            written = draw[kind](run, png=png)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from mechinterp.experiments import rundir
    from mechinterp.experiments.extension import report, tasks
    from mechinterp.experiments.study import write_report

    run = Path(args.run)
    kind = _kind(run)
    if kind not in ("tasks", "extension", "study"):
        raise ValueError(f"{run} is a {kind} run: it has tables and figures, no claims report "
                         "(`mechinterp figures` redraws its figures)")  # fmt: skip
    with rundir.RunLock(run, wait=args.wait):
        if kind == "tasks":
            path = tasks.analyse_tasks(run, png=None)  # every task's report, then the pooled one
        elif kind == "extension":
            path = report.analyse(run, png=None)  # claims and report; `figures` redraws figures
        else:
            path = write_report(run)
    _print_headline(run)
    print(f"wrote {path}")
    return 0


def cmd_plan(args) -> int:
    from mechinterp.experiments.plan import cli_plan

    return cli_plan(args.config, args.model, args.overrides, args.kind, args.budget_gib)


def _parser() -> argparse.ArgumentParser:
    from mechinterp.experiments import COMMANDS, run_command
    from mechinterp.experiments.extension import ExtensionConfig, run_extension
    from mechinterp.experiments.study import StudyConfig, run_study

    parser = argparse.ArgumentParser(prog="mechinterp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        run = lambda config, root, _c=command, **kw: run_command(_c, config, root, **kw)  # noqa: E731
        _experiment(sub, name, command.config, command.help, run, single=True)
    study = _experiment(sub, "study", StudyConfig, "the main job: detect retrieval heads, knock "
                        "them out vs random heads, patch them, and write a claims report with "
                        "figures (`study extension`: the extension pipeline)", run_study,
                        single=False)  # fmt: skip
    kinds = study.add_subparsers(dest="kind", required=False, metavar="{extension}")
    _experiment(kinds, "extension", ExtensionConfig, "fine-tune on task variants and compare "
                "their heads (experiments/extension-mini.yaml)", run_extension,
                single=False)  # fmt: skip
    p = sub.add_parser("plan", help="predicted peak memory and time of each stage of a study (or "
                       "detect) config, before running it; exit 2 when a stage cannot fit")
    p.add_argument("--config", default=None, help="the YAML config to plan (default: defaults)")
    p.add_argument("--model", default=None, help="plan for this model instead of model.name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--kind", choices=["study", "detect"], default="study",
                   help="what the config configures")  # fmt: skip
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory to plan for (default: RAM available, or the GPU's)")  # fmt: skip
    p.set_defaults(handler=cmd_plan)
    for name, fn, what in (("figures", cmd_figures, "redraw a run directory's figures"),
                           ("report", cmd_report, "recompute a study's claims and report.md")):
        p = sub.add_parser(name, help=f"{what} from its stored tables (no model)")
        p.add_argument("run", help="a run directory")
        p.add_argument("--wait", action="store_true", help="wait for a process writing it")
        if name == "figures":
            p.add_argument("--no-png", action="store_true")
        p.set_defaults(handler=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as e:
        print(f"mechinterp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
