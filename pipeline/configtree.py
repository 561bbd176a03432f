"""Strict conversion between plain YAML data and frozen dataclass trees.

Every key must be a field, every value must have the field's type, and each error names the file and
the dotted key. Lists become tuples so that configs stay frozen and hashable.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from pipeline.errors import ConfigError


def build(cls: type, data: Any, *, source: str, key: str = "") -> Any:
    """Build dataclass `cls` from mapping `data`; `source` names the file for error messages."""
    where = key or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {_join(key, unknown[0])!r}; "
            f"{where} takes: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source, _join(key, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {_join(key, name)!r}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ checks say "field: what is wrong" or "what is wrong"
        message = str(err)
        field, sep, rest = message.partition(": ")
        if sep and " " not in field:
            raise ConfigError(f"{source}: {_join(key, field)}: {rest}") from None
        raise ConfigError(f"{source}: {where}: {message}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(options) == 1 else
                          f"{source}: {key}: {value!r} matches none of {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        return tuple(_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source=source, key=key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"configtree cannot convert {hint!r} (at {key})")


def _type_name(hint: Any) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def to_plain(obj: Any, *, output_only: bool = False) -> Any:
    """Dataclass tree -> plain dicts/lists, the inverse of `build` (for YAML). With `output_only`, the
    fields marked `keeps_output` are left out: that is what a stage's fingerprint hashes."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name), output_only=output_only) for f in dataclasses.fields(obj)
                if not output_only or changes_output(f)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, output_only=output_only) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v, output_only=output_only) for k, v in obj.items()}
    return obj


CHANGES_OUTPUT = "changes_output"  # config field metadata key; absent means True


def keeps_output(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field whose value does not change what its stage writes (a safety limit, parallelism,
    logging). It stays out of the stage's fingerprint (DESIGN.md, "Fingerprints hash meaning"), so a
    user who changes it and resumes keeps every committed shard."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={CHANGES_OUTPUT: False})


def changes_output(f: dataclasses.Field) -> bool:
    return f.metadata.get(CHANGES_OUTPUT, True)


def apply_override(data: dict, assignment: str, source: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`3`, `true`, `[a, b]`)."""
    import yaml

    if "=" not in assignment:
        raise ConfigError(f"{source}: --set {assignment!r}: expected KEY=VALUE")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{source}: --set {assignment!r}: empty key part")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: --set {dotted}: value is not valid YAML: {err}") from None
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: --set {dotted}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value
