"""The catalogue of user mistakes: each one through the real CLI, with a clear message, a non-zero
exit code, and nothing lost from a study that was there before.

Two daemons serve the catalogue (module scope):

- `paused`: a reference study with two done runs and one run queued behind `mosaic pause`.
  Mistakes the client or the daemon refuses up front are made against it (often against the
  reference database itself), so "nothing queued, nothing lost" is checked where it matters.
- `live`: a running daemon with its own reference study of done runs, for mistakes that only
  show when a run executes (user code, NaN, a full disk): the run fails with a message that says
  what is wrong, the daemon and the other runs carry on.

After every case both reference databases must be unchanged, row for row, and the queued run
still queued.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import EXAMPLE, Daemon, example_config, query

BAD_INPUT, FAILED = 2, 1


def dump(db: str) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sorted(conn.iterdump())
    finally:
        conn.close()


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.paused = Daemon(root / "p", workers=1)
        self.live = Daemon(root / "l", workers=2)
        for d in (self.paused, self.live):
            d.root.mkdir()
            d.start()
        self.ref = str(self.paused.root / "ref.db")
        self.cfg = example_config(self.paused.root, epochs=1, multiplicity=2)
        self.paused.cli("run", str(self.cfg), self.ref, "--follow", check=True)
        self.paused.cli("pause", check=True)
        self.paused.cli("run", str(self.cfg), self.ref, check=True)  # 2 more runs, queued
        self.live_ref = str(self.live.root / "ref.db")
        live_cfg = example_config(self.live.root, epochs=1)
        self.live.cli("run", str(live_cfg), self.live_ref, "--follow", check=True)
        self.before = {db: dump(db) for db in (self.ref, self.live_ref)}
        self.mounts: list[Path] = []
        self.live_done: dict[str, subprocess.CompletedProcess[str]] = {}

    def check_nothing_lost(self) -> None:
        for db, rows in self.before.items():
            assert dump(db) == rows, f"{db} changed"
        assert query(self.ref, "SELECT status, count(*) FROM runs GROUP BY status") == [
            ("done", 2),
            ("queued", 2),
        ]
        status = self.paused.request("status", db=self.ref)
        assert status["paused"] is True and status["queued"] == 2
        assert self.live.request("ping")["pid"] == self.live.proc.pid  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    root = Path(tempfile.mkdtemp(prefix="mos-bi-"))
    s = Setup(root)
    yield s
    for d in (s.paused, s.live):
        d.stop()
    for mount in s.mounts:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    shutil.rmtree(root, ignore_errors=True)


# -- user files the cases are made of -------------------------------------------------------------

MODEL_OK = """
import torch

