"""Typed field values from YAML and from text (environment, `--set`), with messages that say why not."""
from __future__ import annotations

import types
import typing
from enum import Enum
from typing import Any

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(value: Any, kind: Any, raw: bool) -> Any:
    """`value` as a `kind` (int, float, bool, str, an Enum, or `X | None`); ValueError says why not."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (raw and value.strip().lower() in ("", "null", "none", "~")):
            return None
        kind = next(a for a in args if a is not type(None))
    if value is None:
        raise ValueError("must be set (null is not allowed here)")
    if raw:
        return _from_text(value.strip(), kind)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return _enum_member(kind, value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"expects {_kind_name(kind)}, got {type(value).__name__} {value!r}"
                     + (" (quote it to make it text)" if kind is str else ""))


def _from_text(text: str, kind: Any) -> Any:
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"expects true or false, got {text!r}")
    if isinstance(kind, type) and issubclass(kind, Enum):
        return _enum_member(kind, text)
    try:
        return kind(text) if kind is not str else text
    except ValueError:
        raise ValueError(f"expects {_kind_name(kind)}, got {text!r}") from None


def _enum_member(kind: type[Enum], value: Any) -> Enum:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"expects one of {', '.join(str(m.value) for m in kind)}, got {value!r}") from None


def _kind_name(kind: Any) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(kind, str(kind))


def shown(value: Any) -> Any:
    """A field value as it is written in YAML."""
    return value.value if isinstance(value, Enum) else value
