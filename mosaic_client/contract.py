"""Names and rules that the client and the daemon share, written once (standard library only).

Part of the shared contract with :mod:`mosaic_client.protocol` (every request and reply),
:mod:`mosaic_client.schema` (every ``[PROCESS]``/``[MONITOR]`` key) and
:mod:`mosaic_client.paths` (where the socket and the daemon's state live). The daemon imports
these modules; nothing here may import torch, matplotlib, scipy or the daemon package.
"""

from __future__ import annotations

import os

# -- run states ------------------------------------------------------------------------------
# The values are what `runs.status` holds in every study database, so users' SQL keeps working.
QUEUED = "queued"
RUNNING = "running"
# A run *parked* at an epoch boundary with a checkpoint (`pause --now`, `pause FILE`); it goes on
# from that epoch when resumed. Not to be confused with a *hold* (below), which parks nothing.
PARKED = "paused"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"

RUN_STATES: tuple[str, ...] = (QUEUED, RUNNING, PARKED, DONE, FAILED, CANCELLED)
FINAL_STATES: tuple[str, ...] = (DONE, FAILED, CANCELLED)

# Allowed transitions; anything else is a bug in the daemon and raises.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (RUNNING, CANCELLED, PARKED),
    RUNNING: (DONE, FAILED, CANCELLED, PARKED, QUEUED),
    PARKED: (QUEUED, CANCELLED),
    DONE: (QUEUED,),  # rerun
    FAILED: (QUEUED,),  # rerun
    CANCELLED: (QUEUED,),  # rerun
}

# -- repetitions -----------------------------------------------------------------------------
# Runs that share every param but these form one configuration group (the repetitions of one
# configuration): the run_groups view (mosaicd/storage/store.py), `mosaic compare` and `mosaic
# repeat`.
REPETITION_PARAMS: tuple[str, ...] = ("seed", "process_seed", "owner", "owner_uid")
# The most repetitions one `repeat` request may add to each group: more is surely a typo.
MAX_REPETITIONS_ADDED = 1000

# -- holds -----------------------------------------------------------------------------------
# A *hold* means "start no new runs": of the whole daemon (`mosaic pause --all`, or any pause on a
# per-user daemon) or of one owner's submissions (`mosaic pause` by a user of a shared daemon).
# Runs already training go on; `pause --now` also parks them (state PARKED above). The wire
# keeps the word "paused" for a hold in replies (`status --json` readers rely on it).
HOLD_ALL = "all"
HOLD_OWNER = "owner"

# -- results ---------------------------------------------------------------------------------
# What a run costs, measured by its worker (issue 26, mosaicd.training.resources): each column's
# unit, and the bound a worker's figure must stay under (protocol checks finite, >= 0, < bound).
# NULL where it cannot be measured (the GPU's figures on a CPU). docs/resources.md.
RESOURCE_UNITS: dict[str, str] = {
    "flops_per_sample": "FLOP per sample, forward pass, a multiply-add counted as 2",
    "train_seconds": "s per epoch, wall time of the training pass",
    "cpu_seconds": "s per epoch, process CPU time of the training pass",
    "peak_memory_mb": "MiB, peak growth during a training pass (CUDA allocated or resident)",
    "latency_ms": "ms, median forward time of a batch of 1 after warm-up",
    "throughput_per_s": "samples per s, forward on one batch of the test loader",
    "energy_j": "J per epoch, the GPU's energy during the training pass (NVML)",
}
RESOURCE_COLUMNS: tuple[str, ...] = tuple(RESOURCE_UNITS)
RESOURCE_BOUNDS: dict[str, float] = {
    "flops_per_sample": 1e18,
    "train_seconds": 1e9,
    "cpu_seconds": 1e10,
    "peak_memory_mb": 1e9,
    "latency_ms": 1e9,
    "throughput_per_s": 1e15,
    "energy_j": 1e15,
}
# The last epoch's figures on the validation loader, when the data stage gives one
# (docs/tuning.md); None without one. In run_results and run_epochs.
VALIDATION_COLUMNS: tuple[str, ...] = ("val_loss", "val_acc")
# The columns of run_results, in table order; every one is a metaplot criterion.
RESULT_COLUMNS: tuple[str, ...] = (
    ("train_loss", "test_loss", "train_acc", "test_acc")  # the last epoch's figures
    + ("nb_params", "duration(s)", "epochs")  # the run's size and cost
    + ("overfit", "trainability", "slope")  # derived from its loss curves (docs/analysis.md)
    + RESOURCE_COLUMNS  # what it costs (issue 26)
    + VALIDATION_COLUMNS
)
# The columns a family can be matched on (`compare --size-by`, `metaplot --x`) and a Pareto
# front drawn against (`pareto --cost`), and the short names they may be given by.
SIZE_COLUMNS: tuple[str, ...] = ("nb_params", "duration(s)", *RESOURCE_COLUMNS)
SIZE_ALIASES: dict[str, str] = {
    "params": "nb_params",
    "flops": "flops_per_sample",
    "train_time": "train_seconds",
    "cpu_time": "cpu_seconds",
    "peak_memory": "peak_memory_mb",
    "memory": "peak_memory_mb",
    "latency": "latency_ms",
    "throughput": "throughput_per_s",
    "energy": "energy_j",
}
# Of those, the one where more is better (a cost is the less the better otherwise).
MORE_IS_BETTER: tuple[str, ...] = ("throughput_per_s",)


