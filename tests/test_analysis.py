"""plotloss, metaplot, rekey and export against a small study trained by a real mosaicd.

The study is built once per module: 2 epochs, multiplicity 2, three funnel widths and two brick
widths on dataset_OR (10 runs), plus one submission whose model cannot be built (width 0), so
one OR run and one AND run fail and show up as skipped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ini
import pytest
from conftest import REPO, Daemon, query
from conftest import RESULT_CRITERIA as CRITERIA
from scipy import stats

from mosaic_client import analysis, study_reading


def _config(
    root: Path,
    name: str,
    datasets: tuple[str, ...],
    funnel_width: str,
    brick_width: str | None,
    multiplicity: int,
) -> Path:
    project = root / name
    project.mkdir()
    brick = [ini.mlp(1, brick_width, name="mlp_brick")] if brick_width else []
    return ini.write(
        project,
        ini.process(root, 2),
        ini.monitor(2, multiplicity),
        *(ini.dataset(60, batch_size=12, name=f"dataset_{d}") for d in datasets),
        ini.mlp(1, funnel_width),
        *brick,
    )


class Study:
    def __init__(self, daemon: Daemon, root: Path, db: str, config: Path) -> None:
        self.daemon, self.root, self.db, self.config = daemon, root, db, config

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.daemon.cli(*args, timeout=120)

    def copy(self, name: str) -> str:
        """A consistent copy (savedb) for tests that change keys."""
        target = str(self.root / name)
        self.cli("savedb", target, "--db", self.db)
        return target


@pytest.fixture(scope="module")
def study() -> Iterator[Study]:
    root = Path(tempfile.mkdtemp(prefix="mos-an-"))
    # The daemon refuses studies inside its own socket/state directory: give it a subfolder.
    (root / "daemon").mkdir()
    daemon = Daemon(root / "daemon").start()
    try:
        db = str(root / "study.db")
        good = _config(root, "good", ("OR",), "2, 3, 5", "2, 4", multiplicity=2)
        bad = _config(root, "bad", ("OR", "AND"), "0", None, multiplicity=1)
        daemon.cli("run", str(good), db, check=True)
        daemon.cli("run", str(bad), db, check=True)
        counts = daemon.wait_for(db, total=12, timeout=240)
        assert counts.get("done") == 10 and counts.get("failed") == 2, counts
        yield Study(daemon, root, db, good)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def pdf_pages(path: Path) -> int:
    # Page objects, not the /Pages tree node.
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", path.read_bytes()))


# -- plotloss ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selection", "size", "runs", "pages"),
    [
        (["-id", "all"], 2, 12, 3),
        (["-id", "all"], 3, 12, 2),
        (["-id", "1-4"], 2, 4, 1),
        (["-id", "1-3"], 1, 3, 3),
        (["-request", "SELECT run_id FROM runs WHERE status='done'"], 4, 10, 1),
        (["-param_name_and_value", "mlp_key", "mlp_mlp_brick"], 2, 4, 1),
    ],
)
def test_plotloss_pages(
    study: Study, selection: list[str], size: int, runs: int, pages: int
) -> None:
    out = study.root / f"loss_{size}_{runs}.pdf"
    result = study.cli("plotloss", study.db, str(out), *selection, "-plot_size", str(size))
    assert result.returncode == 0, result.stderr
    assert f"wrote {pages} page(s), {runs} run(s)" in result.stdout
    assert pdf_pages(out) == pages


def test_plotloss_reads_history_from_the_database_alone(study: Study) -> None:
    """A copy moved elsewhere, with the run files gone, still plots; --png writes page 1."""
    copy = Path(study.copy("moved.db"))
    elsewhere = Path(tempfile.mkdtemp(prefix="mos-mv-"))
    try:
        moved = elsewhere / "moved.db"
        shutil.move(str(copy), moved)
        out, png = elsewhere / "l.pdf", elsewhere / "l.png"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mosaic_client.cli",
                "plotloss",
                str(moved),
                str(out),
                "-id",
                "all",
                "-plot_size",
                "4",
                "--png",
                str(png),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env={**study.daemon.env, "MOSAIC_SOCKET": str(elsewhere / "none.sock")},
        )
        assert result.returncode == 0, result.stderr
        assert pdf_pages(out) == 1
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_loss_histories_match_run_epochs(study: Study) -> None:
    conn = analysis.open_readonly(study.db)
    try:
        runs = analysis.loss_histories(conn, list(range(1, 13)))
    finally:
        conn.close()
    assert [r.run_id for r in runs] == list(range(1, 13))
    for run in runs:
        rows = query(
            study.db,
            "SELECT epoch, train_loss, test_loss FROM run_epochs WHERE run_id=? ORDER BY epoch",
            run.run_id,
        )
        assert run.epochs == [r[0] for r in rows]
        assert run.train_loss == [r[1] for r in rows]
        assert run.test_loss == [r[2] for r in rows]
        assert (run.status == "done") == (len(rows) == 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-id", "999"], "matches no run"),
        (["-id", "5-2"], "goes backwards"),
        (["-request", "DELETE FROM runs"], "refused"),
        (["-id", "all", "-plot_size", "0"], "-plot_size 0"),
        ([], "give exactly one selection"),
    ],
)
def test_plotloss_errors(study: Study, args: list[str], message: str) -> None:
    out = study.root / "err.pdf"
    result = study.cli("plotloss", study.db, str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()
    assert query(study.db, "SELECT count(*) FROM runs")[0][0] == 12


def test_plotloss_bad_files(study: Study) -> None:
    result = study.cli("plotloss", study.db, str(study.root / "x.png"), "-id", "all")
    assert result.returncode == 2 and "end the name with .pdf" in result.stderr
    result = study.cli(
        "plotloss", str(study.root / "missing.db"), str(study.root / "x.pdf"), "-id", "all"
    )
    assert result.returncode == 2 and "no database at" in result.stderr
    other = study.root / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    result = study.cli("plotloss", str(other), str(study.root / "x.pdf"), "-id", "all")
    assert result.returncode == 2 and "not a Mosaic study database" in result.stderr
    result = study.cli("plotloss", study.db, str(study.root / "no" / "x.pdf"), "-id", "all")
    assert result.returncode == 2 and "does not exist" in result.stderr


# -- metaplot ---------------------------------------------------------------------------------


def sql_means(db: str, dataset_key: str, criterion: str) -> dict[tuple[str, int], tuple]:
    """The same aggregation, independently, in SQL over run_results and params."""
    rows = query(
        db,
        f"""
        SELECT mk.param_value, rr.nb_params, avg(rr."{criterion}"), min(rr."{criterion}"),
               max(rr."{criterion}"), count(*)
        FROM run_results rr
        JOIN runs r ON r.run_id = rr.run_id AND r.status = 'done'
        JOIN params dk ON dk.run_id = rr.run_id AND dk.param_name = 'dataset_key'
        JOIN params mk ON mk.run_id = rr.run_id AND mk.param_name = 'mlp_key'
        WHERE dk.param_value = ?
        GROUP BY mk.param_value, rr.nb_params""",
        dataset_key,
    )
    return {(r[0], r[1]): r[2:] for r in rows}


def by_seed(db: str, model_key: str, nb_params: int) -> list[float]:
    """The test losses of a group's finished runs on OR, in seed order, in SQL."""
    rows = query(
        db,
        """
        SELECT rr.test_loss FROM run_results rr
        JOIN runs r ON r.run_id = rr.run_id AND r.status = 'done'
        JOIN run_meta m ON m.run_id = rr.run_id
        JOIN params dk ON dk.run_id = rr.run_id AND dk.param_name = 'dataset_key'
        JOIN params mk ON mk.run_id = rr.run_id AND mk.param_name = 'mlp_key'
        WHERE dk.param_value = 'data_dataset_OR' AND mk.param_value = ? AND rr.nb_params = ?
        ORDER BY m.seed""",
        model_key,
        nb_params,
    )
    return [r[0] for r in rows]


