"""What the analysis commands compute, as pure data: no matplotlib, no torch, no daemon.

`plotloss`, `metaplot`, `rekey` and `export` read a study database on a read-only connection,
so they work on a live study (WAL readers never block the daemon), on a `savedb` copy and on a
file moved to another machine. Only `rekey` changes anything, and it sends its changes to the
daemon (the database's single writer); this module just works out what they are. The
queries themselves are mosaic_client.study_reading's: here is what is made of their rows.
The formulas behind each criterion are in docs/analysis.md.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import sqlite3
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import contract, study_reading
from mosaic_client.study_reading import run_params

# Every column of run_results is a metaplot criterion (the shared contract names them once).
CRITERIA: tuple[str, ...] = contract.RESULT_COLUMNS
SPREADS = ("minmax", "std", "ci")
PLOT_EXTENSIONS = (".png", ".pdf", ".svg")


class AnalysisError(ValueError):
    """Input the analysis cannot use, with a message that says what is wrong and what to do."""


class StudyNotReadable(AnalysisError):
    """A study database the user may not read: a refusal, not a mistake in the input."""

    denied = True  # commands.common reports it with exit code DENIED


def _owner_name(path: str) -> str:
    uid = os.stat(path).st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def open_readonly(path: str) -> sqlite3.Connection:
    """A connection to a study database that cannot write, whoever else has it open."""
    if not os.path.isfile(path):
        raise AnalysisError(f"no database at {path}; give the path of a study database")
    if not os.access(path, os.R_OK):
        # Another user's study on a shared box (private by default: [MONITOR] umask).
        raise StudyNotReadable(
            f"{path}: you may not read it (it belongs to {_owner_name(path)}, mode "
            f"{os.stat(path).st_mode & 0o777:03o}); ask its owner, or give your own study"
        )
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        conn.execute("PRAGMA query_only = 1")
        tables = study_reading.table_names(conn)
    except sqlite3.DatabaseError as exc:
        raise AnalysisError(f"{path} is not a readable SQLite database ({exc})") from None
    missing = {"runs", "params", "run_results"} - tables
    if missing:
        conn.close()
        raise AnalysisError(
            f"{path} is not a Mosaic study database (no table "
            f"{', '.join(sorted(missing))}); give a database written by mosaicd"
        )
    return conn


def scheme_types(params: dict[str, Any], scheme: str) -> list[str]:
    """The types a scheme param lists ("a, b" -> ["a", "b"]); [] when the run has none."""
    value = params.get(scheme)
    if not isinstance(value, str):
        return []
    return [t.strip() for t in value.split(",") if t.strip()]


def _joined_keys(params: dict[str, Any], types: Sequence[str]) -> str | None:
    keys = [params.get(f"{t}_key") for t in types]
    if not keys or any(k is None for k in keys):
        return None
    return "_".join(str(k) for k in keys)


def data_key(params: dict[str, Any]) -> str | None:
    """The run's dataset key: the `{type}_key` of its data_scheme types, joined with '_'."""
    return _joined_keys(params, scheme_types(params, "data_scheme"))


def model_key(params: dict[str, Any]) -> str | None:
    """The run's model key: the `{type}_key` of its pipeline_scheme types, joined with '_'."""
    return _joined_keys(params, scheme_types(params, "pipeline_scheme"))


# -- plotloss ---------------------------------------------------------------------------------


@dataclass
class RunLosses:
    """One run's loss history, read from run_epochs, and its final results if it has any."""

    run_id: int
    status: str
    pipeline: str
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    test_loss: list[float | None] = field(default_factory=list)
    results: dict[str, Any] | None = None
    failure: str | None = None  # last line of the traceback of a failed run


def loss_histories(conn: sqlite3.Connection, run_ids: Sequence[int]) -> list[RunLosses]:
    """The per-epoch losses of the given runs, in the order of run_ids."""
    runs: dict[int, RunLosses] = {}
    wanted = set(run_ids)
    for run_id, status, pipeline, return_status in study_reading.runs(conn):
        if run_id in wanted:
            runs[run_id] = RunLosses(run_id, status, pipeline)
            lines = (return_status or "").strip().splitlines()
            if status == "failed" and lines:
                runs[run_id].failure = lines[-1]
    for run_id, epoch, train, test in study_reading.loss_rows(conn):
        run = runs.get(run_id)
        if run is not None:
            run.epochs.append(epoch)
            run.train_loss.append(train)
            run.test_loss.append(test)
    for run_id, values in study_reading.results_by_run(conn, CRITERIA).items():
        run = runs.get(run_id)
        if run is not None:
            run.results = dict(zip(CRITERIA, values))
    return [runs[i] for i in run_ids if i in runs]


