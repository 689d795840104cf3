"""Ensembles (mosaicd/training/ensemble/): the members of a group train to the numbers of the same
runs trained alone, fail, park, resume and cancel alone, and whatever cannot be vmapped falls back
to individual runs. Real torch on tiny data, one thread."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mosaic_client import contract, schema
from mosaicd.training import ensemble, execution
from mosaicd.training.ensemble import batches, stack
from mosaicd.training.ensemble import forward as ensemble_forward
from mosaicd.training.ensemble.members import failed_outcome

ROOT = Path(__file__).resolve().parent.parent
OR_EXAMPLE = ROOT / "examples" / "or_mlp"
REL = 1e-5

CLASSES = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class raw_points:
    """Stage 1 of a two-stage data scheme: points drawn from the run's seeded generator."""

    def __init__(self, n, dims, nan_seed=-1):
        self.n, self.dims, self.nan_seed = n, dims, nan_seed

    def prepare(self, data, run_info, module_info):
        x = torch.randn(self.n, self.dims)
        y = (x.sum(dim=1, keepdim=True) > 0).float()
        return x, y

    def info(self):
        return {"input_size": self.dims, "output_size": 1}


class _Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class split_loader:
    """Stage 2: shuffle, split, and serve through a DataLoader over a custom Dataset."""

    def __init__(self, batch_size):
        self.batch_size = batch_size

    def prepare(self, data, run_info, module_info):
        x, y = data
        perm = torch.randperm(len(x))
        x, y = x[perm], y[perm]
        k = len(x) * 3 // 4
        return (DataLoader(_Pairs(x[:k], y[:k]), batch_size=self.batch_size, shuffle=True),
                DataLoader(_Pairs(x[k:], y[k:]), batch_size=self.batch_size))

    def info(self):
        return {}


class tensor_points(raw_points):
    """One stage: TensorDataset loaders (train shuffled); NaN inputs for one seed."""

    def prepare(self, data, run_info, module_info):
        x, y = super().prepare(data, run_info, module_info)
        k = self.n * 3 // 4
        train_x = x[:k].clone()
        if run_info["seed"] == self.nan_seed:
            train_x[:] = float("nan")
        return (DataLoader(TensorDataset(train_x, y[:k]), batch_size=8, shuffle=True),
                DataLoader(TensorDataset(x[k:], y[k:]), batch_size=8))


class ragged_points(raw_points):
    """Three batches whose size depends on the seed: the members' batches differ in shape."""

    def prepare(self, data, run_info, module_info):
        x, y = super().prepare(data, run_info, module_info)
        n = 24 + run_info["seed"] % 2
        train = list(zip(torch.tensor_split(x[:n], 3), torch.tensor_split(y[:n], 3)))
        return train, [(x[n:n + 8], y[n:n + 8])]


class images:
    """Fixed images, the same for every seed: the members share one batch."""

    def __init__(self, n):
        self.n = n

    def prepare(self, data, run_info, module_info):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 1, 8, 8, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long()
        k = self.n * 3 // 4
        return (DataLoader(TensorDataset(x[:k], y[:k]), batch_size=8),
                DataLoader(TensorDataset(x[k:], y[k:]), batch_size=8))

    def info(self):
        return {"classes": 2}


class Saving(nn.Module):
    def info(self):
        return {}

    def save_model(self, path):
        torch.save(self.state_dict(), path + ".pt")

    def load_model(self, path):
        self.load_state_dict(torch.load(path + ".pt", weights_only=True))


class mlp(Saving):
    def __init__(self, input_size, output_size, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_size, width), nn.Tanh(),
                                 nn.Linear(width, output_size), nn.Sigmoid())

    def forward(self, data, run_info, module_info):
        return self.net(data)


class cnn(Saving):
    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 3 * 3, classes)

    def forward(self, data, run_info, module_info):
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(data)), 2)
        return self.head(h.flatten(1))


class plain_model:
    """Not an nn.Module: a weight tensor and parameters()."""

    def __init__(self, input_size):
        self.w = torch.zeros(input_size, 1, requires_grad=True)

    def parameters(self):
        return [self.w]

    def forward(self, data, run_info, module_info):
        return torch.sigmoid(data @ self.w)

    def info(self):
        return {}


class branchy(mlp):
    def forward(self, data, run_info, module_info):
        if data.sum() > 0:
            return self.net(data)
        return self.net(-data)


class bn_mlp(Saving):
    def __init__(self, input_size, output_size, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_size, width), nn.BatchNorm1d(width),
                                 nn.Linear(width, output_size), nn.Sigmoid())

    def forward(self, data, run_info, module_info):
        return self.net(data)


class dropout_mlp(mlp):
    def __init__(self, input_size, output_size, width):
        super().__init__(input_size, output_size, width)
        self.net.insert(2, nn.Dropout(0.5))


