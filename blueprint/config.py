"""Building the validated config dataclasses from dicts, `key=value` strings and YAML/JSON files.

Every stage has a config dataclass that validates itself in `__post_init__`; this module only turns loose user
input (CLI flags, pipeline parameters, config files) into those dataclasses, naming the offending key on error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from blueprint.errors import UserError


C = TypeVar("C")


class ConfigError(UserError, ValueError):
    """A setting is unknown or has a value of the wrong type; the message names it."""


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"setting {name!r}: cannot read {value!r} as {hint}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        inner = args[0] if args else str
        items = [_coerce(name, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"setting {name!r}: {value!r} is not a boolean")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = hint(float(value)) if hint is int and isinstance(value, str) and "e" in value.lower() else hint(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int("1e9999") is int(inf)
            raise ConfigError(f"setting {name!r}: {value!r} is not a valid {hint.__name__}") from None
        check_number(name, out)
        return out
    return value


INT_LIMIT = 2**63 - 1  # what a tensor index, a step counter or a seed can hold


def check_number(name: str, value: Any) -> None:
    """Refuse numbers that cannot be: inf/nan floats (a NaN learning rate trains NaN weights) and integers
    outside int64."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"setting {name!r}: {value!r} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        raise ConfigError(f"setting {name!r}: {value} is out of range (at most {INT_LIMIT} in size)")


def build(cls: type[C], values: dict[str, Any] | None = None, **overrides: Any) -> C:
    """`cls(**values)` with strings coerced to the field types and unknown keys rejected by name."""
    merged = {**(values or {}), **overrides}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(merged) - fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in merged.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """`["a=1", "b=x"]` -> {"a": "1", "b": "x"}; a malformed item is named."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping from `path`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - any parse error is the file's fault
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def require(condition: bool, field: str, message: str) -> None:
    """Validation helper for `__post_init__`: raise a ConfigError naming the field."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
