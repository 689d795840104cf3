"""The submission schema: every ``[PROCESS]`` and ``[MONITOR]`` key declared once.

Both sides check submissions against this one table: the client's config reader
(:mod:`mosaic_client.config`) turns the INI text into typed values and checks them with
:func:`value_problem`, and the daemon checks every submit request, hand-made or not, with
:func:`submission_problem` before anything is written. A range or a default changes here and
nowhere else. Standard library only (part of the shared contract).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, cast

from mosaic_client import search

PROCESS = "PROCESS"
MONITOR = "MONITOR"
SEARCH = search.SEARCH

# torch.nn loss classes, listed by hand because importing torch would cost the CLI seconds.
TORCH_LOSSES: tuple[str, ...] = (
    "L1Loss",
    "MSELoss",
    "CrossEntropyLoss",
    "CTCLoss",
    "NLLLoss",
    "PoissonNLLLoss",
    "GaussianNLLLoss",
    "KLDivLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "MarginRankingLoss",
    "HingeEmbeddingLoss",
    "MultiLabelMarginLoss",
    "HuberLoss",
    "SmoothL1Loss",
    "SoftMarginLoss",
    "MultiLabelSoftMarginLoss",
    "CosineEmbeddingLoss",
    "MultiMarginLoss",
    "TripletMarginLoss",
    "TripletMarginWithDistanceLoss",
)

TORCH_OPTIMIZERS: tuple[str, ...] = (
    "SGD",
    "Adam",
    "AdamW",
    "Adagrad",
    "Adadelta",
    "Adamax",
    "ASGD",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
)

ACCURACY_MODES: tuple[str, ...] = ("binary", "logits", "argmax", "none")
ENSEMBLE_MODES: tuple[str, ...] = ("auto", "off")
# The largest ensemble by default: benchmarks/ensemble.py measures the gain still growing at 16
# members of a tiny MLP on a 2-core machine, and a larger group holds more runs on one worker.
ENSEMBLE_MAX_DEFAULT = 16

# The accuracy that makes sense for a loss follows from what the model is expected to output.
DEFAULT_ACCURACY: dict[str, str] = {
    "BCELoss": "binary",
    "BCEWithLogitsLoss": "logits",
    "CrossEntropyLoss": "argmax",
    "NLLLoss": "argmax",
}

# Seeds are stored in SQLite, whose INTEGER is a signed 64-bit value.
MAX_SEED = 2**63 - 1
# Counts (epochs, processes, repetitions, retries) are 32-bit: more is only ever a typo.
MAX_COUNT = 2**31
# A timeout beyond this many seconds (30,000 years) is a typo, and would overflow timers.
MAX_TIMEOUT = 1e12

IDENTIFIER_RE = re.compile(r"[A-Za-z_]\w*")

# [MONITOR] umask: the umasks a user may choose for what a shared daemon writes for them.
UMASKS = ("077", "027", "022")

# Value kinds. The client parses INI text into these; the daemon receives them from msgpack.
FLOAT = "float"  # a finite number (an int is accepted)
INT = "int"
BOOL = "bool"
CHOICE = "choice"  # one of Key.choices
IDENTIFIER = "identifier"  # a Python name
SCHEME = "scheme"  # a non-empty list of type names
PATH = "path"  # a path; the client resolves it, the daemon requires it absolute
GPU_LIST = "gpu_list"  # a list of GPU ids (strings or integers), possibly empty


@dataclass(frozen=True)
class Key:
    """One configuration key: its section, kind, limits, default and meaning."""

    section: str
    name: str
    kind: str
    doc: str
    required: bool = False
    # The value when the key is absent or set to None. A config file must give a required key;
    # the daemon applies the default when a hand-made request leaves a MONITOR key out.
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    # A minimum the value must exceed rather than reach (lr > 0, timeout > 0).
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    # Whether "None" (or an empty value in the INI) is allowed and means "not set".
    nullable: bool = False
    # -- how the config reader speaks of the key and reads its INI text --------------------
    # What the key is, in a few words, for messages ("must be at least 1 (the number of epochs)").
    label: str = ""
    # When set, the one phrase any bad value gets ("expected an integer seed between ...").
    expects: str = ""
    # A choice compared in lower case (accuracy = Binary is binary).
    fold_case: bool = False
    # A path that must name an existing file when the config is read (else: made when needed).
    must_exist: bool = False
    # A number that may be a distribution's text instead ([PROCESS] lr, docs/tuning.md).
    searchable: bool = False

    @property
    def named(self) -> str:
        """The key in words: its label, else its doc."""
        return self.label or self.doc

    @property
    def where(self) -> str:
        return f"{self.section} {self.name}"

    def range_text(self) -> str:
        """The allowed values in words, for messages and docs."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        noun = {INT: "an integer", FLOAT: "a number"}.get(self.kind, self.kind)
        low, high = self.minimum, self.maximum
        if high is not None and high < MAX_COUNT and low is not None:
            return f"{noun} between {low:g} and {high:g}"
        if high is not None and high == MAX_SEED and low is not None:
            return f"{noun} between {low:g} and {high}"
        if low is not None:
            return f"{noun} {'greater than' if self.exclusive_minimum else 'of at least'} {low:g}"
        return noun