def pages_needed(n_runs: int, plot_size: int) -> int:
    per_page = plot_size * plot_size
    return (n_runs + per_page - 1) // per_page


def spans_decades(values: Iterable[float | None]) -> bool:
    """True when positive values span more than a factor of ten: worth a log axis."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) > 10.0


# -- metaplot ---------------------------------------------------------------------------------


@dataclass
class MetaPoint:
    """One plotted point: the runs of one model key with one nb_params."""

    nb_params: int
    n: int
    mean: float
    min: float
    max: float
    std: float
    run_ids: list[int]
    # metaplot --ci: the 95% t interval of the mean (issue 28: a percentile bootstrap
    # under-covers at 6 runs); a point for one run.
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass
class MetaData:
    dataset_key: str
    criterion: str
    series: dict[str, list[MetaPoint]]
    used: int
    skipped: dict[str, list[int]]
    x: str = "nb_params"  # the size axis (run_results column; its values are the points' nb_params)

    def skipped_note(self) -> str | None:
        """One line counting the runs left out and why; None when every run counted."""
        if not self.skipped:
            return None
        total = sum(len(ids) for ids in self.skipped.values())
        parts = [f"{len(ids)} {reason}" for reason, ids in sorted(self.skipped.items())]
        return f"skipped {total} run(s) of {self.dataset_key}: {', '.join(parts)}"

    def as_json(self) -> dict[str, Any]:
        return {
            "dataset_key": self.dataset_key,
            "criterion": self.criterion,
            "x": self.x,
            "used": self.used,
            "skipped": self.skipped,
            "series": {key: [vars(p) for p in points] for key, points in self.series.items()},
        }


def size_value(values: list[float], column: str) -> float | int:
    """A configuration's place on a size axis: the median of its finished runs' figures (a
    count stays an integer; a measured figure keeps 4 significant digits, so that the
    repetitions of a configuration share one size however noisy their timings)."""
    found = statistics.median(values)
    return int(round(found)) if column == "nb_params" else float(f"{found:.4g}")


def configuration_sizes(
    params: dict[int, dict[str, Any]],
    statuses: dict[int, str],
    figures: dict[int, Any],
    column: str,
) -> dict[int, float | int]:
    """Each run's size on the axis `column` (figures: {run_id: its value of it}): its
    configuration's (every param but the repetition's, contract.REPETITION_PARAMS) median
    over the finished runs with a positive finite value (the matching and the plots use a log
    axis). A run whose configuration has none is left out."""
    signatures: dict[int, frozenset[Any]] = {}
    measured: dict[frozenset[Any], list[float]] = defaultdict(list)
    for run_id, own in params.items():
        signature = frozenset(own.items()) - {(k, own.get(k)) for k in contract.REPETITION_PARAMS}
        signatures[run_id] = signature
        figure = figures.get(run_id)
        if statuses.get(run_id) == "done" and figure is not None and math.isfinite(figure):
            if figure > 0:
                measured[signature].append(float(figure))
    sizes = {signature: size_value(v, column) for signature, v in measured.items()}
    return {r: sizes[s] for r, s in signatures.items() if s in sizes}


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise AnalysisError(f"unknown criterion {criterion!r}; use one of: {', '.join(CRITERIA)}")


def metaplot_data(
    conn: sqlite3.Connection,
    dataset_key: str,
    criterion: str,
    ci: bool = False,
    x: str = "nb_params",
) -> MetaData:
    """CRITERION per model key and size (the run_results column `x`, a configuration's median:
    configuration_sizes) over the runs of one dataset key: mean, min, max, standard deviation
    (sample, 0 for a single run) over the runs of each point; with ci, the 95% t interval of
    each mean (numpy and scipy, imported only then)."""
    check_criterion(criterion)
    try:
        x = contract.size_column(x)
    except ValueError as exc:
        raise AnalysisError(f"--x {exc}") from None
    params = run_params(conn)
    statuses = study_reading.run_statuses(conn)
    results = study_reading.results_by_run(conn, (x, criterion))
    sizes = configuration_sizes(params, statuses, {r: row[0] for r, row in results.items()}, x)
    present: set[str] = set()
    selected: list[int] = []
    for run_id in sorted(statuses):
        key = data_key(params.get(run_id, {}))
        if key is not None:
            present.add(key)
            if key == dataset_key:
                selected.append(run_id)
    if not selected:
        listing = ", ".join(sorted(present)) if present else "none (the study has no run)"
        raise AnalysisError(f"no run has dataset key {dataset_key!r}; keys present: {listing}")
    groups: dict[tuple[str, float], list[tuple[int, float]]] = defaultdict(list)
    skipped: dict[str, list[int]] = defaultdict(list)
    for run_id in selected:
        status = statuses[run_id]
        row = results.get(run_id)
        if status != "done":
            skipped[status].append(run_id)
        elif row is None:
            skipped["without results"].append(run_id)
        elif run_id not in sizes:
            skipped[f"without a positive {x}"].append(run_id)
        elif row[1] is None or not math.isfinite(row[1]):
            skipped[f"without {criterion}"].append(run_id)
        else:
            model = model_key(params[run_id]) or "(no model key)"
            groups[(model, sizes[run_id])].append((run_id, float(row[1])))
    if not groups:
        note = "; ".join(f"{len(ids)} {reason}" for reason, ids in sorted(skipped.items()))
        raise AnalysisError(
            f"no finished run of dataset key {dataset_key!r} has a {criterion} "
            f"to plot ({note}); wait for runs to finish or pick another "
            "criterion"
        )
    series: dict[str, list[MetaPoint]] = defaultdict(list)
    for (model, nb_params), members in sorted(groups.items()):
        values = [v for _, v in members]
        mean = sum(values) / len(values)
        std = (
            math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            if len(values) > 1
            else 0.0
        )
        point = MetaPoint(
            nb_params, len(values), mean, min(values), max(values), std, [i for i, _ in members]
        )
        if ci:
            from mosaic_client.verdict.statistics import mean_ci

            point.ci_low, point.ci_high = mean_ci(values)
        series[model].append(point)
    used = sum(len(m) for m in groups.values())
    return MetaData(dataset_key, criterion, dict(series), used, dict(skipped), x)


def plot_format(out: str) -> str:
    """The image format from OUT's extension, or a clear error."""
    ext = os.path.splitext(out)[1].lower()
    if ext not in PLOT_EXTENSIONS:
        raise AnalysisError(
            f"cannot tell the image format of {out!r} from its extension; end it "
            f"with {', '.join(PLOT_EXTENSIONS)}"
        )
    return ext[1:]


