"""Typed configuration fields, shared by every config dataclass: the error, key=value parsing, checks.

`parse_typed` reads a field from command-line text (booleans as true/false/yes/no/on/off/1/0, None
as none/null, numbers, comma-separated or JSON lists); `check_typed` checks a value from a file or a
dict; `check_known_fields` names an unknown key with the closest field. Every failure is a
ConfigError naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

from dsv3.errors import Dsv3Error


class ConfigError(Dsv3Error, ValueError):
    """A configuration value is invalid; the message names the field."""


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")


def check_known_fields(cls: type, values: typing.Mapping[str, Any], what: str, prefix: str = "") -> None:
    """A ConfigError naming the first key of `values` that is not a field of dataclass `cls`."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown {what}{hint}")


def parse_typed(name: str, raw: str, hint: Any) -> Any:
    """The command-line text `raw` of field `name` as a value of type `hint`: booleans as
    true/false/1/0/yes/no/on/off, None as none/null for Optional fields, numbers, comma-separated (or
    JSON) lists for tuples. A ConfigError names the field and the value."""
    try:
        return _parse(raw.strip(), hint)
    except (ValueError, TypeError) as e:
        why = f" ({e})" if isinstance(e, _Reason) else ""  # Python's own parse messages add nothing
        raise ConfigError(f"{name}: cannot parse {raw!r} as {_type_name(hint)}{why}") from None


class _Reason(ValueError):
    """A parse failure whose message says more than the expected type does."""


def _parse(raw: str, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in _NONE:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(raw, arg)
            except (ValueError, TypeError):
                continue
        raise ValueError("")
    if hint is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            f = float(raw)  # 1e3 is an integer too
            if not f.is_integer():
                raise
            return int(f)
    if hint is float:
        return float(raw)
    if hint is str:
        return raw
    if origin in (tuple, list):
        items = (
            json.loads(raw) if raw.startswith("[") else [x for x in raw.strip("()").split(",") if x.strip()]
        )
        if not isinstance(items, list):
            raise ValueError("")
        elem = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise _Reason(f"expected {len(args)} values, got {len(items)}")
            return tuple(_parse_item(x, a) for x, a in zip(items, args))
        return (tuple if origin is tuple else list)(_parse_item(x, elem) for x in items)
    if origin is dict or hint is dict:
        raise _Reason("set its entries one by one as key.<name>=value")
    try:  # Any: JSON when it parses, else the text
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse_item(x: Any, hint: Any) -> Any:
    return x if hint is Any else _parse(str(x).strip(), hint)


def check_typed(name: str, value: Any, hint: Any) -> Any:
    """`value` (from a file or a dict) checked against type `hint`; lists become tuples for tuple
    fields. A ConfigError names the field and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok = True
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None) and value is None:
                return None
            if arg is not type(None):
                try:
                    return check_typed(name, value, arg)
                except ConfigError:
                    continue
        ok = False
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        if isinstance(value, Path):  # a path given from Python is its text
            return str(value)
        ok = isinstance(value, str)
    elif origin in (tuple, list):
        ok = isinstance(value, (list, tuple))
        if ok and origin is tuple and args and args[-1] is not Ellipsis:
            ok = len(value) == len(args)
            if ok:
                return tuple(check_typed(name, v, a) for v, a in zip(value, args))
        elif ok and args:
            value = (tuple if origin is tuple else list)(check_typed(name, v, args[0]) for v in value)
    elif origin is dict or hint is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if hint is bool:
        return "a boolean (true/false, yes/no, on/off, 1/0)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "text"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"{len(args)} comma-separated values"
    if origin in (tuple, list):
        return "a comma-separated list"
    if origin is dict or hint is dict:
        return "a mapping"
    return str(hint)
