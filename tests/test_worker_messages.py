"""Worker messages checked before the daemon acts on them (protocol.WORKER_MESSAGES and
mosaicd.scheduling.worker_events.EVENTS): a malformed one fails the run it names, or is dropped,
and never raises in the daemon's loop.

The unit tests throw tens of thousands of malformed messages at the validator and at the
scheduler's on_message; the last test has model code send them over a real worker's socket.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLE, Daemon, example_config, query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosaic_client import contract, protocol
from mosaic_client.protocol import WORKER_MESSAGES, worker_message_problem
from mosaicd.executors.base import WorkerHandle, make_slots
from mosaicd.scheduling import worker_events
from mosaicd.scheduling.worker_events import EVENTS, WorkerEvents

MEASUREMENT = {
    "device": "cpu",
    "memory_method": "resident_hwm",
    "load_1m": 0.4,
    "cpus": 2,
    "threads": 1,
    "gpu_seconds": None,
    "latency_spread": 0.05,
    "members": 1,
}
RESULTS = (
    {column: 0.5 for column in contract.RESULT_COLUMNS}
    | {"epochs": 3, "nb_params": 9, "energy_j": None}
    | {"measurement": MEASUREMENT}
)
# Resource figures a worker must not send (issue 26): not finite, negative, past the bound.
BAD_FIGURES: list[Any] = [float("nan"), float("inf"), -1.0, -(2**40), 1e300, True, "3"]
CODE = {
    "section": "data",
    "class": "dataset_OR",
    "path": "/p/dataset.py",
    "sha256": "ab" * 32,
    "git_commit": None,
    "git_dirty": None,
    "text": "class dataset_OR: ...",
}
# One well-formed message of each type, as the worker sends them.
VALID: dict[str, dict[str, Any]] = {
    "hello": {"type": "hello", "pid": 123, "slot": "cpu"},
    "epoch": {
        "type": "epoch",
        "run_id": 7,
        "epoch": 1,
        "train_loss": 0.5,
        "test_loss": float("nan"),  # a non-finite loss is the run's to report, not malformed
        "train_acc": None,
        "test_acc": 0.75,
        "duration": 0.01,
        "checkpointed": False,
    },
    "done": {"type": "done", "run_id": 7, "results": RESULTS, "files": ["/r/history_7.pt"]},
    "failed": {"type": "failed", "run_id": 7, "error": "boom", "traceback": ""},
    "parked": {"type": "parked", "run_id": 7, "epoch": 0},
    "provenance": {
        "type": "provenance",
        "run_id": 7,
        "environment": {"python": "3.12.3", "threads": 2},
        "code": [CODE],
    },
    "cancelled": {"type": "cancelled", "run_id": 7, "epoch": 2},
    "fallback": {"type": "fallback", "run_ids": [7, 8], "reason": "LBFGS"},
    "search": {"type": "search", "run_id": 7, "values": {"lr": 0.01, "mlp_act": "relu"}},
}
# Values of every msgpack kind; the mutations pick those a field does not accept.
JUNK: list[Any] = [True, 3, -1, 2**70, 1.5, float("inf"), "x", b"\x00", [], [1], {}, {"a": 1}]


def test_every_worker_message_has_a_valid_example_and_a_handler() -> None:
    assert set(VALID) == set(WORKER_MESSAGES) == set(EVENTS)
    for kind, message in VALID.items():
        assert worker_message_problem(message) is None, kind


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ({"type": "done", "run_id": 7, "results": {}, "files": []}, "lacks 'train_loss'"),
        (VALID["done"] | {"results": RESULTS | {"epochs": 2.5}}, "'epochs' must be an integer"),
        (VALID["done"] | {"results": RESULTS | {"slope": "steep"}}, "'slope' must be a number"),
        (VALID["done"] | {"files": [""]}, "item 0 must be a path"),
        (VALID["done"] | {"results": RESULTS | {"latency_ms": -0.5}}, "'latency_ms' must be None"),
        (VALID["done"] | {"results": RESULTS | {"flops_per_sample": float("nan")}}, "finite"),
        (VALID["done"] | {"results": RESULTS | {"energy_j": 1e30}}, "under 1e+15"),
        (
            VALID["done"] | {"results": RESULTS | {"measurement": {"cpu": 1}}},
            "'measurement' has an unknown key 'cpu'",
        ),
        (
            VALID["done"] | {"results": RESULTS | {"measurement": MEASUREMENT | {"cpus": -2}}},
            "'measurement' 'cpus' must be None",
        ),
        (
            VALID["done"] | {"results": RESULTS | {"measurement": MEASUREMENT | {"device": 5}}},
            "'device' must be a short string",
        ),
        (VALID["done"] | {"results": RESULTS | {"measurement": []}}, "must be a map"),
        (VALID["epoch"] | {"epoch": 0}, "must be at least 1"),
        (VALID["epoch"] | {"duration": float("nan")}, "'duration' must be at least 0"),
        (VALID["epoch"] | {"loss": 1.0}, "unknown field 'loss'"),
        (VALID["failed"] | {"error": "e" * (protocol.MAX_WORKER_TEXT + 1)}, "longer than"),
        (VALID["fallback"] | {"run_ids": [7, "8"]}, "item 1 must be a run id"),
        (VALID["search"] | {"values": {"lr": [0.1]}}, "must be a finite number or a short string"),
        (VALID["search"] | {"pruned": 0}, "'pruned'"),
        (VALID["provenance"] | {"code": [{**CODE, "sha256": None}]}, "needs a 'sha256'"),
        ({"type": "epoch"}, "missing field 'run_id'"),
        ({"type": "bye"}, "unknown worker message type 'bye'"),
        ([1, 2], "must be a map"),
    ],
)
def test_worker_message_problems_say_what_is_wrong(message: Any, problem: str) -> None:
    found = worker_message_problem(message)
    assert found is not None and problem in found, found


def _wrong_for(field: protocol.Field, rng: random.Random) -> Any:
    """A value of a kind the field refuses."""
    kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
    while True:
        value = rng.choice(JUNK)
        if isinstance(value, bool):
            if bool not in kinds:
                return value
        elif isinstance(value, int) and (float in kinds or int in kinds):
            if not -(2**63) <= value < 2**63:
                return value
        elif not isinstance(value, kinds):
            return value


def _nested_breakage(kind: str, message: dict[str, Any], rng: random.Random) -> None:
    """Break what is inside a field: a result column, a file, a code entry, a run id, a size."""
    if kind == "done":
        choice = rng.randrange(6)
        if choice == 0:
            del message["results"][rng.choice(contract.RESULT_COLUMNS)]
        elif choice == 1:
            column = rng.choice(contract.RESULT_COLUMNS)
            message["results"][column] = rng.choice(["1", [], {}, True, b"x"])
        elif choice == 2:
            message["files"] = [rng.choice([1, None, "", "p" * 5000, []])]
        elif choice == 4:
            column = rng.choice(contract.RESOURCE_COLUMNS)
            message["results"][column] = rng.choice(BAD_FIGURES)
        elif choice == 5:
            name = rng.choice([*contract.MEASUREMENT_NUMBERS, *contract.MEASUREMENT_TEXT, "x"])
            bad = rng.choice([*BAD_FIGURES, "d" * 5000, [], {}])
            if name in contract.MEASUREMENT_TEXT and isinstance(bad, str) and len(bad) < 10:
                bad = 7  # a short string is a good device name
            message["results"]["measurement"] = MEASUREMENT | {name: bad}
        else:
            message["results"] = {str(i): 1 for i in range(protocol.MAX_WORKER_MAP + 1)}
    elif kind == "provenance":
        entry = rng.choice([None, 3, "x", [], {**CODE, "path": 5}, {"section": "s"}])
        message["code"] = [CODE, entry]
    elif kind == "fallback":
        message["run_ids"] = [7, rng.choice([None, "7", 1.0, True, 0, -3, 2**64, []])]
    elif kind in ("epoch", "parked", "cancelled"):
        message["epoch"] = rng.choice([-1, -(2**40)])
    elif kind == "failed":
        message[rng.choice(["error", "traceback"])] = "t" * (protocol.MAX_WORKER_TEXT + 1)
    elif kind == "search":
        if rng.randrange(2):
            message["values"] = {"lr": rng.choice([[], {}, None, b"x", "v" * 5000, float("nan")])}
        else:
            message["pruned"] = rng.choice([0, -1, -(2**40)])
    else:  # hello
        message[rng.choice(["pid", "slot"])] = rng.choice([0, "s" * 5000])


def malformed(rng: random.Random) -> Any:
    """A worker message that breaks its declaration in one random way."""
    kind = rng.choice(sorted(VALID))
    message = copy.deepcopy(VALID[kind])
    fields = WORKER_MESSAGES[kind]
    how = rng.randrange(6)
    if how == 0:
        return rng.choice([None, 3, "done", b"done", [message], [("type", kind)]])
    if how == 1:
        message["type"] = rng.choice(["", "Done", "run", 5, None, ["done"]])
    elif how == 2:
        del message[rng.choice([f.name for f in fields if f.required])]
    elif how == 3:
        field = rng.choice(fields)
        message[field.name] = _wrong_for(field, rng)
    elif how == 4:
        message[rng.choice(["extra", "results2", "", "run"])] = rng.choice(JUNK)
    else:
        _nested_breakage(kind, message, rng)
    return message


def test_ten_thousand_malformed_messages_are_refused_without_raising() -> None:
    rng = random.Random(20240611)
    for count in range(12_000):
        message = malformed(rng)
        problem = worker_message_problem(message)
        assert isinstance(problem, str) and problem, (count, message)
        protocol.message_run_ids(message)  # never raises either


class FakeExecutor:
    def __init__(self) -> None:
        self.killed: list[tuple[WorkerHandle, str]] = []
        self.hellos = 0

    def kill(self, handle: WorkerHandle, reason: str) -> None:
        self.killed.append((handle, reason))

    def said_hello(self, handle: WorkerHandle) -> None:
        self.hellos += 1


class Proc:
    pid = 4242


def scheduler_part(monkeypatch: pytest.MonkeyPatch) -> tuple[WorkerEvents, list[str]]:
    """WorkerEvents alone, its handlers replaced by a recorder: what on_message does with a
    message before any handler touches a study."""
    events = WorkerEvents.__new__(WorkerEvents)
    events._executor = FakeExecutor()  # type: ignore[assignment]
    handled: list[str] = []
    for kind in EVENTS:
        monkeypatch.setitem(
            worker_events.EVENTS, kind, lambda self, w, m: handled.append(m["type"])
        )
    return events, handled


def busy_worker(group: set[int] | None = None) -> WorkerHandle:
    worker = WorkerHandle("w1", make_slots(1, [], 1)[0], Proc())
    worker.run = ("/s.db", 7)
    worker.group = group or set()
    return worker


def test_on_message_fails_the_named_run_or_drops_and_never_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events, handled = scheduler_part(monkeypatch)
    executor: FakeExecutor = events._executor  # type: ignore[assignment]
    rng = random.Random(7)
    expected_kills = 0
    for _ in range(10_000):
        worker = busy_worker(rng.choice([None, {7, 8}]))
        message = malformed(rng)
        events.on_message(worker, message)
        mine = [r for r in protocol.message_run_ids(message) if r in (worker.group or {7})]
        expected_kills += bool(mine)
    assert handled == []  # no handler saw a malformed message
    assert len(executor.killed) == expected_kills > 1000
    reason = executor.killed[0][1]
    assert reason.startswith("malformed ") and "the worker was killed" in reason
    # A run of another worker, or none: dropped, nothing killed.
    before = len(executor.killed)
    events.on_message(busy_worker(), {"type": "done", "run_id": 99, "results": {}, "files": []})
    idle = busy_worker()
    idle.run = None
    events.on_message(idle, {"type": "done", "run_id": 7, "results": {}, "files": []})
    assert len(executor.killed) == before
    # Well-formed messages reach their handlers.
    for message in VALID.values():
        events.on_message(busy_worker(), copy.deepcopy(message))
    assert handled == list(VALID)


def test_the_malformed_done_that_crashed_the_daemon_fails_its_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events, handled = scheduler_part(monkeypatch)
    executor: FakeExecutor = events._executor  # type: ignore[assignment]
    worker = busy_worker()
    events.on_message(worker, {"type": "done", "run_id": 7, "results": {}, "files": []})
    [(killed, reason)] = executor.killed
    assert killed is worker and handled == []
    assert "malformed 'done' message for run(s) [7]" in reason
    assert "results' lacks 'train_loss'" in reason


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=4)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(sorted(VALID)),
    changes=st.dictionaries(
        st.sampled_from(["run_id", "epoch", "results", "files", "code", "run_ids", "x"]),
        VALUES,
        min_size=1,
        max_size=3,
    ),
)
def test_arbitrary_field_values_never_raise(
    monkeypatch: pytest.MonkeyPatch, kind: str, changes: dict[str, Any]
) -> None:
    message = copy.deepcopy(VALID[kind]) | changes
    problem = worker_message_problem(message)
    assert problem is None or isinstance(problem, str)
    events, handled = scheduler_part(monkeypatch)
    events.on_message(busy_worker({7, 8}), message)
    assert handled == ([kind] if problem is None else [])


# -- through a real daemon -------------------------------------------------------------------

# Appended to the example's dataset file: when a run loads it (a fresh module per run), the
# model code finds its worker and sends malformed messages for its own run over the worker's
# socket, before training as usual. Odd run ids send the `done` with empty results that used
# to crash the daemon (and again at each restart); even ones a wrongly typed `epoch`. Both
# also send one naming a run that is not theirs, which is dropped.
SABOTAGE = """

