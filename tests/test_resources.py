"""What each run costs (issue 26, docs/resources.md): FLOPs equal the hand count, peak memory
agrees with an independent measurement, the figures reach the study through a real daemon
(show, export, the run_groups view), an ensemble's members get their own figures, and a study
of the schema before is migrated with its results kept."""

from __future__ import annotations

import csv
import importlib.util
import io
import sqlite3
from pathlib import Path

import ini
import pytest
import torch
from conftest import EXAMPLE, Daemon, example_config, query
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mosaic_client import contract
from mosaicd.storage.store import MIGRATIONS, SCHEMA_VERSION, Store
from mosaicd.training import resources

MIB = 2**20


def test_flops_of_an_mlp_equal_the_hand_count() -> None:
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4), nn.Sigmoid())
    # Per sample, a Linear(i, o) does i*o multiply-adds (2 FLOPs each); bias, ReLU and sigmoid
    # are not counted (PyTorch's convention).
    assert resources.count_flops(model, torch.randn(8, 10)) == 2 * (10 * 32 + 32 * 4)


def test_flops_of_a_small_cnn_equal_the_hand_count() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 out: 8 channels x 64 positions x 3*9 MACs
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8 x 4x4
        nn.Conv2d(8, 16, 3),  # 16 x 2x2 out: 16 x 4 positions x 8*9 MACs
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10),  # 64*10 MACs
    )
    expected = 2 * (8 * 64 * 27 + 16 * 4 * 72 + 64 * 10)
    assert resources.count_flops(model, torch.randn(5, 3, 8, 8)) == expected
    # The same as PyTorch's FlopCounterMode, whose formulas the worker's counter uses.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(5, 3, 8, 8))
    assert counter.get_total_flops() == 5 * expected
    # Per sample: the batch size does not change it.
    assert resources.count_flops(model, torch.randn(1, 3, 8, 8)) == expected