# -- rekey ------------------------------------------------------------------------------------


def load_pipelines(path: str) -> list[list[dict[str, Any]]]:
    """A `mosaic generate` file: a JSON list of pipelines, each a list of module maps."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise AnalysisError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise AnalysisError(
            f"{path} is not valid JSON ({exc}); give a file written by `mosaic generate`"
        ) from None
    if not isinstance(data, list) or not data:
        raise AnalysisError(
            f"{path} must hold a non-empty JSON list of pipelines, as written by `mosaic generate`"
        )
    for index, pipeline in enumerate(data, 1):
        if not isinstance(pipeline, list) or not all(
            isinstance(m, dict) and isinstance(m.get("type"), str) for m in pipeline
        ):
            raise AnalysisError(
                f"pipeline #{index} of {path} is not a list of modules each with "
                "a 'type'; give a file written by `mosaic generate`"
            )
    return data


def _signature(modules: Sequence[dict[str, Any]], exact: bool, base_dir: str) -> str:
    """A pipeline's identity for matching: everything but `key`; path_to_class resolved to an
    absolute path (exact) or reduced to its file name (a study moved to another machine)."""
    normal = []
    for module in modules:
        entry = {k: v for k, v in module.items() if k != "key"}
        path = entry.get("path_to_class")
        if isinstance(path, str):
            entry["path_to_class"] = (
                os.path.realpath(os.path.join(base_dir, path)) if exact else os.path.basename(path)
            )
        normal.append(entry)
    return json.dumps(normal, sort_keys=True)


@dataclass
class RekeyPlan:
    """What a pipelines file changes: [run_id, '<type>_key', key] items, and per-key counts."""

    changes: list[list[Any]]
    # (param name, key) -> [runs matched, runs whose key changes]
    per_key: dict[tuple[str, str], list[int]]
    matched_runs: list[int]
    unmatched: list[int]  # 1-based indexes of file pipelines that match no run


def rekey_plan(
    conn: sqlite3.Connection, pipelines: list[list[dict[str, Any]]], file_dir: str = "."
) -> RekeyPlan:
    exact: dict[str, list[int]] = defaultdict(list)
    loose: dict[str, list[int]] = defaultdict(list)
    for index, pipeline in enumerate(pipelines):
        exact[_signature(pipeline, True, file_dir)].append(index)
        loose[_signature(pipeline, False, file_dir)].append(index)
    params = run_params(conn)
    used: set[int] = set()
    changes: list[list[Any]] = []
    per_key: dict[tuple[str, str], list[int]] = {}
    matched: list[int] = []
    for run_id in sorted(params):
        try:
            modules = json.loads(params[run_id].get("pipeline") or "")
        except (TypeError, json.JSONDecodeError):
            continue
        if not isinstance(modules, list):
            continue
        candidates = exact.get(_signature(modules, True, "/")) or loose.get(
            _signature(modules, False, "/")
        )
        if not candidates:
            continue
        used.update(candidates)
        keys = _agreed_keys(pipelines, candidates)
        matched.append(run_id)
        for name, key in keys.items():
            counts = per_key.setdefault((name, key), [0, 0])
            counts[0] += 1
            if params[run_id].get(name) != key:
                counts[1] += 1
                changes.append([run_id, name, key])
    unmatched = [i + 1 for i in range(len(pipelines)) if i not in used]
    return RekeyPlan(changes, per_key, matched, unmatched)


def _agreed_keys(pipelines: list[list[dict[str, Any]]], indexes: list[int]) -> dict[str, str]:
    """The `{type}_key` values the matching file pipelines give; copies of one pipeline (the
    multiplicity repeats them) must agree, else the file is ambiguous and nothing is written."""
    keys: dict[str, tuple[str, int]] = {}
    for index in indexes:
        for module in pipelines[index]:
            if "key" not in module or module["key"] is None:
                continue
            name, key = f"{module['type']}_key", str(module["key"])
            if name in keys and keys[name][0] != key:
                raise AnalysisError(
                    f"pipelines #{keys[name][1] + 1} and #{index + 1} are the same pipeline but "
                    f"give {name} {keys[name][0]!r} and {key!r}; make their keys agree. Nothing "
                    "was changed."
                )
            keys.setdefault(name, (key, index))
    return {name: key for name, (key, _) in keys.items()}


# -- export -----------------------------------------------------------------------------------


def export_table(conn: sqlite3.Connection) -> tuple[list[str], list[list[Any]]]:
    """One row per run: run_id, status, pipeline (readable), every param, every result, and
    where its resource figures were measured (`measured_*`).

    A param whose name is already a column (PROCESS `epochs` next to the result `epochs`, the
    JSON `pipeline` next to the readable one) is exported as `param_<name>`.
    """
    params = run_params(conn)
    fixed = ["run_id", "status", "pipeline"]
    taken = set(fixed) | set(CRITERIA)
    names: list[str] = sorted({n for p in params.values() for n in p})
    headers: dict[str, str] = {}
    for name in names:
        header = name
        while header in taken:
            header = f"param_{header}"
        taken.add(header)
        headers[name] = header
    results = study_reading.results_by_run(conn, CRITERIA)
    # Where the resource figures were measured (docs/resources.md), after the results.
    measured = study_reading.measurements_by_run(conn)
    context = [f"measured_{n}" for n in study_reading.MEASUREMENT_NAMES]
    rows = []
    for run_id, status, pipeline, _ in study_reading.runs(conn):
        own = params.get(run_id, {})
        result = results.get(run_id, (None,) * len(CRITERIA))
        where = measured.get(run_id, (None,) * len(context))
        rows.append([run_id, status, pipeline, *(own.get(n) for n in names), *result, *where])
    return fixed + [headers[n] for n in names] + list(CRITERIA) + context, rows
