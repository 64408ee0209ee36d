"""The one configuration mechanism: pydantic models with a help text per field, built from loose user input.

Every config (each stage's, PPO's, the reward's, LoRA's, the prompts', the cluster's) derives from `Settings`:
typed fields with constraints and a description, unknown keys refused by name, strings from the command line
and pipeline parameters coerced to the field types. Any failure is one `ConfigError` naming the setting.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from blueprint.errors import UserError

S = TypeVar("S", bound="Settings")
INT_LIMIT = 2**63 - 1  # what a tensor index, a step counter or a seed can hold


class ConfigError(UserError, ValueError):
    """A setting is unknown or has a value of the wrong type; the message names it."""


class SettingsError(ConfigError):
    """A config's construction failed; `details` keeps (location, text) per problem so that an enclosing config
    (pydantic builds nested ones through their __init__) can name the full path, e.g. resources.merge.cpu_limit."""

    def __init__(self, details: list[tuple[tuple, str]]):
        self.details = details
        super().__init__("; ".join(f"{_where(loc)}: {text}" if loc else text for loc, text in details))


def setting(default: Any = ..., help: str = "", **constraints: Any) -> Any:
    """A field with its help text (shown by `blueprint stage NAME --help`) and pydantic constraints (ge, gt, le)."""
    return Field(default, description=help, **constraints)


def check_number(name: str, value: Any) -> None:
    """Refuse numbers that cannot be: inf/nan floats (a NaN learning rate trains NaN weights) and integers
    outside int64."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"setting {name!r}: {value!r} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        raise ConfigError(f"setting {name!r}: {value} is out of range (at most {INT_LIMIT} in size)")


def _bare(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _from_string(name: str, text: str, hint: Any) -> Any:
    """What pydantic's own coercion does not read: `none`, `1e6` for an int, `a,b` for a list."""
    bare, nullable = _bare(hint)
    if nullable and text.strip().lower() in ("none", "null"):
        return None
    if bare is int and "e" in text.lower():
        try:
            number = float(text)
        except ValueError:
            return text
        check_number(name, number)
        return int(number) if number.is_integer() else text
    if typing.get_origin(bare) in (list, tuple):
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _where(loc: tuple) -> str:
    """A pydantic error location as a reader writes it: resources.merge.cpu_request, tolerations[0].value."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _redacted(value: Any) -> str:
    """repr(value) without the user:password@ of any URI in it (credentials are never echoed)."""
    return re.sub(r"([A-Za-z][\w+.-]*://)[^/@\s'\"]*@", r"\1***@", repr(value))


def _text(error: dict) -> str:
    if error["type"] == "value_error":  # our validators say what they saw; never echo a URI with secrets twice
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "string_type":
        return f"{_redacted(error['input'])} must be a string (quote it in YAML)"
    if error["type"] == "bool_type":
        return f"{error['input']!r} must be true or false"
    return f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {_redacted(error['input'])}"


def did_you_mean(unknown: list[str], known: typing.Iterable[str]) -> str:
    """` (did you mean lr?)` for the known names closest to the mistyped ones, "" when none is close: the fix is
    read at once instead of searched for in the list of every known name."""
    known = list(known)
    close = dict.fromkeys(m for name in unknown for m in difflib.get_close_matches(name, known, n=3, cutoff=0.6))
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _details(exc: ValidationError, cls: type[Settings]) -> list[tuple[tuple, str]]:
    errors = exc.errors(include_url=False)
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return [
            (
                (),
                f"unknown {cls.unknown_label} {', '.join(unknown)} for {cls.__name__}"
                f"{did_you_mean(unknown, cls.model_fields)}; known: {', '.join(sorted(cls.model_fields))}",
            )
        ]
    details = []
    for e in errors:
        loc = tuple(e["loc"])
        if cls.error_prefix and loc:
            loc = (cls.error_prefix + str(loc[0]), *loc[1:])
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, SettingsError):  # a nested config: its own locations below this one
            details += [(loc + sub, text) for sub, text in inner.details]
        else:
            details.append((loc, _text(e)))
    return details


class Settings(BaseModel):
    """Base of every config. Construction either succeeds or raises one ConfigError naming the setting."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    error_prefix: ClassVar[str] = ""  # what an error names before the field: "" for stage settings
    unknown_label: ClassVar[str] = "setting(s)"
    renamed: ClassVar[dict[str, str]] = {}  # {old name: new name}: the old name is refused, naming the new one

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_details(exc, type(self))) from None

    @model_validator(mode="before")
    @classmethod
    def _read_strings(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        fields = cls.model_fields
        for old in values.keys() & cls.renamed.keys():
            raise ConfigError(f"{cls.error_prefix}{old}: renamed {cls.error_prefix}{cls.renamed[old]} (same values)")
        for name, value in values.items():
            kind = _bare(fields[name].annotation)[0] if name in fields else None
            if isinstance(value, bool) and kind is int:
                raise ConfigError(f"{cls.error_prefix}{name}: {value!r} is not an integer")
            if kind is float and isinstance(value, (str, float)):  # before range checks, which nan would pass
                try:
                    number = float(value)
                except ValueError:
                    continue  # pydantic names it
                check_number(cls.error_prefix + name, number)
        return {
            k: _from_string(cls.error_prefix + k, v, fields[k].annotation) if isinstance(v, str) and k in fields else v
            for k, v in values.items()
        }

    @model_validator(mode="after")
    def _numbers_that_can_be(self) -> Settings:
        for name in type(self).model_fields:
            check_number(self.error_prefix + name, getattr(self, name))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (what a cache key and a manifest record)."""
        return self.model_dump()


def parse(cls: type[S], values: dict[str, Any] | None = None, **overrides: Any) -> S:
    """`cls` from loose values (strings from the CLI, dicts from pipeline parameters), `overrides` last."""
    return cls(**{**(values or {}), **overrides})


def describe(cls: type[Settings], profile: Mapping[str, Any] | None = None, profile_name: str = "") -> str:
    """One line per setting: name, type, default and help (the `--help` of a stage); with `profile`, the value
    that profile gives beside the default it overrides."""
    lines = []
    for name, field in cls.model_fields.items():
        kind = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        given = f"; {profile_name} profile: {profile[name]!r}" if profile and name in profile else ""
        lines.append(f"  {name} ({kind}, default {field.get_default(call_default_factory=True)!r}{given})")
        if field.description:
            lines.append(textwrap.fill(field.description, 110, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


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
    except Exception as exc:  # any parse error is the file's fault
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data
