"""YAML files and dotted command-line overrides mapped onto (nested) dataclasses.

    cfg = load_config(TrainConfig, "run.yaml", ["optim.lr=3e-4", "model.preset=small"])

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the dotted key,
so a bad config fails before any process starts.

Every command configured by a dataclass builds its command line here, so all of them take
``--config FILE.yaml`` plus ``dotted.key=value`` overrides and list their fields in ``--help``:

    parser = config_parser(PrepConfig, "cogvideo-prep", "Videos + captions -> token shards.")
    parser.add_argument("--out", required=True)         # paths and switches of this command
    cfg, args = parse_config(PrepConfig, parser, argv)  # a bad key: one line, exit 2
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: value is not valid YAML ({err.__class__.__name__}); quote it"
            ) from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(annotation, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(annotation)}")
        return value
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(
            f"unknown config key(s): {names}; known under {prefix or 'top level'}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from err


def to_dict(obj) -> dict:
    """Dataclass -> plain dict (tuples become lists) suitable for YAML/JSON."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(obj)


def load_config(
    cls, path: str | Path | None = None, overrides: list[str] | None = None, defaults: dict | None = None
):
    """defaults <- YAML file <- dotted overrides, then build `cls` (strictly)."""
    data: dict = dict(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = merge(data, loaded)
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def save_yaml(obj, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True))


def _field_comments(cls) -> dict[str, str]:
    """Each field's comment in the class source: the one ending its line, else the comment lines
    right above it (fields without one are left out)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    out = {}
    for offset, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if not (name.isidentifier() and line.startswith("    ") and line[4:5] != " "):
            continue
        above = offset - 1  # else the comment lines right above the field
        while above >= 1 and lines[above - 1].strip().startswith("#"):
            above -= 1
        block = [comments[n] for n in range(above + 1, offset) if n in comments]
        if offset in comments or block:
            out[name] = comments.get(offset) or " ".join(block)
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def describe_fields(cls, prefix: str = "", instance=None) -> list[str]:
    """``key = default  # comment`` for every field of ``cls`` (values from ``instance`` when
    given), nested sections as dotted keys."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, value = prefix + f.name, _default(f) if instance is None else getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]) and dataclasses.is_dataclass(value):
            rows += describe_fields(type(value), key + ".", value)
            continue
        shown = (
            "(required)"
            if value is dataclasses.MISSING
            else json.dumps(
                to_dict(value) if dataclasses.is_dataclass(value) else value, ensure_ascii=False, default=str
            )
        )
        note = f"  # {comments[f.name]}" if comments.get(f.name) else ""
        rows.append(f"  {key} = {shown}{note}")
    return rows


def fields_help(cls) -> str:
    """The ``--help`` epilog of a command configured by ``cls``: every field with its default."""
    return (
        "config fields (YAML keys of --config, or key=value overrides; nested ones as section.key=value), "
        "with defaults:\n" + "\n".join(describe_fields(cls))
    )


def config_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    """A parser taking ``--config FILE.yaml`` and ``key=value`` overrides for dataclass ``cls``;
    its ``--help`` lists every field with its default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=fields_help(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of the config fields listed below")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="field overrides, applied after --config (values are YAML scalars or lists)",
    )
    return parser


def parse_config(
    cls, parser: argparse.ArgumentParser, argv: list[str] | None = None, defaults: dict | None = None
) -> tuple[Any, argparse.Namespace]:
    """(config, the other arguments). A bad file, key or value ends the command with one line
    naming it, and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides, defaults), args
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: bad config: {err}\n")
