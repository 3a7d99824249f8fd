"""Every command's flags as one Markdown page, `docs/flags.md`: the reference users read and the
file a test compares with the flags the commands really have, so no flag changes unnoticed.

    .venv/bin/python -m mechinterp.experiments.flag_table > docs/flags.md   # `make flags`
"""

from __future__ import annotations

from typing import Literal, get_args, get_origin

from mechinterp.config import config_flags, flag_defaults
from mechinterp.experiments.listing import experiment_configs

HEADER = """# Flags

Every flag of every `mechinterp` command that runs an experiment, generated from the config
classes (`make flags` rewrites this page; a test fails when a flag changes and the page does not).

A flag is the config key's dotted path with `_` written `-`: `--knockout.scope` sets
`knockout.scope` in the YAML (`--print-config` shows it), the same key `--set knockout.scope=all`
sets. A few flags have a short alias, declared by the command and listed here: `--model` for
`--model.name`, `--lengths` for `--task.lengths`, `--heads` for `--select.heads`. Lists are
comma-separated (`--task.lengths 256,512`). Every command also takes `--config FILE.yaml`,
`--set KEY=VALUE`, `--print-config`, `--out`, `--root`, `--engine`, `--ray-address`, `--no-png`,
`--wait`, `--force` and `--debug`; the single commands take `--rows N` (summary rows printed).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flags_markdown() -> str:
    """The page: one table per command (flag, alias, default, what it sets)."""
    parts = [HEADER]
    for name, cls in experiment_configs().items():
        defaults = flag_defaults(cls)
        parts.append(f"\n## mechinterp {name}\n\n| flag | alias | default | what it sets |\n"
                     "|---|---|---|---|")  # fmt: skip
        for f in config_flags(cls):
            choices = get_args(f.type) if get_origin(f.type) is Literal else ()
            what = f.help + (f" (one of {', '.join(map(str, choices))})" if choices else "")
            alias = ", ".join(f"`{a}`" for a in f.aliases)
            parts.append(f"| `{f.flag}` | {alias} | `{_cell(defaults[f.path])}` | {_cell(what)} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
