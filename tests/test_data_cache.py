"""The worker's data-stage cache (mosaicd/training/data_cache.py): cached runs compute the numbers
of uncached ones bit for bit, in memory and on disk; the disk cache survives crashed writers
and keeps its size bound; a full disk that torch's zip writer hides is reported as ENOSPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Daemon, example_config, query

from mosaic_client import contract, protocol, schema
from mosaicd.storage.store import is_disk_full
from mosaicd.training import data_cache, execution
from mosaicd.training.execution import Channel

CLASSES = '''
import random

import numpy
import torch
from torch.utils.data import DataLoader, TensorDataset


class noisy:
    """Draws from torch's, numpy's and Python's global generators while preparing (the run's
    seed set them), and returns shuffling loaders: one drawing its order from torch's global
    generator, one with a generator of its own. Each call appends a line to `calls`."""

    def __init__(self, n, calls):
        self.n, self.calls = n, calls

    def prepare(self, data, run_info, module_info):
        with open(self.calls, "a") as fh:
            fh.write("prepared\\n")
        x = torch.randn(self.n, 3) + float(numpy.random.rand()) + random.random()
        y = (x.sum(dim=1, keepdim=True) > 1.0).float()
        own = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
        split = self.n * 3 // 4
        train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=8, shuffle=True)
        test = DataLoader(
            TensorDataset(x[split:], y[split:]), batch_size=8, shuffle=True, generator=own
        )
        return train, test

    def info(self):
        return {"input_size": 3}


class on_disk(noisy):
    cache_on_disk = True


class never(noisy):
    cacheable = False


class dropout_net(torch.nn.Module):
    """Its initial weights and its dropout draw from torch's generator after preparing."""

    def __init__(self, input_size):
        super().__init__()
        self.layer = torch.nn.Linear(input_size, 8)
        self.out = torch.nn.Linear(8, 1)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, data, run_info, module_info):
        return torch.sigmoid(self.out(self.drop(torch.relu(self.layer(data)))))

    def info(self):
        return {}

    def save_model(self, path):
        torch.save(self.state_dict(), path + ".pt")
