"""The shape of a sequential plan that `compare --until-decided` asks the daemon to keep in its
study (the `record_plan` request; docs/compare.md, "The recorded plan"): checked here before
the study's keeper writes it, so a client can store only a bounded, well-typed row."""

from __future__ import annotations

import json
import math
from typing import Any

from mosaic_client.protocol import ErrorCode
from mosaicd.errors import Refused

MAX_TEXT = 1000  # a metric, a dataset key, a family name
MAX_METHOD = 4000  # the method in words
MAX_FAMILIES = 100
MAX_LOOKS = 1000
MAX_VERDICTS = 10000
MAX_ITEM_FIELDS = 20
MAX_JSON = 1024 * 1024  # looks and verdicts together, as stored
FIELDS = ("metric", "data_key", "families", "alpha", "spent", "looks", "verdicts", "method")


def _refuse(problem: str) -> Refused:
    return Refused(ErrorCode.INVALID, f"plan {problem}; nothing was recorded")


def _text(plan: dict[str, Any], name: str, limit: int) -> str:
    value = plan.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _refuse(f"field {name!r} must be a non-empty text of at most {limit} characters")
    return value


def _fraction(plan: dict[str, Any], name: str) -> float:
    value = plan.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(f"field {name!r} must be a number in [0, 1], got {value!r:.40}")
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise _refuse(f"field {name!r} must be in [0, 1], got {value!r:.40}")
    return float(value)


def _scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))


def _items(plan: dict[str, Any], name: str, limit: int, needs: dict[str, type]) -> list[Any]:
    """A list of at most `limit` maps, each with the `needs` fields of their types and at most
    MAX_ITEM_FIELDS text-named fields whose values are scalars or lists of scalars."""
    value = plan.get(name)
    if not isinstance(value, list) or len(value) > limit:
        raise _refuse(f"field {name!r} must be a list of at most {limit} items")
    for i, item in enumerate(value):
        where = f"{name!r} item {i}"
        if not isinstance(item, dict) or len(item) > MAX_ITEM_FIELDS:
            raise _refuse(f"{where} must be a map of at most {MAX_ITEM_FIELDS} fields")
        for key, kind in needs.items():
            found = item.get(key)
            if isinstance(found, bool) or not isinstance(found, kind):
                raise _refuse(f"{where} needs a field {key!r} of type {kind.__name__}")
        for key, v in item.items():
            ok = _scalar(v) or (isinstance(v, list) and len(v) <= 20 and all(map(_scalar, v)))
            if not isinstance(key, str) or len(key) > 100 or not ok:
                raise _refuse(f"{where} has a field that is not a short name with a plain value")
    return value


def plan_row(plan: Any) -> dict[str, Any]:
    """The sequential_plans row of a client's plan (families, looks and verdicts as JSON), or
    Refused saying what is wrong with it."""
    if not isinstance(plan, dict):
        raise _refuse("must be a map")
    unknown = sorted(str(k) for k in plan if k not in FIELDS)
    if unknown:
        names = ", ".join(unknown)[:200]
        raise _refuse(f"has unknown field(s) {names}; it has {', '.join(FIELDS)}")
    families = plan.get("families")
    if (
        not isinstance(families, list)
        or not 2 <= len(families) <= MAX_FAMILIES
        or not all(isinstance(f, str) and 0 < len(f) <= MAX_TEXT for f in families)
    ):
        raise _refuse(f"field 'families' must be a list of 2 to {MAX_FAMILIES} model keys")
    alpha, spent = _fraction(plan, "alpha"), _fraction(plan, "spent")
    if spent > alpha * (1 + 1e-9):
        raise _refuse(f"spent {spent:g} is more than its alpha {alpha:g}")
    looks = _items(plan, "looks", MAX_LOOKS, {"repetitions": int, "level": float})
    verdicts = _items(plan, "verdicts", MAX_VERDICTS, {"key": list, "verdict": str})
    row = {
        "metric": _text(plan, "metric", MAX_TEXT),
        "data_key": _text(plan, "data_key", MAX_TEXT),
        "families": json.dumps(sorted(set(families))),
        "alpha": alpha,
        "spent": spent,
        "looks": json.dumps(looks),
        "verdicts": json.dumps(verdicts),
        "method": _text(plan, "method", MAX_METHOD),
    }
    if len(row["looks"]) + len(row["verdicts"]) > MAX_JSON:
        raise _refuse(f"looks and verdicts are more than {MAX_JSON} bytes of JSON")
    return row
