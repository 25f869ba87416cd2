"""Model args as data: overrides from a recipe, the command line or a saved config, the
fields in which two args differ, and the round trip to JSON.

A model's args are a dataclass owned by its package (nested dataclasses allowed, e.g.
an MoE block's). Overrides are a plain dict of field -> value (nested dicts for nested
dataclasses), which is what ``--model.args.FIELD VALUE``, ``config.model.args`` in a
recipe and the run's ``config.json`` hold.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from plait.errors import ConfigError

SCALARS = (bool, int, float, str)


def replace_args(args: Any, overrides: dict[str, Any], *, where: str = "--model.args") -> Any:
    """``args`` with ``overrides`` applied (recursively into nested dataclasses)."""
    if not overrides:
        return args
    known = {f.name: f for f in dataclasses.fields(args) if f.init}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown model argument(s) {', '.join(unknown)} ({type(args).__name__} has no such "
            f"field); valid ones: {', '.join(sorted(known))}"
        )
    changes = {}
    for name, value in overrides.items():
        current = getattr(args, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = replace_args(current, value, where=f"{where}.{name}")
        elif current is None and isinstance(value, dict):
            raise ConfigError(f"{where}.{name}: cannot set the fields of an absent {name} (it is None in these args)")
        changes[name] = value
    try:
        return dataclasses.replace(args, **changes)
    except (TypeError, ValueError, ArithmeticError) as error:
        raise ConfigError(f"{where}: {error} (sizes and head counts must be positive integers)") from None


def differing_fields(left: Any, right: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted field, left value, right value)`` for every field that differs."""
    differences = []
    for f in dataclasses.fields(left):
        a, b = getattr(left, f.name), getattr(right, f.name, None)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            differences += differing_fields(a, b, f"{prefix}{f.name}.")
        elif a != b:
            differences.append((f"{prefix}{f.name}", a, b))
    return differences


def args_to_dict(args: Any) -> dict[str, Any]:
    return dataclasses.asdict(args)


def args_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """The args dataclass ``cls`` from ``args_to_dict``'s output."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        value = data[f.name]
        nested = _dataclass_in(hints.get(f.name))
        values[f.name] = args_from_dict(nested, value) if nested is not None and isinstance(value, dict) else value
    return cls(**values)


def scalar_fields(cls: type) -> dict[str, type]:
    """The fields of ``cls`` that the command line can set: name -> bool/int/float/str."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        kinds = [kind for kind in _members(hints.get(f.name)) if kind is not type(None)]
        if f.init and len(kinds) == 1 and kinds[0] in SCALARS:
            fields[f.name] = kinds[0]
    return fields


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _dataclass_in(hint: Any) -> type | None:
    return next((kind for kind in _members(hint) if dataclasses.is_dataclass(kind)), None)
