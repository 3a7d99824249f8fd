"""Frozen dataclass configs from YAML files plus `key=value` command-line overrides.

    config = load_config(KnockoutConfig, "knockout.yaml", ["ks=[1,2,5]", "task.seed=3"])
    Path("template.yaml").write_text(dump_yaml(config))  # load_config reads it back unchanged

- Keys are the dataclass fields. An unknown key is a `ConfigError` naming its dotted path, the
  allowed keys and the nearest match. A missing key keeps its default, and a partial nested
  mapping is laid over the field's own default (`task.seed=3` keeps the rest of the config's
  default task, which need not be `TaskSpec()`).
- Values are checked against the field types. Lists become tuples, and `tuple[X, ...]` also
  takes a comma string (`"1,2,5"`, `"L18H6,L20H1"`) or a single value. Ints are accepted as
  floats. `Literal` fields name their allowed values. None is accepted only where the type
  admits it. Bool fields take real bools only: a quoted `"false"` is refused, not read as truthy.
- YAML, in files and in override values, is read with YAML 1.2 scalars. Only true/false
  (any case) are bools, so `flag=true` gives a bool while `yes`, `no`, `on` and `off` stay
  strings. `1e-3` is a float (PyYAML's YAML 1.1 reads it as a string). An empty value
  (`data=`) is null.
- Lists follow one rule: a repeated value is refused, naming it (`lengths=128,128` would run
  and count one instance twice), and so is an empty item between commas; an empty list is
  refused where the field's default is not empty (it would select nothing), and means "none"
  where the default is empty. `check_lists` applies the rule to a config built in Python.
- A ValueError from a dataclass's `__post_init__` comes back as a ConfigError prefixed with
  where it happened (`task: depths must lie in [0, 1], got (2.0,)`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mechinterp.errors import InputError
from mechinterp.selection import check_selection

T = TypeVar("T")
_NONE = type(None)


class ConfigError(InputError):
    """A config that does not fit its dataclass; the message says where and why."""


class _Mismatch(Exception):
    """A value of the wrong type, reported by the field with its whole expected type."""


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load` with YAML 1.2 scalars: only true/false are bools, `1e-3` is a float."""


class _Dumper(yaml.SafeDumper):
    """`yaml.safe_dump` with one-line lists that also quotes strings `_Loader` reads as floats."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {  # drop YAML 1.1's yes/no/on/off bools and its `=` scalar
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, "tag:yaml.org,2002:value")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        _FLOAT,
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )
_Dumper.add_representer(list, lambda d, v: d.represent_sequence(d.DEFAULT_SEQUENCE_TAG, v, True))


def from_dict(cls: type[T], data: Mapping, *, where: str = "") -> T:
    """`cls` built from plain (YAML/JSON) data; `where` is the dotted path to prefix errors with."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    return _build(cls, data, where, None)


def to_dict(config: Any) -> dict:
    """The plain JSON-able dict of a dataclass config (tuples → lists); `from_dict` inverts it."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {config!r}")
    return _plain(config)


def parse_override(text: str) -> tuple[list[str], object]:
    """`"task.lengths=[256,512]"` → (["task", "lengths"], [256, 512]); the value is YAML."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise ConfigError(
            f"override {text!r} is not of the form key=value "
            "(e.g. task.seed=3, ks=[1,2,5] or model.name=/path/to/model)"
        )
    try:
        return [k.strip() for k in keys], yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {e}") from None


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of `data` with each `a.b.c=value` applied in order; a mapping value is merged into
    the mapping it replaces. Unknown keys are left for `from_dict` to report."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    out = _merge({}, data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):  # a later `a.b=1` replaces an earlier `a=1`
                node[key] = {}
            node = node[key]
        node[keys[-1]] = _merge(node.get(keys[-1]), value)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """`cls` from a YAML file (a mapping; empty means all defaults) and `key=value` overrides."""
    return from_dict(cls, apply_overrides(read_yaml(path), overrides))


