"""Tuned comparisons (issue 25, docs/tuning.md): search spaces in the config, bad ones refused
with the key named, a search through a real daemon (equal budgets, fresh paired final seeds,
the example's verdict flipping once the learning rate is tuned), and the same search after a
kill -9 of the daemon in its middle."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import REPO, Daemon, query
from hypothesis import given
from hypothesis import strategies as st

from mosaic_client import search
from mosaic_client.config import ConfigError, load_config

EXAMPLE = REPO / "examples" / "tuning"
BAD_INPUT = 2


# -- the search space, pure ---------------------------------------------------------------------


def test_distributions_parse_to_a_canonical_text() -> None:
    assert search.parse("loguniform(1e-4, 1e-1)") == search.Distribution("loguniform", (1e-4, 0.1))
    assert search.parse(" int( 1 , 4 ) ").text == "int(1, 4)"
    assert search.parse("choice(16, 32, relu)").args == (16, 32, "relu")
    assert search.parse(search.parse("uniform(0, 0.5)").text) == search.parse("uniform(0, 0.5)")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("lognormal(1, 2)", "unknown distribution 'lognormal'"),
        ("uniform(2, 1)", "low is greater than high"),
        ("loguniform(0, 1)", "needs bounds above 0"),
        ("loguniform(-1, 1)", "needs bounds above 0"),
        ("int(1.5, 4)", "integer bounds"),
        ("uniform(1)", "two bounds"),
        ("choice(1, 1)", "twice"),
        ("uniform(a, 1)", "not a number"),
    ],
)
def test_bad_distributions_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        search.parse(text)


def test_grid_points_are_the_product_in_a_fixed_order() -> None:
    dims = {"b": search.parse("choice(1, 2)"), "a": search.parse("int(0, 2)")}
    points = search.grid_points(dims)
    assert len(points) == 6 and points[0] == {"a": 0, "b": 1} and points[-1] == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="continuous"):
        search.grid_points({"lr": search.parse("uniform(0, 1)")})


def test_the_best_trial_is_the_lowest_finite_complete_one_ties_to_the_first() -> None:
    history = [
        {"trial": 0, "state": "complete", "value": 0.5},
        {"trial": 1, "state": "pruned", "value": None},
        {"trial": 2, "state": "complete", "value": 0.2},
        {"trial": 3, "state": "complete", "value": 0.2},
        {"trial": 4, "state": "fail", "value": None},
        {"trial": 5, "state": "complete", "value": math.nan},
    ]
    assert search.best(history, "minimize")["trial"] == 2  # type: ignore[index]
    assert search.best(history, "maximize")["trial"] == 0  # type: ignore[index]
    assert search.best(history[4:5], "minimize") is None


@given(st.integers(0, 2**31), st.integers(1, 50), st.integers(1, 20), st.integers(1, 8))
def test_final_seeds_are_shared_and_disjoint_from_every_trial_seed(
    base: int, trials: int, finals: int, round_size: int
) -> None:
    trial_seeds = {search.trial_seed(base, n) for n in range(trials)}
    final_seeds = [search.final_seed(base, trials, i) for i in range(finals)]
    assert not trial_seeds & set(final_seeds) and len(set(final_seeds)) == finals
    # Rounds: a fixed size, never the machine's; every trial in exactly one.
    rounds = [search.round_of(n, round_size) for n in range(trials)]
    assert rounds == sorted(rounds) and rounds[0] == 0


def test_sampler_seeds_depend_on_the_study_seed_group_and_trial_only() -> None:
    seeds = {search.sampler_seed(s, g, t) for s in (0, 1) for g in (0, 1) for t in (0, 1)}
    assert len(seeds) == 8
    assert search.sampler_seed(3, 1, 2) == search.sampler_seed(3, 1, 2)


def test_values_outside_a_space_are_refused() -> None:
    dims = {"lr": search.parse("loguniform(0.001, 1)"), "m_h": search.parse("choice(8, 16)")}
    assert search.values_problem(dims, {"lr": 0.01, "m_h": 8}) is None
    assert "outside" in str(search.values_problem(dims, {"lr": 2.0, "m_h": 8}))
    assert "choices" in str(search.values_problem(dims, {"lr": 0.01, "m_h": 9}))
    assert "searched params" in str(search.values_problem(dims, {"lr": 0.01}))


# -- the config --------------------------------------------------------------------------------


def _config(tmp_path: Path, **edits: str) -> Path:
    """The example's tuned.ini in tmp_path, each `old=new` line edit applied."""
    text = (EXAMPLE / "tuned.ini").read_text()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    for name in ("data.py", "models.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    path = tmp_path / "tuned.ini"
    path.write_text(text)
    return path


def test_the_example_expands_into_one_group_per_family(tmp_path: Path) -> None:
    expanded = load_config(str(_config(tmp_path)), cwd=str(tmp_path))
    assert expanded.search is not None and expanded.search["trials"] == 8
    assert expanded.process["lr"] == "loguniform(0.001, 1.5)"
    assert len(expanded.pipelines) == 2


@pytest.mark.parametrize(
    ("edits", "where", "words"),
    [
        ({"lr = loguniform(0.001, 1.5)": "lr = lognormal(0, 1)"}, "lr", "unknown distribution"),
        ({"lr = loguniform(0.001, 1.5)": "lr = uniform(1, 0.1)"}, "lr", "greater than high"),
        ({"lr = loguniform(0.001, 1.5)": "lr = loguniform(0, 1)"}, "lr", "above 0"),
        ({"epochs = 10": "epochs = int(2, 5)"}, "epochs", "cannot be searched"),
        ({"nb_processus = 2": "nb_processus = choice(1, 2)"}, "nb_processus", "cannot be searched"),
        ({"hidden = 16\nkey = mlp": "hidden = int(8, 4)\nkey = mlp"}, "hidden", "greater than"),
        ({"strategy = tpe": "strategy = grid"}, "lr", "continuous"),
        ({"strategy = tpe": "strategy = bayes"}, "strategy", "unknown search strategy"),
        (
            {"pruning = none": "pruning = median", "metric = val_loss": "metric = overfit"},
            "pruning",
            "per-epoch",
        ),
        (
            {"key = mlp": "key = mlp_{hidden}", "hidden = 16\n": "hidden = choice(8, 16)\n"},
            "key",
            "cannot name the searched",
        ),
    ],
)
def test_bad_search_spaces_are_refused_with_the_key_named(
    tmp_path: Path, edits: dict[str, str], where: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(str(_config(tmp_path, **edits)), cwd=str(tmp_path))
    named = [p for p in caught.value.problems if p.key == where]
    assert named and words in str(named[0]), str(caught.value)


def test_a_distribution_without_search_is_refused(tmp_path: Path) -> None:
    text = (EXAMPLE / "fixed.ini").read_text().replace("lr = 0.01", "lr = uniform(0.01, 0.1)")
    path = _config(tmp_path)
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"lr = 'uniform\(0.01, 0.1\)'.*needs a \[SEARCH\]"):
        load_config(str(path), cwd=str(tmp_path))


def test_mosaic_generate_and_run_refuse_a_bad_space_and_queue_nothing(tmp: Path) -> None:
    path = _config(tmp, **{"lr = loguniform(0.001, 1.5)": "lr = loguniform(-1, 1)"})
    daemon = Daemon(tmp)
    commands = (
        ("generate", str(path), str(tmp / "out.json")),
        ("run", str(path), "x.db", "--no-autostart"),
    )
    for args in commands:
        result = daemon.cli(*args)
        assert result.returncode == BAD_INPUT, result
        assert "[PROCESS] lr" in result.stderr and "above 0" in result.stderr
    assert not (tmp / "x.db").exists()


def test_a_hand_made_search_request_is_checked_by_the_daemon(daemon: Daemon, tmp: Path) -> None:
    expanded = load_config(str(_config(tmp)), cwd=str(tmp))
    args = {
        "db": str(tmp / "hand.db"),
        "config_path": expanded.config_path,
        "process": expanded.process,
        "monitor": expanded.monitor,
        "pipelines": expanded.pipelines,
    }
    for search_values, words in (
        (None, "is a distribution but the submission has no [SEARCH]"),
        ({**expanded.search, "strategy": "grid"}, "continuous"),
        ({**expanded.search, "trials": 0}, "SEARCH trials"),
    ):
        extra = {} if search_values is None else {"search": search_values}
        with pytest.raises(Exception, match=re.escape(words)):
            daemon.request("submit", **args, **extra)
    assert not (tmp / "hand.db").exists() or not query(tmp / "hand.db", "SELECT * FROM runs")


# -- through the daemon ------------------------------------------------------------------------


def _compare(daemon: Daemon, db: Path) -> dict:
    result = daemon.cli("compare", str(db), "--json", check=True)
    return json.loads(result.stdout)


def _search_rows(db: Path) -> list[tuple]:
    """(run_id, group, stage, trial, seed, status, lr) of every search run."""
    rows = query(
        db,
        "SELECT m.run_id, m.search, m.seed, r.status, p.param_value FROM run_meta m "
        "JOIN runs r USING (run_id) JOIN params p ON p.run_id = m.run_id AND "
        "p.param_name = 'lr' ORDER BY m.run_id",
    )
    out = []
    for run_id, record, seed, status, lr in rows:
        info = json.loads(record)
        out.append((run_id, info["group"], info["stage"], info["trial"], seed, status, lr))
    return out


def test_the_example_a_wins_at_a_fixed_lr_b_once_tuned(tmp: Path) -> None:
    for name in ("fixed.ini", "tuned.ini", "data.py", "models.py"):
        shutil.copy(EXAMPLE / name, tmp / name)
    daemon = Daemon(tmp).start()
    try:
        daemon.cli("run", str(tmp / "fixed.ini"), str(tmp / "fixed.db"), check=True)
        daemon.cli("run", str(tmp / "tuned.ini"), str(tmp / "tuned.db"), check=True)
        daemon.wait_for(str(tmp / "fixed.db"))
        daemon.wait_for(str(tmp / "tuned.db"), total=26)
        fixed = _compare(daemon, tmp / "fixed.db")
        tuned = _compare(daemon, tmp / "tuned.db")
        text = daemon.cli("compare", str(tmp / "tuned.db"), check=True).stdout
        status = json.loads(daemon.cli("status", "--db", str(tmp / "tuned.db"), "--json").stdout)
        shown = daemon.cli("status", "--db", str(tmp / "tuned.db"), check=True).stdout
    finally:
        daemon.stop()
    assert [line["verdict"] for line in fixed["lines"]] == ["A better"]
    assert (fixed["lines"][0]["a"], fixed["lines"][0]["b"]) == ("features", "mlp")
    assert not fixed["tuned"]
    # Tuned: the same families, B better; the trials are left out, the final runs are paired.
    [line] = tuned["lines"]
    assert line["verdict"] == "B better" and line["paired"]
    assert line["n_a"] == line["n_b"] == 5
    assert tuned["tuned"] and {g["family"] for g in tuned["tuning"]} == {"features", "mlp"}
    assert "tuned with equal budgets: 8 tpe trial(s)" in text
    assert "slot-hours" in text
    # status: each search's progress (trials done, best so far), in text and in --json.
    [study] = status["studies"]
    assert [(g["family"], g["finished"], g["trials"]) for g in study["searches"]] == [
        ("features", 8, 8),
        ("mlp", 8, 8),
    ]
    assert "search sine mlp: 8/8 trials, best val_loss" in shown
    # The web view's study summary carries the same lines (the study page lists them).
    from mosaic_client.web import studies

    conn = sqlite3.connect(f"file:{tmp / 'tuned.db'}?mode=ro", uri=True)
    try:
        summary = studies.study_summary(conn)
    finally:
        conn.close()
    assert [line.split(":")[0] for line in summary["search_lines"]] == [
        "search sine features",
        "search sine mlp",
    ]
    rows = _search_rows(tmp / "tuned.db")
    trials = [r for r in rows if r[2] == "trial"]
    finals = [r for r in rows if r[2] == "final"]
    # Equal budgets: 8 trials per group, numbered 0..7; failures counted, not replaced.
    for group in (0, 1):
        assert sorted(r[3] for r in trials if r[1] == group) == list(range(8))
    assert {g["trials"] for g in tuned["tuning"]} == {8}
    assert sum(g["failed"] for g in tuned["tuning"]) == sum(r[5] == "failed" for r in trials)
    # Fresh seeds: no final run uses a trial's seed; the same seeds in both groups (paired).
    assert not {r[4] for r in finals} & {r[4] for r in trials}
    assert sorted(r[4] for r in finals if r[1] == 0) == sorted(r[4] for r in finals if r[1] == 1)
    # A validation loader: every run and every epoch has its validation loss.
    assert query(tmp / "tuned.db", "SELECT count(*) FROM run_results WHERE val_loss IS NULL") == [
        (0,)
    ]
    assert query(tmp / "tuned.db", "SELECT count(*) FROM run_epochs WHERE val_loss IS NULL") == [
        (0,)
    ]
    # Each final run trained its group's best trial's lr, recorded in its params.
    for g in tuned["tuning"]:
        lrs = {r[6] for r in finals if r[1] == g["group"]}
        assert lrs == {g["best_values"]["lr"]}


SMALL = {
    "trials = 8": "trials = 4",
    "round_size = 4": "round_size = 2",
    "final_repetitions = 5": "final_repetitions = 3",
    "epochs = 10": "epochs = 4",
    "pruning = none": "pruning = median",
}


def _outcome(daemon: Daemon, db: Path) -> tuple:
    pruned = dict(
        query(
            db, "SELECT run_id, param_value FROM params WHERE param_name = ?", search.PRUNED_PARAM
        )
    )
    rows = [(*row, pruned.get(row[0])) for row in _search_rows(db)]
    report = _compare(daemon, db)
    sequence = [(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]
    chosen = sorted(
        (g["group"], g["best_trial"], json.dumps(g["best_values"])) for g in report["tuning"]
    )
    verdicts = [
        (line["verdict"], round(line["mean_a"], 9), round(line["mean_b"], 9))
        for line in report["lines"]
    ]
    return sequence, chosen, verdicts


def test_a_kill_9_mid_search_gives_the_same_search(tmp: Path) -> None:
    path = _config(tmp, **SMALL)
    plain = Daemon(tmp / "a", workers=2)
    (tmp / "a").mkdir()
    plain.start()
    try:
        plain.cli("run", str(path), str(tmp / "a" / "s.db"), check=True)
        plain.wait_for(str(tmp / "a" / "s.db"), total=14)
        expected = _outcome(plain, tmp / "a" / "s.db")
    finally:
        plain.stop()
    # Pruned trials (median, against the finished trials of earlier rounds) are part of it.
    assert any(step[-1] is not None for step in expected[0]), expected[0]

    (tmp / "b").mkdir()
    db = tmp / "b" / "s.db"
    killed = Daemon(tmp / "b", workers=2).start()
    killed.cli("run", str(path), str(db), check=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # some trials done, some still to come
        done = query(db, "SELECT count(*) FROM runs WHERE status IN ('done', 'failed')")[0][0]
        running = query(db, "SELECT count(*) FROM runs WHERE status = 'running'")[0][0]
        if done >= 3 and running:
            break
        time.sleep(0.05)
    killed.kill9()
    assert query(db, "SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")[0][0]
    again = Daemon(tmp / "b", workers=1).start()  # another slot count: the same search
    try:
        again.wait_for(str(db), total=14)
        got = _outcome(again, db)
    finally:
        again.stop()
    assert got[0] == expected[0]  # the trial sequence: values, seeds, states
    assert got[1] == expected[1]  # the selected configurations
    assert got[2] == expected[2]  # the final verdict


# -- the worker's side: sampling and pruning (mosaicd.training.tuning, Optuna in-process) --------


def _part(trial: int, history: list[dict], **settings: object) -> dict:
    base = {
        "strategy": "tpe",
        "trials": 8,
        "metric": "val_loss",
        "direction": "minimize",
        "pruning": "none",
        "final_repetitions": 2,
        "round_size": 2,
    }
    return {
        "settings": {**base, **settings},
        "group": 1,
        "stage": "trial",
        "trial": trial,
        "study_seed": 7,
        "history": history,
    }


def _finished(trial: int, lr: float, value: float, epochs: int = 3) -> dict:
    return {
        "trial": trial,
        "run_id": trial + 1,
        "state": "complete",
        "value": value,
        "values": {"lr": lr},
        "intermediate": [[e, value + 0.1 * (epochs - e)] for e in range(1, epochs + 1)],
    }


def test_a_trial_samples_the_same_values_from_the_same_finished_trials() -> None:
    from mosaicd.training import tuning

    dims = {"lr": search.parse("loguniform(0.001, 1)")}
    history = [_finished(0, 0.01, 0.5), _finished(1, 0.3, 0.1)]
    first, _ = tuning.resolve(_part(2, history), dims, 3)
    again, _ = tuning.resolve(_part(2, list(history)), dims, 3)
    other, _ = tuning.resolve(_part(3, history), dims, 3)
    assert first == again and first != other
    assert 0.001 <= first["lr"] <= 1
    grid, _ = tuning.resolve(_part(1, [], strategy="grid"), {"h": search.parse("int(2, 4)")}, 3)
    assert grid == {"h": 3}


def test_a_final_run_takes_its_groups_best_trial() -> None:
    from mosaicd.training import tuning

    dims = {"lr": search.parse("loguniform(0.001, 1)")}
    part = _part(0, [_finished(0, 0.01, 0.5), _finished(1, 0.3, 0.1)]) | {"stage": "final"}
    assert tuning.resolve(part, dims, 3)[0] == {"lr": 0.3}
    with pytest.raises(tuning.SearchError, match="no trial of this group finished"):
        tuning.resolve(part | {"history": []}, dims, 3)


def test_the_median_pruner_stops_a_trial_worse_than_the_finished_ones() -> None:
    from mosaicd.training import tuning
    from mosaicd.training.history import History

    history = [_finished(n, 0.01 * (n + 1), 0.1) for n in range(4)]
    sent: list[tuple[dict, int | None]] = []
    spec = {
        "process": {"lr": "loguniform(0.001, 1)"},
        "modules": [],
        "epochs_target": 3,
        "search": _part(4, history, pruning="median"),
    }
    resolved, tuner = tuning.start(spec, lambda values, pruned: sent.append((values, pruned)))
    assert isinstance(resolved["process"]["lr"], float) and sent == [(tuner.values, None)]
    run = History()
    run.append(2.0, 2.0, None, None, 0.1, 5.0, None)  # far worse than every finished trial
    assert tuner.prune(run, 1)
    assert sent[-1] == (tuner.values, 1)
    good = tuning.start(spec, None)[1]
    fine = History()
    fine.append(0.1, 0.1, None, None, 0.1, 0.05, None)
    assert not good.prune(fine, 1)


def test_selecting_on_a_validation_figure_needs_a_validation_loader() -> None:
    from mosaicd.training import tuning

    tuner = tuning.Tuner(_part(0, []), {"lr": 0.1}, None, None)
    tuner.check(True)
    with pytest.raises(tuning.SearchError, match="needs a validation loader"):
        tuner.check(False)
    tuning.Tuner(_part(0, [], metric="test_loss"), {"lr": 0.1}, None, None).check(False)


def test_the_gate_holds_a_round_until_the_earlier_rounds_finish() -> None:
    from mosaicd.scheduling.search_gate import SearchGate
    from mosaicd.scheduling.submissions import Submission
    from mosaicd.storage.store import RunRecord

    class Study:
        open_rounds: list[list[int]] = [[0, 0], [1, 1]]  # group 0: round 0 open; group 1: 1

        def call(self, op: str, **args: object) -> list[list[int]]:
            assert op == "search_open_rounds"
            return self.open_rounds

    process = {"lr": "loguniform(0.001, 1)", "epochs": 1, "data_scheme": ["d"]}
    process |= {"pipeline_scheme": ["m"]}
    submission = Submission("/s.db", 1, None, None, process, {}, search={"trials": 8})

    def record(group: int, stage: str, trial: int | None, round_: int) -> RunRecord:
        info = {"group": group, "stage": stage, "trial": trial, "round": round_}
        return RunRecord(1, 1, [], 0, 1, 0, 0, 1, search=info)

    gate, study = SearchGate(), Study()
    assert gate.ready(study, submission, record(0, "trial", 1, 0))  # type: ignore[arg-type]
    words = gate.wait(study, submission, record(0, "trial", 5, 1))  # type: ignore[arg-type]
    assert words is not None and "waits for round 0" in words
    assert gate.ready(study, submission, record(1, "trial", 5, 1))  # type: ignore[arg-type]
    final = gate.wait(study, submission, record(1, "final", None, -1))  # type: ignore[arg-type]
    assert final is not None and "every trial" in final
    Study.open_rounds = [[0, 0]]
    gate.reset()
    assert gate.ready(study, submission, record(1, "final", None, -1))  # type: ignore[arg-type]


def test_neither_the_client_nor_the_daemons_loop_imports_optuna() -> None:
    """Samplers stay in the workers: the client (every command's module loaded by the parser)
    and the daemon's main process never import optuna."""
    import subprocess
    import sys

    code = (
        "import mosaic_client.cli, mosaic_client.commands.tuning, mosaic_client.search_report, "
        "mosaicd.main, mosaicd.service.server, mosaicd.scheduling.scheduler, sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'torch')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
