"""The steps of a run inside a worker (mosaicd/training/execution.py), on real torch and tiny
data."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mosaic_client import contract, schema
from mosaicd.training import epochs, execution
from mosaicd.training.execution import BuiltRun, Channel, History, UserCodeError

CLASSES = '''
import torch


class points:
    """n points in `dims` dimensions, labelled by the sign of their sum; batches of 8."""

    def __init__(self, n, dims):
        self.n, self.dims = n, dims

    def prepare(self, data, run_info, module_info):
        g = torch.Generator().manual_seed(run_info["seed"])
        x = torch.randn(self.n, self.dims, generator=g)
        y = (x.sum(dim=1, keepdim=True) > 0).float()
        split = self.n * 3 // 4
        return ([(x[i:i + 8], y[i:i + 8]) for i in range(0, split, 8)],
                [(x[i:i + 8], y[i:i + 8]) for i in range(split, self.n, 8)])

    def info(self):
        return {"input_size": self.dims, "output_size": 1}


class one_set(points):
    def prepare(self, data, run_info, module_info):
        return super().prepare(data, run_info, module_info)[0]


class nan_points(points):
    def prepare(self, data, run_info, module_info):
        train, test = super().prepare(data, run_info, module_info)
        return [(torch.full_like(x, float("nan")), y) for x, y in train], test


class linear(torch.nn.Module):
    def __init__(self, input_size, output_size, n):
        super().__init__()
        self.n_seen = n  # from the data section: parameters are looked up across sections
        self.layer = torch.nn.Linear(input_size, output_size)

    def forward(self, data, run_info, module_info):
        return torch.sigmoid(self.layer(data))

    def info(self):
        return {"hidden": 0}

    def save_model(self, path):
        torch.save(self.state_dict(), path + ".pt")

    def load_model(self, path):
        self.load_state_dict(torch.load(path + ".pt", weights_only=True))


class frozen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, data, run_info, module_info):
        return data[:, :1] * self.scale

    def info(self):
        return {}
'''


@pytest.fixture
def classes(write_classes: Callable[[str], str]) -> str:
    return write_classes(CLASSES)


def make_spec(
    classes: str,
    files: Path,
    *,
    data: str = "points",
    model: str = "linear",
    epochs: int = 2,
    **process: Any,
) -> dict[str, Any]:
    """A RunSpec as the daemon's dispatch makes it: its PROCESS resolved by the schema (the
    keys given here, the defaults for the others)."""
    return {
        "run_id": 7,
        "seed": 3,
        "device": "cpu",
        "run_files_path": str(files),
        "epochs_target": epochs,
        "start_epoch": 0,
        "checkpoint_every": 30.0,
        "max_log_mb": 50.0,
        "umask": None,
        "process": schema.process_settings(
            {
                "data_scheme": ["data"],
                "pipeline_scheme": ["model"],
                "lr": 0.05,
                "loss_function": "BCELoss",
                "accuracy": "binary",
                **process,
            }
        ),
        "modules": [
            {
                "type": "data",
                "class": data,
                "path_to_class": classes,
                "n": 64,
                "dims": 3,
                "key": "data",
                "name": "data",
            },
            {
                "type": "model",
                "class": model,
                "path_to_class": classes,
                "key": "m",
                "name": "model",
            },
        ],
    }


class Recorder:
    """A channel that records the epoch messages and asks to park after chosen epochs."""

    def __init__(self, park_after: int | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.park_after = park_after

    def channel(self) -> Channel:
        return Channel(
            on_epoch=self.events.append,
            park_requested=lambda: (
                self.park_after is not None and len(self.events) + 1 >= self.park_after
            ),
        )


def test_module_params_leave_out_the_module_fields() -> None:
    module = {name: "x" for name in contract.MODULE_FIELDS} | {"width": 3}
    assert execution.module_params(module) == {"width": 3}


def test_build_constructs_the_pipeline_from_a_spec(classes: str, tmp_path: Path) -> None:
    # No optimizer given: the schema's default, filled in when the settings are resolved.
    spec = make_spec(classes, tmp_path)
    assert spec["process"]["optimizer"] == "Adam"
    run = execution.build(spec)
    assert type(run.optimizer) is torch.optim.Adam  # the schema's default optimizer
    assert run.optimizer.param_groups[0]["lr"] == 0.05
    assert isinstance(run.criterion, torch.nn.BCELoss)
    [model] = run.models
    assert type(model).__name__ == "linear" and model.n_seen == 64
    assert run.nb_params == 3 + 1
    assert run.model_infos == [spec["modules"][1]]
    # Each module's info() reaches the run_info of the next ones.
    assert run.run_info == {
        "run_id": 7,
        "device": "cpu",
        "seed": 3,
        "epoch": 0,
        "input_size": 3,
        "output_size": 1,
        "hidden": 0,
    }
    assert (len(run.train_data), len(run.test_data)) == (6, 2)
    assert run.accuracy_mode == "binary" and run.user_accuracy is None
    # Seeded: the same spec builds the same initial weights.
    again = execution.build(spec)
    assert torch.equal(again.models[0].layer.weight, model.layer.weight)


def test_build_uses_the_optimizer_and_defaults_accuracy_to_none(
    classes: str, tmp_path: Path
) -> None:
    spec = make_spec(classes, tmp_path, optimizer="SGD", accuracy=None)  # none given
    run = execution.build(spec)
    assert type(run.optimizer) is torch.optim.SGD
    assert run.accuracy_mode == "none"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimizer": "Nope"}, "optimizer 'Nope' is not in torch.optim"),
        ({"data": "one_set"}, "the last data module [data] must return (train, test)"),
        ({"model": "frozen"}, "the pipeline has no trainable parameters"),
        ({"loss_function": "Nope"}, "loss_function 'Nope' is not a torch.nn loss class"),
    ],
)
def test_build_names_what_is_wrong(
    classes: str, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    with pytest.raises(
        UserCodeError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        execution.build(make_spec(classes, tmp_path, **change))


def test_test_pass_matches_a_plain_computation_and_changes_nothing(
    classes: str, tmp_path: Path
) -> None:
    run = execution.build(make_spec(classes, tmp_path))
    model = run.models[0]
    before = copy.deepcopy(model.state_dict())
    loss, acc = execution.run_pass(run, run.test_data, train=False)
    with torch.no_grad():
        losses = [
            torch.nn.functional.binary_cross_entropy(model(x, {}, {}), y).item()
            for x, y in run.test_data
        ]
        correct = sum(int(((model(x, {}, {}) > 0.5) == (y > 0.5)).sum()) for x, y in run.test_data)
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert acc == correct / sum(len(y) for _, y in run.test_data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_train_pass_steps_like_a_plain_training_loop(classes: str, tmp_path: Path) -> None:
    run = execution.build(make_spec(classes, tmp_path))
    twin = copy.deepcopy(run.models[0])
    optimizer = torch.optim.Adam(twin.parameters(), lr=0.05)
    losses = []
    for x, y in run.train_data:
        loss = torch.nn.functional.binary_cross_entropy(twin(x, {}, {}), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    mean_loss, acc = execution.run_pass(run, run.train_data, train=True)
    assert mean_loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert acc is not None and 0.0 <= acc <= 1.0
    for mine, theirs in zip(run.models[0].parameters(), twin.parameters()):
        assert torch.allclose(mine, theirs)


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([], "a data loader yielded no batch"),
        ([torch.zeros(8, 3)], "each batch must be an (x, y) pair"),
    ],
)
def test_pass_refuses_bad_loaders(
    classes: str, tmp_path: Path, batches: list[Any], message: str
) -> None:
    run = execution.build(make_spec(classes, tmp_path))
    with pytest.raises(UserCodeError) as error:
        execution.run_pass(run, batches, train=True)
    assert message in str(error.value)


def test_epoch_appends_its_figures_and_stops_on_a_non_finite_loss(
    classes: str, tmp_path: Path
) -> None:
    run = execution.build(make_spec(classes, tmp_path))
    history = History()
    execution.run_epoch(run, history, 1)
    execution.run_epoch(run, history, 2)
    assert run.run_info["epoch"] == 2
    assert len(history.train_loss) == len(history.test_acc) == len(history.duration) == 2
    assert history.train_loss[1] < history.train_loss[0]  # it learns
    # MSELoss passes NaN through where BCELoss would refuse it.
    nan_run = execution.build(
        make_spec(classes, tmp_path, data="nan_points", loss_function="MSELoss")
    )
    with pytest.raises(UserCodeError, match="loss is not finite at epoch 1"):
        execution.run_epoch(nan_run, History(), 1)


def test_history_truncates_and_describes_an_epoch() -> None:
    history = History()
    for epoch in range(3):
        history.append(1.0 + epoch, 2.0 + epoch, None, 0.5, 0.1)
    history.truncate(2)
    assert history.as_dict() == {
        "train_loss": [1.0, 2.0],
        "test_loss": [2.0, 3.0],
        "train_acc": [None, None],
        "test_acc": [0.5, 0.5],
        "duration": [0.1, 0.1],
        "val_loss": [None, None],  # no validation loader: None, and no field in the event
        "val_acc": [None, None],
        "usage": [],
    }
    assert history.event(4, 1, True) == {
        "run_id": 4,
        "epoch": 2,
        "train_loss": 2.0,
        "test_loss": 3.0,
        "train_acc": None,
        "test_acc": 0.5,
        "duration": 0.1,
        "checkpointed": True,
    }
    history.append(3.0, 4.0, None, 0.5, 0.1, 0.25, 0.75)
    assert history.event(4, 2, False)["val_loss"] == 0.25
    assert history.event(4, 2, False)["val_acc"] == 0.75


def test_run_results_follow_the_history() -> None:
    history = History(
        [0.9, 0.5, 0.4], [1.0, 0.7, 0.6], [0.5, 0.6, 0.7], [0.4, 0.5, 0.6], [0.25, 0.25, 0.5]
    )
    results = execution.run_results(history, nb_params=12)
    assert set(results) == {*contract.RESULT_COLUMNS, "measurement"}
    # Nothing measured: every resource figure is None (NULL), not 0.
    assert all(results[c] is None for c in contract.RESOURCE_COLUMNS)
    assert results["train_loss"] == 0.4 and results["test_acc"] == 0.6
    assert results["epochs"] == 3 and results["duration(s)"] == 1.0 and results["nb_params"] == 12
    assert results["overfit"] == pytest.approx(0.2 / 0.6)
    assert results["trainability"] == pytest.approx(2.3 / 3)
    empty = execution.run_results(History(), nb_params=1)
    assert empty["train_loss"] is None and empty["epochs"] == 0


def test_a_parked_run_resumes_to_the_numbers_of_an_uninterrupted_one(
    classes: str, tmp_path: Path
) -> None:
    whole = Recorder()
    result = execution.execute(make_spec(classes, tmp_path / "whole", epochs=3), whole.channel())

    files = tmp_path / "parked"
    first = Recorder(park_after=1)
    with pytest.raises(execution.Parked) as parked:
        execution.execute(make_spec(classes, files, epochs=3), first.channel())
    assert parked.value.epoch == 1 and first.events[0]["checkpointed"]
    assert os.path.exists(contract.checkpoint_path(str(files), 7))
    second = Recorder()
    resumed = execution.execute(
        make_spec(classes, files, epochs=3) | {"start_epoch": 1}, second.channel()
    )
    assert [e["epoch"] for e in second.events] == [2, 3]
    numbers = ("train_loss", "test_loss", "train_acc", "test_acc")
    assert [[e[k] for k in numbers] for e in first.events + second.events] == [
        [e[k] for k in numbers] for e in whole.events
    ]
    assert resumed["results"]["train_loss"] == result["results"]["train_loss"]
    # The run's files, named by the contract.
    assert resumed["files"] == [
        contract.history_path(str(files), 7),
        execution.run_info_path(str(files), 7),
        contract.checkpoint_path(str(files), 7),
    ]
    assert all(os.path.exists(path) for path in resumed["files"])
    assert os.path.exists(contract.model_path(str(files), "linear", 7) + ".pt")
    info = json.loads(Path(execution.run_info_path(str(files), 7)).read_text())
    assert info["seed"] == 3 and info["results"]["epochs"] == 3
    assert torch.load(contract.history_path(str(files), 7))["train_loss"] == [
        e["train_loss"] for e in whole.events
    ]
    # What the run cost (issue 26): the parked epoch's figures came back with the checkpoint,
    # and the measuring after the last epoch changed none of the numbers above.
    usage = torch.load(contract.history_path(str(files), 7))["usage"]
    assert len(usage) == 3 and all(u["train_seconds"] > 0 for u in usage)
    assert usage[0]["peak_memory_mb"] is not None  # read at the checkpoint before the park
    for key in ("flops_per_sample", "nb_params"):
        assert resumed["results"][key] == result["results"][key]
    assert resumed["results"]["measurement"]["device"] == "cpu"


def test_resume_resends_the_epochs_the_database_missed(classes: str, tmp_path: Path) -> None:
    first = Recorder()
    execution.execute(make_spec(classes, tmp_path, epochs=2), first.channel())
    # The daemon recorded epoch 1 only, but the checkpoint holds epoch 2.
    later = Recorder()
    execution.execute(make_spec(classes, tmp_path, epochs=3) | {"start_epoch": 1}, later.channel())
    assert [e["epoch"] for e in later.events] == [2, 3]
    assert later.events[0] == first.events[1]  # sent again as it was, with checkpointed set
    assert later.events[0]["checkpointed"]


def test_count_correct_prefers_the_models_own_accuracy(classes: str, tmp_path: Path) -> None:
    run = execution.build(make_spec(classes, tmp_path))
    y_pred, y = torch.tensor([[0.9], [0.2], [0.7]]), torch.tensor([[1.0], [1.0], [0.0]])
    assert int(run.count_correct(y_pred, y)) == 1
    own = BuiltRun(**{**run.__dict__, "user_accuracy": lambda p, t: 42})
    assert own.count_correct(y_pred, y) == 42


# (epoch, target, park, cancel, checkpoint due) -> (checkpoint, outcome)
EPOCH_ENDS = [
    ((1, 3, False, False, False), (False, epochs.CONTINUE)),
    ((1, 3, False, False, True), (True, epochs.CONTINUE)),  # the timed checkpoint
    ((1, 3, True, False, False), (True, epochs.PARKED)),  # parked: checkpointed first
    ((1, 3, True, False, True), (True, epochs.PARKED)),
    ((1, 3, False, True, True), (False, epochs.CANCELLED)),  # a cancelled run keeps nothing
    ((1, 3, True, True, False), (False, epochs.CANCELLED)),  # a cancel wins over a park
    ((3, 3, False, False, False), (True, epochs.DONE)),  # the target: always checkpointed
    ((3, 3, True, False, False), (True, epochs.DONE)),  # parked at the target: done
    ((3, 3, False, True, True), (False, epochs.DONE)),  # cancelled at the target: done as is
    ((3, 3, True, True, False), (False, epochs.DONE)),
]


@pytest.mark.parametrize(("given", "decided"), EPOCH_ENDS)
def test_the_epoch_boundary_decision_of_a_run_and_of_an_ensemble_member(
    given: tuple[int, int, bool, bool, bool], decided: tuple[bool, str]
) -> None:
    epoch, target, park, cancel, due = given
    end = epochs.epoch_end(epoch, target, park=park, checkpoint_due=due, cancel=cancel)
    assert (end.checkpoint, end.outcome) == decided
    if not cancel:  # a run alone is never cancelled: the default
        assert epochs.epoch_end(epoch, target, park=park, checkpoint_due=due) == end


def test_the_checkpoint_clock_is_due_every_so_many_seconds() -> None:
    now = [100.0]
    clock = epochs.CheckpointClock(30.0, now=lambda: now[0])
    now[0] = 129.9
    assert not clock.due()
    now[0] = 130.0
    assert clock.due()
    clock.restart()
    assert not clock.due()
    now[0] = 160.0
    assert clock.due()