def _count(section: str, name: str, doc: str, minimum: int, **more: Any) -> Key:
    """A 32-bit count (epochs, processes, repetitions, retries): more is only ever a typo."""
    return Key(section, name, INT, doc, minimum=minimum, maximum=MAX_COUNT, **more)


KEYS: tuple[Key, ...] = (
    # -- PROCESS: what every run of the study does -----------------------------------------
    Key(
        PROCESS,
        "lr",
        FLOAT,
        "the learning rate, e.g. lr = 0.001",
        required=True,
        label="the learning rate",
        minimum=0.0,
        exclusive_minimum=True,
        searchable=True,
    ),
    _count(
        PROCESS,
        "epochs",
        "the number of training epochs, e.g. epochs = 10",
        1,
        required=True,
        label="the number of epochs",
    ),
    Key(
        PROCESS,
        "data_scheme",
        SCHEME,
        "the types of the data stages, in order, e.g. data_scheme = dataset",
        required=True,
    ),
    Key(
        PROCESS,
        "pipeline_scheme",
        SCHEME,
        "the types of the model stages, in order, e.g. pipeline_scheme = model",
        required=True,
    ),
    Key(
        PROCESS,
        "loss_function",
        CHOICE,
        "a torch.nn loss class such as MSELoss, BCELoss or CrossEntropyLoss",
        choices=TORCH_LOSSES,
        nullable=True,
        label="loss",
        expects="a torch.nn loss class name such as MSELoss, BCELoss or CrossEntropyLoss",
    ),
    Key(
        PROCESS,
        "class_loss_function",
        IDENTIFIER,
        "the name of your own loss class, defined in path_to_class_loss_function",
        nullable=True,
    ),
    Key(
        PROCESS,
        "path_to_class_loss_function",
        PATH,
        "the .py file that defines class_loss_function",
        nullable=True,
        must_exist=True,
    ),
    Key(
        PROCESS,
        "run_files_path",
        PATH,
        "the directory of the run files (logs, checkpoints, saved models)",
        default=".runs",
    ),
    Key(
        PROCESS,
        "optimizer",
        CHOICE,
        "the torch.optim optimizer",
        default="Adam",
        choices=TORCH_OPTIMIZERS,
        label="optimizer",
    ),
    Key(
        PROCESS,
        "accuracy",
        CHOICE,
        "how accuracy is computed from the model's output (default: from the loss)",
        choices=ACCURACY_MODES,
        nullable=True,
        label="accuracy mode",
        fold_case=True,
    ),
    Key(
        PROCESS,
        "seed",
        INT,
        "the first repetition's seed; repetition i gets seed + i (None: random seeds)",
        minimum=0,
        maximum=MAX_SEED,
        nullable=True,
        expects=f"an integer seed between 0 and {MAX_SEED}",
    ),
    Key(
        PROCESS,
        "deterministic",
        BOOL,
        "true to run with torch's deterministic algorithms (and the cuDNN and cuBLAS settings "
        "they need): same seed, same numbers; an operation with no deterministic "
        "implementation then fails the run",
        default=False,
    ),
    # -- MONITOR: how the daemon runs them -------------------------------------------------
    Key(
        MONITOR,
        "need_gpu",
        BOOL,
        "true to train on GPUs, false for CPUs",
        required=True,
        default=False,
    ),
    Key(
        MONITOR,
        "gpu_available",
        GPU_LIST,
        "GPU names separated by commas, or None when unused",
        required=True,
        default=(),
        nullable=True,
    ),
    _count(MONITOR, "nb_processus", "how many runs may train at once", 1, required=True, default=1),
    _count(
        MONITOR,
        "multiplicity",
        "how many times each pipeline is repeated",
        1,
        required=True,
        default=1,
    ),
    _count(MONITOR, "retries", "how many times a failed run is retried", 0, default=0),
    Key(
        MONITOR,
        "timeout",
        FLOAT,
        "a positive number of seconds per run, or None",
        minimum=0.0,
        maximum=MAX_TIMEOUT,
        exclusive_minimum=True,
        nullable=True,
        expects="a positive number of seconds, or None",
    ),
    Key(
        MONITOR,
        "max_log_mb",
        FLOAT,
        "the most MiB a run's output log keeps: its first and last halves, and a line saying "
        "how much was cut between them",
        default=50.0,
        minimum=0.0,
        maximum=1e6,
        exclusive_minimum=True,
        label="the run log cap in MiB",
    ),
    Key(
        MONITOR,
        "ensemble",
        CHOICE,
        "auto to train the repetitions of one pipeline together as one vmapped model "
        "(docs/ensembles.md), off to train every run alone",
        default="auto",
        choices=ENSEMBLE_MODES,
        label="ensemble mode",
        fold_case=True,
    ),
    _count(
        MONITOR,
        "ensemble_max",
        "the most repetitions trained together in one ensemble",
        1,
        default=ENSEMBLE_MAX_DEFAULT,
        label="the ensemble size",
    ),
    Key(
        MONITOR,
        "umask",
        CHOICE,
        "on a shared daemon, the umask of the workers that run your code and of the study "
        "and run files made for you: 077 keeps them yours alone, 027 lets your group read "
        "them, 022 everyone (docs/deployment.md)",
        default="077",
        choices=UMASKS,
        label="the umask of your runs",
    ),
    Key(
        MONITOR,
        "data_cache_mb",
        FLOAT,
        "the most MiB of prepared data stages each worker keeps in memory for the next runs "
        "(docs/performance.md); 0 turns the cache off",
        default=512.0,
        minimum=0.0,
        maximum=1e7,
        label="the data cache size in MiB",
    ),
    Key(
        MONITOR,
        "cache_dir",
        PATH,
        "a directory where the data stages that ask for it (cache_on_disk = True) are kept "
        "on disk, shared by your workers; None: no disk cache",
        nullable=True,
    ),
    Key(
        MONITOR,
        "cache_size_mb",
        FLOAT,
        "the most MiB the on-disk data cache (cache_dir) holds; the least recently used "
        "entries are removed first",
        default=2048.0,
        minimum=0.0,
        maximum=1e9,
        label="the on-disk data cache size in MiB",
    ),
    # -- SEARCH: a tuned comparison (docs/tuning.md); the section is optional -----------------
    Key(
        SEARCH,
        "strategy",
        CHOICE,
        "how trials are drawn: grid (the product of the choice()/int() values), random, or "
        "tpe (Optuna's Tree-structured Parzen Estimator)",
        default="tpe",
        choices=search.STRATEGIES,
        label="search strategy",
        fold_case=True,
    ),
    Key(
        SEARCH,
        "trials",
        INT,
        "the trials per family x size (per combination of the grid's lists); the same for all",
        default=20,
        minimum=1,
        maximum=search.MAX_TRIALS,
        label="the number of trials",
    ),
    Key(
        SEARCH,
        "metric",
        CHOICE,
        "the run_results column trials are selected on (val_loss needs a validation loader)",
        default="val_loss",
        choices=search.METRICS,
        label="selection metric",
    ),
    Key(
        SEARCH,
        "direction",
        CHOICE,
        "whether the metric is better low (minimize) or high (maximize)",
        default="minimize",
        choices=search.DIRECTIONS,
        label="direction",
        fold_case=True,
    ),
    Key(
        SEARCH,
        "pruning",
        CHOICE,
        "stop unpromising trials early, on the per-epoch metric: none, median or hyperband",
        default="none",
        choices=search.PRUNINGS,
        label="pruning",
        fold_case=True,
    ),
    Key(
        SEARCH,
        "final_repetitions",
        INT,
        "how many fresh seeds each family x size's best configuration is run with",
        default=5,
        minimum=1,
        maximum=search.MAX_TRIALS,
        label="the number of final repetitions",
    ),
    Key(
        SEARCH,
        "round_size",
        INT,
        "trials per round: a trial is drawn from the finished trials of the earlier rounds "
        "of its group, so the same seed gives the same trials on any machine",
        default=search.DEFAULT_ROUND_SIZE,
        minimum=1,
        maximum=search.MAX_TRIALS,
        label="the round size",
    ),
)

