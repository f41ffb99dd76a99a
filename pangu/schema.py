"""Strict typed documents: a nested dict (read from YAML) becomes a dataclass, every key and type
checked, or a `ConfigError` names the field, the bad value and what is allowed. The config and the
task files are read through here; sizes as users type them (80GiB, 500MB) are parsed here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from typing import Any, Literal

import yaml


class PanguError(Exception):
    """A condition a user can cause (bad input, a damaged file, a full disk): the command prints
    its message, which names what is wrong and what to do, as one line, without a traceback, and
    exits with `exit_status` (2; a subclass for a failure a retry can cure says otherwise)."""

    exit_status = 2


class ConfigError(PanguError, ValueError):
    """A configuration value is unknown, mistyped or inconsistent."""


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """A ConfigError naming the field, its value and what is allowed, unless `ok`."""
    if not ok:
        raise ConfigError(f"{name} = {value!r} is not allowed: expected {allowed}")


def from_dict(cls: type, data: Any, where: str, document: str = "the config") -> Any:
    """Build dataclass `cls` from `data`, checking every key and type; `where` is the dotted path
    of `data` inside `document` (the config, a task file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or document} must be a mapping, got {data!r}")
    hints, names, required = _fields(cls)
    for key in data:
        if key not in names:
            raise ConfigError(
                f"unknown key {_join(where, key)!r}.{did_you_mean(key, names)} "
                f"Allowed keys of {where or document}: {', '.join(names)}"
            )
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(
            f"missing key {_join(where, missing[0])!r}: {where or document} needs {', '.join(map(repr, required))}"
        )
    kwargs = {key: _coerce(hints[key], value, _join(where, key)) for key, value in data.items()}
    return cls(**kwargs)


def did_you_mean(key: Any, names: list[str]) -> str:
    """' Did you mean NAME?' for the name closest to a mistyped key, or ''."""
    close = difflib.get_close_matches(str(key), names, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], list[str], list[str]]:
    """(type hints, field names, required field names) of a dataclass: worked out once per class,
    since documents with many records (a checkpoint's index) build the same class many times."""
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return typing.get_type_hints(cls), [f.name for f in fields], required


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _describe(hint: Any) -> str:
    """What a type hint allows, in words."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list (of {_describe(typing.get_args(hint)[0])} each)"
    if origin is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, str(hint))


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:  # a value kept as it was read (e.g. the run config a checkpoint records)
        return value
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                f"{where} = {value!r} is not allowed: expected one of {', '.join(repr(a) for a in allowed)}"
            )
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r} is not allowed: expected a list")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where} = {value!r} is not allowed: expected nothing (null)")
        return None
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{where} = {value!r} is not allowed: expected a list of {len(items)}")
        return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(items, value)))
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r} is not allowed: expected a mapping")
        return {_coerce(key_type, k, where): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):  # the first alternative the value fits
        for alternative in typing.get_args(hint):
            try:
                return _coerce(alternative, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} = {value!r} is not allowed: expected {_describe(hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} is not allowed: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r} is not allowed: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} is not allowed: expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r} is not allowed: expected a string")
        return value
    raise TypeError(f"unsupported config type {hint} at {where}")


# ---------------------------------------------------------------------------------------------
# Sizes as users type them


_SIZE = re.compile(r"\s*(\d*\.?\d+(?:e[+-]?\d+)?)\s*(?:([kmgtp])(i?)b?|b?)\s*", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'80G', '80GB', '80GiB', '1.5TiB', '500MB', '8e10' or a plain number -> bytes.
    K, M, G, T, P are decimal (1000^n); with an i (KiB, GiB, ...) binary (1024^n)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ConfigError(f"{text!r} is not a size: expected e.g. 80GiB, 32GB, 500M or 8e10 (bytes)")
    value, prefix, binary = float(match[1]), (match[2] or "").upper(), match[3]
    power = "KMGTP".index(prefix) + 1 if prefix else 0
    return int(value * (1024 if binary else 1000) ** power)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` (value parsed as YAML) to the nested dict `raw`."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. train.steps=100")
    dotted, _, text = override.partition("=")
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {key!r} is not a section")
    node[keys[-1]] = value
