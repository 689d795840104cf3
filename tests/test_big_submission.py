"""A big submission is taken in bounded steps (issue 27): while 20,000 runs are taken, the
daemon keeps answering another client; a refused one, or one the daemon stops in the middle of,
leaves nothing queued or stored. (The figures at 150,000 runs: benchmarks/big_submission.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from conftest import Daemon, query
from ini import EXAMPLE

from mosaic_client.connection import Client
from mosaic_client.protocol import ProtocolError

RUNS = 20_000


def _request(root: Path, pipelines: list[list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "db": str(root / "big.db"),
        "config_path": str(root / "big.ini"),
        "process": {
            "lr": 0.01,
            "epochs": 1,
            "data_scheme": ["dataset"],
            "pipeline_scheme": ["mlp"],
            "loss_function": "BCELoss",
            "run_files_path": str(root / "runs"),
            "seed": 7,
        },
        "monitor": {"need_gpu": False, "nb_processus": 4, "multiplicity": 10},
        "pipelines": pipelines,
    }


def _pipelines(n: int) -> list[list[dict[str, Any]]]:
    """n pipelines of the example's classes: n // 10 widths, each repeated 10 times."""
    data = {"type": "dataset", "class": "dataset_OR", "path_to_class": str(EXAMPLE), "key": "or"}
    return [
        [
            dict(data),
            {
                "type": "mlp",
                "class": "mlp_funnel",
                "path_to_class": str(EXAMPLE),
                "length": 2,
                "width": 2 + i // 10,
                "key": "mlp",
            },
        ]
        for i in range(n)
    ]


class Submitter(threading.Thread):
    """Sends one submission and keeps its reply (or refusal)."""

    def __init__(self, socket: str, request: dict[str, Any]) -> None:
        super().__init__()
        self.socket, self.request = socket, request
        self.reply: Any = None
        self.refusal: ProtocolError | None = None

    def run(self) -> None:
        with Client(self.socket, timeout=300) as client:
            try:
                self.reply = client.request("submit", **self.request)
            except ProtocolError as exc:
                self.refusal = exc


def _submit_while_pinging(daemon: Daemon, request: dict[str, Any]) -> tuple[Submitter, int]:
    """The submission's outcome, and how many pings the daemon answered while it was taken."""
    submitter = Submitter(daemon.socket, request)
    answered = 0
    with Client(daemon.socket, timeout=300) as other:
        other.request("ping")
        submitter.start()
        time.sleep(0.2)  # the submission is on its way (20,000 pipelines: a few MB)
        while submitter.is_alive():
            other.request("ping")
            answered += submitter.is_alive()  # answered before the submission's reply
    submitter.join()
    return submitter, answered


def _queued(daemon: Daemon, db: str) -> int:
    studies = daemon.request("status", db=db, limit=0)["studies"]
    return studies[0]["counts"].get("queued", 0) if studies else 0


def test_other_requests_are_answered_while_a_big_submission_is_taken(tmp: Path) -> None:
    # No workers: the runs stay queued. At most 30,000 queued runs per user.
    daemon = Daemon(tmp, "--user-queued", "30000", workers=0).start()
    try:
        request = _request(tmp, _pipelines(RUNS))
        submitter, answered = _submit_while_pinging(daemon, request)
        assert submitter.refusal is None, submitter.refusal
        # The loop went on between the submission's parts (it used to answer nothing until the
        # whole submission was written).
        assert answered >= 5, answered
        ids = submitter.reply["run_ids"]
        assert len(ids) == RUNS and ids == list(range(ids[0], ids[0] + RUNS))
        db = request["db"]
        assert _queued(daemon, db) == RUNS
        # Every run is in the study, in order, with its pipeline's modules and its seed
        # (repetition i of a pipeline: the PROCESS seed + i), whatever part it was written in.
        rows = query(
            db,
            "SELECT m.run_id, m.seed, m.queue_seq, p.param_value FROM run_meta m JOIN params p "
            "ON p.run_id = m.run_id AND p.param_name = 'mlp_funnel_width' ORDER BY m.run_id",
        )
        assert [r[1] for r in rows] == [7 + i % 10 for i in range(RUNS)]
        assert [r[3] for r in rows] == [2 + i // 10 for i in range(RUNS)]
        assert [r[2] for r in rows] == sorted(r[2] for r in rows)
        assert query(db, "SELECT count(*) FROM run_events")[0][0] == RUNS

        # Over the per-user limit: refused, nothing more queued or stored.
        refused, _ = _submit_while_pinging(daemon, _request(tmp, _pipelines(RUNS)))
        assert refused.refusal is not None and "--user-queued" in refused.refusal.message
        assert "Nothing was queued" in refused.refusal.message
        # A bad module in its last pipeline: refused once the checks reach it, after many steps.
        bad = _pipelines(5_000)
        bad[-1][1]["width"] = [3]  # a list: module values must be numbers or strings
        refused, _ = _submit_while_pinging(daemon, _request(tmp, bad))
        assert refused.refusal is not None and "numbers or strings" in refused.refusal.message
        assert _queued(daemon, db) == RUNS
        assert query(db, "SELECT count(*) FROM runs")[0][0] == RUNS
        assert query(db, "SELECT count(*) FROM submissions")[0][0] == 1
    finally:
        daemon.stop()


def test_a_submission_the_daemon_stops_in_the_middle_of_leaves_nothing(tmp: Path) -> None:
    daemon = Daemon(tmp, workers=0).start()
    request = _request(tmp, _pipelines(RUNS))
    submitter = Submitter(daemon.socket, request)
    try:
        submitter.start()
        # Its runs are being written (the study's counts grow as its parts go in, uncommitted).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not 0 < _queued(daemon, request["db"]) < RUNS:
            time.sleep(0.02)
        assert 0 < _queued(daemon, request["db"]) < RUNS
        daemon.request("shutdown")
        submitter.join(60)
    finally:
        daemon.stop()
    assert submitter.refusal is not None and "nothing of this submission was queued" in (
        submitter.refusal.message
    )
    # Its one transaction was rolled back: not one of its rows is in the study.
    assert query(request["db"], "SELECT count(*) FROM runs")[0][0] == 0
    assert query(request["db"], "SELECT count(*) FROM submissions")[0][0] == 0
    assert query(request["db"], "SELECT count(*) FROM params")[0][0] == 0