class counting(mlp):
    """Counts its training batches in a buffer, in place."""

    def __init__(self, input_size, output_size, width):
        super().__init__(input_size, output_size, width)
        self.register_buffer("batches", torch.zeros(()))

    def forward(self, data, run_info, module_info):
        if self.training:
            self.batches.add_(1)
        return self.net(data)


class scalar_accuracy(mlp):
    def accuracy(self, y_pred, y):
        return int(((y_pred > 0.5) == (y > 0.5)).sum().item())


class seed_shift(mlp):
    def forward(self, data, run_info, module_info):
        return torch.sigmoid(self.net[:3](data) + 0.1 * run_info["seed"])


class fixed_points(raw_points):
    """The same points for every seed, in order: the members share one batch per step."""

    def prepare(self, data, run_info, module_info):
        x = torch.randn(self.n, self.dims, generator=torch.Generator().manual_seed(0))
        y = (x.sum(dim=1, keepdim=True) > 0).float()
        k = self.n * 3 // 4
        return (DataLoader(TensorDataset(x[:k], y[:k]), batch_size=8),
                DataLoader(TensorDataset(x[k:], y[k:]), batch_size=8))


class mixed_ops(Saving):
    """Every kind of node the batched forward accepts: Linear layers with and without bias,
    activation modules, activation functions and methods, arithmetic with numbers."""

    def __init__(self, input_size, output_size, width):
        super().__init__()
        self.a = nn.Linear(input_size, width)
        self.b = nn.Sequential(nn.LeakyReLU(0.2), nn.Linear(width, width),
                               nn.GELU(approximate="tanh"), nn.Dropout(0.0), nn.Identity(),
                               nn.ReLU(inplace=True))
        self.c = nn.Linear(width, output_size, bias=False)

    def forward(self, data, run_info, module_info):
        h = torch.nn.functional.relu(self.a(data) * 2.0) - 0.5
        h = self.b(1.0 - h.tanh())
        return torch.sigmoid(self.c(h) / 3).relu()


class clamped(mlp):
    """An operation the batched forward does not know."""

    def forward(self, data, run_info, module_info):
        return self.net(data).clamp(0.0, 1.0)


class mode_scaled(mlp):
    """A forward that differs in training and evaluation mode, decided in Python."""

    def forward(self, data, run_info, module_info):
        out = self.net(data)
        return out * 0.5 if self.training else out