def _sabotage():
    import gc

    # The worker's module may run as __main__: found by its class name.
    worker = next(
        o for o in gc.get_objects() if type(o).__name__ == "Worker" and hasattr(o, "running_ids")
    )
    [run_id] = worker.running_ids
    worker.send("done", run_id=run_id + 1000, results={}, files=[])
    if run_id % 2:
        worker.send("done", run_id=run_id, results={}, files=[])
    else:
        worker.send("epoch", run_id=run_id, epoch="one", train_loss=None)


_sabotage()
"""


@pytest.mark.parametrize("isolation", ["state", "process"])
def test_malformed_messages_from_model_code_fail_the_run_and_the_daemon_serves_on(
    tmp: Path, isolation: str
) -> None:
    classes = tmp / "classes"
    shutil.copytree(EXAMPLE, classes)
    with open(classes / "dataset.py", "a") as fh:
        fh.write(SABOTAGE)
    cfg = example_config(
        tmp, epochs=2, multiplicity=2, extra_monitor="ensemble = off", classes=classes
    )
    d = Daemon(tmp, "--isolation", isolation, workers=1).start()
    db = str(tmp / "s.db")
    try:
        d.cli("run", str(cfg), db, check=True)
        counts = d.wait_for(db, total=2, timeout=120)
        assert counts["failed"] == 2, counts
        assert d.request("ping")["pid"] == d.proc.pid  # type: ignore[union-attr]
        assert d.proc is not None and d.proc.poll() is None
        rows = query(db, "SELECT run_id, return_status FROM runs ORDER BY run_id")
        for run_id, status in rows:
            kind = "done" if run_id % 2 else "epoch"
            assert f"malformed '{kind}' message for run(s) [{run_id}]" in status, status
        odd = next(status for run_id, status in rows if run_id % 2)
        assert "results' lacks 'train_loss'" in odd
        # The daemon's loop went on: a status request answers, and the study is readable.
        assert d.request("status", db=db)["studies"][0]["counts"]["failed"] == 2
        log = d.log_path.read_text()
        assert "dropped a malformed message from worker" in log
        assert "Traceback" not in log, log
    finally:
        d.stop()
    # A restart finds nothing to trip on either.
    d = Daemon(tmp, "--isolation", isolation, workers=1).start()
    try:
        time.sleep(0.5)
        assert d.request("ping")
    finally:
        d.stop()


@settings(max_examples=300, deadline=None)
@given(
    column=st.sampled_from(contract.RESOURCE_COLUMNS),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.none(),
    ),
)
def test_a_resource_figure_passes_only_when_finite_non_negative_and_bounded(
    column: str, value: Any
) -> None:
    message = copy.deepcopy(VALID["done"])
    message["results"][column] = value
    problem = worker_message_problem(message)
    bound = contract.RESOURCE_BOUNDS[column]
    fits = value is None or (-(2**63) <= value < 2**63 and value == value and 0 <= value < bound)
    assert (problem is None) == fits, (column, value, problem)