def size_column(name: str) -> str:
    """The run_results column `name` (or its short name) names as a size or a cost; ValueError
    with the valid names when it is none."""
    column = SIZE_ALIASES.get(name, name)
    if column not in SIZE_COLUMNS:
        raise ValueError(
            f"{name!r} is not a size or cost column of run_results; use one of: "
            f"{', '.join(SIZE_COLUMNS)} (or the short names "
            f"{', '.join(f'{k}={v}' for k, v in SIZE_ALIASES.items())})"
        )
    return column


# Keys of the measurement context a worker sends with its resource figures (stored in
# run_measurements): where and under what load they were taken.
MEASUREMENT_TEXT = ("device", "memory_method")
MEASUREMENT_NUMBERS = ("load_1m", "cpus", "threads", "gpu_seconds", "latency_spread", "members")
# The per-epoch columns of run_epochs besides run_id and epoch.
EPOCH_COLUMNS: tuple[str, ...] = (
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "duration(s)",
) + VALIDATION_COLUMNS

# -- pipelines and params --------------------------------------------------------------------
# Keys of a module dict that describe the module rather than parameterise it: never passed to
# the class as parameters and never stored as `{class}_{param}` rows. "name" holds the section
# name in every module dict, so a class parameter of that name is refused by the config checks.
MODULE_FIELDS: tuple[str, ...] = ("type", "class", "path_to_class", "key", "name")
# Of those, the keys a config section may set itself (the others are filled in by Mosaic).
SECTION_FIELDS: tuple[str, ...] = ("type", "class", "path_to_class", "key")
# What Mosaic itself gives every class by name (the run information: mosaicd.training.execution
# builds run_info from these names). A constructor parameter is filled from run_info first, so a
# section parameter of one of these names would never reach the class while `params` recorded it:
# the config checks and the daemon refuse such a name (docs/classes.md).
RUN_INFO_KEYS: tuple[str, ...] = ("run_id", "device", "seed", "epoch")
# What a class section parameter named like a run information key could be called instead.
RUN_INFO_RENAMES: dict[str, str] = {
    "run_id": "my_run_id",
    "device": "data_device",
    "seed": "data_seed",
    "epoch": "first_epoch",
}
# The params row of the [PROCESS] seed (the first repetition's seed); the row `seed` holds the
# run's own seed.
PROCESS_SEED_PARAM = "process_seed"


def run_info_key_problem(section: str, key: str) -> str | None:
    """Why a class section may not have a parameter `key`, or None (one message, both sides)."""
    if key not in RUN_INFO_KEYS:
        return None
    return (
        f"section [{section}]: parameter '{key}' is a name Mosaic gives every class itself "
        f"(run information: {', '.join(RUN_INFO_KEYS)}), so the class would receive Mosaic's "
        f"value, not this one; rename it (e.g. {RUN_INFO_RENAMES[key]}) in the section and in "
        "the class's __init__"
    )


# -- run files -------------------------------------------------------------------------------
# Every file a run writes in its run_files_path, named in one place.


def run_log_path(run_files_path: str, run_id: int) -> str:
    """The run's captured stdout/stderr (the seed's name)."""
    return os.path.join(run_files_path, f"output_{run_id}.log")


def checkpoint_path(run_files_path: str, run_id: int) -> str:
    """The run's last epoch-boundary checkpoint, from which it resumes."""
    return os.path.join(run_files_path, f"checkpoint_{run_id}.pt")


def history_path(run_files_path: str, run_id: int) -> str:
    """The run's per-epoch history, as a torch file."""
    return os.path.join(run_files_path, f"history_{run_id}.pt")


def model_path(run_files_path: str, class_name: str, run_id: int) -> str:
    """Where a module's save_model/load_model write and read its weights."""
    return os.path.join(run_files_path, f"model_{class_name}_{run_id}")
