"""Running one pipeline inside a worker: build the modules, train, evaluate, save.

Imported by workers only: the daemon's main process never imports torch.

:func:`execute` runs a spec through four steps, each its own function: :func:`build` (load the
user classes, construct the modules, prepare the data, make the loss and the optimizer),
:func:`restore` (from the run's checkpoint when it resumes), :func:`train` (one
:func:`run_epoch` after the other, checkpointing and honouring park requests) and :func:`finish`
(save the models, the history and the results).
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mosaic_client import contract
from mosaic_client.protocol import RunSpec
from mosaic_client.schema import ProcessSettings
from mosaicd.training import (
    checkpoints,
    data_cache,
    epochs,
    metrics,
    provenance,
    resources,
    tuning,
)
from mosaicd.training.history import History

_module_counter = itertools.count()
# Names of the user modules loaded since the worker last dropped them (worker.py): keeping
# them here spares a scan of sys.modules after every run.
loaded_user_modules: list[str] = []
# The bytes of each user file the current run executed, by path (issue 16: its provenance is
# what ran, not what the file holds by the time someone looks).
executed_sources: dict[str, bytes] = {}


class UserCodeError(Exception):
    """A mistake in the user's classes or config, reported as the run's failure message."""


def failure_message(exc: BaseException) -> str:
    """The "failed" message's error for an exception a run raised. A full disk that torch's zip
    writer reports as ``[enforce fail at inline_container.cc:…] unexpected pos`` is said as
    ENOSPC, the words by which the daemon parks a run on a full disk instead of failing it."""
    if isinstance(exc, (UserCodeError, tuning.SearchError)):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, OSError) and checkpoints.is_full_disk(exc):
        return f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} (torch's zip writer: {text})"
    return text


class Parked(Exception):
    """The daemon asked the run to stop at this epoch boundary; the checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = epoch


@dataclass
class Channel:
    """How a run talks back to the daemon (set up by the worker)."""

    on_epoch: Callable[[dict[str, Any]], None]
    park_requested: Callable[[], bool]
    # Receives the run's provenance (the "provenance" message's fields besides run_id) once
    # its pipeline is built, or failed to build (issue 16).
    on_provenance: Callable[[dict[str, Any]], None] | None = None
    # Receives a search run's resolved values, and the epoch its pruner stopped it at
    # (the "search" message; docs/tuning.md).
    on_search: Callable[[dict[str, Any], int | None], None] | None = None


def load_user_class(path: str, class_name: str, run_id: int) -> type:
    """Load a class from a file under a fresh module name, so an edited file is seen."""
    if not os.path.isfile(path):
        raise UserCodeError(f"class file {path} does not exist (path_to_class)")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"mosaic_user_{run_id}_{next(_module_counter)}_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserCodeError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loaded_user_modules.append(name)
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        with open(path, "rb") as fh:
            source = fh.read()
    except OSError as exc:
        raise UserCodeError(f"cannot read class file {path}: {exc}") from None
    executed_sources[path] = source
    # Run the bytes just read (and recorded), not a second read of the file.
    exec(compile(source, path, "exec"), module.__dict__)
    cls = getattr(module, class_name, None)
    if cls is None or not isinstance(cls, type):
        raise UserCodeError(f"{path} defines no class named {class_name!r}")
    return cls


def module_params(module: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in module.items() if k not in contract.MODULE_FIELDS}