def assert_points_match(plotted: dict[str, Any], expected: dict[tuple[str, int], tuple]) -> None:
    points = {
        (model, p["nb_params"]): (p["mean"], p["min"], p["max"], p["n"])
        for model, series in plotted["series"].items()
        for p in series
    }
    assert set(points) == set(expected)
    for key, (mean, low, high, n) in points.items():
        assert mean == pytest.approx(expected[key][0], rel=1e-12)
        assert (low, high, n) == pytest.approx(expected[key][1:], rel=1e-12)


def test_metaplot_aggregation_every_criterion(study: Study) -> None:
    conn = analysis.open_readonly(study.db)
    try:
        for criterion in CRITERIA:
            if criterion == "energy_j":  # measured on a GPU only: NULL here, nothing to plot
                with pytest.raises(analysis.AnalysisError, match="10 without energy_j"):
                    analysis.metaplot_data(conn, "data_dataset_OR", criterion)
                continue
            if criterion.startswith("val_"):
                # The example's data stage gives no validation loader (docs/tuning.md).
                with pytest.raises(analysis.AnalysisError, match=f"has a {criterion} to plot"):
                    analysis.metaplot_data(conn, "data_dataset_OR", criterion)
                continue
            data = analysis.metaplot_data(conn, "data_dataset_OR", criterion)
            assert_points_match(data.as_json(), sql_means(study.db, "data_dataset_OR", criterion))
            assert data.skipped == {"failed": [11]}
    finally:
        conn.close()