'''


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def classes(write_classes: Callable[[str], str]) -> str:
    return write_classes(CLASSES)


def module(name: str, kind: str, path: str, **params: Any) -> dict[str, Any]:
    return {"type": kind, "class": name, "path_to_class": path, "key": name, "name": name, **params}


def make_specs(
    files: Path,
    data: list[dict[str, Any]],
    model: dict[str, Any],
    *,
    n: int = 3,
    epochs: int = 3,
    loss: str = "BCELoss",
    accuracy: str = "binary",
    optimizer: str = "Adam",
    lr: float = 0.05,
) -> list[dict[str, Any]]:
    return [
        {
            "run_id": 10 + i,
            "seed": i,
            "device": "cpu",
            "run_files_path": str(files),
            "epochs_target": epochs,
            "start_epoch": 0,
            "checkpoint_every": 30.0,
            "max_log_mb": 50.0,
            "umask": None,
            # Resolved as the daemon's dispatch does (mosaic_client.schema.process_settings).
            "process": schema.process_settings(
                {
                    "data_scheme": [d["type"] for d in data],
                    "pipeline_scheme": [model["type"]],
                    "lr": lr,
                    "loss_function": loss,
                    "accuracy": accuracy,
                    "optimizer": optimizer,
                }
            ),
            "modules": [*copy.deepcopy(data), copy.deepcopy(model)],
        }
        for i in range(n)
    ]


def or_specs(files: Path, **kw: Any) -> list[dict[str, Any]]:
    data = module(
        "dataset_OR",
        "dataset",
        str(OR_EXAMPLE / "dataset.py"),
        data_size=120,
        train_prop=0.8,
        batch_size=20,
    )
    model = module("mlp_funnel", "mlp", str(OR_EXAMPLE / "mlp.py"), length=2, width=4)
    return make_specs(files, [data], model, **kw)


def two_stage_specs(classes: str, files: Path, **kw: Any) -> list[dict[str, Any]]:
    return make_specs(
        files,
        [
            module("raw_points", "raw", classes, n=48, dims=3),
            module("split_loader", "split", classes, batch_size=8),
        ],
        module("mlp", "model", classes, width=5),
        **kw,
    )


def points_specs(
    classes: str,
    files: Path,
    model: str = "mlp",
    **kw: Any,
) -> list[dict[str, Any]]:
    data_params = {"nan_seed": kw.pop("nan_seed")} if "nan_seed" in kw else {}
    return make_specs(
        files,
        [module(kw.pop("data", "tensor_points"), "data", classes, n=48, dims=3, **data_params)],
        module(model, "model", classes, width=5),
        **kw,
    )


class Recorder:
    """One run's channel: records its epoch messages, parks/cancels after chosen epochs."""

    def __init__(self, park_after: int | None = None, cancel_after: int | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.park_after = park_after
        self.cancel_after = cancel_after

    def _at(self, epoch: int | None) -> Callable[[], bool]:
        return lambda: epoch is not None and len(self.events) + 1 >= epoch

    def channel(self) -> ensemble.MemberChannel:
        return ensemble.MemberChannel(
            on_epoch=self.events.append,
            park_requested=self._at(self.park_after),
            cancel_requested=self._at(self.cancel_after),
        )


def run_group(
    specs: list[dict[str, Any]],
    recorders: dict[int, Recorder] | None = None,
) -> tuple[dict[int, ensemble.Outcome], dict[int, list[dict[str, Any]]]]:
    recorders = recorders or {}
    for spec in specs:
        recorders.setdefault(int(spec["run_id"]), Recorder())
    outcomes = ensemble.execute_group(specs, {k: r.channel() for k, r in recorders.items()})
    return outcomes, {k: r.events for k, r in recorders.items()}


def run_individually(
    specs: list[dict[str, Any]], channels: dict[int, execution.Channel]
) -> Iterator[tuple[int, ensemble.Outcome]]:
    """The fallback path: each spec through execution.execute, as the worker's run_one does
    (without its logs and isolation)."""
    for spec in specs:
        run_id = int(spec["run_id"])
        try:
            yield run_id, ("done", execution.execute(spec, channels[run_id]))
        except execution.Parked as parked:
            yield run_id, ("parked", {"epoch": parked.epoch})
        except Exception as exc:
            yield run_id, failed_outcome(exc)


def run_alone(spec: dict[str, Any], files: Path) -> list[dict[str, Any]]:
    spec = dict(spec, run_files_path=str(files))
    recorder = Recorder()
    execution.execute(spec, recorder.channel())
    return recorder.events


FIGURES = ("train_loss", "test_loss", "train_acc", "test_acc")


def assert_same_epochs(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [e["epoch"] for e in got] == [e["epoch"] for e in want]
    for a, b in zip(got, want):
        for key in FIGURES:
            if b[key] is None:
                assert a[key] is None
            else:
                assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-7), (a["epoch"], key)


def assert_models_alike(spec: dict[str, Any], files_a: Path, files_b: Path, cls: str) -> None:
    """The model saved by the group and the one saved alone load into the run's model class
    and predict the same on the run's test data (and not what the untrained model predicts)."""
    run_id = int(spec["run_id"])
    run = execution.build(spec)
    model = run.models[-1]
    model.eval()
    x = next(iter(run.test_data))[0]
    with torch.no_grad():
        untrained = model(x, run.run_info, run.model_infos[-1])
        predictions = []
        for files in (files_a, files_b):
            model.load_model(contract.model_path(str(files), cls, run_id))
            predictions.append(model(x, run.run_info, run.model_infos[-1]))
    assert torch.allclose(predictions[0], predictions[1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(predictions[0], untrained, rtol=1e-4, atol=1e-6)


def check_equivalence(specs: list[dict[str, Any]], tmp_path: Path, cls: str) -> None:
    outcomes, events = run_group(specs)
    assert {k: v[0] for k, v in outcomes.items()} == {s["run_id"]: "done" for s in specs}
    alone_dir = tmp_path / "alone"
    for spec in specs:
        run_id = int(spec["run_id"])
        alone = run_alone(spec, alone_dir)
        assert len(alone) == spec["epochs_target"]
        assert_same_epochs(events[run_id], alone)
        assert_models_alike(spec, Path(spec["run_files_path"]), alone_dir, cls)
        history = torch.load(contract.history_path(spec["run_files_path"], run_id))
        assert history["test_loss"] == [e["test_loss"] for e in events[run_id]]
        assert outcomes[run_id][1]["results"]["epochs"] == spec["epochs_target"]
        log = Path(contract.run_log_path(spec["run_files_path"], run_id)).read_text()
        ids = [int(s["run_id"]) for s in specs]
        assert f"[mosaic] run {run_id} trains in an ensemble with runs {ids}" in log
    # The members are different runs: their seeds gave them different numbers.
    assert len({events[int(s["run_id"])][-1]["train_loss"] for s in specs}) == len(specs)


@pytest.mark.parametrize("gather", ["per pass", "per step"])
def test_or_example_members_equal_their_runs_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gather: str
) -> None:
    if gather == "per step":  # as for data above batches.PASS_GATHER_MAX_BYTES
        monkeypatch.setattr(batches, "PASS_GATHER_MAX_BYTES", 0)
    check_equivalence(or_specs(tmp_path / "group"), tmp_path, "mlp_funnel")


def record_sharing(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each step of the group ran on one shared batch or on stacked batches."""
    shared: list[bool] = []
    steps = batches.steps

    def recording(*args: Any) -> Iterator[Any]:
        for step in steps(*args):
            shared.append(step[2])
            yield step

    monkeypatch.setattr(batches, "steps", recording)
    return shared


def test_two_stage_data_members_equal_their_runs_alone(
    classes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = record_sharing(monkeypatch)
    check_equivalence(two_stage_specs(classes, tmp_path / "group"), tmp_path, "mlp")
    assert shared and not any(shared)  # each member's own data: stacked batches


@pytest.mark.parametrize("gather", ["per pass", "per step"])
def test_cnn_members_share_one_batch_and_equal_their_runs_alone(
    classes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gather: str
) -> None:
    if gather == "per step":  # as for data above batches.PASS_GATHER_MAX_BYTES
        monkeypatch.setattr(batches, "PASS_GATHER_MAX_BYTES", 0)
    shared = record_sharing(monkeypatch)
    specs = make_specs(
        tmp_path / "group",
        [module("images", "data", classes, n=64)],
        module("cnn", "model", classes),
        loss="CrossEntropyLoss",
        accuracy="argmax",
    )
    check_equivalence(specs, tmp_path, "cnn")
    assert shared and all(shared)  # the same images for every seed: one shared batch


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD", "RMSprop"])
def test_weight_decay_and_other_optimizers_are_elementwise(
    classes: str, tmp_path: Path, optimizer: str
) -> None:
    check_equivalence(
        points_specs(classes, tmp_path / "group", optimizer=optimizer), tmp_path, "mlp"
    )


def test_a_member_with_a_nan_loss_fails_alone(classes: str, tmp_path: Path) -> None:
    specs = points_specs(classes, tmp_path / "group", nan_seed=1, loss="MSELoss")
    outcomes, events = run_group(specs)
    assert outcomes[11][0] == "failed"
    assert "loss is not finite at epoch 1" in outcomes[11][1]["error"]
    assert events[11] == []
    for run_id in (10, 12):
        assert outcomes[run_id][0] == "done"
        assert_same_epochs(events[run_id], run_alone(specs[run_id - 10], tmp_path / "alone"))


@pytest.mark.parametrize("model", ["mlp", "dropout_mlp"])
def test_dropout_draws_an_independent_stream_per_member(
    classes: str, tmp_path: Path, model: str
) -> None:
    # Two members with the same seed: same weights, same data; only their randomness differs.
    specs = [dict(s, seed=0) for s in points_specs(classes, tmp_path / "a", model=model, n=2)]
    _, events = run_group(specs)
    _, again = run_group([dict(s, run_files_path=str(tmp_path / "b")) for s in specs])
    for run_id in events:  # a group is reproducible, randomness included
        assert [[e[k] for k in FIGURES] for e in events[run_id]] == [
            [e[k] for k in FIGURES] for e in again[run_id]
        ]
    # Without dropout the two members agree up to float rounding: the batched kernels may sum
    # two slices of one stacked tensor in another order (seen on AMD EPYC: 1e-7 relative).
    same = [
        math.isclose(events[10][-1][k], events[11][-1][k], rel_tol=1e-5)
        for k in ("train_loss", "test_loss")
    ]
    assert same == ([True, True] if model == "mlp" else [False, False])


def test_park_and_resume_of_a_group_gives_the_uninterrupted_numbers(
    classes: str, tmp_path: Path
) -> None:
    straight = two_stage_specs(classes, tmp_path / "straight", epochs=4)
    _, want = run_group(straight)
    specs = two_stage_specs(classes, tmp_path / "parked", epochs=4)
    # The whole group parks after epoch 2, except run 12, which parks after epoch 1.
    recorders = {10: Recorder(park_after=2), 11: Recorder(park_after=2), 12: Recorder(park_after=1)}
    outcomes, first = run_group(specs, recorders)
    assert outcomes == {
        10: ("parked", {"epoch": 2}),
        11: ("parked", {"epoch": 2}),
        12: ("parked", {"epoch": 1}),
    }
    # 10 and 11 resume together from their checkpoints; 12 resumes alone (same files).
    resumed = [dict(s, start_epoch=2) for s in specs[:2]]
    outcomes, second = run_group(resumed)
    assert {k: v[0] for k, v in outcomes.items()} == {10: "done", 11: "done"}
    alone = Recorder()
    execution.execute(dict(specs[2], start_epoch=1), alone.channel())
    for run_id in (10, 11):
        assert_same_epochs(first[run_id] + second[run_id], want[run_id])
    assert_same_epochs(first[12] + alone.events, want[12])


def test_a_rerun_for_more_epochs_resends_what_the_database_missed(
    classes: str, tmp_path: Path
) -> None:
    _, want = run_group(or_specs(tmp_path / "straight", epochs=4))
    specs = or_specs(tmp_path / "rerun", epochs=2)
    run_group(specs)
    # The daemon stored only epoch 1 (a kill between the checkpoint and the database write),
    # then asks for 4 epochs: each member sends epoch 2 again, then trains 3 and 4.
    outcomes, got = run_group([dict(s, epochs_target=4, start_epoch=1) for s in specs])
    for run_id in (10, 11, 12):
        assert outcomes[run_id][0] == "done"
        assert outcomes[run_id][1]["results"]["epochs"] == 4
        assert_same_epochs(got[run_id], want[run_id][1:])
        assert [e["checkpointed"] for e in got[run_id]] == [True, False, True]


def test_cancelling_a_member_leaves_the_others_unchanged(classes: str, tmp_path: Path) -> None:
    _, want = run_group(or_specs(tmp_path / "straight"))
    outcomes, got = run_group(or_specs(tmp_path / "cancel"), {11: Recorder(cancel_after=1)})
    assert outcomes[11] == ("cancelled", {"epoch": 1})
    assert len(got[11]) == 1
    for run_id in (10, 12):
        assert outcomes[run_id][0] == "done"
        assert_same_epochs(got[run_id], want[run_id])


def test_group_keys_ignore_only_run_id_seed_and_device(tmp_path: Path) -> None:
    specs = or_specs(tmp_path)
    keys = {ensemble.group_key(dict(s, device=f"cuda:{i}")) for i, s in enumerate(specs)}
    assert len(keys) == 1 and None not in keys
    wider = dict(copy.deepcopy(specs[0]), run_id=99)
    wider["modules"][1]["width"] = 3
    assert ensemble.group_key(wider) not in keys
    assert ensemble.group_key(dict(specs[0], start_epoch=2)) not in keys
    lbfgs = dict(copy.deepcopy(specs[0]), run_id=98)
    lbfgs["process"]["optimizer"] = "LBFGS"
    assert ensemble.group_key(lbfgs) is None
    assert ensemble.fallback_reason(specs) is None
    assert ensemble.fallback_reason(specs[:1]) == "a group needs at least two members"
    assert "not repetitions of one pipeline" in ensemble.fallback_reason([specs[0], wider])
    assert "LBFGS is not elementwise" in ensemble.fallback_reason([lbfgs, specs[1]])


def fallback_specs(classes: str, files: Path, case: str) -> list[dict[str, Any]]:
    if case == "not_module":
        return points_specs(classes, files, model="plain_model")
    if case == "control_flow":
        return points_specs(classes, files, model="branchy")
    if case == "batchnorm":
        return points_specs(classes, files, model="bn_mlp")
    if case == "buffer":
        return points_specs(classes, files, model="counting")
    if case == "ragged":
        return points_specs(classes, files, data="ragged_points")
    if case == "optimizer":
        return points_specs(classes, files, optimizer="ASGD")
    if case == "accuracy":
        return points_specs(classes, files, model="scalar_accuracy")
    if case == "run_info":
        return points_specs(classes, files, model="seed_shift")
    raise AssertionError(case)


FALLBACKS = {
    "not_module": "model plain_model (section [plain_model]) is not a torch.nn.Module",
    "control_flow": "data-dependent control flow cannot be vmapped",
    "batchnorm": "in-place buffer updates: BatchNorm1d in bn_mlp updates its running "
    "statistics in training mode",
    "buffer": "in-place buffer updates: a module changes its buffers while training",
    "ragged": "the members' batches differ in shape or structure",
    "optimizer": "optimizer ASGD is not elementwise",
    "accuracy": "the accuracy cannot take stacked outputs",
    "run_info": "the vmapped model does not reproduce run 11's outputs",
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_what_cannot_be_vmapped_falls_back_to_individual_runs(
    classes: str, tmp_path: Path, case: str
) -> None:
    files = tmp_path / "group"
    specs = fallback_specs(classes, files, case)
    recorders = {int(s["run_id"]): Recorder() for s in specs}
    with pytest.raises(ensemble.Fallback) as caught:
        ensemble.execute_group(specs, {k: r.channel() for k, r in recorders.items()})
    assert FALLBACKS[case] in caught.value.reason
    # Nothing reached the daemon nor the run files, but the reason in each run's log.
    assert all(r.events == [] for r in recorders.values())
    for spec in specs:
        run_id = int(spec["run_id"])
        assert not Path(contract.checkpoint_path(str(files), run_id)).exists()
        log = Path(contract.run_log_path(str(files), run_id)).read_text()
        assert FALLBACKS[case] in log and "the run trains individually" in log
        assert "trains in an ensemble" not in log
    # The caller then trains them one by one, as without ensembles: they finish.
    outcomes = dict(run_individually(specs, {k: r.channel() for k, r in recorders.items()}))
    for spec in specs:
        run_id = int(spec["run_id"])
        assert outcomes[run_id][0] == "done", outcomes[run_id]
        assert [e["epoch"] for e in recorders[run_id].events] == [1, 2, 3]
        assert_same_epochs(recorders[run_id].events, run_alone(spec, tmp_path / "alone"))


def test_models_above_the_auto_size_fall_back(classes: str, tmp_path: Path) -> None:
    specs = points_specs(classes, tmp_path / "group", n=2)  # 3*5+5 + 5+1 = 26 parameters
    with pytest.raises(
        ensemble.Fallback,
        match=r"too large to gain from an ensemble \(26 "
        r"trainable parameters per member, more than 25",
    ):
        ensemble.execute_group(
            specs, {10: Recorder().channel(), 11: Recorder().channel()}, max_params=25
        )
    outcomes, _ = run_group(specs)  # the default limit (AUTO_MAX_PARAMS) lets them group
    assert {k: v[0] for k, v in outcomes.items()} == {10: "done", 11: "done"}


def test_members_resuming_from_different_epochs_fall_back(classes: str, tmp_path: Path) -> None:
    specs = points_specs(classes, tmp_path / "group", n=2, epochs=3)
    outcomes, _ = run_group(specs, {10: Recorder(park_after=1), 11: Recorder(park_after=2)})
    assert outcomes == {10: ("parked", {"epoch": 1}), 11: ("parked", {"epoch": 2})}
    resumed = [dict(s, start_epoch=1) for s in specs]
    with pytest.raises(ensemble.Fallback, match=r"resume from different epochs \(\[1, 2\]\)"):
        run_group(resumed)


def test_the_monitor_keys_default_to_auto_and_the_benchmarked_size() -> None:
    from mosaic_client import schema

    assert schema.value(schema.MONITOR, {}, "ensemble") == "auto"
    assert schema.value(schema.MONITOR, {}, "ensemble_max") == 16
    assert (
        schema.section_problem(schema.MONITOR, {"ensemble": "off", "ensemble_max": 4}, False)
        is None
    )
    wrong_mode = schema.section_problem(schema.MONITOR, {"ensemble": "on"}, False)
    assert wrong_mode is not None and "MONITOR ensemble" in wrong_mode
    assert "auto, off" in wrong_mode and "'on'" in wrong_mode
    too_small = schema.section_problem(schema.MONITOR, {"ensemble_max": 0}, False)
    assert too_small is not None and "MONITOR ensemble_max" in too_small
    assert "at least 1" in too_small


ACCURACY_SHAPES = [
    # (mode, one member's output shape, one member's target shape, counted without vmap)
    ("binary", (6, 1), (6, 1), True),
    ("binary", (6,), (6, 1), True),  # alone: the target is reshaped to the output's shape
    ("logits", (6, 2), (6, 2), True),
    ("argmax", (6, 3), (6,), True),  # class indices
    ("argmax", (6, 3), (6, 3), True),  # one-hot targets
    ("argmax", (6, 3, 4), (6, 4), True),  # a class per position
    ("argmax", (6, 3, 6), (6,), False),  # alone broadcasts (6, 6) against (6,): vmap does it
]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(("mode", "out_shape", "y_shape", "direct"), ACCURACY_SHAPES)
def test_built_in_accuracy_on_stacked_outputs_counts_as_each_member_alone(
    mode: str, out_shape: tuple[int, ...], y_shape: tuple[int, ...], direct: bool, shared: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    members = 4
    out = torch.randn(members, *out_shape, generator=generator)
    if mode == "argmax" and len(y_shape) == len(out_shape) - 1:
        y = torch.randint(0, out_shape[1], (members, *y_shape), generator=generator)
    else:
        y = (torch.rand(members, *y_shape, generator=generator) > 0.5).float()
    if shared:
        y = y[:1].expand(members, *y_shape)
    alone = [execution.correct_count(mode, out[i], y[i]) for i in range(members)]
    stacked = stack._stacked_correct(mode, out, y[0] if shared else y, shared)
    if not direct:
        assert stacked is None
        return
    assert stacked is not None
    assert stacked.tolist() == [int(a) for a in alone]
    # The members differ: the counts are not all one number by construction.
    assert len({int(a) for a in alone}) > 1 or shared and mode != "argmax"


def test_a_member_checkpoint_keeps_the_optimizer_flags_of_a_run_alone(
    classes: str, tmp_path: Path
) -> None:
    # The stacked optimizer takes torch's fused or foreach path; each member's checkpoint must
    # still hold its own optimizer's settings, so that it resumes alone as a run alone would.
    for optimizer in ("Adam", "RMSprop"):
        specs = points_specs(classes, tmp_path / optimizer, n=2, epochs=1, optimizer=optimizer)
        outcomes, _ = run_group(specs)
        assert {k: v[0] for k, v in outcomes.items()} == {10: "done", 11: "done"}
        alone = execution.build(specs[0]).optimizer.param_groups[0]
        for spec in specs:
            path = contract.checkpoint_path(str(spec["run_files_path"]), int(spec["run_id"]))
            group = torch.load(path, weights_only=False)["optimizer"]["param_groups"][0]
            del group["params"]
            assert group == {k: v for k, v in alone.items() if k != "params"}


def test_members_record_the_code_and_git_state_of_a_run_alone_asking_git_once(
    classes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from mosaic_client import provenance

    repo = Path(classes).parent
    for args in (["init", "-q"], ["add", "classes.py"], ["commit", "-q", "-m", "classes"]):
        subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True,
        )
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    asked: list[str] = []
    real_git_state = provenance.git_state

    def counting_git_state(directory: str) -> tuple[str | None, bool | None]:
        asked.append(directory)
        return real_git_state(directory)

    monkeypatch.setattr(provenance, "git_state", counting_git_state)
    specs = points_specs(classes, tmp_path / "group", epochs=1)
    recorded: dict[int, dict[str, Any]] = {}
    channels = {}
    for spec in specs:
        run_id = int(spec["run_id"])
        channel = Recorder().channel()
        channel.on_provenance = lambda fields, run_id=run_id: recorded.__setitem__(run_id, fields)
        channels[run_id] = channel
    outcomes = ensemble.execute_group(specs, channels)
    assert {k: v[0] for k, v in outcomes.items()} == {10: "done", 11: "done", 12: "done"}
    # Three members built from one class file, at the same moment: git answered once for them.
    assert asked == [str(repo)]
    alone: list[dict[str, Any]] = []
    channel = Recorder().channel()
    channel.on_provenance = alone.append
    execution.execute(dict(specs[0], run_files_path=str(tmp_path / "alone")), channel)
    for run_id in (10, 11, 12):
        assert recorded[run_id]["code"] == alone[0]["code"]
    assert [(e["git_commit"], e["git_dirty"]) for e in alone[0]["code"]] == [(head, False)] * 2


# -- the batched forward (issue 19): batched matrix products instead of vmap, where provably the
# same computation.


def forward_line(spec: dict[str, Any]) -> str:
    log = Path(contract.run_log_path(spec["run_files_path"], int(spec["run_id"]))).read_text()
    lines = [line for line in log.splitlines() if line.startswith("[mosaic] ensemble forward:")]
    assert len(lines) == 1, log  # decided once for the group
    return lines[0]


def count_batched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many steps (probe included) ran the batched forward."""
    calls = [0]
    forward = ensemble_forward.Batched.forward

    def counting(self: Any, *args: Any) -> Any:
        calls[0] += 1
        return forward(self, *args)

    monkeypatch.setattr(ensemble_forward.Batched, "forward", counting)
    return calls


@pytest.mark.parametrize("case", ["or_example", "tiny_mlp", "mixed_ops", "shared_mse"])
def test_linear_and_elementwise_pipelines_take_the_batched_forward_and_equal_their_runs_alone(
    classes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    calls = count_batched(monkeypatch)
    shared = record_sharing(monkeypatch)
    files = tmp_path / "group"
    if case == "or_example":
        specs, cls = or_specs(files), "mlp_funnel"
    elif case == "tiny_mlp":
        specs, cls = points_specs(classes, files), "mlp"
    elif case == "mixed_ops":
        specs, cls = points_specs(classes, files, model="mixed_ops"), "mixed_ops"
    else:  # the same points for every seed (one shared batch per step), another loss
        specs = points_specs(classes, files, data="fixed_points", loss="MSELoss")
        cls = "mlp"
    check_equivalence(specs, tmp_path, cls)  # per-epoch figures within 1e-5 of each run alone
    for spec in specs:
        assert forward_line(spec) == "[mosaic] ensemble forward: batched matmul"
    # The probe and the two passes of every epoch, all through the batched forward.
    assert calls[0] >= 1 + 2 * specs[0]["epochs_target"]
    assert shared and all(shared) == (case == "shared_mse")


NOT_BATCHED = {
    "cnn": "model cnn: Conv2d is not one of the batched layers",
    "dropout_mlp": "model dropout_mlp: Dropout draws random masks",
    "clamped": "model clamped: call_method clamp is not one of the batched operations",
    "mode_scaled": "model mode_scaled: its forward differs in training and evaluation mode",
}


def not_batched_specs(classes: str, files: Path, model: str) -> list[dict[str, Any]]:
    if model == "cnn":
        return make_specs(
            files,
            [module("images", "data", classes, n=64)],
            module("cnn", "model", classes),
            loss="CrossEntropyLoss",
            accuracy="argmax",
        )
    return points_specs(classes, files, model=model)


@pytest.mark.parametrize("model", sorted(NOT_BATCHED))
def test_other_pipelines_keep_vmap_with_the_numbers_it_gave_before(
    classes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    calls = count_batched(monkeypatch)
    specs = not_batched_specs(classes, tmp_path / "group", model)
    outcomes, events = run_group(specs)
    assert {k: v[0] for k, v in outcomes.items()} == {s["run_id"]: "done" for s in specs}
    assert calls == [0]
    for spec in specs:
        assert forward_line(spec) == f"[mosaic] ensemble forward: vmap ({NOT_BATCHED[model]})"
    # The vmap path as it was before the batched forward existed: the same numbers, bit for bit.
    monkeypatch.setattr(ensemble_forward, "batched_forward", lambda bases: (None, "switched off"))
    before = [dict(s, run_files_path=str(tmp_path / "before")) for s in specs]
    _, again = run_group(before)
    for run_id in events:
        assert [[e[k] for k in FIGURES] for e in events[run_id]] == [
            [e[k] for k in FIGURES] for e in again[run_id]
        ]
    if model != "dropout_mlp":  # dropout: a member's masks are not those of the run alone
        for spec in specs:
            alone = run_alone(spec, tmp_path / "alone")
            assert_same_epochs(events[int(spec["run_id"])], alone)


def test_a_batched_forward_that_differs_from_the_members_falls_back_to_vmap_not_to_runs(
    classes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    linear = ensemble_forward._stacked_linear
    # A wrong batched Linear layer (as a bug would give): the probe must catch it.
    monkeypatch.setattr(ensemble_forward, "_stacked_linear", lambda *args: linear(*args) * 1.01)
    specs = points_specs(classes, tmp_path / "group")
    outcomes, events = run_group(specs)
    assert {k: v[0] for k, v in outcomes.items()} == {10: "done", 11: "done", 12: "done"}
    for spec in specs:
        assert forward_line(spec) == (
            "[mosaic] ensemble forward: vmap (the batched forward does not reproduce "
            "run 10's outputs)"
        )
        assert_same_epochs(events[int(spec["run_id"])], run_alone(spec, tmp_path / "alone"))


LOSSES = [
    # (criterion, one member's output shape, target: "binary", "real", "classes", "probs")
    (torch.nn.MSELoss(), (6, 2), "real"),
    (torch.nn.L1Loss(), (6,), "real"),
    (torch.nn.BCELoss(), (6, 1), "binary"),
    (torch.nn.BCEWithLogitsLoss(), (6, 3), "binary"),
    (torch.nn.CrossEntropyLoss(), (6, 4), "classes"),
    (torch.nn.CrossEntropyLoss(ignore_index=1), (6, 4), "classes"),
    (torch.nn.CrossEntropyLoss(), (6, 4), "probs"),
]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(("criterion", "out_shape", "target"), LOSSES)
def test_per_member_losses_on_stacked_outputs_equal_each_member_alone(
    criterion: torch.nn.Module, out_shape: tuple[int, ...], target: str, shared: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    members = 4
    out = torch.randn(members, *out_shape, generator=generator)
    if isinstance(criterion, torch.nn.BCELoss):
        out = torch.sigmoid(out)
    if target == "classes":
        y = torch.randint(0, out_shape[1], (members, out_shape[0]), generator=generator)
    elif target == "probs":
        y = torch.softmax(torch.randn(members, *out_shape, generator=generator), dim=-1)
    elif target == "binary":
        y = (torch.rand(members, *out_shape, generator=generator) > 0.5).float()
    else:
        y = torch.randn(members, *out_shape, generator=generator)
    if shared:
        y = y[:1].expand(members, *y.shape[1:])
    alone = torch.stack([criterion(out[i], y[i]) for i in range(members)])
    loss = ensemble_forward.member_loss(criterion)
    assert loss is not None
    stacked = loss(out, y[0] if shared else y, shared)
    assert stacked is not None
    assert torch.allclose(stacked, alone, rtol=1e-6, atol=0)
    assert len(set(alone.tolist())) > 1 or shared and target != "classes"


def test_losses_with_weights_or_broadcast_targets_are_left_to_vmap() -> None:
    assert ensemble_forward.member_loss(torch.nn.MSELoss(reduction="sum")) is None
    assert ensemble_forward.member_loss(torch.nn.BCELoss(weight=torch.ones(1))) is None
    assert (
        ensemble_forward.member_loss(torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(1))) is None
    )
    assert ensemble_forward.member_loss(torch.nn.CrossEntropyLoss(label_smoothing=0.1)) is None
    assert ensemble_forward.member_loss(torch.nn.HuberLoss()) is None
    mse = ensemble_forward.member_loss(torch.nn.MSELoss())
    assert mse is not None
    # Alone, a (6, 1) output against a (6,) target broadcasts to (6, 6): vmap reproduces that.
    assert mse(torch.zeros(4, 6, 1), torch.zeros(4, 6), False) is None


def test_a_deterministic_group_trains_its_members_alone(classes: str, tmp_path: Path) -> None:
    # The client turns ensembles off for deterministic = true; a group made by hand falls back,
    # since a member equals its run alone within float rounding only.
    specs = points_specs(classes, tmp_path / "group", n=2)
    for spec in specs:
        spec["process"] = dict(spec["process"], deterministic=True)
    with pytest.raises(ensemble.Fallback, match="deterministic = true: every run trains alone"):
        ensemble.execute_group(specs, {10: Recorder().channel(), 11: Recorder().channel()})
