"""Unit and property tests of the small pure pieces: metrics, selections, protocol, params."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from conftest import REPO
from hypothesis import given
from hypothesis import strategies as st

from mosaic_client import protocol
from mosaic_client import selection as sel
from mosaic_client.contract import TRANSITIONS
from mosaicd.scheduling.submissions import readable_pipeline, run_params
from mosaicd.storage.store import Store, StoreError
from mosaicd.training import metrics

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


def test_metrics_formulas() -> None:
    train, test = [1.0, 0.5, 0.25], [1.2, 0.8, 0.5]
    assert metrics.overfit(train, test) == pytest.approx(0.25 / (1.2 - 0.25))
    assert metrics.trainability(test) == pytest.approx(2.5 / 3)
    # 3 epochs: 10% of 2 steps rounds to 0, so at least one step: the last change.
    assert metrics.slope(train) == pytest.approx(-0.25)
    twenty = [float(20 - i) for i in range(21)]
    assert metrics.slope(twenty) == pytest.approx(-1.0)  # two steps, -1 each


def test_metrics_short_and_degenerate_histories() -> None:
    assert metrics.derived([], []) == {"overfit": None, "trainability": None, "slope": None}
    one = metrics.derived([0.3], [0.3])
    assert one == {"overfit": 0.0, "trainability": 0.3, "slope": None}
    assert metrics.overfit([float("nan")], [1.0]) is None
    assert metrics.slope([1.0, float("inf")]) is None


@given(st.lists(finite, min_size=1, max_size=60), st.lists(finite, min_size=1, max_size=60))
def test_overfit_is_between_zero_and_one(train: list[float], test: list[float]) -> None:
    value = metrics.overfit(train, test)
    assert value is not None and 0.0 <= value <= 1.0 + 1e-9


@given(st.lists(finite, min_size=2, max_size=200))
def test_slope_is_bounded_by_the_largest_step(train: list[float]) -> None:
    value = metrics.slope(train)
    biggest = max(abs(b - a) for a, b in zip(train, train[1:]))
    assert value is not None and abs(value) <= biggest + 1e-6


@given(st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=30))
def test_parse_ids_round_trips(ids: list[int]) -> None:
    text = ",".join(str(i) for i in ids)
    assert sel.parse_ids(text) == sorted(set(ids))


def test_parse_ids_ranges_and_errors() -> None:
    assert sel.parse_ids("1-3,7") == [1, 2, 3, 7]
    assert sel.parse_ids("all") is None
    for bad, word in (
        ("3-1", "backwards"),
        ("a", "not a run id"),
        ("1,,2", "empty"),
        ("1-x", "range"),
    ):
        with pytest.raises(sel.SelectionError, match=word):
            sel.parse_ids(bad)


def test_make_selection_needs_exactly_one() -> None:
    with pytest.raises(sel.SelectionError, match="exactly one"):
        sel.make_selection()
    with pytest.raises(sel.SelectionError, match="exactly one"):
        sel.make_selection(ids="1", request="SELECT 1")
    assert sel.make_selection(param=["width", "3"]) == {
        "kind": "param",
        "name": "width",
        "value": 3,
    }


@pytest.fixture
def study(tmp_path) -> sqlite3.Connection:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.db")
    store = Store(path)
    module = [{"type": "m", "class": "c", "path_to_class": "/c.py", "key": "k", "name": "c"}]
    runs = [
        (module, i, "c()", {"width": w, "act": a})
        for i, (w, a) in enumerate([(3, "relu"), (10, "tanh"), (5, "relu")])
    ]
    store.add_submission(0, "me", "/c.ini", {"epochs": 1}, {}, runs)
    store.close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    yield conn
    conn.close()


def test_resolve_selections(study: sqlite3.Connection) -> None:
    assert sel.resolve(study, {"kind": "ids", "ids": [1, 3, 99]}) == [1, 3]
    assert sel.resolve(study, {"kind": "all"}) == [1, 2, 3]
    assert sel.resolve(study, {"kind": "param", "name": "act", "value": "relu"}) == [1, 3]
    assert sel.resolve(study, {"kind": "low", "name": "width", "value": 5}) == [1, 3]
    assert sel.resolve(study, {"kind": "high", "name": "width", "value": 5}) == [2, 3]
    assert sel.resolve(
        study,
        {
            "kind": "request",
            "sql": "SELECT run_id FROM params WHERE param_name='width' AND param_value > 4",
        },
    ) == [2, 3]


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM runs",
        "DROP TABLE params",
        "INSERT INTO runs VALUES (9, 'x', 'y', NULL)",
        "PRAGMA writable_schema = 1",
        "SELECT 1; SELECT 2",
        "CREATE TABLE t (x)",
        "SELECT 'text'",
    ],
)
def test_request_refuses_anything_but_reading_ids(study: sqlite3.Connection, sql: str) -> None:
    with pytest.raises(sel.SelectionError):
        sel.resolve(study, {"kind": "request", "sql": sql})
    assert sel.resolve(study, {"kind": "all"}) == [1, 2, 3]


def test_protocol_round_trip_and_validation() -> None:
    payload = protocol.make_request("status", limit=3)
    assert protocol.decode_request(payload) == ("status", {"limit": 3})
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode_request(protocol.pack({"v": 1, "type": "cancel", "args": {"db": 3}}))
    assert err.value.code == protocol.ErrorCode.BAD_ARGUMENTS
    with pytest.raises(protocol.ProtocolError, match="boolean"):
        protocol.check_fields(protocol.REQUESTS["status"], {"limit": True}, "status")
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode_reply(protocol.error_reply("permission", "no"))
    assert err.value.code == "permission"


def test_readable_pipeline_and_params() -> None:
    modules = [
        {
            "type": "dataset",
            "class": "dataset_OR",
            "path_to_class": "/d.py",
            "data_size": 200,
            "train_prop": 0.8,
            "key": "data_dataset_OR",
            "name": "d",
        },
        {
            "type": "mlp",
            "class": "mlp_funnel",
            "path_to_class": "/m.py",
            "length": 4,
            "width": 3,
            "key": "mlp",
            "name": "m",
        },
    ]
    assert readable_pipeline(modules) == "dataset_OR(200,0.8) | mlp_funnel(4,3)"
    params = run_params(
        {"lr": 0.1, "data_scheme": ["dataset"], "seed": None}, modules, 7, 1000, "alice"
    )
    assert params["dataset_key"] == "data_dataset_OR" and params["mlp_key"] == "mlp"
    assert params["mlp_funnel_width"] == 3 and params["dataset_OR_data_size"] == 200
    assert params["data_scheme"] == "dataset" and "seed" in params and params["seed"] == 7
    assert params["owner"] == "alice" and params["owner_uid"] == 1000


def test_store_refuses_foreign_and_newer_databases(tmp_path) -> None:  # type: ignore[no-untyped-def]
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        Store(str(junk))
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (y)").connection.commit()
    with pytest.raises(StoreError, match="not a Mosaic study"):
        Store(str(other))
    newer = tmp_path / "newer.db"
    Store(str(newer)).close()
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE system SET param_value=99 WHERE param_name='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this Mosaic"):
        Store(str(newer))


def test_every_transition_is_recorded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = Store(str(tmp_path / "s.db"))
    module = [{"type": "m", "class": "c", "path_to_class": "/c.py", "key": "k", "name": "c"}]
    _, (run_id,) = store.add_submission(
        0, "me", "/c.ini", {"epochs": 1}, {}, [(module, 0, "c()", {})]
    )
    for state in ("running", "paused", "queued", "running", "done", "queued"):
        store.transition(run_id, state, "test")
    with pytest.raises(StoreError, match="cannot go from queued to done"):
        store.transition(run_id, "done")
    events = store.conn.execute("SELECT from_status, to_status FROM run_events").fetchall()
    assert events[0] == (None, "queued") and len(events) == 7
    for before, after in zip(events, events[1:]):
        assert after[1] in TRANSITIONS[after[0]] and before[1] == after[0]
    assert store.counts["queued"] == 1 and sum(store.counts.values()) == 1


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    # One formatter for the whole tree ([tool.ruff.format] in pyproject.toml).
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_request_is_sent_by_a_command_that_says_so() -> None:
    import re

    from mosaic_client import cli

    named: set[str] = set()
    for command in cli.COMMANDS:
        assert command.NAME and command.HELP and command.EXAMPLE.startswith("mosaic ")
        assert callable(command.add_arguments) and callable(command.run)
        doc = command.__doc__ or ""
        assert doc.startswith(f"`mosaic {command.NAME}"), command.__name__
        assert "Sends" in doc, f"{command.__name__} does not say which requests it sends"
        named |= set(re.findall(r"`(\w+)`", doc)) & set(protocol.REQUESTS)
    assert named == set(protocol.REQUESTS)
    assert [c.NAME for c in cli.COMMANDS] == list(dict.fromkeys(c.NAME for c in cli.COMMANDS))


def test_legacy_entry_points_are_installed() -> None:
    from mosaic_client import cli
    from mosaic_client.completion import LEGACY_COMMANDS

    pyproject = (REPO / "pyproject.toml").read_text()
    for name in LEGACY_COMMANDS:
        assert f'mosaic_{name} = "mosaic_client.cli:legacy_{name}"' in pyproject
        assert callable(getattr(cli, f"legacy_{name}"))
        assert name in {c.NAME for c in cli.COMMANDS}


def test_a_version_1_study_is_migrated_forward(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mosaicd.storage.store import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO system VALUES ('schema_version', 1), ('next_run_id', 1)")
    conn.execute("INSERT INTO submissions (created_at, process, monitor) VALUES (0, '{}', '{}')")
    conn.commit()
    conn.close()
    store = Store(str(path))
    assert store._version() == SCHEMA_VERSION >= 3
    assert store.submission(1)["process"] == {} and "paused" not in store.submission(1)
    store.close()


def test_a_version_2_study_loses_its_per_submission_pause(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Migration 3: an owner's hold lives in the daemon's state only; the study's copy goes,
    # and nothing else of the submission is lost.
    from mosaicd.storage.store import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    for version in (1, 2):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO system VALUES ('schema_version', 2), ('next_run_id', 1)")
    conn.execute(
        "INSERT INTO submissions (created_at, owner_uid, owner, process, monitor, paused)"
        " VALUES (0, 1234, 'ann', '{\"epochs\": 3}', '{\"retries\": 1}', 1)"
    )
    conn.commit()
    conn.close()
    store = Store(str(path))
    assert store._version() == SCHEMA_VERSION >= 3
    columns = [row[1] for row in store.conn.execute("PRAGMA table_info(submissions)")]
    assert "paused" not in columns and "owner_uid" in columns
    info = store.submission(1)
    assert (info["owner_uid"], info["owner"], info["process"], info["monitor"]) == (
        1234,
        "ann",
        {"epochs": 3},
        {"retries": 1},
    )
    store.close()


def test_holds_are_stored_once_and_survive_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mosaicd.scheduling.holds import Holds
    from mosaicd.storage.state import DaemonState

    holds = Holds(DaemonState(str(tmp_path)))
    holds.hold(1001)
    assert holds.keeps(1001) and not holds.keeps(1002) and not holds.keeps(None)
    assert holds.holds_submissions_of(1001) and not holds.holds_submissions_of(1002)
    again = Holds(DaemonState(str(tmp_path)))  # a restarted daemon
    assert again.owners == {1001} and not again.all
    again.hold(None)
    assert again.holds_submissions_of(1002)
    again.release(None)  # releases every hold: the daemon's and each owner's
    restarted = Holds(DaemonState(str(tmp_path)))
    assert not restarted.all and restarted.owners == set()


def test_a_worker_changes_state_only_along_its_lifecycle() -> None:
    from mosaicd.executors.base import (
        BUSY,
        IDLE,
        STARTING,
        STOPPING,
        WORKER_TRANSITIONS,
        Slot,
        WorkerHandle,
    )

    handle = WorkerHandle("w1", Slot("cpu", 0), proc=None)
    assert handle.state == STARTING
    with pytest.raises(RuntimeError, match="cannot go from starting to busy"):
        handle.become(BUSY)
    for state in (IDLE, BUSY, IDLE, BUSY, STOPPING):
        before = handle.state
        handle.become(state)
        assert state in WORKER_TRANSITIONS[before]
    with pytest.raises(RuntimeError, match="cannot go from stopping to idle"):
        handle.become(IDLE)


def test_every_worker_message_has_its_handler() -> None:
    # WorkerEvents.on_message hands every message to its entry of the EVENTS table.
    from mosaicd.scheduling.worker_events import EVENTS

    missing = [kind for kind in protocol.WORKER_MESSAGES if not callable(EVENTS.get(kind))]
    assert missing == [] and set(EVENTS) == set(protocol.WORKER_MESSAGES)


def test_settings_are_resolved_once_with_every_default() -> None:
    from mosaic_client import schema

    process = {"lr": 1, "epochs": 2, "data_scheme": ["d"], "pipeline_scheme": ["m"], "x": 5}
    settings = schema.process_settings(process)
    assert tuple(settings) == schema.PROCESS_KEYS  # every key, unknown ones left out
    assert settings["lr"] == 1.0 and isinstance(settings["lr"], float)
    assert (settings["optimizer"], settings["deterministic"], settings["accuracy"]) == (
        "Adam",
        False,
        "none",  # no accuracy given by a hand-made request
    )
    assert schema.monitor_settings({}) == {
        key.name: list(key.default) if isinstance(key.default, tuple) else key.default
        for key in schema.KEYS
        if key.section == schema.MONITOR
    }
    assert schema.monitor_settings({"timeout": 5, "gpu_available": None})["timeout"] == 5.0


def test_a_submission_keeps_the_users_values_and_resolves_them() -> None:
    from mosaicd.scheduling.submissions import Submission

    process = {"lr": 0.1, "epochs": 1, "data_scheme": ["d"], "pipeline_scheme": ["m"]}
    monitor = {"nb_processus": 3, "need_gpu": True, "gpu_available": ["cuda:1"]}
    submission = Submission("/s.db", 1, None, None, dict(process), dict(monitor))
    # What the study stores and `pending` reports stays as sent.
    assert (submission.process, submission.monitor) == (process, monitor)
    assert submission.process_settings["optimizer"] == "Adam"
    assert submission.monitor_settings["ensemble_max"] == 16
    assert (submission.cap, submission.retries, submission.timeout) == (3, 0, None)
    assert submission.slot_kind == "cuda" and submission.umask == 0o077
