"""Any resource as the size axis, and the Pareto front (issue 26, docs/resources.md): on a small
study of the resources example (an MLP and a CNN family), `compare --size-by flops` and
`--size-by nb_params` match different sizes (hand-computed FLOPs and parameter counts), and
`mosaic pareto` calls a point dominated exactly when an independent paired t test with Holm's
correction (scipy, by hand) says a point costing no more is better."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Daemon, query
from scipy import stats

EXAMPLE = REPO / "examples" / "resources"
ALPHA = 0.05


def mlp_size(hidden: int) -> tuple[int, int]:
    """(parameters, FLOPs per sample) of models.mlp on 8x8 images, counted by hand."""
    return 64 * hidden + hidden + hidden * 4 + 4, 2 * (64 * hidden + hidden * 4)


def cnn_size(c: int) -> tuple[int, int]:
    """(parameters, FLOPs per sample) of models.cnn: conv 1->c and c->c (3x3), linear 4c->4."""
    params = (9 * c + c) + (9 * c * c + c) + (4 * c * 4 + 4)
    flops = 2 * (64 * c * 9 + 16 * c * c * 9 + 4 * c * 4)
    return params, flops


@pytest.fixture(scope="module")
def study() -> Iterator[tuple[Daemon, str]]:
    root = Path(tempfile.mkdtemp(prefix="mos-"))
    for name in ("data.py", "models.py", "config.ini"):
        shutil.copy(EXAMPLE / name, root / name)
    cfg = root / "config.ini"
    # Shorter than the example, same shape: 8 pipelines x 6 repetitions.
    cfg.write_text(
        cfg.read_text()
        .replace("epochs = 15", "epochs = 10")
        .replace("multiplicity = 5", "multiplicity = 6")
        .replace("data_size = 600", "data_size = 400")
    )
    daemon = Daemon(root).start()
    db = str(root / "study.db")
    daemon.cli("run", str(cfg), db, "--follow", check=True, timeout=600)
    yield daemon, db
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_the_example_counts_equal_the_hand_counts(study: tuple[Daemon, str]) -> None:
    _, db = study
    rows = query(
        db,
        "SELECT p.param_name, p.param_value, r.nb_params, r.flops_per_sample FROM run_results r "
        "JOIN params p ON p.run_id = r.run_id AND p.param_name IN ('mlp_hidden', 'cnn_channels')",
    )
    assert len(rows) == 48
    for name, width, params, flops in rows:
        assert (params, flops) == (mlp_size if name == "mlp_hidden" else cnn_size)(width)


def _matches(daemon: Daemon, db: str, size_by: str) -> tuple[dict, set]:
    out = daemon.cli("compare", db, "--metric", "test_acc", "--size-by", size_by, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    pairs = {
        (line["a_nb_params"], line["b_nb_params"])
        for line in report["lines"]
        if line["kind"] == "size"
    }
    return report, pairs


def test_compare_matches_on_params_or_on_flops(study: tuple[Daemon, str]) -> None:
    daemon, db = study
    by_params, params_pairs = _matches(daemon, db, "nb_params")
    by_flops, flops_pairs = _matches(daemon, db, "flops")
    assert by_params["size_by"] == "nb_params" and by_flops["size_by"] == "flops_per_sample"
    # A = cnn, B = mlp. Within 1.5x, closest first: the CNN of 6 channels meets the MLP of 8
    # hidden units by parameters but the MLP of 128 by FLOPs.
    assert params_pairs == {
        (cnn_size(6)[0], mlp_size(8)[0]),
        (cnn_size(16)[0], mlp_size(32)[0]),
    }
    flops = {
        (float(f"{cnn_size(c)[1]:.4g}"), float(f"{mlp_size(h)[1]:.4g}"))
        for c, h in ((6, 128), (16, 512))
    }
    assert flops_pairs == flops
    # The JSON keeps its keys whatever the size axis.
    assert set(by_params["lines"][0]) == set(by_flops["lines"][0])
    text = daemon.cli("compare", db, "--metric", "test_acc", "--size-by", "flops").stdout
    assert "sizes are flops_per_sample" in text and "17470" in text


def test_size_and_cost_columns_are_checked(study: tuple[Daemon, str]) -> None:
    daemon, db = study
    for command in (
        ("compare", db, "--size-by", "weight"),
        ("pareto", db, "--cost", "weight"),
        ("metaplot", db, str(Path(db).parent / "m.png"), "bars", "test_acc", "--x", "weight"),
    ):
        result = daemon.cli(*command)
        assert result.returncode == 2, result
        assert "'weight' is not a size or cost column of run_results" in result.stderr
        assert "flops_per_sample" in result.stderr and "latency=latency_ms" in result.stderr
    same = daemon.cli("compare", db, "--metric", "latency_ms", "--size-by", "latency")
    assert same.returncode == 2 and "matched on the figure compared" in same.stderr
    energy = daemon.cli("pareto", db, "--cost", "energy", "--metric", "test_acc")
    assert energy.returncode == 2 and "positive energy_j" in energy.stderr  # NULL on a CPU


def _holm(p: list[float]) -> list[float]:
    order = np.argsort(p)
    adjusted = np.empty(len(p))
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return list(adjusted)


def test_pareto_dominates_by_an_independent_paired_test(study: tuple[Daemon, str]) -> None:
    daemon, db = study
    out = Path(db).parent / "front.png"
    # By parameters: the small CNNs cost fewer than the MLPs they beat.
    result = daemon.cli(
        "pareto", db, str(out), "--metric", "test_acc", "--cost", "params", "--json"
    )
    assert result.returncode == 0, result.stderr
    front = json.loads(result.stdout)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert front["cost"] == "nb_params" and front["cost_better"] == "lower"
    points = front["points"]
    assert len(points) == 8 and all(p["n"] == 6 for p in points)
    # The independent computation: each run's accuracy by seed, a paired t test of each pair of
    # points (q costing no more than p), Holm over all of them.
    acc = {
        run_id: (seed, value)
        for run_id, seed, value in query(
            db,
            "SELECT r.run_id, p.param_value, r.test_acc FROM run_results r JOIN params p "
            "ON p.run_id = r.run_id AND p.param_name = 'seed'",
        )
    }

    def by_seed(point: dict) -> list[float]:
        return [v for _, v in sorted(acc[r] for r in point["run_ids"])]

    tests = []
    for i, q in enumerate(points):
        for j, p in enumerate(points):
            if i != j and (q["cost"] < p["cost"] or (q["cost"] == p["cost"] and i < j)):
                diff = np.array(by_seed(q)) - np.array(by_seed(p))
                pv = stats.ttest_rel(by_seed(q), by_seed(p)).pvalue if diff.std() > 0 else 1.0
                tests.append((i, j, pv, diff.mean()))
    assert front["comparisons"] == len(tests) == 28
    adjusted = _holm([t[2] for t in tests])
    dominated = {j for (i, j, _, d), adj in zip(tests, adjusted) if adj <= ALPHA and d > 0}
    assert {k for k, p in enumerate(points) if not p["on_front"]} == dominated
    assert dominated and len(dominated) < len(points)  # the study has both kinds
    for point in points:
        assert point["ci"][0] <= point["mean"] <= point["ci"][1]
        if point["on_front"]:
            assert point["dominated_by"] == []
    # The best affordable point per budget range is on the front and improves with the budget.
    ranges = front["ranges"]
    assert ranges and all(r["family"] in ("mlp", "cnn") for r in ranges)
    assert [r["mean"] for r in ranges] == sorted(r["mean"] for r in ranges)
    text = daemon.cli("pareto", db, "--metric", "test_acc", "--cost", "flops").stdout
    assert "best affordable on the front, by flops_per_sample budget" in text


def test_metaplot_puts_any_column_on_x(study: tuple[Daemon, str]) -> None:
    daemon, db = study
    root = Path(db).parent
    result = daemon.cli(
        "metaplot", db, str(root / "m.png"), "bars", "test_acc", "--x", "flops", "--data",
        str(root / "m.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((root / "m.json").read_text())
    assert data["x"] == "flops_per_sample"
    xs = {p["nb_params"] for series in data["series"].values() for p in series}
    assert xs == {float(f"{f:.4g}") for f in [mlp_size(h)[1] for h in (8, 32, 128, 512)]} | {
        float(f"{f:.4g}") for f in [cnn_size(c)[1] for c in (4, 6, 8, 16)]
    }