'''

NUMBERS = ("train_loss", "test_loss", "train_acc", "test_acc")


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    """Each test starts with the worker's cache empty, as a fresh worker does."""
    data_cache.memory.shrink(0)
    data_cache.stats.__init__()  # type: ignore[misc]
    yield
    data_cache.memory.shrink(0)


@pytest.fixture
def classes(write_classes: Callable[[str], str]) -> str:
    return write_classes(CLASSES)


def make_spec(
    classes: str, files: Path, run_id: int, data: str = "noisy", **cache: Any
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "seed": 11,
        "device": "cpu",
        "run_files_path": str(files / str(run_id)),
        "epochs_target": 3,
        "start_epoch": 0,
        "checkpoint_every": 30.0,
        "max_log_mb": 50.0,
        "umask": None,
        "data_cache": {"data_cache_mb": 64.0, "cache_dir": None, "cache_size_mb": 64.0} | cache,
        "process": schema.process_settings(
            {
                "data_scheme": ["data"],
                "pipeline_scheme": ["model"],
                "lr": 0.05,
                "loss_function": "BCELoss",
                "accuracy": "binary",
            }
        ),
        "modules": [
            {
                "type": "data",
                "class": data,
                "path_to_class": classes,
                "n": 96,
                "calls": str(files / "calls.txt"),
                "key": "data",
                "name": "data",
            },
            {
                "type": "model",
                "class": "dropout_net",
                "path_to_class": classes,
                "key": "m",
                "name": "model",
            },
        ],
    }


def train(spec: dict[str, Any]) -> tuple[list[list[Any]], dict[str, torch.Tensor], str]:
    """The run's per-epoch figures, its saved weights and how its data stages were had."""
    events: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    channel = Channel(
        on_epoch=events.append, park_requested=lambda: False, on_provenance=records.append
    )
    execution.execute(spec, channel)  # type: ignore[arg-type]
    weights = torch.load(
        contract.model_path(spec["run_files_path"], "dropout_net", spec["run_id"]) + ".pt"
    )
    assert not protocol.worker_message_problem(
        {"type": "provenance", "run_id": spec["run_id"], **records[0]}
    )
    return [[e[k] for k in NUMBERS] for e in events], weights, records[0]["data_cache"]["outcome"]


def calls(files: Path) -> int:
    path = files / "calls.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_run_from_the_memory_cache_equals_the_uncached_run_bit_for_bit(
    classes: str, tmp_path: Path
) -> None:
    alone_figures, alone_weights, outcome = train(
        make_spec(classes, tmp_path / "off", 1, data_cache_mb=0.0)
    )
    assert outcome == "off"
    first = train(make_spec(classes, tmp_path, 2))
    second = train(make_spec(classes, tmp_path, 3))
    third = train(make_spec(classes, tmp_path, 4))
    assert [first[2], second[2], third[2]] == ["miss", "memory", "memory"]
    assert calls(tmp_path) == 1  # prepared once, for the first run
    for figures, weights, _ in (first, second, third):
        assert figures == alone_figures
        assert_same_bits(weights, alone_weights)
    assert data_cache.figures()["hits"] == 2 and data_cache.figures()["bytes"] > 0


def test_a_run_from_the_disk_cache_equals_the_uncached_run_bit_for_bit(
    classes: str, tmp_path: Path
) -> None:
    alone_figures, alone_weights, _ = train(
        make_spec(classes, tmp_path / "off", 1, "on_disk", data_cache_mb=0.0)
    )
    disk = {"data_cache_mb": 0.0, "cache_dir": str(tmp_path / "cache")}
    first = train(make_spec(classes, tmp_path, 2, "on_disk", **disk))
    entries = list((tmp_path / "cache").glob("*" + data_cache.ENTRY_SUFFIX))
    assert len(entries) == 1
    # Another worker (its memory cache empty) finds the entry on disk.
    second = train(make_spec(classes, tmp_path, 3, "on_disk", **disk))
    assert [first[2], second[2]] == ["miss", "disk"]
    assert calls(tmp_path) == 1
    for figures, weights, _ in (first, second):
        assert figures == alone_figures
        assert_same_bits(weights, alone_weights)
    assert (tmp_path / "cache").stat().st_mode & 0o077 == 0  # the owner's alone


def test_an_uncacheable_stage_prepares_every_run_and_stages_stay_off_disk_by_default(
    classes: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    outcomes = [
        train(make_spec(classes, tmp_path, run_id, "never", cache_dir=str(cache_dir)))[2]
        for run_id in (1, 2)
    ]
    assert outcomes == ["off", "off"] and calls(tmp_path) == 2
    # A cacheable stage that does not ask for the disk stays in memory only.
    train(make_spec(classes, tmp_path, 3, cache_dir=str(cache_dir)))
    assert not list(cache_dir.glob("*" + data_cache.ENTRY_SUFFIX))


def test_the_key_changes_with_seed_parameters_code_and_device(classes: str, tmp_path: Path) -> None:
    first = make_spec(classes, tmp_path, 1)
    train(first)
    other_seed = make_spec(classes, tmp_path, 2) | {"seed": 12}
    assert train(other_seed)[2] == "miss"
    other_size = make_spec(classes, tmp_path, 3)
    other_size["modules"][0]["n"] = 80
    assert train(other_size)[2] == "miss"
    Path(classes).write_text(CLASSES + "\n# edited\n")
    assert train(make_spec(classes, tmp_path, 4))[2] == "miss"
    assert train(make_spec(classes, tmp_path, 5))[2] == "memory"
    cls = execution.load_user_class(classes, "noisy", 6)
    keys = {
        data_cache.key([cls], first["modules"][:1], first["modules"], {}, 11, device, False)
        for device in ("cpu", "cuda:0")
    }
    assert len(keys) == 2


def test_the_memory_cache_evicts_the_least_recently_used_within_its_budget() -> None:
    cache = data_cache.MemoryCache()
    for name in "abc":
        assert cache.put(name, data_cache._Entry(b"x" * 40), budget=100)
    assert list(cache.entries) == ["b", "c"] and cache.bytes == 80
    assert cache.get("b") is not None  # now the most recently used
    cache.put("d", data_cache._Entry(b"x" * 40), budget=100)
    assert list(cache.entries) == ["b", "d"]
    assert not cache.put("e", data_cache._Entry(b"x" * 101), budget=100)
    assert "e" not in cache.entries and cache.bytes <= 100


def test_the_disk_cache_keeps_its_size_bound_and_the_recently_used(tmp_path: Path) -> None:
    disk = data_cache.DiskCache(str(tmp_path / "c"), budget=1000)
    for index, name in enumerate("abcd"):
        assert disk.put(name, bytes([index]) * 300)
        os.utime(disk.path(name), (1000.0 + index, 1000.0 + index))  # a clear order of use
    assert disk.get("b") == b"\x01" * 300  # read: touched, now the most recent
    assert disk.put("e", b"\x04" * 300)
    left = sorted(p.name[0] for p in (tmp_path / "c").iterdir())
    assert left == ["b", "d", "e"]
    assert sum(p.stat().st_size for p in (tmp_path / "c").iterdir()) <= 1000
    assert not disk.put("f", b"x" * 1001)  # larger than the bound: not kept


WRITER = """
import os, signal, sys
from mosaicd.training import data_cache

real_write = os.write

def write_then_die(fd, data):
    # Half of the entry reaches the file, then the worker is killed.
    real_write(fd, bytes(data[: len(data) // 2]))
    os.kill(os.getpid(), signal.SIGKILL)

os.write = write_then_die
data_cache.DiskCache(sys.argv[1], budget=10**6).put("k", b"y" * 5000)
"""


def test_a_writer_killed_mid_write_leaves_nothing_a_later_run_reads(tmp_path: Path) -> None:
    directory = str(tmp_path / "c")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WRITER), directory],
        cwd=root,
        env=os.environ | {"PYTHONPATH": str(root)},
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL
    left = os.listdir(directory)
    assert len(left) == 1 and left[0].startswith(data_cache.TMP_PREFIX)  # half an entry
    assert os.path.getsize(os.path.join(directory, left[0])) == 2500
    disk = data_cache.DiskCache(directory, budget=10**6)
    assert disk.get("k") is None
    found, outcome = data_cache.lookup("k", data_cache.Settings(memory_mb=0.0, cache_dir=directory))
    assert found is None and outcome == "miss"
    # The next write removes the dead writer's file: it never counts against the bound.
    assert disk.put("other", b"z" * 10)
    assert os.listdir(directory) == ["other" + data_cache.ENTRY_SUFFIX]


def test_an_unreadable_entry_is_a_miss_and_is_removed(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir(mode=0o700)
    (directory / ("k" + data_cache.ENTRY_SUFFIX)).write_bytes(b"not a torch file")
    found, outcome = data_cache.lookup(
        "k", data_cache.Settings(memory_mb=0.0, cache_dir=str(directory))
    )
    assert found is None and outcome == "miss"
    assert not list(directory.iterdir())


def test_a_disk_cache_others_may_write_to_is_not_used(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir()
    directory.chmod(0o777)
    disk = data_cache.DiskCache(str(directory), budget=1000)
    assert not disk.put("k", b"x")
    (directory / ("k" + data_cache.ENTRY_SUFFIX)).write_bytes(b"x")
    assert disk.get("k") is None


def test_a_full_disk_in_torch_s_zip_writer_is_reported_as_enospc(
    write_classes: Callable[[str], str], tmp_path: Path
) -> None:
    # /dev/full refuses every write with ENOSPC, as a full disk does: torch's zip writer then
    # raises "[enforce fail at inline_container.cc:…] unexpected pos …".
    path = write_classes(
        CLASSES.replace(
            'torch.save(self.state_dict(), path + ".pt")',
            'torch.save([self.state_dict(), torch.zeros(1000)], "/dev/full")',
        )
    )
    spec = make_spec(path, tmp_path, 1)
    with pytest.raises(RuntimeError) as raised:
        execution.execute(spec, Channel(on_epoch=lambda e: None, park_requested=lambda: False))  # type: ignore[arg-type]
    assert "unexpected pos" in str(raised.value)
    message = execution.failure_message(raised.value)
    assert "No space left on device" in message and "unexpected pos" in message
    # The daemon's test for a full disk (it parks the run instead of failing it).
    assert is_disk_full(Exception(message))
    # A small file fails at its last flush, with the stream's own words.
    with pytest.raises(RuntimeError) as small:
        torch.save(1, "/dev/full")
    assert is_disk_full(Exception(execution.failure_message(small.value)))
    assert not is_disk_full(Exception(execution.failure_message(RuntimeError("unexpected pos"))))


def test_the_provenance_message_checks_its_data_cache_figures() -> None:
    base = {"type": "provenance", "run_id": 1, "environment": {}, "code": []}
    good = data_cache.figures()
    assert protocol.worker_message_problem(base) is None  # an older worker's
    assert protocol.worker_message_problem(base | {"data_cache": good}) is None
    for bad in (
        good | {"outcome": "maybe"},
        good | {"hits": -1},
        good | {"bytes": True},
        {"outcome": "miss"},
        good | {"extra": 1},
    ):
        assert protocol.worker_message_problem(base | {"data_cache": bad}), bad


def test_through_the_daemon_cached_runs_equal_uncached_ones_and_status_says_hits(
    tmp: Path,
) -> None:
    """Two model families x 2 seeds on one worker: each seed is prepared once, and every run's
    epochs equal those of the same study with the cache off; status and show say so."""
    daemon = Daemon(tmp, workers=1).start()
    try:
        studies = {}
        for name, cache_mb in (("off", 0), ("on", 64)):
            root = tmp / name
            root.mkdir()
            cfg = example_config(
                root,
                epochs=2,
                multiplicity=2,
                nb_processus=1,
                mlp_width="3, 4",
                seed=5,
                extra_monitor=f"ensemble = off\ndata_cache_mb = {cache_mb}",
            )
            db = str(root / "s.db")
            daemon.cli("run", str(cfg), db, check=True)
            assert daemon.wait_for(db)["done"] == 4
            studies[name] = db
            if name == "off":
                off = daemon.request("status")["workers"][0]["data_cache"]
                assert off["hits"] == 0 and off["outcome"] == "off"
        sql = "SELECT r.run_id, r.pipeline, e.epoch, e.train_loss, e.test_loss, e.train_acc "
        sql += "FROM run_epochs e JOIN runs r USING (run_id) ORDER BY 1, 2, 3"
        assert query(studies["on"], sql) == query(studies["off"], sql)
        figures = daemon.request("status")["workers"][0]["data_cache"]
        assert (figures["hits"], figures["misses"]) == (2, 2)
        logs = "".join(p.read_text() for p in (tmp / "on").rglob("output_*.log"))
        assert logs.count("[mosaic] data stages from the data cache (memory)") == 2
        text = daemon.cli("status", check=True).stdout
        assert "data cache 2 hit(s), 2 miss(es)" in text
    finally:
        daemon.stop()


def test_show_says_how_a_running_run_had_its_data() -> None:
    from mosaic_client.commands.show import run_text

    figures = {"outcome": "disk", "hits": 3, "disk_hits": 1, "misses": 2, "entries": 2}
    info = {
        "run_id": 4,
        "status": "running",
        "pipeline": "p",
        "seed": 1,
        "epochs_target": 2,
        "checkpoint_epoch": 0,
        "params": {},
        "events": [],
        "history": [],
        "live": {
            "epoch": 1,
            "worker": "w1",
            "slot": "cpu",
            "pid": 9,
            "data_cache": figures | {"bytes": 3 * 2**20},
        },
    }
    lines = "\n".join(run_text(info))
    assert "data stages: disk (worker w1: data cache 3 hit(s) (1 from disk), 2 miss(es), " in lines
    assert "3 MiB in 2" in lines


OWN_DATASET = '''

