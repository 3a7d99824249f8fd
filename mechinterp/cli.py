"""The `mechinterp` command: a table of experiments. Each one's flags, `--config FILE.yaml`,
`--set key=value` and `--print-config` are generated from its config dataclass
(`mechinterp.config.add_config_flags`); every run goes through the shard runner, so each resumes
after a kill and runs on Ray.

Exit status: 0 done; 2 an error the suite raises on purpose (bad input, an unsupported model or
setting, a missing package: one line naming the problem and the fix; `--debug` or
`MECHINTERP_DEBUG=1` adds the traceback); 1 a crash (anything else: a bug in the suite or a failure
of the machine, shown with its traceback); 130 interrupted (finished shards are kept)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from mechinterp.errors import InputError, crash_hint, on_purpose

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
        p.add_argument("--rows", type=int, default=10, help="rows of the summary to print")


def _experiment(sub, name: str, cls: type, help: str, run: Callable, single: bool, **kw):
    from mechinterp.config import add_config_flags

    p = sub.add_parser(name, help=help, description=help, **kw)
    add_config_flags(p.add_argument_group(f"{cls.__name__} (also as --config / --set keys)"), cls)
    _run_options(p, single=single)
    p.set_defaults(handler=_run_experiment, config_cls=cls, run=run, single=single)
    return p


def _run_experiment(args) -> int:
    from mechinterp.config import config_from_flags, dump_yaml

    if args.single and args.rows < 1:
        raise InputError(f"--rows must be >= 1, got {args.rows}")
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

        print(COMMANDS[args.command].summary(out, args.rows))
        print(f"wrote {out}")
    else:
        _print_headline(out)
        print(f"wrote {out}/report.md")
    return 0


def _print_headline(out) -> None:
    from mechinterp.experiments.from_tables import headline

    print(headline(out))


def cmd_figures(args) -> int:
    from mechinterp.experiments.from_tables import redraw

    for path in redraw(args.run, png=not args.no_png, wait=args.wait):
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from mechinterp.experiments.from_tables import rewrite_report

    path = rewrite_report(args.run, wait=args.wait)
    _print_headline(args.run)
    print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from mechinterp.experiments import COMMANDS, run_command
    from mechinterp.experiments.extension import ExtensionConfig, run_extension
    from mechinterp.experiments.listing import runs_text
    from mechinterp.experiments.plan import plan_arguments
    from mechinterp.experiments.study import StudyConfig, run_study
    from mechinterp.store import version_line

    parser = argparse.ArgumentParser(prog="mechinterp", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("--debug", action="store_true", default=False, help=DEBUG_HELP)
    sub = _Subparsers(parser.add_subparsers(dest="command", required=True))
    for name, command in COMMANDS.items():
        run = lambda config, root, _c=command, **kw: run_command(_c, config, root, **kw)  # noqa: E731
        _experiment(sub, name, command.config, command.help, run, single=True)
    study = _experiment(sub, "study", StudyConfig, "the main job: detect retrieval heads, knock "
                        "them out vs random heads, patch them, and write a claims report with "
                        "figures (`study extension`: the extension pipeline)", run_study,
                        single=False)  # fmt: skip
    kinds = _Subparsers(study.add_subparsers(dest="kind", required=False, metavar="{extension}"))
    _experiment(kinds, "extension", ExtensionConfig, "fine-tune on task variants and compare "
                "their heads (experiments/extension-mini.yaml)", run_extension,
                single=False)  # fmt: skip
    p = sub.add_parser("plan", help="predicted peak memory and time of each stage of any "
                       "command, the study or the extension, before running it (`plan study "
                       "--config FILE`); exit 2 when a stage cannot fit")  # fmt: skip
    plan_arguments(p)
    for name, fn, what in (("figures", cmd_figures, "redraw a run directory's figures"),
                           ("report", cmd_report, "recompute a study's claims and report.md")):
        p = sub.add_parser(name, help=f"{what} from its stored tables (no model)")
        p.add_argument("run", help="a run directory")
        p.add_argument("--wait", action="store_true", help="wait for a process writing it")
        if name == "figures":
            p.add_argument("--no-png", action="store_true")
        p.set_defaults(handler=fn)
    p = sub.add_parser("runs", help="list the run directories under a root: the command that "
                       "wrote each, its model, status (finished, partial, running), wall time and "
                       "headline verdicts")  # fmt: skip
    p.add_argument("root", nargs="?", default="runs", help="the root (default: runs)")
    p.set_defaults(handler=lambda a: print(runs_text(a.root)) or 0)
    return parser


DEBUG_HELP = "show the traceback of every error, not only of crashes (or MECHINTERP_DEBUG=1)"


class _Subparsers:
    """`add_parser` that gives every command `--debug` too (`mechinterp knockout --debug ...`)."""

    def __init__(self, action) -> None:
        self.action = action

    def add_parser(self, name: str, **kw):
        p = self.action.add_parser(name, allow_abbrev=False, **kw)  # no prefix of a flag
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        return p


def main(argv: list[str] | None = None) -> int:
    from mechinterp.config import first_unknown_flag, unknown_flag

    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if bad := first_unknown_flag(parser, argv):
        print(f"mechinterp: error: {unknown_flag(*bad)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("MECHINTERP_DEBUG", "").strip() not in ("", "0")
    where = f"mechinterp {args.command}"
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{where}: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:
        if not on_purpose(e):
            traceback.print_exc()
            print(f"{where}: crashed with {type(e).__name__}. This is not an input error: a bug in "
                  "the suite or a failure of the machine (the traceback above says where)."
                  f"{crash_hint(e)}", file=sys.stderr)  # fmt: skip
            return 1
        if debug:
            traceback.print_exc()
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
