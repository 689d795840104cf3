"""Issue 16: per-run provenance, `mosaic diff`, `deterministic = true`, `rerun` after a code
edit, and the parameters Mosaic injects itself refused as section parameters."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EXAMPLE, Daemon, example_config, query

from mosaic_client import contract, provenance, schema, study_reading
from mosaicd.scheduling import submissions
from mosaicd.storage.store import Store


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid",
            "HOME": str(repo),
            "PATH": "/usr/bin:/bin",
        },
    )
    return done.stdout.strip()


def _project(root: Path, *, widths: str = "3", multiplicity: int = 2, extra: str = "") -> Path:
    """The OR example with its class files copied into root (a project of its own)."""
    for name in ("dataset.py", "mlp.py"):
        shutil.copy(EXAMPLE / name, root / name)
    return example_config(
        root,
        epochs=2,
        multiplicity=multiplicity,
        mlp_width=widths,
        classes=root,
        extra_process=extra,
    )


def _run_id(db: str, **params: object) -> list[int]:
    """Run ids whose params have these values, ascending."""
    ids = None
    for name, value in params.items():
        found = {
            r[0]
            for r in query(
                db, "SELECT run_id FROM params WHERE param_name=? AND param_value=?", name, value
            )
        }
        ids = found if ids is None else ids & found
    return sorted(ids or ())


# -- the store: one text per distinct content ------------------------------------------------


def test_store_keeps_one_text_for_a_hundred_runs_of_one_file(tmp: Path) -> None:
    store = Store(str(tmp / "s.db"))
    modules = [{"type": "m", "class": "C", "path_to_class": "/p/c.py", "name": "c"}]
    runs = [(modules, seed, "C()", {"seed": seed}) for seed in range(101)]
    process = {"epochs": 1}
    _, run_ids = store.add_submission(None, "me", "/c.ini", process, {}, runs)
    env = dict.fromkeys(provenance.ENVIRONMENT_FIELDS, "x") | {"threads": 2, "deterministic": False}
    v1 = b"class C:\n    pass\n"
    v2 = b"class C:\n    x = 1\n"
    for run_id in run_ids[:100]:
        store.record_provenance(run_id, env, [_entry(v1)])
    store.record_provenance(run_ids[100], env, [_entry(v2)])
    db = str(tmp / "s.db")
    assert query(db, "SELECT count(*) FROM run_code") == [(101,)]
    texts = dict(query(db, "SELECT sha256, text FROM code_files"))
    assert texts == {provenance.digest(v1): v1.decode(), provenance.digest(v2): v2.decode()}
    assert query(db, "SELECT count(DISTINCT sha256) FROM run_code WHERE run_id<=100") == [(1,)]
    # A later start of a run replaces its record; the shared text stays.
    store.record_provenance(run_ids[0], env | {"threads": 4}, [_entry(v2)])
    record = study_reading.run_provenance(store.conn, run_ids[0], with_text=True)
    assert record is not None
    assert record["environment"]["threads"] == 4
    assert record["environment"]["deterministic"] == 0
    assert [e["text"] for e in record["code"]] == [v2.decode()]
    assert query(db, "SELECT count(*) FROM code_files") == [(2,)]
    assert query(db, "SELECT count(*) FROM run_environment") == [(101,)]
    store.close()


def _entry(data: bytes) -> dict[str, object]:
    return {
        "section": "c",
        "class": "C",
        "path": "/p/c.py",
        "sha256": provenance.digest(data),
        "text": data.decode(),
        "git_commit": None,
        "git_dirty": None,
    }


def test_git_state_outside_a_repository_is_unknown(tmp: Path) -> None:
    assert provenance.git_state(str(tmp)) == (None, None)
    assert provenance.git_state(str(tmp / "missing")) == (None, None)


# -- end to end: two versions of a class file, git, show, diff, rerun ------------------------


def test_provenance_of_two_code_versions_diff_and_rerun(daemon: Daemon, tmp: Path) -> None:
    root = tmp / "proj"
    root.mkdir()
    cfg = _project(root, widths="3, 4")
    _git(root, "init", "-q")
    _git(root, "add", "dataset.py", "mlp.py")
    _git(root, "commit", "-q", "-m", "classes")
    head = _git(root, "rev-parse", "HEAD")
    db = str(tmp / "p.db")
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    assert query(db, "SELECT count(*) FROM runs WHERE status='done'") == [(4,)]

    # Every run records both class files, hashed from the bytes it ran, and the git state.
    dataset_sha = provenance.file_digest(str(root / "dataset.py"))
    mlp_v1 = provenance.file_digest(str(root / "mlp.py"))
    rows = query(db, "SELECT run_id, section, path, sha256, git_commit, git_dirty FROM run_code")
    assert len(rows) == 8
    assert {(r[1], r[3]) for r in rows} == {("dataset_OR", dataset_sha), ("mlp_funnel", mlp_v1)}
    assert {(r[4], r[5]) for r in rows} == {(head, 0)}
    assert query(db, "SELECT count(*) FROM code_files") == [(2,)]
    env = query(db, "SELECT python, torch, device, threads, deterministic FROM run_environment")
    assert len(env) == 4
    for python, torch_version, device, threads, deterministic in env:
        assert python == ".".join(map(str, sys.version_info[:3]))
        assert torch_version == torch.__version__ and device == "cpu"
        assert threads >= 1 and deterministic == 0

    # The [PROCESS] seed has its own row; `seed` is each run's own.
    w3 = _run_id(db, mlp_funnel_width=3)
    w4 = _run_id(db, mlp_funnel_width=4)
    assert len(w3) == len(w4) == 2
    assert query(
        db,
        f"SELECT DISTINCT param_value FROM params WHERE param_name='{contract.PROCESS_SEED_PARAM}'",
    ) == [(0,)]
    seeds = {
        r[0]: r[1]
        for r in query(db, "SELECT run_id, param_value FROM params WHERE param_name='seed'")
    }
    assert sorted(seeds[i] for i in w3) == [0, 1]

    show = daemon.cli("show", str(w3[0]), "--db", db, check=True).stdout
    assert f"sha256 {mlp_v1[:16]}" in show and f"git {head[:12]}" in show
    assert f"torch {torch.__version__}" in show and "determinism: off" in show
    shown = json.loads(daemon.cli("show", str(w3[0]), "--db", db, "--json", check=True).stdout)
    assert {e["sha256"] for e in shown["provenance"]["code"]} == {dataset_sha, mlp_v1}

    # diff: the repetitions differ only by their seed; the widths by a parameter.
    same_config = daemon.cli("diff", str(w3[0]), str(w3[1]), "--db", db, check=True).stdout
    assert "differs: nothing but the seed" in same_config
    assert "seed: 0 | 1" in same_config
    by_param = daemon.cli("diff", str(w3[0]), str(w4[0]), "--db", db, check=True).stdout
    assert "mlp_funnel_width: 3 | 4" in by_param and "differs: they differ" in by_param
    assert "code of" not in by_param and "seeds:" not in by_param

    # Edit the model's class file: rerun warns, --strict refuses and queues nothing.
    edited = (root / "mlp.py").read_text() + "\n# edited: a second version\nEDITED = True\n"
    (root / "mlp.py").write_text(edited)
    mlp_v2 = provenance.file_digest(str(root / "mlp.py"))
    events_before = query(db, "SELECT count(*) FROM run_events")
    strict = daemon.cli("rerun", str(cfg), db, "-id", str(w3[0]), "-epochs", "1", "--strict")
    assert strict.returncode == 2, strict.stderr
    assert f"{root}/mlp.py (edited)" in strict.stderr and "nothing was queued" in strict.stderr
    assert query(db, "SELECT count(*) FROM run_events") == events_before
    assert query(db, f"SELECT status FROM runs WHERE run_id={w3[0]}") == [("done",)]
    # Without --strict: a warning naming the file and the run, then the rerun is queued.
    rerun = daemon.cli("rerun", str(cfg), db, "-id", str(w3[0]), "-epochs", "1", check=True)
    assert "class files differ" in rerun.stderr and f"run(s) {w3[0]} started" in rerun.stderr
    daemon.wait_for(db, total=4)

    # A new submission runs the edited file: a second hash, a second text, a dirty tree.
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    new_w3 = [i for i in _run_id(db, mlp_funnel_width=3, seed=0) if i > 4]
    assert len(new_w3) == 1
    texts = dict(query(db, "SELECT sha256, text FROM code_files"))
    assert set(texts) == {dataset_sha, mlp_v1, mlp_v2} and texts[mlp_v2] == edited
    assert query(
        db,
        f"SELECT sha256, git_commit, git_dirty FROM run_code WHERE run_id={new_w3[0]} "
        "AND section='mlp_funnel'",
    ) == [(mlp_v2, head, 1)]
    # The rerun's start recorded the code it ran too.
    assert query(
        db, f"SELECT sha256 FROM run_code WHERE run_id={w3[0]} AND section='mlp_funnel'"
    ) == [(mlp_v2,)]
    by_code = daemon.cli("diff", str(w3[1]), str(new_w3[0]), "--db", db, check=True).stdout
    assert "code of [mlp_funnel] differs:" in by_code
    assert "+# edited: a second version" in by_code and "differs: they differ" in by_code
    assert "parameters:" not in by_code
    found = json.loads(
        daemon.cli("diff", str(w3[1]), str(new_w3[0]), "--db", db, "--json", check=True).stdout
    )
    assert [c["sha256"] for c in found["code"]] == [[mlp_v1, mlp_v2]]
    assert found["seeds"] == {"seed": [1, 0]}


def test_diff_across_two_studies_and_bad_input(daemon: Daemon, tmp: Path) -> None:
    root = tmp / "proj"
    root.mkdir()
    cfg = _project(root, multiplicity=1)
    db_a, db_b = str(tmp / "a.db"), str(tmp / "b.db")
    daemon.cli("run", str(cfg), db_a, "--follow", check=True)
    daemon.cli("run", str(cfg), db_b, "--follow", check=True)
    result = daemon.cli("diff", "1", "1", "--db", db_a, "--db-b", db_b, check=True)
    assert "differs: nothing" in result.stdout and "seeds:" not in result.stdout
    missing = daemon.cli("diff", "1", "9", "--db", db_a)
    assert missing.returncode == 2 and "no run 9" in missing.stderr


# -- determinism -----------------------------------------------------------------------------

_PUT_MODEL = """
import torch