def test_a_pass_meter_sees_an_allocation_of_known_size() -> None:
    size = 192 * MIB
    with resources.PassMeter(torch.device("cpu")) as meter:
        hog = torch.ones(size // 4)  # float32: touches every page
        # The independent measurement: the tensor's own size, in bytes.
        independent = hog.numel() * hog.element_size()
        del hog
    figures = meter.figures()
    assert figures["memory_method"] == "resident_hwm"
    assert figures["peak_memory_mb"] == pytest.approx(independent / MIB, rel=0.1)
    assert figures["gpu_seconds"] is None and figures["energy_j"] is None  # GPU only
    assert figures["train_seconds"] > 0 and figures["cpu_seconds"] >= 0
    with resources.PassMeter(torch.device("cpu"), share=4) as shared:
        hog = torch.ones(size // 4)
        del hog
    # An ensemble's pass: each of 4 members is charged a quarter.
    assert shared.figures()["peak_memory_mb"] == pytest.approx(size / MIB / 4, rel=0.1)
    assert shared.figures()["shared"] == 4


def test_summary_means_times_and_keeps_the_highest_peak() -> None:
    usage = [
        {"train_seconds": 1.0, "cpu_seconds": 2.0, "peak_memory_mb": 5.0, "shared": 1},
        {"train_seconds": 3.0, "cpu_seconds": 4.0, "peak_memory_mb": 9.0, "shared": 2},
    ]
    found = resources.summary(usage)
    assert found["train_seconds"] == 2.0 and found["cpu_seconds"] == 3.0
    assert found["peak_memory_mb"] == 9.0 and found["members"] == 2
    assert found["energy_j"] is None and found["gpu_seconds"] is None
    assert resources.summary([])["train_seconds"] is None


def test_latency_is_a_median_of_timed_calls_and_leaves_no_gradient() -> None:
    model = nn.Linear(4, 2)
    found = resources.inference_figures(model, torch.randn(16, 4), torch.device("cpu"), 0.01)
    assert found["flops_per_sample"] == 2 * 4 * 2
    assert found["latency_ms"] > 0 and found["throughput_per_s"] > 0
    assert found["latency_spread"] >= 0
    assert model.weight.grad is None
    # Inputs that cannot be cut into samples give no figure rather than an error.
    assert resources.inference_figures(model, "text", torch.device("cpu"), 0.01) == {
        "flops_per_sample": None,
        "latency_ms": None,
        "throughput_per_s": None,
        "latency_spread": None,
    }


def _linear_flops(width: int, length: int) -> int:
    """The hand count of the example's mlp_funnel (2 inputs, 1 output): 2 x in x out of each
    Linear layer of the model the class builds."""
    spec = importlib.util.spec_from_file_location("example_mlp", EXAMPLE / "mlp.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.mlp_funnel(input_size=2, output_size=1, length=length, width=width)
    return sum(
        2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    )


HOG = """
import torch
from torch import nn


class hog(nn.Module):
    # A one-layer model whose training forward allocates `hog_mb` MiB and frees them.
    def __init__(self, input_size, output_size, hog_mb):
        super().__init__()
        self.net = nn.Linear(input_size, output_size)
        self.hog_mb = hog_mb

    def forward(self, x, run_info, module_info):
        if self.training and self.hog_mb:
            big = torch.ones(self.hog_mb * 2**20 // 4)
            x = x + big[:1] * 0
        return torch.sigmoid(self.net(x))

    def info(self):
        return {}
"""


def test_a_study_records_every_figure_with_its_context(daemon: Daemon, tmp: Path) -> None:
    cfg = example_config(tmp, epochs=2, mlp_width="3, 4")
    db = str(tmp / "study.db")
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    rows = query(
        db,
        "SELECT p.param_value, r.* FROM run_results r JOIN params p ON p.run_id = r.run_id "
        "AND p.param_name = 'mlp_funnel_width' ORDER BY r.run_id",
    )
    names = [c[1] for c in query(db, "PRAGMA table_info(run_results)")]
    # The fixed interface: these names, in this order (the validation loader's follow them).
    first = names.index(contract.RESOURCE_COLUMNS[0])
    assert names[first : first + len(contract.RESOURCE_COLUMNS)] == list(contract.RESOURCE_COLUMNS)
    for width, *row in rows:
        got = dict(zip(names, row))
        assert got["flops_per_sample"] == _linear_flops(width, 2)
        for column in ("train_seconds", "cpu_seconds", "latency_ms"):
            assert 0 < got[column] < 60, column
        assert got["throughput_per_s"] > 0
        assert got["peak_memory_mb"] is not None and got["peak_memory_mb"] >= 0
        assert got["energy_j"] is None  # on a CPU: NULL, not 0
    context = query(
        db, "SELECT device, memory_method, cpus, gpu_seconds, members FROM run_measurements"
    )
    assert context == [("cpu", "resident_hwm", context[0][2], None, 1.0)] * 2
    assert context[0][2] >= 1
    groups = query(db, "SELECT nb_params, mean_flops_per_sample FROM run_groups ORDER BY 1")
    assert [g[1] for g in groups] == sorted(_linear_flops(w, 2) for w in (3, 4))
    shown = daemon.cli("show", "1", "--db", db, check=True).stdout
    assert "FLOP/sample" in shown and "ms (batch of 1)" in shown
    assert "measured on cpu (load " in shown
    exported = list(csv.DictReader(io.StringIO(daemon.cli("export", db, check=True).stdout)))
    assert float(exported[0]["flops_per_sample"]) == rows[0][names.index("flops_per_sample") + 1]
    assert exported[0]["measured_device"] == "cpu" and exported[0]["energy_j"] == ""


def test_peak_memory_agrees_with_the_size_of_what_the_model_allocates(
    daemon: Daemon, tmp: Path
) -> None:
    cfg = ini.write(
        tmp,
        ini.process(tmp, 2),
        ini.monitor(1),
        ini.dataset(200, classes=EXAMPLE),
        ini.user_class("hog", "mlp", str(tmp / "hog.py"), "hog", hog_mb="0, 160"),
        files={"hog.py": HOG},
    )
    db = str(tmp / "study.db")
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    (small, base), (big, peak) = query(
        db,
        "SELECT p.param_value, r.peak_memory_mb FROM run_results r JOIN params p "
        "ON p.run_id = r.run_id AND p.param_name = 'hog_hog_mb' ORDER BY 1",
    )
    assert (small, big) == (0, 160)
    # The independent measurement: the run without the allocation, plus the tensor's size.
    assert peak == pytest.approx(base + 160, rel=0.1)
    assert peak - base == pytest.approx(160, rel=0.1)


def test_ensemble_members_get_their_own_share(daemon: Daemon, tmp: Path) -> None:
    cfg = example_config(
        tmp, epochs=2, multiplicity=3, nb_processus=1, extra_monitor="ensemble = auto"
    )
    db = str(tmp / "study.db")
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    assert query(db, "SELECT count(*) FROM run_ensembles WHERE fallback IS NULL") == [(3,)]
    assert query(db, "SELECT DISTINCT members FROM run_measurements") == [(3.0,)]
    flops = {f for (f,) in query(db, "SELECT flops_per_sample FROM run_results")}
    assert flops == {_linear_flops(3, 2)}  # each member measured on its own modules
    for latency, seconds in query(db, "SELECT latency_ms, train_seconds FROM run_results"):
        assert latency > 0 and seconds > 0


def test_a_version_8_study_gains_the_resource_columns_and_keeps_its_results(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v8.db"
    conn = sqlite3.connect(path)
    for version in range(1, 9):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO system VALUES ('schema_version', 8), ('next_run_id', 2)")
    conn.execute("INSERT INTO runs VALUES (1, 'done', 'p', 'done')")
    conn.execute("INSERT INTO params VALUES (1, 'seed', 0), (1, 'lr', 0.1)")
    conn.execute(
        "INSERT INTO run_results (run_id, test_loss, nb_params, epochs) VALUES (1, 0.25, 9, 3)"
    )
    conn.commit()
    conn.close()
    store = Store(str(path))
    assert store._version() == SCHEMA_VERSION == 10
    row = store.conn.execute(
        f"SELECT test_loss, nb_params, {', '.join(contract.RESOURCE_COLUMNS)} FROM run_results"
    ).fetchone()
    assert row[:2] == (0.25, 9) and set(row[2:]) == {None}
    group = store.conn.execute("SELECT mean_test_loss, mean_latency_ms FROM run_groups").fetchone()
    assert group == (0.25, None)
    store.close()


def test_size_columns_and_their_short_names() -> None:
    assert contract.size_column("flops") == "flops_per_sample"
    assert contract.size_column("latency_ms") == "latency_ms"
    assert all(contract.size_column(c) == c for c in contract.SIZE_COLUMNS)
    for bad in ("test_loss", "epochs", "FLOPS", ""):
        with pytest.raises(ValueError, match="is not a size or cost column"):
            contract.size_column(bad)
    # Every resource column has a unit and a bound, and is a result column.
    assert set(contract.RESOURCE_UNITS) == set(contract.RESOURCE_BOUNDS)
    assert set(contract.RESOURCE_COLUMNS) <= set(contract.RESULT_COLUMNS)


def test_the_cost_ranges_follow_the_best_affordable_point() -> None:
    from mosaic_client.verdict.pareto import Point, cost_ranges

    def point(family: str, cost: float, mean: float, on_front: bool = True) -> Point:
        return Point("d", family, cost, 3, 0, mean, [mean, mean], [], on_front)

    points = [
        point("mlp", 1, 0.3),
        point("mlp", 2, 0.5),
        point("cnn", 3, 0.45),  # on the front (undecided) but worse than a cheaper one
        point("cnn", 4, 0.8),
        point("mlp", 5, 0.9, on_front=False),  # dominated: never a range of its own
    ]
    ranges = cost_ranges(points, "higher", "lower")
    assert [(r["from"], r["to"], r["family"]) for r in ranges] == [
        (1, 2, "mlp"),
        (2, 4, "mlp"),
        (4, None, "cnn"),
    ]
    # Lower is better (a loss): the best affordable is the lowest mean.
    lower = cost_ranges(points[:4], "lower", "lower")
    assert [(r["from"], r["family"]) for r in lower] == [(1, "mlp")]
