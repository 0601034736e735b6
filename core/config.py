"""Typed dataclass configs: defaults in code, optional YAML file, then `key=value` overrides.

Each stage defines one dataclass and validates it in `__post_init__`; `load_config` builds it.
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
    """A config value is missing, unknown or out of range."""


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
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if annotation in (int, float, str):
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


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Build `cls` from its defaults, a YAML file (optional) and overrides (`key=value` strings or a dict)."""
    values: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            values[key.strip()] = value
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; known keys: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def config_from_argv(cls: type[T], argv: list[str]) -> T:
    """`python -m trainers.X [CONFIG.yaml] key=value ...` (how Ray Jobs start the entry points) -> `cls`."""
    path = argv[0] if argv and "=" not in argv[0] else None
    return load_config(cls, path, [a for a in argv if "=" in a])


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