class own_dataset(torch.utils.data.Dataset):
    """A Dataset class of the class file: pickle cannot find it again by name once the run's
    module is dropped, so its entries stay in memory, held by reference."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


class own_data(on_disk):
    def prepare(self, data, run_info, module_info):
        train, test = super().prepare(data, run_info, module_info)
        ds = train.dataset
        return DataLoader(own_dataset(*ds.tensors), batch_size=8, shuffle=True,
                          collate_fn=lambda b: torch.utils.data.default_collate(b)), test
'''


def test_data_of_the_class_file_s_own_classes_is_cached_in_memory_only(
    write_classes: Callable[[str], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_classes(CLASSES + OWN_DATASET)
    alone = train(make_spec(path, tmp_path / "off", 1, "own_data", data_cache_mb=0.0))
    cache_dir = tmp_path / "cache"
    first = train(make_spec(path, tmp_path, 2, "own_data", cache_dir=str(cache_dir)))
    # The worker drops the run's user modules between runs (GlobalState.restore).
    while execution.loaded_user_modules:
        sys.modules.pop(execution.loaded_user_modules.pop(), None)
    second = train(make_spec(path, tmp_path, 3, "own_data", cache_dir=str(cache_dir)))
    assert [first[2], second[2]] == ["miss", "memory"]
    assert first[0] == second[0] == alone[0]
    assert_same_bits(second[1], alone[1])
    assert not list(cache_dir.glob("*" + data_cache.ENTRY_SUFFIX))
    note = [line for line in capsys.readouterr().out.splitlines() if "data cache:" in line]
    assert len(note) == 1 and "not written to cache_dir: it refers to" in note[0]
    assert "own_dataset" in note[0] and "<lambda>" in note[0]


def test_data_larger_than_every_budget_is_not_serialized_whole(
    classes: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_spec(classes, tmp_path, 1, data_cache_mb=0.001)  # about 1 KiB
    assert train(spec)[2] == "miss"
    assert "the prepared data is not kept: more than" in capsys.readouterr().out
    assert not data_cache.memory.entries
    assert train(make_spec(classes, tmp_path, 2, data_cache_mb=0.001))[2] == "miss"
    assert calls(tmp_path) == 2


CONCURRENT_WRITER = """
import sys
from mosaicd.training import data_cache