def read_yaml(path: str | Path | None) -> dict:
    """The mapping in a YAML config file ({} for None or an empty file)."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        try:
            with path.open(encoding="utf-8") as f:  # the file's name then appears in YAML errors
                data = yaml.load(f, Loader=_Loader)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML:\n{e}") from None
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"config file {path} must hold a mapping of keys at the top level, "
                f"got {type(data).__name__}: {data!r}"
            )
    return dict(data)


def dump_yaml(config: Any) -> str:
    """YAML text of `to_dict(config)` in field order: a template `load_config` reads back."""
    return yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


# --- building and checking ------------------------------------------------------------------


def _build(cls: type[T], data: Any, where: str, base: Any) -> T:
    """`cls` from `data`; missing keys come from `base` (an instance) or else the defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key(cls, str(key), where, hints, list(fields)))
    kwargs = {}
    for name, f in fields.items():
        at = f"{where}.{name}" if where else name
        if name in data:
            value = data[name]
            default = None
            if isinstance(value, Mapping):  # a partial nested mapping lays over the default
                default = getattr(base, name) if base is not None else _default(f)
            try:
                kwargs[name] = _convert(hints[name], value, at, default)
            except _Mismatch:
                raise ConfigError(
                    f"{at}: expected {_describe(hints[name])}, got {value!r}"
                ) from None
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where or cls.__name__}: missing required key {name!r}")
    for name in data:
        at = f"{where}.{name}" if where else name
        _check_list(hints[name], kwargs[name], fields[name], at)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def check_lists(config: Any, where: str = "") -> None:
    """Apply the list rule (`_check_list`) to every list field of a dataclass config and of the
    configs nested in it: what `from_dict` checks as it reads, for a config built in Python."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"check_lists needs a dataclass instance, got {config!r}")
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        at = f"{where}.{f.name}" if where else f.name
        value = getattr(config, f.name)
        _check_list(hints[f.name], value, f, at)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                check_lists(item, at)


#: `field(default=..., metadata=EMPTY_SKIPS)`: an empty list skips what the field configures
#: (a stage), although its default is not empty.
EMPTY_SKIPS = {"empty": "skips"}


def _check_list(tp: Any, value: Any, f: dataclasses.Field, at: str) -> None:
    """The selection rule (`mechinterp.selection`) for a list field: a repeated value is
    refused; an empty list too where the field's default is not empty (it would select
    nothing), unless the field is marked `EMPTY_SKIPS`; where the default is empty, empty
    means none."""
    if not (isinstance(value, tuple) and _is_list_type(tp)):
        return
    default = _default(f)
    if any(dataclasses.is_dataclass(v) for v in value):  # their own check names what repeats
        value = tuple(range(len(value)))
    try:
        check_selection(at, value, empty=not default or f.metadata.get("empty") == "skips")
    except ValueError as e:
        shown = f" (default: {','.join(map(str, _plain(default)))})" if not value else ""
        raise ConfigError(f"{e}{shown}") from None


def _is_list_type(tp: Any) -> bool:
    """`tuple[X, ...]`, or an optional one."""
    arms = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    return any(get_origin(a) is tuple and get_args(a)[1:] == (...,) for a in arms)


def _convert(tp: Any, value: Any, where: str, default: Any = None, *, text: bool = False) -> Any:
    """`value` as a `tp`; `text` marks a piece of a comma string ("5" may be an int)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        for arm in (a for a in args if a is not _NONE):
            try:
                return _convert(arm, value, where, default, text=text)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if origin is tuple:
        return _tuple(args, value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build(tp, value, where, default if isinstance(default, tp) else None)
    if text and isinstance(value, str):
        value = _from_text(tp, value)
    if isinstance(value, bool) and tp is not bool:
        raise _Mismatch  # bool is an int subclass, but True is not a count or a rate
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    raise TypeError(f"{where}: unsupported field type {tp!r}")


def _tuple(args: tuple, value: Any, where: str) -> tuple:
    if isinstance(value, str):
        items, text = [s.strip() for s in value.split(",")], True
        if len(items) > 1 and not all(items):
            raise ConfigError(f"{where}: {value!r} has an empty item between commas")
        items = [s for s in items if s]
    elif isinstance(value, list | tuple):
        items, text = list(value), False
    elif isinstance(value, int | float):  # a single value: `ks=5`
        items, text = [value], False
    else:
        raise _Mismatch
    kinds = [args[0]] * len(items) if len(args) == 2 and args[1] is ... else list(args)
    if len(kinds) != len(items):
        raise _Mismatch
    return tuple(
        _convert(kind, item, f"{where}[{i}]", text=text)
        for i, (kind, item) in enumerate(zip(kinds, items, strict=True))
    )


def _from_text(tp: Any, text: str) -> Any:
    try:
        if tp is bool:
            return {"true": True, "false": False}[text.lower()]
        if tp in (int, float):
            return tp(text)
    except (KeyError, ValueError):
        raise _Mismatch from None
    return text


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is _NONE else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is ...:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)}: [{', '.join(map(_describe, args))}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    if tp is bool:
        return "a bool (true or false)"
    return getattr(tp, "__name__", repr(tp))


def _unknown_key(cls: type, key: str, where: str, hints: dict, allowed: list[str]) -> str:
    guess = difflib.get_close_matches(key, allowed, n=1) or [
        f"{name}.{key}"  # `seed` at the top may belong to a nested config: `task.seed`
        for name in allowed
        for arm in get_args(hints[name]) or (hints[name],)
        if dataclasses.is_dataclass(arm) and key in {f.name for f in dataclasses.fields(arm)}
    ]
    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
    dotted = f"{where}.{key}" if where else key
    return f"unknown key {dotted!r} for {cls.__name__}{hint}; allowed keys: {', '.join(allowed)}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _merge(old: Any, new: Any) -> Any:
    """`new`, or when both are mappings, `old` updated by `new` (recursively, as new dicts)."""
    if not isinstance(new, Mapping):
        return new
    out = {k: _merge(None, v) for k, v in old.items()} if isinstance(old, Mapping) else {}
    for key, value in new.items():
        out[key] = _merge(out.get(key), value)
    return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --- command-line flags generated from a config class ---------------------------------------


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag: the config field it sets (a dotted path), its type, its help and
    the short aliases its config class declares for it."""

    flag: str
    path: str
    type: Any
    help: str
    aliases: tuple[str, ...] = ()


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body), by name."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, after in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def flag_name(path: str) -> str:
    """A field's flag: its dotted config path with `_` written `-` (`knockout.max_new_tokens` →
    `--knockout.max-new-tokens`), so a flag never changes when another field is added."""
    return "--" + path.replace("_", "-")


def config_flags(cls: type) -> list[Flag]:
    """A flag for every leaf field of `cls` (nested dataclasses flattened), named by `flag_name`,
    with the short aliases `cls.FLAG_ALIASES` declares (`{"--lengths": "task.lengths"}`)."""
    leaves: list[tuple[str, Any, str]] = []

    def walk(klass: type, prefix: list[str]) -> None:
        hints, docs = get_type_hints(klass), field_docs(klass)
        for f in dataclasses.fields(klass):
            if not f.init or not f.metadata.get("flag", True):
                continue
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, [*prefix, f.name])
            else:
                leaves.append((".".join([*prefix, f.name]), tp, docs.get(f.name, "")))

    walk(cls, [])
    declared: Mapping[str, str] = getattr(cls, "FLAG_ALIASES", {})
    paths = {path for path, _, _ in leaves}
    names = {flag_name(path) for path in paths}
    for alias, path in declared.items():  # a declaration error is a bug in the suite
        assert path in paths, f"{cls.__name__}.FLAG_ALIASES: {alias} names no field {path!r}"
        assert alias.startswith("--") and alias not in names, f"{cls.__name__}: alias {alias}"
    return [Flag(flag_name(path), path, tp, doc,
                 tuple(a for a, p in declared.items() if p == path))
            for path, tp, doc in leaves]  # fmt: skip


def first_unknown_flag(parser, argv: Sequence[str]) -> tuple[str, list[Flag]] | None:
    """The first `--flag` in `argv` that the (sub)command it reaches does not have, with that
    command's config flags (for `unknown_flag`); checked before parsing, so an unknown flag's
    value is never mistaken for a subcommand."""
    import argparse

    known, cls, p = set(parser._option_string_actions), None, parser
    for word in (w for w in argv if not w.startswith("-")):  # descend through subcommands
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        p = subs[0].choices[word]
        known |= set(p._option_string_actions)
        cls = p._defaults.get("config_cls", cls)
    for word in argv:
        if word == "--":
            break
        if word.startswith("--") and word.split("=", 1)[0] not in known:
            return word, config_flags(cls) if cls is not None else []
    return None


def unknown_flag(given: str, flags: Sequence[Flag]) -> str:
    """The error for a flag no field has, with the flag it most likely meant: the one whose
    path ends with what was typed (`--scope` → `--knockout.scope`), else the closest name."""
    typed = given.split("=", 1)[0]
    words = typed.lstrip("-").replace("_", "-").replace(".", "-")
    names = [n for f in flags for n in (f.flag, *f.aliases)]
    ends = [f.flag for f in flags if ("-" + f.flag[2:].replace(".", "-")).endswith("-" + words)]
    near = ends or difflib.get_close_matches(typed, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(near[:3])}?" if near else ""
    return f"unrecognized flag {typed}{hint} (`--help` lists every flag)"


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and _NONE in get_args(tp)


def _flag_value(tp: Any, raw: str) -> Any:
    """A flag's text as the config's loader would read it: YAML, except that text fields stay
    text and `none` is null where the field admits it."""
    if _is_optional(tp) and raw.strip().lower() in ("none", "null"):
        return None
    arms = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if any(a is str or a is Path for a in arms):
        return raw
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        return raw  # the type check names the field and what it expected


def flag_defaults(cls: type) -> dict[str, str]:
    """Each flag's default as a user would type it (`1,2,5`, `None`), by dotted path."""
    defaults = _plain({f.name: _default(f) for f in dataclasses.fields(cls) if f.init})
    shown = {}
    for f in config_flags(cls):
        value: Any = defaults
        for key in f.path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        shown[f.path] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return shown