BY_SECTION: dict[str, dict[str, Key]] = {
    PROCESS: {k.name: k for k in KEYS if k.section == PROCESS},
    MONITOR: {k.name: k for k in KEYS if k.section == MONITOR},
    SEARCH: {k.name: k for k in KEYS if k.section == SEARCH},
}
PROCESS_KEYS: tuple[str, ...] = tuple(BY_SECTION[PROCESS])
MONITOR_KEYS: tuple[str, ...] = tuple(BY_SECTION[MONITOR])
SEARCH_KEYS: tuple[str, ...] = tuple(BY_SECTION[SEARCH])
# The [MONITOR] keys a worker's data cache reads (they travel in RunSpec's "data_cache").
DATA_CACHE_KEYS: tuple[str, ...] = ("data_cache_mb", "cache_dir", "cache_size_mb")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def value_problem(key: Key, value: Any) -> str | None:
    """What is wrong with a typed value of `key` (None: it is fine). Absent values are the
    caller's concern (see :func:`section_problem`); None is accepted where the key allows it."""
    if value is None:
        return None if key.nullable or not key.required else "must be set"
    if key.searchable and isinstance(value, str):
        try:
            search.parse(value)
        except ValueError as exc:
            return str(exc)
        return None
    if key.kind in (INT, FLOAT):
        if key.kind == INT and not _is_int(value):
            return f"expected {key.range_text()}"
        if key.kind == FLOAT and not _is_number(value):
            return f"expected {key.range_text()}"
        low, high = key.minimum, key.maximum
        if low is not None and (value <= low if key.exclusive_minimum else value < low):
            return f"expected {key.range_text()}"
        if high is not None and value > high:
            return f"expected {key.range_text()}"
        return None
    if key.kind == BOOL:
        return None if isinstance(value, bool) else "expected true or false"
    if key.kind == CHOICE:
        return None if value in key.choices else f"expected {key.range_text()}"
    if key.kind == IDENTIFIER:
        ok = isinstance(value, str) and IDENTIFIER_RE.fullmatch(value)
        return None if ok else "expected a Python class name"
    if key.kind == SCHEME:
        ok = (
            isinstance(value, list)
            and value
            and all(isinstance(t, str) and IDENTIFIER_RE.fullmatch(t) for t in value)
        )
        return None if ok else "expected a non-empty list of type names"
    if key.kind == PATH:
        return None if isinstance(value, str) and value else "expected a path"
    if key.kind == GPU_LIST:
        ok = isinstance(value, (list, tuple)) and all(
            (isinstance(g, str) and g) or _is_int(g) for g in value
        )
        return None if ok else "expected a list of GPU ids"
    raise AssertionError(f"unknown kind {key.kind!r} of {key.where}")