disk = data_cache.DiskCache(sys.argv[1], budget=4000)
for i in range(30):
    disk.put(f"{sys.argv[2]}{i}", bytes([i]) * (100 + 37 * i))
"""


def test_concurrent_writers_keep_whole_entries_within_the_bound(tmp_path: Path) -> None:
    directory = str(tmp_path / "c")
    os.makedirs(directory, mode=0o700)
    root = Path(__file__).resolve().parent.parent
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, directory, prefix],
            cwd=root,
            env=os.environ | {"PYTHONPATH": str(root)},
        )
        for prefix in "ab"
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    names = os.listdir(directory)
    assert names and all(n.endswith(data_cache.ENTRY_SUFFIX) for n in names)
    assert sum(os.path.getsize(os.path.join(directory, n)) for n in names) <= 4000
    disk = data_cache.DiskCache(directory, budget=4000)
    for file_name in names:
        index = int(file_name[1:].split(".")[0])
        assert disk.get(file_name.split(".")[0]) == bytes([index]) * (100 + 37 * index)


def test_a_forked_run_keeps_nothing_in_memory_but_uses_the_disk(
    classes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under --isolation process each run is a forked child: its memory dies with it.
    monkeypatch.setattr(data_cache, "in_forked_run", True)
    outcomes = [train(make_spec(classes, tmp_path, run_id))[2] for run_id in (1, 2)]
    assert outcomes == ["miss", "miss"] and not data_cache.memory.entries
    disk = {"cache_dir": str(tmp_path / "cache")}
    outcomes = [train(make_spec(classes, tmp_path, i, "on_disk", **disk))[2] for i in (3, 4)]
    assert outcomes == ["miss", "disk"] and not data_cache.memory.entries


def test_an_unusable_cache_dir_is_no_cache_and_fails_no_run(classes: str, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    spec = make_spec(classes, tmp_path, 1, "on_disk", data_cache_mb=0.0)
    spec["data_cache"]["cache_dir"] = str(not_a_directory / "cache")
    assert train(spec)[2] == "miss"
    spec = make_spec(classes, tmp_path, 2, "on_disk", data_cache_mb=0.0)
    spec["data_cache"]["cache_dir"] = str(not_a_directory / "cache")
    assert train(spec)[2] == "miss" and calls(tmp_path) == 2


def test_an_ensemble_s_members_hit_the_entries_of_another_family(
    classes: str, tmp_path: Path
) -> None:
    """Ensembles (the default) build each member as its run alone: a second family's group
    finds the seeds the first prepared, and trains to the numbers of a group without cache."""
    from mosaicd.training import ensemble

    def group(first_id: int, family: int, **cache: Any) -> dict[int, list[list[Any]]]:
        specs = []
        for i in range(2):
            spec = make_spec(classes, tmp_path, first_id + i, "on_disk", **cache)
            spec["seed"] = 20 + i
            spec["modules"][1]["family"] = family  # a model parameter the data does not take
            specs.append(spec)
        events: dict[int, list[dict[str, Any]]] = {s["run_id"]: [] for s in specs}
        channels = {
            run_id: ensemble.MemberChannel(on_epoch=got.append, park_requested=lambda: False)
            for run_id, got in events.items()
        }
        outcomes = ensemble.execute_group(specs, channels)  # type: ignore[arg-type]
        assert {o[0] for o in outcomes.values()} == {"done"}, outcomes
        return {s["seed"]: [[e[k] for k in NUMBERS] for e in events[s["run_id"]]] for s in specs}

    alone = group(1, 1, data_cache_mb=0.0)
    first = group(3, 1)
    assert (data_cache.stats.hits, data_cache.stats.misses) == (0, 2)
    second = group(5, 2)
    assert (data_cache.stats.hits, data_cache.stats.misses) == (2, 2)
    assert alone == first == second
