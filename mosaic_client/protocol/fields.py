"""How a message's fields are declared and checked: the building block of every table of the
protocol (requests, worker messages, keeper replies). Standard library only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    name: str
    kind: type | tuple[type, ...]
    required: bool = True
    # What a value of the right kind must be besides (worker messages: bounds, nested shapes):
    # a problem in words, or None when it is fine.
    check: Callable[[Any], str | None] | None = None


def spec_field(
    name: str,
    kind: type | tuple[type, ...],
    required: bool = True,
    check: Callable[[Any], str | None] | None = None,
) -> Field:
    return Field(name, kind, required, check)


def fields_problem(spec: tuple[Field, ...], args: Any, what: str) -> str | None:
    """What is wrong with a message's fields against its declaration (types, required fields;
    not Field.check), or None."""
    if not isinstance(args, dict):
        return f"{what}: arguments must be a map"
    for field in spec:
        value = args.get(field.name)
        if value is None:
            if field.required:
                return f"{what}: missing field {field.name!r}"
            continue
        kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
        # msgpack has one integer type; a float field accepts an int, never a bool.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:
                return f"{what}: field {field.name!r} is out of range"
            continue
        if isinstance(value, bool) and bool not in kinds:
            return f"{what}: field {field.name!r} must not be a boolean"
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            # SQLite integers are 64-bit: a bigger run id or count can only be a mistake.
            return f"{what}: field {field.name!r} is out of range"
        if not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            return f"{what}: field {field.name!r} must be {names}, got {type(value).__name__}"
    return None
