"""`mosaic repeat` and `mosaic compare --until-decided` through a real daemon, and the pure parts
of both (the seeds of new repetitions; the loop that decides which groups to repeat and when to
stop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ini
import numpy as np
import pytest
from conftest import EXAMPLE, Daemon, query

from mosaic_client.verdict import comparison, reading, sequential
from mosaicd.scheduling.repetitions import next_seeds, signature

# A family that cannot see its input: the same network as the funnel, fed zeros, so it has the
# same number of parameters (a matched size) and can at best learn the base rate.
BLIND = """
import sys
sys.path.insert(0, {example!r})
import torch
from mlp import mlp_funnel


class mlp_blind(mlp_funnel):
    def forward(self, data, run_info, module_info):
        return self.net(torch.zeros_like(data))
"""


def two_families(root: Path, repetitions: int, seed: int | None = 0, epochs: int = 3) -> Path:
    """OR data; a funnel MLP that learns it and a blind one of the same size."""
    return ini.write(
        root,
        ini.process(root, epochs, lr=0.05, seed=seed),
        ini.monitor(2, repetitions),
        ini.dataset(200, 0.5, 10),
        ini.mlp(1, 3),
        ini.user_class("mlp_blind", "mlp", f"{root}/blind.py", "mlp_{class}", length=1, width=3),
        files={"blind.py": BLIND.format(example=str(EXAMPLE))},
    )


def params_of(db: str, run_id: int) -> dict[str, Any]:
    return dict(query(db, "SELECT param_name, param_value FROM params WHERE run_id=?", run_id))


def snapshot(db: str, run_ids: list[int]) -> list[Any]:
    """Everything stored about these runs."""
    marks = ",".join("?" * len(run_ids))
    return [
        query(db, f"SELECT * FROM {table} WHERE run_id IN ({marks}) ORDER BY 1, 2", *run_ids)
        for table in ("runs", "params", "run_meta", "run_results", "run_epochs", "run_events")
    ]


# -- pure parts -----------------------------------------------------------------------------------


def test_new_seeds_continue_a_numbered_group_and_avoid_a_random_groups_seeds() -> None:
    assert next_seeds([3, 4, 5], numbered=True, add=3) == [6, 7, 8]
    assert next_seeds([0, 2], numbered=True, add=1) == [3]  # after the largest, never reused
    draws = iter([7, 7, 1, 9, 7, 4])
    seeds = next_seeds([1, 9], numbered=False, add=2, draw=lambda: next(draws))
    assert seeds == [7, 4]  # 7 once, 1 and 9 are the group's own
    fresh = next_seeds([5], numbered=False, add=50)
    assert len(set(fresh)) == 50 and 5 not in fresh


def test_a_groups_signature_ignores_only_the_repetitions_params() -> None:
    base = {"lr": 0.1, "mlp_key": "a", "seed": 1, "owner": "x", "owner_uid": 3}
    assert signature(base) == signature({**base, "seed": 2, "owner": "y", "owner_uid": 4})
    assert signature(base) != signature({**base, "mlp_key": "b"})


def sides(n: int, gaps: dict[str, float], rng: np.random.Generator) -> reading.StudyValues:
    """One dataset key, families at one size each, run ids 100 k + i; random seeds (unpaired)."""
    families = {
        fam: {
            10: reading.Side(
                fam, 10, list(rng.normal(gap, 1.0, n)), list(range(100 * k, 100 * k + n))
            )
        }
        for k, (fam, gap) in enumerate(gaps.items())
    }
    for k, by_size in enumerate(families.values()):
        by_size[10].seeds = [1000 * k + i for i in range(n)]
        by_size[10].data_stages = [""] * n
    return reading.StudyValues("test_loss", {"data": families}, {}, {})


def test_next_round_repeats_the_groups_of_undecided_lines_until_decided_or_r() -> None:
    rng = np.random.default_rng(3)
    values = sides(8, {"A": 0.0, "B": 5.0, "C": 0.0}, rng)
    plan = sequential.SequentialPlan(0.05, 20)
    report = plan.look(values, 8, n_resamples=0)
    verdicts = {(ln.a, ln.b): ln.verdict for ln in report.lines}
    assert (
        verdicts[("A", "B")] == comparison.A_BETTER and verdicts[("B", "C")] == comparison.B_BETTER
    )
    assert verdicts[("A", "C")] != comparison.A_BETTER
    step = sequential.until_decided_step(8, 20)
    assert step == 3  # four rounds from 8 to 20
    first = sequential.next_round(report, values, plan, step)
    assert not first.stop and first.target == 11
    # only A and C are still undecided: their groups get 3 runs each, B's none
    assert [(side.family, n) for side, n in first.additions] == [("A", 3), ("C", 3)]
    assert first.requests() == {3: list(range(0, 8)) + list(range(200, 208))}
    # groups are topped up to the next look: one with more runs gets fewer, or none
    values.sides["data"]["C"][10].values += [0.0] * 2
    plan.looked_at = 19
    near = sequential.next_round(report, values, plan, step)
    assert near.target == 20 and near.requests() == {12: list(range(8)), 10: list(range(200, 208))}
    values.sides["data"]["C"][10].values += [0.0] * 20
    assert sequential.next_round(report, values, plan, step).requests() == {12: list(range(8))}
    plan.looked_at = 20
    last = sequential.next_round(report, values, plan, step)
    assert last.stop and "maximum of 20" in last.reason and not last.additions
    decided = sides(8, {"A": 0.0, "B": 5.0}, rng)
    plan = sequential.SequentialPlan(0.05, 20)
    done = sequential.next_round(plan.look(decided, 8, n_resamples=0), decided, plan, step)
    assert done.stop and "every comparison is decided" in done.reason and not done.sides


def test_the_commands_loop_keeps_false_decisions_at_alpha() -> None:
    """The whole --until-decided loop (sequential.until_decided, which the command runs), on
    simulated null studies whose repetitions arrive from a generator instead of the daemon."""
    rng = np.random.default_rng(21)
    sequences, start, r_max, alpha = 500, 4, 16, 0.05
    false = rounds = 0
    for _ in range(sequences):
        pool = {fam: list(rng.normal(0.0, 1.0, r_max)) for fam in ("A", "B")}
        have = {"n": start}

        def values_now(pool: dict[str, list[float]] = pool, have: dict[str, int] = have) -> Any:
            n = have["n"]
            study = sides(n, {"A": 0.0, "B": 0.0}, rng)
            for fam in pool:
                study.sides["data"][fam][10].values = pool[fam][:n]
            return study

        def add(requests: dict[int, list[int]], have: dict[str, int] = have) -> None:
            ((n, run_ids),) = requests.items()  # both groups lack the same number of runs
            assert sorted(run_ids) == list(range(have["n"])) + list(range(100, 100 + have["n"]))
            have["n"] += n

        report, looks = sequential.until_decided(
            sequential.SequentialPlan(alpha, r_max), values_now, add, options={"n_resamples": 0}
        )
        rounds += len(looks)
        false += any(
            line.verdict in (comparison.A_BETTER, comparison.B_BETTER) for line in report.lines
        )
        assert have["n"] == r_max or report.lines[0].verdict != comparison.NO_DIFFERENCE
    rate = false / sequences
    print(f"--until-decided loop under the null: {rate:.3f} false decisions, {rounds} looks")
    assert rate <= alpha + 0.01
    assert rounds > 3 * sequences  # it did look several times


# -- through the daemon -------------------------------------------------------------------------


@pytest.mark.slow
def test_repeat_continues_the_groups_and_compare_sees_the_new_runs(daemon: Daemon) -> None:
    root = daemon.root
    db = str(root / "s.db")
    daemon.cli("run", str(two_families(root, 2, epochs=1)), db, "--follow", check=True)
    before = query(db, "SELECT run_id, seed FROM run_meta ORDER BY run_id")
    assert [s for _, s in before] == [0, 1, 0, 1]
    old = snapshot(db, [1, 2, 3, 4])
    groups = json.loads(daemon.cli("groups", db, "--json", check=True).stdout)
    assert [g["n"] for g in groups] == [2, 2]

    out = daemon.cli("repeat", db, "--add", "3", "-id", "1", check=True).stdout
    assert "queued 3 run(s) in 1 group(s)" in out and "seeds 2-4" in out, out
    daemon.wait_for(db, total=7)
    seeds = dict(query(db, "SELECT run_id, seed FROM run_meta"))
    assert [seeds[r] for r in (5, 6, 7)] == [2, 3, 4]
    template = params_of(db, 1)
    for run_id, seed in ((5, 2), (6, 3), (7, 4)):
        assert params_of(db, run_id) == {**template, "seed": seed}
    assert query(db, "SELECT count(*) FROM runs WHERE status='done'") == [(7,)]
    assert snapshot(db, [1, 2, 3, 4]) == old  # existing runs untouched
    groups = json.loads(daemon.cli("groups", db, "--json", check=True).stdout)
    assert [g["n"] for g in groups] == [5, 2]

    # every group of the study, by a param selection; each continues its own numbering
    out = daemon.cli("repeat", db, "--add", "1", "--param", "loss_function", "BCELoss", check=True)
    assert "in 2 group(s)" in out.stdout
    daemon.wait_for(db, total=9)
    assert query(db, "SELECT seed FROM run_meta WHERE run_id > 7 ORDER BY run_id") == [(5,), (2,)]
    report = json.loads(daemon.cli("compare", db, "--json", check=True).stdout)
    # seeds 0-2 against 0-5: paired over the 3 complete pairs, the 3 others left out and said
    assert [(ln["n_a"], ln["n_b"], ln["paired"]) for ln in report["lines"]] == [(3, 3, True)]
    assert "3 complete pairs" in report["lines"][0]["pairing"]
    assert snapshot(db, [1, 2, 3, 4]) == old

    bad = daemon.cli("repeat", db, "--add", "0", "-id", "1")
    assert bad.returncode == 2 and "--add 0" in bad.stderr
    none = daemon.cli("repeat", db, "--add", "1", "-id", "99")
    assert none.returncode == 2 and "matches no run" in none.stderr
    assert query(db, "SELECT count(*) FROM runs") == [(9,)]

    # without a PROCESS seed: fresh random seeds, none already used in the group
    rdb = str(root / "r.db")
    daemon.cli("run", str(two_families(root, 2, seed=None, epochs=1)), rdb, "--follow", check=True)
    daemon.cli("repeat", rdb, "--add", "2", "-id", "1", check=True)
    daemon.wait_for(rdb, total=6)
    seeds = dict(query(rdb, "SELECT run_id, seed FROM run_meta"))
    assert len({seeds[1], seeds[2], seeds[5], seeds[6]}) == 4
    assert params_of(rdb, 5) == {**params_of(rdb, 1), "seed": seeds[5]}


@pytest.mark.slow
def test_compare_until_decided_stops_by_itself(daemon: Daemon) -> None:
    root = daemon.root
    db = str(root / "u.db")
    daemon.cli("run", str(two_families(root, 3, epochs=5)), db, "--follow", check=True)
    for args, says in (
        (("--until-decided",), "needs --max-repetitions"),
        (("--max-repetitions", "5"), "go with --until-decided"),
        (("--until-decided", "--max-repetitions", "3"), "give a maximum above 3"),
        (("--until-decided", "--max-repetitions", "9", "--step", "0"), "--step 0"),
    ):
        bad = daemon.cli("compare", db, *args)
        assert bad.returncode == 2 and says in bad.stderr, (args, bad.stderr)
    assert query(db, "SELECT count(*) FROM runs") == [(6,)]
    result = daemon.cli(
        "compare", db, "--until-decided", "--max-repetitions", "10", timeout=120, check=True
    )
    out = result.stdout
    print(out)
    assert "round 1:" in out and "look at 3 repetitions" in out, out
    assert "stopped: every comparison is decided" in out, out
    assert "1 A better" in out or "1 B better" in out, out
    n = query(db, "SELECT count(*) FROM runs")[0][0]
    assert 6 < n <= 20 and n % 2 == 0  # repetitions added to both groups, never beyond R
    assert query(db, "SELECT count(*) FROM runs WHERE status != 'done'") == [(0,)]
    # the report is the last look's; a plain compare now sees the same runs
    report = json.loads(daemon.cli("compare", db, "--json", check=True).stdout)
    assert report["lines"][0]["n_a"] == n // 2