class put_model(torch.nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.linear = torch.nn.Linear(input_size, output_size)

    def forward(self, x, run_info, module_info):
        out = torch.sigmoid(self.linear(x))
        # put_ has no deterministic implementation: torch refuses it in deterministic mode.
        marker = torch.zeros(2).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        return out + 0 * marker.sum()

    def info(self):
        return {}
"""


def test_deterministic_runs_are_bit_identical_and_refuse_other_ops(tmp: Path) -> None:
    daemon = Daemon(tmp, workers=1).start()  # one worker: the runs share its process
    try:
        root = tmp / "proj"
        root.mkdir()
        det = _project(root, multiplicity=1, extra="deterministic = true")
        db = str(tmp / "d.db")
        daemon.cli("run", str(det), db, "--follow", check=True)
        daemon.cli("run", str(det), db, "--follow", check=True)
        assert query(db, "SELECT run_id, seed FROM run_meta") == [(1, 0), (2, 0)]
        epochs = [
            query(db, f"SELECT epoch, train_loss, test_loss FROM run_epochs WHERE run_id={i}")
            for i in (1, 2)
        ]
        assert len(epochs[0]) == 2 and epochs[0] == epochs[1]  # exact floats
        weights = [
            torch.load(contract.checkpoint_path(str(root / "runs"), i), weights_only=False)[
                "models"
            ]
            for i in (1, 2)
        ]
        for a, b in zip(weights[0], weights[1]):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
        rows = query(
            db,
            "SELECT deterministic, cudnn_deterministic, cudnn_benchmark, cublas_workspace_config"
            " FROM run_environment ORDER BY run_id",
        )
        assert rows == [(1, 1, 0, provenance.CUBLAS_DETERMINISTIC)] * 2
        assert query(
            db, "SELECT DISTINCT param_value FROM params WHERE param_name='deterministic'"
        ) == [(1,)]
        diff = daemon.cli("diff", "1", "2", "--db", db, check=True).stdout
        assert "differs: nothing" in diff
        assert "deterministic algorithms on" in daemon.cli("show", "1", "--db", db).stdout

        # The worker put the settings back: the next run of the same process is not
        # deterministic, and the record says so.
        plain = tmp / "plain"
        plain.mkdir()
        daemon.cli("run", str(_project(plain, multiplicity=1)), db, "--follow", check=True)
        assert query(
            db, "SELECT deterministic, cudnn_deterministic FROM run_environment WHERE run_id=3"
        ) == [(0, 0)]
        assert "deterministic: 1 | 0" in daemon.cli("diff", "1", "3", "--db", db).stdout

        # An operation with no deterministic implementation fails the run with torch's words.
        (root / "put_model.py").write_text(_PUT_MODEL)
        text = det.read_text().replace("class = mlp_funnel", "class = put_model")
        text = text.replace(f"{root}/mlp.py", f"{root}/put_model.py")
        text = text.replace("length = 2\n", "").replace("width = 3\n", "")
        cfg = root / "put.ini"
        cfg.write_text(text)
        daemon.cli("run", str(cfg), db, "--follow")
        status, detail = query(db, "SELECT status, return_status FROM runs WHERE run_id=4")[0]
        assert status == "failed"
        assert "put_ does not have a deterministic implementation" in detail
        # The failed run's provenance is recorded too.
        assert query(db, "SELECT deterministic FROM run_environment WHERE run_id=4") == [(1,)]
    finally:
        daemon.stop()


# -- the values Mosaic injects are not section parameters ------------------------------------


def test_injected_names_are_refused_as_section_parameters(daemon: Daemon, tmp: Path) -> None:
    root = tmp / "proj"
    root.mkdir()
    cfg = _project(root, multiplicity=1)
    good = cfg.read_text()
    for name in contract.RUN_INFO_KEYS:
        cfg.write_text(good.replace("batch_size = 20\n", f"batch_size = 20\n{name} = 7\n"))
        result = daemon.cli("generate", str(cfg), str(tmp / "out.json"))
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"section [dataset_OR]: parameter '{name}'" in result.stderr
        assert contract.RUN_INFO_RENAMES[name] in result.stderr
        assert not (tmp / "out.json").exists()
        run = daemon.cli("run", str(cfg), str(tmp / "r.db"))
        assert run.returncode == 2 and f"parameter '{name}'" in run.stderr
        assert not (tmp / "r.db").exists()
        # A hand-made request is refused by the daemon too, with the same words.
        module = {"type": "dataset", "class": "dataset_OR", "path_to_class": "x.py", "name": "d"}
        problem = submissions.submission_problem(
            {
                "run_files_path": str(tmp),
                "data_scheme": ["dataset"],
                "pipeline_scheme": ["mlp"],
                "lr": 0.1,
                "loss_function": "MSELoss",
                "epochs": 1,
            },
            {"need_gpu": False, "gpu_available": None, "nb_processus": 1, "multiplicity": 1},
            [[module | {name: 7}, {**module, "type": "mlp", "name": "m"}]],
        )
        assert problem is not None and f"section [d]: parameter '{name}'" in problem


def test_execute_reports_the_bytes_it_ran_and_the_environment(tmp: Path) -> None:
    from mosaicd.training import execution

    shutil.copy(EXAMPLE / "dataset.py", tmp / "dataset.py")
    shutil.copy(EXAMPLE / "mlp.py", tmp / "mlp.py")
    spec = {
        "run_id": 5,
        "seed": 1,
        "device": "cpu",
        "run_files_path": str(tmp / "runs"),
        "epochs_target": 1,
        "start_epoch": 0,
        "checkpoint_every": 30.0,
        "max_log_mb": 50.0,
        "umask": None,
        # Resolved as the daemon's dispatch does: the defaults fill what is not given.
        "process": schema.process_settings(
            {
                "data_scheme": ["dataset"],
                "pipeline_scheme": ["mlp"],
                "lr": 0.01,
                "loss_function": "BCELoss",
            }
        ),
        "modules": [
            {
                "type": "dataset",
                "class": "dataset_OR",
                "path_to_class": str(tmp / "dataset.py"),
                "data_size": 20,
                "train_prop": 0.5,
                "batch_size": 5,
                "key": "d",
                "name": "data",
            },
            {
                "type": "mlp",
                "class": "mlp_funnel",
                "path_to_class": str(tmp / "mlp.py"),
                "length": 2,
                "width": 3,
                "key": "m",
                "name": "net",
            },
        ],
    }
    records: list[dict[str, object]] = []
    saved = list(sys.path)
    try:
        channel = execution.Channel(
            on_epoch=lambda event: None,
            park_requested=lambda: False,
            on_provenance=records.append,
        )
        execution.execute(spec, channel)
        # A build that fails still reports what it loaded before failing.
        spec["modules"][1]["path_to_class"] = str(tmp / "missing.py")
        with pytest.raises(execution.UserCodeError):
            execution.execute(spec, channel)
    finally:
        sys.path[:] = saved
        while execution.loaded_user_modules:
            sys.modules.pop(execution.loaded_user_modules.pop(), None)
    first, failed = records
    assert [(e["section"], e["sha256"]) for e in first["code"]] == [
        ("data", provenance.file_digest(str(tmp / "dataset.py"))),
        ("net", provenance.file_digest(str(tmp / "mlp.py"))),
    ]
    assert first["code"][1]["text"] == (tmp / "mlp.py").read_text()
    assert set(first["environment"]) == set(provenance.ENVIRONMENT_FIELDS)
    assert first["environment"]["threads"] == torch.get_num_threads()
    assert [e["section"] for e in failed["code"]] == ["data"]


def test_diff_says_when_one_run_trained_in_an_ensemble_and_the_other_alone() -> None:
    from mosaic_client.commands.diff import compare_runs, diff_text

    environment = {"python": "3.11", "torch": "2"}
    code = [{"section": "m", "sha256": "x", "path": "p", "text": ""}]
    record = {"environment": environment, "code": code}

    def run(seed: int, group: dict[str, Any] | None) -> dict[str, Any]:
        return {"params": {"w": 3}, "seed": seed, "provenance": record, "group": group}

    grouped = {"members": [1, 2, 3], "fallback": None}
    found = compare_runs(run(1, grouped), run(1, None))
    assert found["training"] == ["in an ensemble of 3 (runs 1, 2, 3)", "alone"]
    assert found["verdict"].startswith("how they were trained")
    text = "\n".join(diff_text(found, "A", "B"))
    assert "trained: in an ensemble of 3 (runs 1, 2, 3) | alone" in text
    # A group that fell back trained its members alone; the members of one group differ by seed.
    fell_back = {"members": [1, 2], "fallback": "a reason"}
    assert compare_runs(run(1, fell_back), run(1, None))["verdict"] == "nothing"
    assert compare_runs(run(1, grouped), run(2, grouped))["verdict"] == "nothing but the seed"