@pytest.mark.parametrize("criterion", ["test_loss", "duration(s)", "train_acc"])
def test_metaplot_points_equal_sql_means(study: Study, criterion: str) -> None:
    out, data = study.root / "meta.svg", study.root / f"meta_{criterion}.json"
    result = study.cli(
        "metaplot", study.db, str(out), "data_dataset_OR", criterion, "--data", str(data)
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
    # One OR run of the bad submission failed: counted in a note, not silently dropped.
    assert "skipped 1 run(s) of data_dataset_OR: 1 failed" in result.stderr
    plotted = json.loads(data.read_text())
    assert_points_match(plotted, sql_means(study.db, "data_dataset_OR", criterion))
    assert plotted["used"] == 10
    assert set(plotted["series"]) == {"mlp_mlp_funnel", "mlp_mlp_brick"}
    # Three funnel widths and two brick widths: several nb_params per model key.
    assert len(plotted["series"]["mlp_mlp_funnel"]) == 3
    assert all(p["n"] == 2 for s in plotted["series"].values() for p in s)


def test_metaplot_std_and_formats(study: Study) -> None:
    conn = analysis.open_readonly(study.db)
    try:
        data = analysis.metaplot_data(conn, "data_dataset_OR", "test_loss")
    finally:
        conn.close()
    for point in (p for s in data.series.values() for p in s):
        values = [
            query(study.db, "SELECT test_loss FROM run_results WHERE run_id=?", i)[0][0]
            for i in point.run_ids
        ]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert point.std == pytest.approx(std)
    for ext, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF")):
        out = study.root / f"m{ext}"
        result = study.cli(
            "metaplot", study.db, str(out), "data_dataset_OR", "test_acc", "--spread", "std"
        )
        assert result.returncode == 0, result.stderr
        assert out.read_bytes().startswith(magic)


@pytest.mark.parametrize(
    ("out", "key", "criterion", "message"),
    [
        (
            "m.png",
            "data_dataset_OR",
            "accuracy",
            "unknown criterion 'accuracy'; use one of: train_loss, test_loss",
        ),
        (
            "m.png",
            "data_nope",
            "test_loss",
            "no run has dataset key 'data_nope'; keys present: data_dataset_AND, data_dataset_OR",
        ),
        ("m.jpg", "data_dataset_OR", "test_loss", "end it with .png, .pdf, .svg"),
        ("m", "data_dataset_OR", "test_loss", "cannot tell the image format"),
        # Its only run failed: nothing to plot, said so with the count.
        ("m.png", "data_dataset_AND", "test_loss", "(1 failed)"),
    ],
)
def test_metaplot_errors(study: Study, out: str, key: str, criterion: str, message: str) -> None:
    target = study.root / "errs" / out
    target.parent.mkdir(exist_ok=True)
    result = study.cli("metaplot", study.db, str(target), key, criterion)
    assert result.returncode == 2
    assert message in result.stderr
    assert not target.exists()


# -- rekey ------------------------------------------------------------------------------------


def generated(study: Study, name: str) -> tuple[Path, list[list[dict[str, Any]]]]:
    path = study.root / name
    study.cli("generate", str(study.config), str(path))
    return path, json.loads(path.read_text())


def keys_of(db: str, name: str = "mlp_key") -> dict[int, str]:
    return dict(query(db, "SELECT run_id, param_value FROM params WHERE param_name=?", name))


def test_rekey_writes_keys_through_the_daemon(study: Study) -> None:
    db = study.copy("rekey.db")
    path, pipelines = generated(study, "pipes.json")
    for pipeline in pipelines:
        if pipeline[1]["class"] == "mlp_funnel":
            pipeline[1]["key"] = "funnel_renamed"
            # Moved project: the file's class paths differ, their file names do not.
            pipeline[1]["path_to_class"] = "/elsewhere/mlp.py"
    path.write_text(json.dumps(pipelines))
    before = keys_of(db)
    result = study.cli("rekey", str(path), db)
    assert result.returncode == 0, result.stderr
    assert "mlp_key = funnel_renamed: 6 run(s), 6 changed" in result.stdout
    assert "mlp_key = mlp_mlp_brick: 4 run(s), 0 changed" in result.stdout
    assert "dataset_key = data_dataset_OR: 10 run(s), 0 changed" in result.stdout
    after = keys_of(db)
    changed = {i for i in after if after[i] != before[i]}
    funnels = {
        r[0]
        for r in query(
            db,
            "SELECT r.run_id FROM runs r WHERE r.status='done' AND r.pipeline LIKE '%mlp_funnel%'",
        )
    }
    assert changed == funnels and all(after[i] == "funnel_renamed" for i in changed)
    # The failed width-0 runs are other pipelines: untouched.
    assert {after[i] for i in (11, 12)} == {"mlp_mlp_funnel"}
    # metaplot groups by the new key at once.
    data = study.root / "rekeyed.json"
    study.cli(
        "metaplot",
        db,
        str(study.root / "rk.png"),
        "data_dataset_OR",
        "test_loss",
        "--data",
        str(data),
    )
    assert set(json.loads(data.read_text())["series"]) == {"funnel_renamed", "mlp_mlp_brick"}
    # Again: everything already matches, nothing is sent.
    again = study.cli("rekey", str(path), db)
    assert again.returncode == 0
    assert "keys already up to date, nothing written" in again.stdout
    assert "funnel_renamed: 6 run(s), 0 changed" in again.stdout


def test_rekey_errors(study: Study) -> None:
    db = study.copy("rekey_err.db")
    before = keys_of(db)
    path, pipelines = generated(study, "pipes_err.json")
    for pipeline in pipelines:
        pipeline[0]["data_size"] = 61
    path.write_text(json.dumps(pipelines))
    result = study.cli("rekey", str(path), db)
    assert result.returncode == 2
    assert "matches a run" in result.stderr and "nothing was changed" in result.stderr

    _, pipelines = generated(study, "pipes_conflict.json")
    pipelines[0][1]["key"] = "one"
    pipelines[1][1]["key"] = "two"  # the same pipeline, repeated by the multiplicity
    path.write_text(json.dumps(pipelines))
    result = study.cli("rekey", str(path), db)
    assert result.returncode == 2
    assert "pipelines #1 and #2 are the same pipeline" in result.stderr

    for text, message in (
        ("{not json", "is not valid JSON"),
        ("[]", "non-empty JSON list"),
        ('[[{"class": "x"}]]', "pipeline #1"),
    ):
        path.write_text(text)
        result = study.cli("rekey", str(path), db)
        assert result.returncode == 2 and message in result.stderr
    result = study.cli("rekey", str(study.root / "absent.json"), db)
    assert result.returncode == 2 and "cannot read" in result.stderr
    assert keys_of(db) == before


def test_rekey_partial_file_notes_unmatched(study: Study) -> None:
    db = study.copy("rekey_part.db")
    path, pipelines = generated(study, "pipes_part.json")
    extra = json.loads(json.dumps(pipelines[0]))
    extra[1]["width"] = 99
    path.write_text(json.dumps(pipelines[:2] + [extra]))
    result = study.cli("rekey", str(path), db)
    assert result.returncode == 0, result.stderr
    assert "1 pipeline(s) of" in result.stderr and "#3" in result.stderr
    assert "mlp_key = mlp_mlp_funnel: 2 run(s), 0 changed" in result.stdout


# -- export -----------------------------------------------------------------------------------


def test_export_csv_and_json(study: Study) -> None:
    params = {r[0] for r in query(study.db, "SELECT DISTINCT param_name FROM params")}
    result = study.cli("export", study.db)
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    header, body = rows[0], rows[1:]
    assert len(body) == 12
    assert header[:3] == ["run_id", "status", "pipeline"]
    # The results, then where their resource figures were measured (issue 26).
    context = [f"measured_{n}" for n in study_reading.MEASUREMENT_NAMES]
    assert header[-len(context) :] == context
    first_result = len(header) - len(context) - len(CRITERIA)
    assert header[first_result : -len(context)] == list(CRITERIA)
    # Params clashing with a fixed or result column get a prefix; none is lost.
    exported = {
        h.removeprefix("param_") if h in ("param_epochs", "param_pipeline") else h
        for h in header[3:first_result]
    }
    assert exported == params
    assert "param_epochs" in header and "param_pipeline" in header
    by_id = {int(r[0]): dict(zip(header, r)) for r in body}
    for run_id, test_loss in query(study.db, "SELECT run_id, test_loss FROM run_results"):
        assert float(by_id[run_id]["test_loss"]) == test_loss
    assert by_id[11]["status"] == "failed" and by_id[11]["test_loss"] == ""

    out = study.root / "export.json"
    result = study.cli("export", study.db, "--format", "json", str(out))
    assert result.returncode == 0 and "wrote 12 run(s)" in result.stdout
    records = json.loads(out.read_text())
    assert len(records) == 12 and list(records[0]) == header
    assert (
        records[0]["nb_params"]
        == query(study.db, "SELECT nb_params FROM run_results WHERE run_id=1")[0][0]
    )
    # The format follows OUT's extension unless --format says otherwise, wherever OUT stands.
    for args, kind in (
        ([str(study.root / "e.json")], "json"),
        ([str(study.root / "e2.json"), "--format", "csv"], "csv"),
        (["--format", "csv", str(study.root / "e.csv")], "csv"),
    ):
        result = study.cli("export", study.db, *args)
        assert result.returncode == 0, result.stderr
        written = Path(next(a for a in args if a.startswith("/"))).read_text()
        assert written.startswith("[" if kind == "json" else "run_id,status,pipeline,")


def test_export_errors(study: Study) -> None:
    result = study.cli("export", str(study.root / "nope.db"))
    assert result.returncode == 2 and "no database at" in result.stderr
    result = study.cli("export", study.db, "--format", "xml")
    assert result.returncode == 2


def test_client_imports_no_matplotlib() -> None:
    code = (
        "import sys, mosaic_client.cli, mosaic_client.analysis; "
        "bad = [m for m in ('matplotlib', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# -- compare, groups, metaplot --ci (issue 15) -------------------------------------------------
# On this module's study: OR runs of 3 funnel and 2 brick widths, seeds 0 and 1 each.


def test_compare_on_the_trained_study(study: Study) -> None:
    result = study.cli("compare", study.db, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric"] == "test_loss" and report["better"] == "lower"
    means = sql_means(study.db, "data_dataset_OR", "test_loss")
    sizes = [ln for ln in report["lines"] if ln["kind"] == "size"]
    assert sizes and all(ln["dataset_key"] == "data_dataset_OR" for ln in report["lines"])
    for line in sizes:
        assert line["a"] == "mlp_mlp_brick" and line["b"] == "mlp_mlp_funnel"
        assert line["mean_a"] == pytest.approx(means[("mlp_mlp_brick", line["a_nb_params"])][0])
        assert line["mean_b"] == pytest.approx(means[("mlp_mlp_funnel", line["b_nb_params"])][0])
        # Same seeds (0, 1) on the same data stage: paired; 2 pairs: a paired t test (1 df).
        assert line["paired"] and (line["n_a"], line["n_b"]) == (2, 2)
        a = by_seed(study.db, "mlp_mlp_brick", line["a_nb_params"])
        b = by_seed(study.db, "mlp_mlp_funnel", line["b_nb_params"])
        if a == b:  # brick and funnel of width 2, length 1 are the same network: same results
            # no spread at all: the exact sign-flip test, whose p is never below 1: no test
            assert line["verdict"] == "too few repetitions" and line["p_value"] == 1.0
            assert line["repetitions_note"].startswith("no spread") and line["ci"] is None
            continue
        ref = stats.ttest_rel(a, b)
        assert line["test"] == "paired t"
        assert line["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
        ci = ref.confidence_interval()
        assert line["ci"] == pytest.approx([ci.low, ci.high], rel=1e-9)
        assert line["verdict"] != "too few repetitions"
        if line["verdict"] == "no detectable difference":
            assert line["repetitions_needed"] >= 2
    sizes_of = (
        {ln["a_nb_params"] for ln in sizes}
        | {ln["b_nb_params"] for ln in sizes}
        | {u["nb_params"] for u in report["unmatched"]}
    )
    assert sizes_of == {size for _, size in means}  # every size compared or listed
    (curve,) = [ln for ln in report["lines"] if ln["kind"] == "curve"]
    assert curve["p_holm"] is not None and curve["verdict"] in (
        "no detectable difference",
        "A better",
        "B better",
    )
    assert any("data_dataset_AND" in note for note in report["notes"])  # its one run failed
    table = study.cli("compare", study.db, "--data", "data_dataset_OR")
    assert table.returncode == 0, table.stderr
    assert "A = mlp_mlp_brick, B = mlp_mlp_funnel" in table.stdout
    assert "too few repetitions" in table.stdout and "paired" in table.stdout
    assert "failed A/B" in table.stdout and "without a partner" in table.stdout
    across = json.loads(study.cli("compare", study.db, "--across-datasets", "--json").stdout)
    (pair,) = across["across_datasets"]
    assert (pair["a"], pair["b"], pair["datasets"]) == (
        "mlp_mlp_brick",
        "mlp_mlp_funnel",
        ["data_dataset_OR"],  # AND has no finished run: nothing to combine there
    )
    assert pair["p_value"] == pytest.approx(curve["p_value"]) and pair["lines"] == ["curve"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--data", "data_nope"],
            "no run has dataset key 'data_nope'; keys present: data_dataset_AND, data_dataset_OR",
        ),
        (["--metric", "accuracy"], "unknown criterion 'accuracy'; use one of: train_loss"),
        (["--metric", "nb_params"], "cannot compare on nb_params"),
        (
            ["--families", "mlp_mlp_brick,mlp_nope", "--data", "data_dataset_OR"],
            "no finished run of model key 'mlp_nope'",
        ),
        (["--alpha", "2"], "--alpha 2"),
    ],
)
def test_compare_errors(study: Study, args: list[str], message: str) -> None:
    result = study.cli("compare", study.db, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_groups_on_the_trained_study(study: Study) -> None:
    result = study.cli("groups", study.db, "--json")
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)
    means = sql_means(study.db, "data_dataset_OR", "test_loss")
    done = [g for g in groups if g["n"]]
    assert {(g["model_key"], g["nb_params"]): g["mean_test_loss"] for g in done} == pytest.approx(
        {key: value[0] for key, value in means.items()}
    )
    assert all(g["runs"] == g["n"] == 2 for g in done)
    failed = [g for g in groups if not g["n"]]  # the width-0 submission: OR and AND, failed
    assert sorted(g["dataset_key"] for g in failed) == ["data_dataset_AND", "data_dataset_OR"]
    assert [g["group_id"] for g in groups] == list(range(1, len(groups) + 1))


def test_metaplot_ci_bars_are_bootstrap_intervals(study: Study) -> None:
    from mosaic_client.verdict.statistics import mean_ci

    out, data = study.root / "ci.png", study.root / "ci.json"
    result = study.cli(
        "metaplot", study.db, str(out), "data_dataset_OR", "test_loss", "--ci", "--data", str(data)
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    for points in json.loads(data.read_text())["series"].values():
        for p in points:
            values = [
                query(study.db, "SELECT test_loss FROM run_results WHERE run_id=?", i)[0][0]
                for i in p["run_ids"]
            ]
            assert (p["ci_low"], p["ci_high"]) == pytest.approx(mean_ci(values))
            assert p["ci_low"] <= p["mean"] <= p["ci_high"]