def construct(
    cls: type, module: dict[str, Any], run_info: dict[str, Any], pipeline: list[dict[str, Any]]
) -> Any:
    """Fill each __init__ parameter by name: run_info, own section, then other sections."""
    own = module_params(module)
    others: dict[str, Any] = {}
    for other in pipeline:
        if other is not module:
            for key, value in module_params(other).items():
                others.setdefault(key, value)
    kwargs: dict[str, Any] = {}
    missing = []
    signature = inspect.signature(cls.__init__)
    for name, param in list(signature.parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        for source in (run_info, own, others):
            if name in source:
                kwargs[name] = source[name]
                break
        else:
            if param.default is param.empty:
                missing.append(name)
    if missing:
        raise UserCodeError(
            f"class {cls.__name__} (section [{module.get('name')}]): required constructor "
            f"parameter(s) {', '.join(missing)} not found in run_info (keys: "
            f"{', '.join(sorted(run_info)) or 'none'}), in section [{module.get('name')}], or in "
            "the other sections of the pipeline; add them to the section or to a previous "
            "module's info()"
        )
    return cls(**kwargs)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def make_loss(process: ProcessSettings, run_id: int) -> Any:
    if process["class_loss_function"]:
        cls = load_user_class(
            process["path_to_class_loss_function"], process["class_loss_function"], run_id
        )
        return cls()
    name = process["loss_function"] or "MSELoss"
    loss_cls = getattr(torch.nn, name, None)
    if not (isinstance(loss_cls, type) and issubclass(loss_cls, torch.nn.Module)):
        raise UserCodeError(f"loss_function {name!r} is not a torch.nn loss class")
    return loss_cls()


def correct_count(mode: str, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Number of correctly predicted samples in a batch, as a device tensor (no host sync)."""
    if mode == "none" or not isinstance(y_pred, torch.Tensor):
        return None
    if mode in ("binary", "logits"):
        threshold = 0.5 if mode == "binary" else 0.0
        pred = y_pred > threshold
        truth = y > 0.5
        agree = pred == truth.reshape(pred.shape)
        return agree.reshape(agree.shape[0], -1).all(dim=1).sum()
    if mode == "argmax":
        pred = y_pred.argmax(dim=1)
        truth = y.argmax(dim=1) if y.dim() == y_pred.dim() else y
        return (pred == truth).sum()
    raise UserCodeError(f"unknown accuracy mode {mode!r}")


def _batch_size(y: Any) -> int:
    return int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() > 0 else 1


def _call(module: Any, data: Any, run_info: dict[str, Any], module_info: dict[str, Any]) -> Any:
    if isinstance(module, torch.nn.Module):
        return module(data, run_info, module_info)
    return module.forward(data, run_info, module_info)


def _state_of(obj: Any) -> Any:
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    if hasattr(obj, "parameters"):
        return [p.detach().clone() for p in obj.parameters()]
    return None


def _restore_state(obj: Any, state: Any) -> None:
    if state is None:
        return
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
    elif hasattr(obj, "parameters"):
        with torch.no_grad():
            for param, saved in zip(obj.parameters(), state):
                param.copy_(saved)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy" in states:
        numpy.random.set_state(states["numpy"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % (2**32))


def atomic_save(obj: Any, path: str) -> None:
    """Write, fsync, rename: a crash mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _unique_parameters(modules: Iterable[Any]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        if not hasattr(module, "parameters"):
            continue
        for param in module.parameters():
            if id(param) not in seen and param.requires_grad:
                seen.add(id(param))
                params.append(param)
    return params


def _check_methods(obj: Any, names: tuple[str, ...], module: dict[str, Any]) -> None:
    missing = [n for n in names if not callable(getattr(obj, n, None))]
    # nn.Module defines a placeholder forward that fails only when first called, mid-epoch.
    if (
        "forward" in names
        and isinstance(obj, torch.nn.Module)
        and type(obj).forward is torch.nn.Module.forward
    ):
        missing.append("forward")
    if missing:
        raise UserCodeError(
            f"class {type(obj).__name__} (section [{module.get('name')}]) lacks "
            f"required method(s) {', '.join(missing)}; see the class contracts "
            "in docs/classes.md"
        )


def warm_up() -> None:
    """Pay torch's first-use costs before the first run, not during it.

    The first optimizer built in a process imports torch._dynamo (seconds), the first FLOP count
    torch's meta registrations; one tiny training step and one count at worker start keep that
    out of every run's duration and out of dispatch latency.
    """
    state = torch.get_rng_state()
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    loss = torch.nn.MSELoss()(model(torch.zeros(1, 2)), torch.zeros(1, 1))
    loss.backward()
    optimizer.step()
    # The FLOP counter's first use imports torch's meta registrations (seconds): here too.
    resources.count_flops(model, torch.zeros(1, 2))
    torch.set_rng_state(state)


# -- build ------------------------------------------------------------------------------------


@dataclass
class BuiltRun:
    """A run's pipeline built from its spec, ready to train (see :func:`build`)."""

    run_id: int
    device: torch.device
    # What the modules were told about the run, grown by each module's info() and updated with
    # the current epoch; modules receive it on every call.
    run_info: dict[str, Any]
    train_data: Any
    test_data: Any
    models: list[Any]
    model_infos: list[dict[str, Any]]  # the models' module dicts, in pipeline order
    optimizer: Any
    criterion: Any
    accuracy_mode: str
    # The last model's own accuracy(y_pred, y), which replaces the accuracy mode when defined.
    user_accuracy: Callable[[Any, Any], Any] | None
    nb_params: int
    test_input: Any = None  # the last test pass's first input, measured after it (resources)
    # The data stage's validation loader (train, validation, test); None: it gave none.
    val_data: Any = None

    def count_correct(self, y_pred: Any, y: Any) -> Any:
        if self.user_accuracy is not None:
            return self.user_accuracy(y_pred, y)
        return correct_count(self.accuracy_mode, y_pred, y)


def _instantiate(
    module: dict[str, Any],
    run_info: dict[str, Any],
    pipeline: list[dict[str, Any]],
    run_id: int,
    methods: tuple[str, ...],
) -> Any:
    cls = load_user_class(module["path_to_class"], module["class"], run_id)
    obj = construct(cls, module, run_info, pipeline)
    _check_methods(obj, methods, module)
    return obj


def _prepare_stages(
    data_modules: list[dict[str, Any]],
    classes: list[type],
    run_info: dict[str, Any],
    pipeline: list[dict[str, Any]],
) -> tuple[Any, Any, Any]:
    """Chain the data modules' prepare(); the last one returns the (train, test) loaders, or
    (train, validation, test) (docs/tuning.md): returned as (train, test, validation)."""
    data: Any = None
    for module, cls in zip(data_modules, classes):
        obj = construct(cls, module, run_info, pipeline)
        _check_methods(obj, ("prepare", "info"), module)
        data = obj.prepare(data, run_info, module)
        run_info.update(obj.info() or {})
    if not (isinstance(data, (tuple, list)) and len(data) in (2, 3)):
        last = data_modules[-1].get("name") if data_modules else None
        raise UserCodeError(
            f"the last data module [{last}] must return (train, test) or (train, validation, "
            f"test) from prepare(), got {type(data).__name__}"
        )
    if len(data) == 3:
        return data[0], data[2], data[1]
    return data[0], data[1], None


def prepare_data(
    data_modules: list[dict[str, Any]],
    run_info: dict[str, Any],
    pipeline: list[dict[str, Any]],
    run_id: int,
    cache: data_cache.Settings | None = None,
    deterministic: bool = False,
) -> tuple[Any, Any, Any]:
    """The (train, test, validation or None) loaders the data modules prepare, from the
    worker's data cache when it holds them (`cache` None: off). A hit leaves run_info and the
    random generators as preparing would have, and gives fresh loaders: the run computes the
    same numbers."""
    classes = [load_user_class(m["path_to_class"], m["class"], run_id) for m in data_modules]
    if cache is None or not data_cache.cacheable(classes):
        data_cache.stats.record("off")
        return _prepare_stages(data_modules, classes, run_info, pipeline)
    key = data_cache.key(
        classes,
        data_modules,
        pipeline,
        executed_sources,
        int(run_info["seed"]),
        str(run_info["device"]),
        deterministic,
    )
    found, outcome = data_cache.lookup(key, cache)
    data_cache.stats.record(outcome)
    if found is not None:
        # The run's own id, whatever run prepared the entry.
        run_info.update({k: v for k, v in found.run_info.items() if k != "run_id"})
        set_rng_states(found.rng)
        print(f"[mosaic] data stages from the data cache ({outcome})", flush=True)
        return found.train, found.test, found.validation
    train, test, validation = _prepare_stages(data_modules, classes, run_info, pipeline)
    # Kept now, before training advances the loaders' generators.
    prepared = data_cache.Prepared(train, test, dict(run_info), rng_states(), validation)
    note = data_cache.store(key, prepared, cache, data_cache.wants_disk(classes))
    if note:
        print(note, flush=True)
    return train, test, validation


def build_models(
    model_modules: list[dict[str, Any]],
    run_info: dict[str, Any],
    pipeline: list[dict[str, Any]],
    run_id: int,
    device: torch.device,
) -> list[Any]:
    """Construct the model modules in order, on the run's device."""
    models: list[Any] = []
    for module in model_modules:
        obj = _instantiate(module, run_info, pipeline, run_id, ("forward", "info"))
        if isinstance(obj, torch.nn.Module):
            obj.to(device)
        models.append(obj)
        run_info.update(obj.info() or {})
    return models


def make_optimizer(process: ProcessSettings, models: list[Any]) -> tuple[Any, int]:
    """The PROCESS optimizer over the models' trainable parameters, and their number."""
    params = _unique_parameters(models)
    if not params:
        raise UserCodeError(
            "the pipeline has no trainable parameters: pipeline classes must be "
            "torch.nn.Module or define parameters()"
        )
    nb_params = sum(p.numel() for p in params)
    name = process["optimizer"]
    optimizer_cls = getattr(torch.optim, name, None)
    if optimizer_cls is None:
        raise UserCodeError(f"optimizer {name!r} is not in torch.optim")
    return optimizer_cls(params, lr=float(process["lr"])), nb_params


def build(spec: RunSpec) -> BuiltRun:
    """Seed the run, then build its data, models, loss and optimizer, in the pipeline's order."""
    run_id = int(spec["run_id"])
    process = spec["process"]
    pipeline: list[dict[str, Any]] = spec["modules"]
    device = torch.device(spec["device"])
    seed = int(spec["seed"])
    provenance.apply_determinism(process)
    # Before anything is constructed: initial weights and data splits depend on it.
    seed_everything(seed)
    # Built from the shared names, which the config checks refuse as section parameters.
    given = {"run_id": run_id, "device": str(device), "seed": seed, "epoch": 0}
    run_info: dict[str, Any] = {name: given[name] for name in contract.RUN_INFO_KEYS}
    n_data = len(process["data_scheme"])
    cache = data_cache.Settings.of(spec.get("data_cache"))
    train_data, test_data, val_data = prepare_data(
        pipeline[:n_data],
        run_info,
        pipeline,
        run_id,
        cache if cache.enabled else None,
        bool(process["deterministic"]),
    )
    model_infos = pipeline[n_data:]
    models = build_models(model_infos, run_info, pipeline, run_id, device)
    optimizer, nb_params = make_optimizer(process, models)
    criterion = make_loss(process, run_id)
    if isinstance(criterion, torch.nn.Module):
        criterion.to(device)
    mode = process["accuracy"]  # resolved: "none" when a hand-made request gave none
    return BuiltRun(
        run_id=run_id,
        device=device,
        run_info=run_info,
        train_data=train_data,
        test_data=test_data,
        models=models,
        model_infos=model_infos,
        optimizer=optimizer,
        criterion=criterion,
        accuracy_mode=mode,
        user_accuracy=getattr(models[-1], "accuracy", None),
        nb_params=nb_params,
        val_data=val_data,
    )


# -- restore ----------------------------------------------------------------------------------


def save_checkpoint(run: BuiltRun, history: History, epoch: int, path: str) -> None:
    atomic_save(
        {
            "epoch": epoch,
            "models": [_state_of(m) for m in run.models],
            "optimizer": run.optimizer.state_dict(),
            "rng": checkpoints.storable_rng(rng_states()),  # loads with weights_only=True
            "history": history.as_dict(),
        },
        path,
    )


def restore(run: BuiltRun, files_dir: str) -> tuple[int, History]:
    """Load the run's checkpoint into the built run; return its epoch and the history so far."""
    checkpoint = checkpoints.load(contract.checkpoint_path(files_dir, run.run_id), run.device)
    epoch = int(checkpoint["epoch"])
    for obj, state, module in zip(run.models, checkpoint["models"], run.model_infos):
        if state is None and callable(getattr(obj, "load_model", None)):
            obj.load_model(contract.model_path(files_dir, module["class"], run.run_id))
        else:
            _restore_state(obj, state)
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    history = History(**checkpoint["history"])
    history.truncate(epoch)
    set_rng_states(checkpoints.loaded_rng(checkpoint["rng"]))
    return epoch, history


def resend_epochs(
    channel: Channel, run_id: int, history: History, stored_epoch: int, checkpoint_epoch: int
) -> None:
    """Send again the epochs the database lacks: it may lag the checkpoint file by a few epochs
    (a kill between the two writes), and the stored history must have no gap."""
    for index in range(stored_epoch, checkpoint_epoch):
        channel.on_epoch(history.event(run_id, index, index + 1 == checkpoint_epoch))


# -- one epoch --------------------------------------------------------------------------------


def run_pass(run: BuiltRun, batches: Iterable[Any], train: bool) -> tuple[float, float | None]:
    """One pass over a loader, training or testing; return the mean loss and the accuracy."""
    for model in run.models:
        if isinstance(model, torch.nn.Module):
            model.train(train)
    device = run.device
    loss_sum = torch.zeros((), device=device)
    correct: Any = None
    n_batches = 0
    n_samples = 0
    with torch.set_grad_enabled(train):
        for batch in batches:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise UserCodeError(
                    "each batch must be an (x, y) pair; the data module's "
                    "loaders yielded " + type(batch).__name__
                )
            x, y = to_device(batch[0], device), to_device(batch[1], device)
            run.test_input = x if not (train or n_batches) else run.test_input
            out = x
            for model, info in zip(run.models, run.model_infos):
                out = _call(model, out, run.run_info, info)
            loss = run.criterion(out, y)
            if train:
                run.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                run.optimizer.step()
            loss_sum += loss.detach()
            count = run.count_correct(out.detach() if isinstance(out, torch.Tensor) else out, y)
            if count is not None:
                correct = count if correct is None else correct + count
            n_batches += 1
            n_samples += _batch_size(y)
    if n_batches == 0:
        raise UserCodeError("a data loader yielded no batch; check data_size and train_prop")
    mean_loss = float(loss_sum.item()) / n_batches  # the one host sync per pass
    acc = None if correct is None else float(correct) / n_samples
    return mean_loss, acc


def run_epoch(run: BuiltRun, history: History, epoch: int) -> None:
    """Train then test for `epoch` (counted from 1); append its figures to the history."""
    run.run_info["epoch"] = epoch
    started = time.perf_counter()
    with resources.PassMeter(run.device, scope=run) as meter:
        train_loss, train_acc = run_pass(run, run.train_data, True)
    test_loss, test_acc = run_pass(run, run.test_data, False)
    val_loss, val_acc = (None, None)
    if run.val_data is not None:
        val_loss, val_acc = run_pass(run, run.val_data, False)
    duration = time.perf_counter() - started
    if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
        raise UserCodeError(
            f"loss is not finite at epoch {epoch} (train {train_loss}, test {test_loss});"
            " lower lr, check the data for NaN, or use a numerically stable loss"
        )
    history.append(train_loss, test_loss, train_acc, test_acc, duration, val_loss, val_acc)
    history.usage.append(meter.figures())


def train(
    run: BuiltRun,
    history: History,
    channel: Channel,
    first_epoch: int,
    target: int,
    checkpoint_every: float,
    checkpoint_file: str,
    tuner: tuning.Tuner | None = None,
) -> None:
    """Run the epochs after `first_epoch` up to `target`, reporting each one; checkpoint every
    `checkpoint_every` seconds, at the end, and before raising Parked when the daemon asks
    (the decision is :func:`mosaicd.training.epochs.epoch_end`, as for an ensemble's members)."""
    clock = epochs.CheckpointClock(checkpoint_every)
    for epoch in range(first_epoch + 1, target + 1):
        run_epoch(run, history, epoch)
        print(
            f"[mosaic] run {run.run_id} epoch {epoch}/{target} "
            f"train_loss={history.train_loss[-1]:.6g} test_loss={history.test_loss[-1]:.6g}",
            flush=True,
        )
        if tuner is not None and tuner.prune(history, epoch):
            # Its pruner stopped it (docs/tuning.md): it finishes now, with the epochs it has.
            print(f"[mosaic] run {run.run_id} pruned after epoch {epoch}", flush=True)
            channel.on_epoch(history.event(run.run_id, epoch - 1, False))
            return
        park = channel.park_requested()
        end = epochs.epoch_end(epoch, target, park=park, checkpoint_due=clock.due())
        if end.checkpoint or end.outcome != epochs.CONTINUE:  # the history is kept: its peak
            resources.note_resident_peak(history.usage[-1], run)
        if end.checkpoint:
            save_checkpoint(run, history, epoch, checkpoint_file)
            clock.restart()
        channel.on_epoch(history.event(run.run_id, epoch - 1, end.checkpoint))
        if end.outcome == epochs.PARKED:
            raise Parked(epoch)


# -- finish -----------------------------------------------------------------------------------


def run_results(
    history: History, nb_params: int, inference: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run's row of run_results (contract.RESULT_COLUMNS) from its history and the figures
    measured after its last epoch (measure_inference), with the measurement's context under
    "measurement" (stored in run_measurements)."""
    measured = resources.summary(history.usage) | (inference or {})
    context = contract.MEASUREMENT_TEXT + contract.MEASUREMENT_NUMBERS
    return {
        "train_loss": history.train_loss[-1] if history.train_loss else None,
        "test_loss": history.test_loss[-1] if history.test_loss else None,
        "train_acc": history.train_acc[-1] if history.train_acc else None,
        "test_acc": history.test_acc[-1] if history.test_acc else None,
        "nb_params": nb_params,
        "duration(s)": sum(history.duration),
        "epochs": len(history.train_loss),
        **metrics.derived(history.train_loss, history.test_loss),
        **{column: measured.get(column) for column in contract.RESOURCE_COLUMNS},
        "measurement": {name: measured.get(name) for name in context},
        "val_loss": history.val_loss[-1] if history.val_loss else None,
        "val_acc": history.val_acc[-1] if history.val_acc else None,
    }


def measure_inference(run: BuiltRun, history: History) -> dict[str, Any]:
    """The trained pipeline's FLOPs, latency and throughput (resources.after_training), the
    random state left as it was (a loader's iterator draws a seed)."""

    def forward(inputs: Any) -> Any:
        out = inputs
        for model, info in zip(run.models, run.model_infos):
            out = _call(model, out, run.run_info, info)
        return out

    state = rng_states()
    try:
        return resources.after_training(
            run.models, run.test_data, run.device, forward, to_device, history.usage, run.test_input
        )
    finally:
        set_rng_states(state)


def run_info_path(run_files_path: str, run_id: int) -> str:
    """The run's summary (seed, device, pipeline, process, results) as JSON (the seed's name)."""
    return os.path.join(run_files_path, f"run_info_{run_id}.mdt")


def finish(run: BuiltRun, spec: RunSpec, history: History) -> dict[str, Any]:
    """Save the models that can save themselves, the history and the run's summary; return the
    results and the run's files."""
    files_dir = spec["run_files_path"]
    for obj, module in zip(run.models, run.model_infos):
        if callable(getattr(obj, "save_model", None)):
            obj.save_model(contract.model_path(files_dir, module["class"], run.run_id))
    history_file = contract.history_path(files_dir, run.run_id)
    torch.save(history.as_dict(), history_file)
    results = run_results(history, run.nb_params, measure_inference(run, history))
    info_file = run_info_path(files_dir, run.run_id)
    with open(info_file, "w") as fh:
        json.dump(
            {
                "run_id": run.run_id,
                "seed": int(spec["seed"]),
                "device": str(run.device),
                "pipeline": spec["modules"],
                "process": spec["process"],
                "results": results,
            },
            fh,
            indent=1,
            default=str,
        )
    return {
        "results": results,
        "files": [history_file, info_file, contract.checkpoint_path(files_dir, run.run_id)],
    }


def execute(spec: RunSpec, channel: Channel) -> dict[str, Any]:
    """Train one pipeline to spec["epochs_target"] epochs; return results and files."""
    files_dir = spec["run_files_path"]
    os.makedirs(files_dir, exist_ok=True)
    # The environment as the run starts (before its code can change the thread count), with
    # the determinism it asked for; the code once built, sent even when the build fails.
    provenance.apply_determinism(spec["process"])
    environment = provenance.environment(torch.device(spec["device"]))
    executed_sources.clear()
    tuner = None
    if spec.get("search") is not None:
        # A search run resolves its distributions first (sampled, or its group's best trial).
        spec, tuner = tuning.start(spec, channel.on_search)
    try:
        run = build(spec)
        if tuner is not None:
            tuner.check(run.val_data is not None)
    finally:
        if channel.on_provenance is not None:
            code = provenance.code(spec, executed_sources)
            record = {"environment": environment, "code": code}
            channel.on_provenance(record | {"data_cache": data_cache.figures()})
    history = History()
    start_epoch = spec["start_epoch"]
    if start_epoch > 0:
        checkpoint_epoch, history = restore(run, files_dir)
        resend_epochs(channel, run.run_id, history, start_epoch, checkpoint_epoch)
        start_epoch = checkpoint_epoch
        if tuner is not None:
            tuner.replay(history, start_epoch)
    train(
        run,
        history,
        channel,
        start_epoch,
        int(spec["epochs_target"]),
        spec["checkpoint_every"],
        contract.checkpoint_path(files_dir, run.run_id),
        tuner,
    )
    return finish(run, spec, history)
