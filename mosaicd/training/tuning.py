"""A search run in its worker (docs/tuning.md): resolve its distributions, and prune it.

A trial's values come from Optuna's ask-and-tell interface on an in-memory study rebuilt from
the finished trials of the earlier rounds of its group (what the daemon's spec hands over:
study_reading.search_history), with a sampler seeded from (study seed, group, trial): the
same seed gives the same trials, on any machine and after any restart. A grid's trial n takes
point n of the grid; a final run takes its group's best trial. Optuna is imported here only,
in the worker, when a search run starts (the daemon never imports it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mosaic_client import search
from mosaic_client.protocol import RunSpec
from mosaicd.training.history import History

OnSearch = Callable[[dict[str, Any], int | None], None] | None


class SearchError(Exception):
    """A search run that cannot be resolved (a message for its log and `mosaic show`)."""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:  # the optional extra (pyproject: search)
        raise SearchError(
            "a [SEARCH] study needs optuna in the workers' Python: "
            "pip install 'mosaic-compare[search]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _distribution(optuna: Any, dimension: search.Distribution) -> Any:
    kinds = optuna.distributions
    if dimension.kind == search.CHOICE:
        return kinds.CategoricalDistribution(list(dimension.args))
    low, high = dimension.args
    if dimension.kind == search.INT:
        return kinds.IntDistribution(int(low), int(high))
    return kinds.FloatDistribution(float(low), float(high), log=dimension.kind == search.LOGUNIFORM)


def _pruner(optuna: Any, settings: dict[str, Any], epochs: int) -> Any:
    if settings["pruning"] == "median":
        # Against the finished trials only: a median needs a few of them first.
        return optuna.pruners.MedianPruner(n_startup_trials=settings["round_size"])
    if settings["pruning"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs))
    return optuna.pruners.NopPruner()


def _study(part: dict[str, Any], dimensions: dict[str, search.Distribution], epochs: int) -> Any:
    """The group's in-memory study: its finished trials of the earlier rounds, in trial order."""
    optuna = _optuna()
    settings = part["settings"]
    seed = search.sampler_seed(part["study_seed"], part["group"], part["trial"])
    if settings["strategy"] == "tpe":
        # The first round is drawn at random; TPE models the finished trials after that.
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings["round_size"])
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(
        study_name=f"group-{part['group']}",
        direction=settings["direction"],
        sampler=sampler,
        pruner=_pruner(optuna, settings, epochs),
    )
    distributions = {n: _distribution(optuna, d) for n, d in dimensions.items()}
    states = {
        "complete": optuna.trial.TrialState.COMPLETE,
        "pruned": optuna.trial.TrialState.PRUNED,
    }
    for past in part["history"]:
        if past["state"] not in states or search.values_problem(dimensions, past["values"]):
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=past["values"],
                distributions=distributions,
                value=past["value"] if past["state"] == "complete" else None,
                state=states[past["state"]],
                intermediate_values={int(e): float(v) for e, v in past["intermediate"]},
            )
        )
    return study, distributions


class Tuner:
    """One search run's values, and its pruner's decisions after each epoch."""

    def __init__(self, part: dict[str, Any], values: dict[str, Any], trial: Any, send: OnSearch):
        self.part = part
        self.values = values
        self.trial = trial  # Optuna's trial (a trial of a random or tpe search), else None
        self.send = send
        self.metric = part["settings"]["metric"]

    def check(self, has_validation: bool) -> None:
        """A trial selected on a validation figure needs a validation loader."""
        if self.part["stage"] == search.TRIAL and self.metric.startswith("val_"):
            if not has_validation:
                raise SearchError(
                    f"[SEARCH] metric = {self.metric} needs a validation loader: make the last "
                    "data module's prepare() return (train, validation, test), or select on "
                    "test_loss with tuning seeds the final runs never use (docs/tuning.md)"
                )

    def _report(self, history: History, epoch: int) -> bool:
        if self.trial is None or self.metric not in search.EPOCH_METRICS:
            return False
        value = history.figure(self.metric, epoch - 1)
        if value is None:
            return False
        self.trial.report(float(value), epoch)
        return True

    def replay(self, history: History, epochs: int) -> None:
        """The epochs a resumed run trained before its checkpoint, reported again."""
        for epoch in range(1, epochs + 1):
            self._report(history, epoch)

    def prune(self, history: History, epoch: int) -> bool:
        """Whether the pruner stops the run after this epoch (then the daemon is told)."""
        if self.part["settings"]["pruning"] == "none" or not self._report(history, epoch):
            return False
        if not self.trial.should_prune():
            return False
        if self.send is not None:
            self.send(self.values, epoch)
        return True


def resolve(
    part: dict[str, Any], dimensions: dict[str, search.Distribution], epochs: int
) -> tuple[dict[str, Any], Any]:
    """The run's values and Optuna's trial (None for a grid's trial or a final run)."""
    settings = part["settings"]
    if part["stage"] == search.FINAL:
        best = search.best(part["history"], settings["direction"])
        if best is None:
            raise SearchError(
                f"no trial of this group finished with a finite {settings['metric']}: there is "
                "no configuration to run again (see the trials' logs)"
            )
        return dict(best["values"]), None
    if settings["strategy"] == "grid":
        points = search.grid_points(dimensions)
        return points[int(part["trial"]) % len(points)], None
    study, distributions = _study(part, dimensions, epochs)
    trial = study.ask(distributions)
    return {name: trial.params[name] for name in dimensions}, trial


def start(spec: RunSpec, send: OnSearch) -> tuple[RunSpec, Tuner]:
    """The spec with its distributions resolved, and the run's tuner; the values are sent to
    the daemon (recorded in the run's params) before the run builds anything."""
    part = spec["search"]
    process = spec["process"]
    dimensions = search.space(process["lr"], spec["modules"])
    values, trial = resolve(part, dimensions, int(spec["epochs_target"]))
    lr, modules = search.resolve(process["lr"], spec["modules"], values)
    resolved: RunSpec = {**spec, "process": {**process, "lr": lr}, "modules": modules}
    if send is not None:
        send(values, None)
    return resolved, Tuner(part, values, trial, send)