class good(torch.nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.lin = torch.nn.Linear(input_size, output_size)
    def forward(self, data, run_info, module_info):
        return torch.sigmoid(self.lin(data))
    def info(self):
        return {}
"""

SOURCES = {
    "syntax": "import torch\n\nclass good(torch.nn.Module:\n    pass\n",
    "no_forward": """
import torch

class good(torch.nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.lin = torch.nn.Linear(input_size, output_size)
    def info(self):
        return {}
""",
    "nan": MODEL_OK.replace("torch.sigmoid(self.lin(data))", "self.lin(data) * float('nan')"),
    "no_prepare": """
class data:
    def info(self):
        return {"batch_size": 10, "input_size": 2, "output_size": 1}
""",
    "one_loader": """
import torch
from torch.utils.data import DataLoader, TensorDataset

class data:
    def prepare(self, data, run_info, module_info):
        x = torch.rand(20, 2)
        return DataLoader(TensorDataset(x, x[:, :1]), batch_size=10)
    def info(self):
        return {"batch_size": 10, "input_size": 2, "output_size": 1}
""",
}


def project(
    root: Path,
    name: str,
    *,
    model: str | None = None,
    model_class: str = "good",
    data: str | None = None,
    loss: str = "BCELoss",
    lr: str = "0.01",
    run_files: str | None = None,
    drop: str = "",
) -> Path:
    """A one-run project in root/name: the example data and a small model unless replaced."""
    where = root / name
    where.mkdir()
    if model is not None:
        (where / "model.py").write_text(textwrap.dedent(model))
    if data is not None:
        (where / "data.py").write_text(textwrap.dedent(data))
    data_section = (
        f"[data]\ntype = dataset\nclass = data\npath_to_class = {where}/data.py\nkey = d\n"
        if data is not None
        else f"[dataset_OR]\ntype = dataset\nclass = dataset_OR\n"
        f"path_to_class = {EXAMPLE}/dataset.py\ndata_size = 40\ntrain_prop = 0.5\n"
        "batch_size = 10\nkey = d\n"
    )
    model_section = (
        f"[{model_class}]\ntype = mlp\nclass = {model_class}\n"
        f"path_to_class = {where}/model.py\nkey = m\n"
        if model is not None
        else f"[mlp_funnel]\ntype = mlp\nclass = mlp_funnel\npath_to_class = "
        f"{EXAMPLE}/mlp.py\nlength = 2\nwidth = 3\nkey = m\n"
    )
    text = (
        f"[PROCESS]\nlr = {lr}\nepochs = 1\ndata_scheme = dataset\npipeline_scheme = mlp\n"
        f"loss_function = {loss}\nrun_files_path = {run_files or where / 'runs'}\nseed = 1\n\n"
        "[MONITOR]\nneed_gpu = false\ngpu_available = None\nnb_processus = 1\n"
        f"multiplicity = 1\n\n{data_section}\n{model_section}"
    )
    if drop:
        text = text.split(f"[{drop}]")[0] + "".join(
            "[" + part for part in text.split(f"[{drop}]")[1].split("[")[1:]
        )
    path = where / "config.ini"
    path.write_text(text)
    return path


def full_disk(s: Setup, where: Path) -> str:
    """A run_files_path with (almost) no free space: a 64 KiB tmpfs filled to the brim.

    Mounting needs root (the test environment has it); without it, the run's log file is made a
    link to /dev/full, which fails every write with ENOSPC the same way."""
    mount = where / "full"
    mount.mkdir(parents=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        == 0
    )
    if mounted:
        s.mounts.append(mount)
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
    else:
        os.symlink("/dev/full", mount / "output_1.log")
    return str(mount)


# -- the catalogue --------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    run: Callable[[Setup, Path], subprocess.CompletedProcess[str]] | None
    code: int
    words: tuple[str, ...]
    # For mistakes that show when a run executes: writes the project, returns its config.
    live: Callable[[Setup, Path], Path] | None = None

    @property
    def dirname(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.name)


def cli(s: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    return s.paused.cli(*args)


def live_results(s: Setup) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every live case at once (`mosaic run --follow` each, concurrently: the failures cost
    fresh workers, which is the slow part), then append `show` of each failed run."""
    if s.live_done:
        return s.live_done
    procs = {}
    for case in CASES:
        if case.live is None:
            continue
        where = s.root / case.dirname
        where.mkdir()
        cfg = case.live(s, where)
        procs[case.name] = (
            cfg.parent / "case.db",
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mosaic_client.cli",
                    "run",
                    str(cfg),
                    str(cfg.parent / "case.db"),
                    "--follow",
                ],
                env=s.live.env,
                cwd=where,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    for name, (db, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        shown = s.live.cli("show", "1", "--db", str(db))
        assert query(db, "SELECT status FROM runs") == [("failed",)], name
        s.live_done[name] = subprocess.CompletedProcess(
            proc.args, proc.returncode, out + shown.stdout, err + shown.stderr
        )
    return s.live_done


def not_sqlite(s: Setup, where: Path) -> subprocess.CompletedProcess[str]:
    junk = where / "junk.db"
    junk.write_bytes(os.urandom(8192))
    before = junk.read_bytes()
    result = cli(s, "run", str(s.cfg), str(junk))
    assert junk.read_bytes() == before
    return result


def newer_schema(s: Setup, where: Path) -> subprocess.CompletedProcess[str]:
    newer = where / "newer.db"
    cli(s, "savedb", str(newer), "--db", s.ref)
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE system SET param_value=999 WHERE param_name='schema_version'")
    conn.commit()
    conn.close()
    result = cli(s, "run", str(s.cfg), str(newer))
    assert query(newer, "SELECT count(*) FROM runs") == [(4,)]
    return result


def missing_class_file(s: Setup, where: Path) -> subprocess.CompletedProcess[str]:
    cfg = project(where, "c", model=MODEL_OK)
    os.unlink(cfg.parent / "model.py")
    return cli(s, "run", str(cfg), s.ref)


CASES = [
    # Search spaces (docs/tuning.md): refused when the file is read, the key named.
    Case(
        "config: unknown distribution",
        lambda s, w: cli(s, "run", str(project(w, "c", lr="lognormal(1, 2)")), s.ref),
        BAD_INPUT,
        ("[PROCESS] lr", "unknown distribution 'lognormal'", "nothing was queued"),
    ),
    Case(
        "config: a log scale over a non-positive bound",
        lambda s, w: cli(s, "run", str(project(w, "c", lr="loguniform(0, 1)")), s.ref),
        BAD_INPUT,
        ("[PROCESS] lr", "above 0", "nothing was queued"),
    ),
    Case(
        "config: distribution with low > high",
        lambda s, w: cli(s, "generate", str(project(w, "c", lr="uniform(1, 0.1)")), "o.json"),
        BAD_INPUT,
        ("[PROCESS] lr", "low is greater than high"),
    ),
    Case(
        "config: a distribution without [SEARCH]",
        lambda s, w: cli(s, "run", str(project(w, "c", lr="uniform(0.01, 0.1)")), s.ref),
        BAD_INPUT,
        ("[PROCESS] lr", "needs a [SEARCH] section", "nothing was queued"),
    ),
    Case(
        "config: value of the wrong type",
        lambda s, w: cli(s, "run", str(project(w, "c", lr="fast")), s.ref),
        BAD_INPUT,
        ("lr", "expected a number", "nothing was queued"),
    ),
    Case(
        "config: mandatory section missing",
        lambda s, w: cli(s, "run", str(project(w, "c", drop="MONITOR")), s.ref),
        BAD_INPUT,
        ("MONITOR", "nothing was queued"),
    ),
    Case(
        "config: loss that is not in torch.nn",
        lambda s, w: cli(s, "run", str(project(w, "c", loss="MSELos")), s.ref),
        BAD_INPUT,
        ("MSELos", "loss", "nothing was queued"),
    ),
    Case(
        "config file that does not exist",
        lambda s, w: cli(s, "run", str(w / "x.ini"), s.ref),
        BAD_INPUT,
        ("x.ini",),
    ),
    Case(
        "config: class file that does not exist",
        missing_class_file,
        BAD_INPUT,
        ("model.py", "file not found", "nothing was queued"),
    ),
    Case(
        "selection that matches nothing",
        lambda s, w: cli(s, "cancel", s.ref, "-id", "999"),
        BAD_INPUT,
        ("matches no", "nothing was cancelled"),
    ),
    Case(
        "selection that is not a range",
        lambda s, w: cli(s, "cancel", s.ref, "-id", "3-1"),
        BAD_INPUT,
        ("backwards",),
    ),
    Case(
        "SQL that writes (cancel)",
        lambda s, w: cli(s, "cancel", s.ref, "-request", "DELETE FROM runs"),
        BAD_INPUT,
        ("refused", "read-only SELECT"),
    ),
    Case(
        "SQL that writes (plot, read by the client)",
        lambda s, w: cli(
            s, "plotloss", s.ref, str(w / "p.pdf"), "-request", "UPDATE runs SET status='failed'"
        ),
        BAD_INPUT,
        ("refused", "SELECT"),
    ),
    Case(
        "SQL that never ends",
        lambda s, w: cli(
            s,
            "cancel",
            s.ref,
            "-request",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
        ),
        BAD_INPUT,
        ("took more than", "simpler query"),
    ),
    Case(
        "database file that is not SQLite", not_sqlite, BAD_INPUT, ("not a usable SQLite database",)
    ),
    Case(
        "database of a newer schema version",
        newer_schema,
        BAD_INPUT,
        ("schema version 999", "upgrade Mosaic"),
    ),
    Case(
        "database in a directory that does not exist",
        lambda s, w: cli(s, "run", str(s.cfg), str(w / "missing" / "s.db")),
        BAD_INPUT,
        ("does not exist",),
    ),
    Case(
        "database that does not exist (status)",
        lambda s, w: cli(s, "status", "--db", str(w / "nope.db")),
        BAD_INPUT,
        ("no database at",),
    ),
    Case(
        "run_files_path that is a regular file",
        lambda s, w: cli(s, "run", str(project(w, "c", run_files=str(s.cfg))), s.ref),
        BAD_INPUT,
        ("run_files_path", "not a directory", "nothing was queued"),
    ),
    Case(
        "pause file that is not a pause file",
        lambda s, w: cli(s, "resume", str(s.cfg)),
        BAD_INPUT,
        ("cannot read",),
    ),
    # Mistakes that show only when a run executes: the run fails with the cause, exit code 1.
    # Refused when the config is checked (issue 18): the file is compiled and read, not run.
    Case(
        "class file with a syntax error",
        lambda s, w: cli(s, "run", str(project(w, "c", model=SOURCES["syntax"])), s.ref),
        BAD_INPUT,
        ("model.py:3: SyntaxError", "nothing was queued"),
    ),
    Case(
        "class that is not in its file",
        lambda s, w: cli(
            s, "run", str(project(w, "c", model=MODEL_OK, model_class="nothere")), s.ref
        ),
        BAD_INPUT,
        ("model.py defines no class nothere", "good", "nothing was queued"),
    ),
    Case(
        "model class without forward",
        None,
        FAILED,
        ("lacks required method(s) forward",),
        live=lambda s, w: project(w, "c", model=SOURCES["no_forward"]),
    ),
    Case(
        "data class without prepare",
        None,
        FAILED,
        ("lacks required method(s) prepare",),
        live=lambda s, w: project(w, "c", data=SOURCES["no_prepare"]),
    ),
    Case(
        "prepare returning the wrong shape",
        None,
        FAILED,
        ("must return (train, test)", "DataLoader"),
        live=lambda s, w: project(w, "c", data=SOURCES["one_loader"]),
    ),
    Case(
        "NaN loss",
        None,
        FAILED,
        ("loss is not finite", "epoch 1"),
        live=lambda s, w: project(w, "c", model=SOURCES["nan"], loss="MSELoss"),
    ),
    Case(
        "full disk for run files",
        None,
        FAILED,
        ("No space left on device",),
        live=lambda s, w: project(w, "c", run_files=full_disk(s, w)),
    ),
]


# The mistakes that show only when a run executes cost a fresh worker each (their failures
# recycle it), so they belong to the slow set; the default run keeps the up-front refusals.
@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.live else []) for c in CASES]
)
def test_user_mistake(setup: Setup, case: Case) -> None:
    if case.live is not None:
        result = live_results(setup)[case.name]
    else:
        assert case.run is not None
        where = setup.root / case.dirname
        where.mkdir()
        result = case.run(setup, where)
    text = result.stdout + result.stderr
    assert result.returncode == case.code, text
    for word in case.words:
        assert word in text, f"{word!r} not in:\n{text}"
    if case.code == BAD_INPUT:
        assert "Traceback" not in result.stderr, result.stderr
    setup.check_nothing_lost()