_SCALAR = (str, int, float, bool, type(None))


def section_problem(section: str, values: dict[str, Any], require: bool = True) -> str | None:
    """The first problem of a whole section as sent to the daemon, or None. With `require`
    false, absent keys take their defaults (see :func:`value`)."""
    keys = BY_SECTION[section]
    for key in keys.values():
        if key.name not in values:
            if key.required and require:
                return f"{key.where} is missing: {key.doc}"
            continue
        problem = value_problem(key, values[key.name])
        if problem:
            return f"{key.where} {problem}, got {values[key.name]!r:.80}"
    for name, value in values.items():
        # Unknown keys travel into params: they must be plain values.
        if name not in keys and not isinstance(value, _SCALAR):
            return f"{section} {name} has an unusable value {value!r:.80}"
    return None


def loss_problem(process: dict[str, Any]) -> str | None:
    """The loss is given one way: a torch.nn class, or a class of the user's with its file."""
    builtin = process.get("loss_function")
    own = process.get("class_loss_function"), process.get("path_to_class_loss_function")
    if builtin is not None and any(v is not None for v in own):
        return (
            "give either loss_function or class_loss_function + "
            "path_to_class_loss_function, not both"
        )
    if builtin is None and any(v is None for v in own):
        return (
            "give loss_function (a torch.nn loss such as MSELoss) or both "
            "class_loss_function and path_to_class_loss_function"
        )
    return None


