"""Reads filtered by rights everywhere (issue 24, item 5), attacked on a root daemon with only
the unit's capabilities (tests/test_shared_box.py's running_box):

- a selection is a read: `cancel`/`rerun`/`repeat` with `-request` SQL ran as the study's owner
  on a study the caller may not read, and the refusal echoed the first integer the query
  returned (`run 1046777 belongs to an unknown user`): another user's code, byte by byte;
- naming a path the daemon does not serve (`status`, `cancel`, `rekey`, ...) made it open the
  file as its owner, create its -wal/-shm, migrate it and remember it for good ("adoption").
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLE, example_config
from test_shared_box import DENIED, Box, _uid, running_box, settled

from mosaic_client.protocol import ProtocolError

SECRET = "MOSAIC-SECRET-\u0416-5e1d"  # in B's model code; \u0416 is the character attacked
# What the attacking SQL computes from that character: unicode('\u0416') * 1000 + 777.
DERIVED = "1046777"
ATTACK = (
    "SELECT unicode(substr(text, instr(text, 'SECRET-') + 7, 1)) * 1000 + 777 "
    "FROM code_files WHERE instr(text, 'SECRET-') > 0"
)


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with running_box("mosreads-") as made:
        yield made


@pytest.fixture(scope="module")
def private(box: Box) -> tuple[str, str]:
    """B's finished run in a private (0600) study whose code text holds SECRET: (config, db)."""
    directory = box.home("b") / "secret"
    shutil.copytree(EXAMPLE, directory / "classes")
    with open(directory / "classes" / "mlp.py", "a") as fh:
        fh.write(f"\n# {SECRET}\n")
    config = example_config(directory, epochs=1, nb_processus=1, classes=directory / "classes")
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, _uid(box, "b"), -1)
    db = str(directory / "results.db")
    result = box.cli("b", "run", str(config), db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    assert settled(box, db) == {"done": 1}
    assert os.stat(db).st_mode & 0o077 == 0, "the study should be private to B"
    assert SECRET in _read(db, "SELECT group_concat(text) FROM code_files")[0][0]
    return str(config), db


def _read(db: str, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _files(db: str) -> dict[str, bytes | None]:
    """The study's file and its -wal, byte for byte (the -shm changes with every read)."""
    out: dict[str, bytes | None] = {}
    for suffix in ("", "-wal"):
        path = db + suffix
        out[suffix] = Path(path).read_bytes() if os.path.exists(path) else None
    return out


def _clean(text: str) -> None:
    assert SECRET not in text and SECRET.encode("unicode_escape").decode() not in text, text
    assert DERIVED not in text, text


def _attack(db: str, sql: str = ATTACK) -> dict[str, Any]:
    return {"db": db, "selection": {"kind": "request", "sql": sql}}


def test_a_selection_is_a_read_refused_without_the_right_to_read(
    box: Box, private: tuple[str, str]
) -> None:
    config, db = private
    before = _files(db)
    # Through the CLI where it reaches the daemon (rerun reads the study in the client first).
    for args in (
        ("cancel", db, "-request", ATTACK),
        ("repeat", db, "--add", "1", "-request", ATTACK),
        ("show", "1", "--db", db),
        ("show", "1", "--db", db, "--json"),
        ("logs", "1", "--db", db),
        ("rerun", config, db, "-request", ATTACK, "-epochs", "1"),
    ):
        result = box.cli("a", *args)
        assert result.returncode == DENIED, (args, result.stdout, result.stderr)
        _clean(result.stdout + result.stderr)
        assert "may not read" in result.stderr, (args, result.stderr)
    # A hostile client sends the requests itself.
    requests: list[tuple[str, dict[str, Any]]] = [
        ("cancel", _attack(db)),
        ("cancel", {**_attack(db), "selection": {"kind": "ids", "ids": [1]}}),
        ("rerun", {**_attack(db), "epochs": 1}),
        ("repeat", {**_attack(db), "add": 1}),
        ("rekey", {"db": db, "keys": [[1, "mlp_key", "stolen"]]}),
        ("show", {"db": db, "run_id": 1}),
    ]
    for name, fields in requests:
        reply = box.request("a", name, **fields)
        assert reply.get("code") == "permission", (name, reply)
        assert "may not read" in reply["message"], (name, reply)
        _clean(json.dumps(reply, ensure_ascii=False))
    assert _files(db) == before

    # An administrator of the runs may still act on them; what a -request computes is never
    # echoed, to anyone: integers that are not run ids of the study select nothing.
    reply = box.request("adm", "cancel", **_attack(db))
    assert reply["ok"] == {"selected": [], "cancelled": [], "skipped": []}, reply
    broken = "SELECT json_extract('{}', text) FROM code_files"  # the error quotes the text
    reply = box.request("adm", "cancel", **_attack(db, broken))
    assert reply["code"] == "invalid" and "not shown" in reply["message"], reply
    _clean(json.dumps(reply, ensure_ascii=False))
    assert _files(db) == before
    reply = box.request("adm", "rerun", **_attack(db, "SELECT run_id FROM runs"), epochs=1)
    assert reply["ok"]["queued"] == [1], reply
    box.daemon.wait_for(db, timeout=180)
    assert _read(db, "SELECT status, epochs_target FROM runs JOIN run_meta USING (run_id)") == [
        ("done", 2)
    ]


def _state_studies(box: Box) -> list[str]:
    state = os.path.join(box.daemon.state_dir, "daemon.db")
    return [row[0] for row in _read(state, "SELECT path FROM studies")]


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_naming_a_study_the_daemon_does_not_serve_never_adopts_it(
    box: Box, private: tuple[str, str], mode: int
) -> None:
    # C (here B) made a valid study offline, never submitted: a copy of a finished one.
    directory = box.home("b") / f"offline{mode:o}"
    directory.mkdir()
    os.chown(directory, _uid(box, "b"), -1)
    study = str(directory / "made_offline.db")
    result = box.cli("b", "savedb", study, "--db", private[1])
    assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(study)  # a plain rollback-journal file, as a copy sent by mail
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    os.chmod(study, mode)
    before = Path(study).read_bytes()
    served = _state_studies(box)

    for role in ("a", "b"):
        for args in (
            ("status", "--db", study, "--json"),
            ("cancel", study, "-id", "all"),
            ("cancel", study, "-request", "SELECT run_id FROM runs"),
            ("repeat", study, "--add", "1", "-id", "1"),
        ):
            result = box.cli(role, *args)
            _clean(result.stdout + result.stderr)
        for name, fields in (
            ("status", {"db": study, "submission": 1, "limit": 5}),
            ("cancel", {"db": study, "selection": {"kind": "all"}}),
            ("rerun", {"db": study, "selection": {"kind": "ids", "ids": [1]}, "epochs": 1}),
            ("rekey", {"db": study, "keys": [[1, "mlp_key", "x"]]}),
            ("repeat", {"db": study, "selection": {"kind": "all"}, "add": 1}),
            ("show", {"db": study, "run_id": 1}),
        ):
            reply = box.request(role, name, **fields)
            if name == "status" and "ok" in reply:
                # A study A may not read is only filtered out of A's status (as before).
                assert role == "a" and mode == 0o600, reply
                assert "submission_counts" not in reply["ok"], reply
                assert study not in [s["db"] for s in reply["ok"]["studies"]]
                continue
            assert "ok" not in reply, (role, name, reply)
            if role == "b":
                # Its owner is told the daemon does not serve it (others may be refused first
                # for want of the right to read it, or to write it for `repeat`).
                assert reply["code"] == "not_found", (role, name, reply)
                assert "not a study this daemon serves" in reply["message"], reply
            else:
                assert reply["code"] in ("not_found", "permission"), (role, name, reply)
            _clean(json.dumps(reply, ensure_ascii=False))
        for suffix in ("-wal", "-shm", "-journal"):
            assert not os.path.exists(study + suffix), (role, suffix)
        assert Path(study).read_bytes() == before
    # Nor does root's request adopt it: every other check passes for the daemon's own user.
    with pytest.raises(ProtocolError, match="not a study this daemon serves"):
        box.daemon.request("cancel", db=study, selection={"kind": "all"})
    assert Path(study).read_bytes() == before
    assert not os.path.exists(study + "-wal") and not os.path.exists(study + "-shm")
    assert study not in [item["db"] for item in box.daemon.request("studies")]
    assert _state_studies(box) == served and study not in served
    # Its owner reads it without the daemon taking it over: the client reads it themself.
    result = box.cli("b", "show", "1", "--db", study)
    assert result.returncode == 0, result.stderr
    assert "not a study the daemon serves" in result.stderr and "run 1: done" in result.stdout
    assert Path(study).read_bytes() == before