def add_config_flags(parser, cls: type) -> list[Flag]:
    """Add one argparse option per config field (help from the field's docstring, default from
    the config); only flags the user gives reach the config (see `config_from_flags`)."""
    import argparse

    flags = config_flags(cls)
    defaults = flag_defaults(cls)
    for f in flags:
        choices = get_args(f.type) if get_origin(f.type) is Literal else None
        extra = f"; one of {', '.join(map(str, choices))}" if choices else ""
        shown = defaults[f.path]
        text = f"{f.help} (default: {shown}{extra})" if f.help else f"default: {shown}{extra}"
        if f.type is bool:
            parser.add_argument(f.flag, *f.aliases, dest=f"cfg:{f.path}", help=text,
                                action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS)  # fmt: skip
        else:
            metavar = f.path.rsplit(".", 1)[-1].upper()
            parser.add_argument(f.flag, *f.aliases, dest=f"cfg:{f.path}", metavar=metavar,
                                default=argparse.SUPPRESS, help=text)  # fmt: skip
    return flags


def config_from_flags(
    cls: type[T], path: str | Path | None, overrides: Sequence[str], given: Mapping[str, Any]
) -> T:
    """`cls` from a YAML file, then `--set key=value` overrides, then the flags given (`given`:
    argparse's namespace as a dict). A key set both by a flag and by `--set` is an error."""
    flags = {f.path: f for f in config_flags(cls)}
    chosen = {k.removeprefix("cfg:"): v for k, v in given.items() if k.startswith("cfg:")}
    set_keys = {".".join(parse_override(o)[0]) for o in overrides}
    both = sorted(k for k in chosen if k in set_keys)
    if both:
        raise ConfigError(
            f"{flags[both[0]].flag} and --set {both[0]}=... both set {both[0]!r}; give one"
        )
    data = apply_overrides(read_yaml(path), overrides)
    for dotted, raw in chosen.items():
        value = raw if isinstance(raw, bool) else _flag_value(flags[dotted].type, raw)
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return from_dict(cls, data)