def submission_problem(process: dict[str, Any], monitor: dict[str, Any]) -> str | None:
    """What makes a submission's PROCESS and MONITOR unusable, or None. The client always sends
    a complete PROCESS (run_files_path resolved); MONITOR keys left out take their defaults."""
    run_files = process.get("run_files_path")
    if not (isinstance(run_files, str) and os.path.isabs(run_files)):
        return f"PROCESS run_files_path must be an absolute path, got {run_files!r:.80}"
    return (
        section_problem(PROCESS, process)
        or section_problem(MONITOR, monitor, False)
        or loss_problem(process)
    )


def value(section: str, values: Mapping[str, Any], name: str) -> Any:
    """A key's value in a submitted section, or its default when absent or None."""
    got = values.get(name)
    return BY_SECTION[section][name].default if got is None else got


# -- resolved settings -----------------------------------------------------------------------
# A submission's sections with every key present and typed, its defaults filled in from KEYS.
# The daemon resolves them once, when it builds a Submission (mosaicd.scheduling.submissions),
# so that nothing later looks a default up; the study keeps the user's values as they were
# sent, so `mosaic show` and older studies read the same, and a default changed here applies
# to what a run does, never to what a study says the user asked for.


class ProcessSettings(TypedDict):
    """[PROCESS] resolved: what every run of a submission does (it travels in RunSpec)."""

    lr: float | str  # a distribution's text in a search's trial (docs/tuning.md)
    epochs: int
    data_scheme: list[str]
    pipeline_scheme: list[str]
    loss_function: str | None
    class_loss_function: str | None
    path_to_class_loss_function: str | None
    run_files_path: str
    optimizer: str
    # Never None: absent (a hand-made request), it is "none"; the client fills it from the loss.
    accuracy: str
    seed: int | None
    deterministic: bool


class MonitorSettings(TypedDict):
    """[MONITOR] resolved: how the daemon runs a submission."""

    need_gpu: bool
    gpu_available: list[str | int]
    nb_processus: int
    multiplicity: int
    retries: int
    timeout: float | None
    max_log_mb: float
    ensemble: str
    ensemble_max: int
    umask: str
    data_cache_mb: float
    cache_dir: str | None
    cache_size_mb: float


class SearchSettings(TypedDict):
    """[SEARCH] resolved (docs/tuning.md)."""

    strategy: str
    trials: int
    metric: str
    direction: str
    pruning: str
    final_repetitions: int
    round_size: int


# The typed forms and the table must name the same keys (a key added to KEYS needs its type).
assert tuple(ProcessSettings.__annotations__) == PROCESS_KEYS, "ProcessSettings != PROCESS keys"
assert tuple(MonitorSettings.__annotations__) == MONITOR_KEYS, "MonitorSettings != MONITOR keys"
assert tuple(SearchSettings.__annotations__) == SEARCH_KEYS, "SearchSettings != SEARCH keys"


def _typed(key: Key, got: Any) -> Any:
    """A checked value in its declared type: stored JSON gives 3 for 3.0, and a tuple default
    must travel as a list (msgpack and JSON know lists only)."""
    if got is None:
        return None
    if key.searchable and isinstance(got, str):
        return got
    if key.kind == FLOAT:
        return float(got)
    if key.kind == INT:
        return int(got)
    if key.kind in (SCHEME, GPU_LIST):
        return list(got)
    return got


def _resolved(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: _typed(key, value(section, values, name)) for name, key in BY_SECTION[section].items()
    }


def process_settings(process: Mapping[str, Any]) -> ProcessSettings:
    """A checked [PROCESS] (see :func:`submission_problem`) with every key, typed; keys the
    schema does not know (they became params) are left out."""
    settings = _resolved(PROCESS, process)
    # No accuracy given (a hand-made request): none, as the client would have said explicitly.
    settings["accuracy"] = settings["accuracy"] or "none"
    return cast(ProcessSettings, settings)


def monitor_settings(monitor: Mapping[str, Any]) -> MonitorSettings:
    """A checked [MONITOR] with every key, typed: the keys left out take their defaults."""
    return cast(MonitorSettings, _resolved(MONITOR, monitor))


def search_settings(values: Mapping[str, Any]) -> SearchSettings:
    """A checked [SEARCH] with every key, typed."""
    return cast(SearchSettings, _resolved(SEARCH, values))


def default_accuracy(loss_function: str | None) -> str:
    return DEFAULT_ACCURACY.get(loss_function or "", "none")
