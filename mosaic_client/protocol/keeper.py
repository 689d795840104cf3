"""The replies of a keeper (mosaicd.keeper), part of the protocol (mosaic_client.protocol
re-exports what the daemon uses). A keeper runs as its user, who controls it: the daemon checks
the result of every operation it acts on before using it (mosaicd.keeper.link). A result that
fails its check fails that operation, as a study that cannot be read does; it never raises in
the daemon's loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mosaic_client.contract import RUN_STATES

# A keeper's replies: a submission's run ids, a run's description.
MAX_KEEPER_MESSAGE_BYTES = 64 * 1024 * 1024


def _run_id(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**63:
        return f"must be an id, got {value!r:.40}"
    return None


_RECORD_INTS = "run_id submission_id seed epochs_target checkpoint_epoch attempts queue_seq".split()


def _int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _record(value: Any) -> str | None:
    """A run record (mosaicd.storage.store.RunRecord) as a map."""
    if value is None:
        return None
    # "search" may be absent (a run record before tuned comparisons): no search.
    if not isinstance(value, dict) or set(value) - {"search"} != {*_RECORD_INTS, "modules"}:
        return "must be a run record"
    if value.get("search") is not None and not _search_record(value["search"]):
        return "field 'search' must be a search record"
    bad = [k for k in _RECORD_INTS if not _int64(value[k])]
    if bad:
        return f"field {bad[0]!r} must be an integer"
    if value["run_id"] < 1 or value["submission_id"] < 1:
        return "has an id below 1"
    modules = value["modules"]
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        return "field 'modules' must be a list of maps"
    return None


def _search_record(value: Any) -> bool:
    """A run's search record (mosaic_client.search.record): group, stage, trial, round."""
    return (
        isinstance(value, dict)
        and set(value) == {"group", "stage", "trial", "round"}
        and value["stage"] in ("trial", "final")
        and _int64(value["group"])
        and _int64(value["round"])
        and (value["trial"] is None or _int64(value["trial"]))
    )


def _open_rounds(value: Any) -> str | None:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and _int64(p[0]) and _int64(p[1]) for p in value
    ):
        return "must be a list of [group, round] pairs"
    return None


def _history(value: Any) -> str | None:
    """A search group's finished trials (mosaic_client.study_reading.search_history)."""
    if not isinstance(value, list):
        return "must be a list of trials"
    for item in value:
        if not (
            isinstance(item, dict)
            and _int64(item.get("trial"))
            and item.get("state") in ("complete", "pruned", "fail")
            and (item.get("value") is None or isinstance(item.get("value"), (int, float)))
            and isinstance(item.get("values"), dict)
            and isinstance(item.get("intermediate"), list)
        ):
            return "has an item that is not a trial"
    return None


def _records(value: Any) -> str | None:
    if not isinstance(value, list) or None in value:
        return "must be a list of run records"
    return next((f"item {i} {p}" for i, r in enumerate(value) if (p := _record(r))), None)


def _ids(value: Any) -> str | None:
    if not isinstance(value, list) or not all(_run_id(v) is None for v in value):
        return "must be a list of ids"
    return None


def _optional(kind: type) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
            return None
        return f"must be {kind.__name__} or None"

    return check


def _is(kind: type, what: str) -> Callable[[Any], str | None]:
    return lambda value: None if isinstance(value, kind) else f"must be {what}"


def _submission(value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("process"), dict):
        return "must be a submission with its process settings"
    if not isinstance(value.get("monitor"), dict) or not isinstance(value.get("config_path"), str):
        return "must be a submission with its monitor settings and config path"
    if not _int64(value.get("priority")):
        return "must be a submission with an integer priority"
    if value.get("search") is not None and not isinstance(value["search"], dict):
        return "must be a submission whose search settings are a map"
    return None


def _rows(value: Any) -> str | None:
    """Submission rows: [submission_id, owner_uid or None, created_at or None]."""
    if not isinstance(value, list):
        return "must be a list of rows"
    for row in value:
        if not (isinstance(row, list) and len(row) == 3 and _run_id(row[0]) is None):
            return "has a row that is not [submission id, owner uid, created at]"
        if row[1] is not None and not _int64(row[1]):
            return "has an owner uid that is not an integer"
    return None


def _added(value: Any) -> str | None:
    """Per batch: [submission_id, run_ids, created_at]."""
    if not isinstance(value, list):
        return "must be a list"
    for item in value:
        if not (isinstance(item, list) and len(item) == 3 and _run_id(item[0]) is None):
            return "has an item that is not [submission id, run ids, created at]"
        if _ids(item[1]) or not (item[2] is None or isinstance(item[2], float)):
            return "has an item with bad run ids or time"
    return None


def _opened(value: Any) -> str | None:
    """A submission begun in parts: [submission_id, first run id, first queue_seq, created_at]."""
    if not (isinstance(value, list) and len(value) == 4):
        return "must be [submission id, first run id, first queue seq, created at]"
    if _run_id(value[0]) or _run_id(value[1]) or not _int64(value[2]):
        return "has a bad id or queue seq"
    if not isinstance(value[3], float):
        return "has a bad time"
    return None


# Each keeper operation's result check (operations without one return nothing the daemon acts
# on: None, or a description passed to the client who may read the study).
KEEPER_RESULTS: dict[str, Callable[[Any], str | None]] = {
    "status_of": lambda v: None if v is None or v in RUN_STATES else "must be a run state",
    "run_record": _record,
    "runs_in_state": _records,
    "run_records": _records,
    "requeue_interrupted": _records,
    "resume_parked": _records,
    "settle": _record,
    "rerun": _record,
    "submission": _submission,
    "submission_of": _optional(int),
    "submission_rows": _rows,
    "submission_counts": _is(dict, "a map"),
    "recent": _is(list, "a list"),
    "describe": lambda v: None if v is None or isinstance(v, dict) else "must be a map",
    "pipeline_text": _optional(str),
    "params_of": _is(dict, "a map"),
    "pipeline_mates": _ids,
    "select": _ids,
    "search_open_rounds": _open_rounds,
    "search_history": _history,
    "add_submissions": _added,
    "begin_submission": _opened,
    "add_runs": lambda v: None if _int64(v) and v >= 0 else "must be a count",
    "record_plan": _run_id,
    "exists": _is(bool, "a boolean"),
    "same_filesystem": _is(bool, "a boolean"),
    "log_tail": _optional(str),
    "writable_problem": _optional(str),
    "prove": lambda v: (
        _is(list, "a list")(v)
        or next(("must be booleans" for b in v if not isinstance(b, bool)), None)
    ),
}


def keeper_reply_problem(op: str, reply: Any) -> str | None:
    """What makes a keeper's reply to `op` unusable, or None. Never raises."""
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return "a keeper reply must be a map with 'ok'"
    if not reply["ok"]:
        if not isinstance(reply.get("kind"), str) or not isinstance(reply.get("message"), str):
            return "an error reply needs a 'kind' and a 'message'"
        return None
    counts = reply.get("counts")
    if counts is not None and (
        not isinstance(counts, dict)
        or set(counts) - set(RUN_STATES)
        or not all(_int64(n) and n >= 0 for n in counts.values())
    ):
        return "'counts' must map run states to counts"
    try:
        problem = KEEPER_RESULTS.get(op, lambda _: None)(reply.get("result"))
    except Exception as exc:  # a check meeting a shape it did not expect
        problem = f"cannot be checked ({type(exc).__name__})"
    return f"{op}: result {problem}" if problem else None
