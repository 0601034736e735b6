"""Typed dataclass configs: defaults in code, an optional YAML file, then `key=value` overrides.

Each stage defines one dataclass and validates it in `__post_init__`; `load_config` builds it. A field whose
type is itself a config dataclass is a nested config: YAML gives it a mapping, and overrides reach into it
with dotted keys (`finetune.lr=3e-4`, `model.hidden=128`). Every problem is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


def parse_overrides(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """`key=value` strings -> {key: value} (the one parser of command-line overrides); later ones win."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1, "c": 2} -> {"a": {"b": 1}, "c": 2}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is a value, not a nested config")
            node = child
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _merge(node[leaf], _nest(value))
        else:
            node[leaf] = _nest(value) if isinstance(value, dict) else value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Turn a YAML value or a command-line string into the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, name)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if annotation in (int, float, str):
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name}: expected int, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {annotation.__name__}, got {value!r}") from None
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if not value.startswith("[") else json.loads(value)
        items = [_coerce(v, args[0] if args else str, name) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        where = prefix or cls.__name__
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(fields)}")
    values = dict(values)
    for f in dataclasses.fields(cls):
        # A partial mapping for a nested config overrides its declared default, not the nested class's own.
        if isinstance(values.get(f.name), dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                values[f.name] = _merge(to_dict(default), values[f.name])
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}: {err}" if prefix else str(err)) from None
    except TypeError as err:  # a required field left out
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Build `cls` from its defaults, a YAML file (optional) and overrides (`key=value` strings or a dict;
    dotted keys reach into nested configs)."""
    values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the config file: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        values = _nest(loaded)
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    values = _merge(values, _nest(extra))
    return _build(cls, values)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], values: dict) -> T:
    """The config `to_dict` gave (nested dicts included), e.g. after crossing into a Ray worker."""
    return _build(cls, values)


def require(config: Any, condition: bool, key: str, message: str) -> None:
    """Raise ConfigError("<Class>.<key> <message>, got <value>") unless condition holds."""
    if not condition:
        value = config
        for part in key.split("."):  # a dotted key names a field of a nested config
            value = getattr(value, part, None)
        raise ConfigError(f"{type(config).__name__}.{key} {message}, got {value!r}")


def require_at_least(config: Any, minimum: float, *keys: str) -> None:
    for key in keys:
        require(config, getattr(config, key) >= minimum, key, f"must be >= {minimum}")
