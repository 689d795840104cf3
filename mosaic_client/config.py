"""The Mosaic configuration language: one INI file expanded into many pipelines.

This module is imported by the thin ``mosaic`` client, which must start fast, so it uses the
standard library only: torch and matplotlib are never imported here, and the names of torch's
loss functions and optimizers are checked against static tuples instead.

The INI dialect is read by a small hand-written reader rather than :mod:`configparser` because
the client must report *every* problem of a file at once (configparser in strict mode stops at
the first duplicate, and in lax mode silently lets later duplicates win), must know the line of
each value, and must keep the case of parameter names, which are passed by name to the user's
constructors.  See ``docs/configuration.md`` for the language reference.
"""

import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACCURACY_MODES",
    "ConfigError",
    "ExpandedConfig",
    "MAX_PIPELINES",
    "MAX_RANGE_SIZE",
    "Problem",
    "TORCH_LOSSES",
    "TORCH_OPTIMIZERS",
    "load_config",
    "parse_value",
    "pipelines_to_json",
    "resolve_path",
    "typed_scalar",
]

PROCESS = "PROCESS"
MONITOR = "MONITOR"

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

# The accuracy that makes sense for a loss follows from what the model is expected to output.
_DEFAULT_ACCURACY: dict[str, str] = {
    "BCELoss": "binary",
    "BCEWithLogitsLoss": "logits",
    "CrossEntropyLoss": "argmax",
    "NLLLoss": "argmax",
}

# Guards against a typo such as {1-1000000000} eating the client's memory before the user
# sees anything; a real study never needs more than this.
MAX_RANGE_SIZE = 100_000
MAX_PIPELINES = 100_000

_PROCESS_KEYS = (
    "lr",
    "epochs",
    "data_scheme",
    "pipeline_scheme",
    "loss_function",
    "class_loss_function",
    "path_to_class_loss_function",
    "run_files_path",
    "optimizer",
    "accuracy",
    "seed",
)
_MONITOR_KEYS = ("need_gpu", "gpu_available", "nb_processus", "multiplicity", "retries", "timeout")
_RESERVED_CLASS_KEYS = ("type", "class", "path_to_class", "key")
# "name" is filled with the section name in every module dict, so a parameter of that name
# would be silently overwritten.
_FORBIDDEN_PARAMS = ("name",)

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")

# Seeds are stored in SQLite, whose INTEGER is a signed 64-bit value.
_MAX_SEED = 2**63 - 1

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_RANGE_PARTS_RE = re.compile(r"([+-]?[^-]*)-(.*)")
_IDENTIFIER_RE = re.compile(r"[A-Za-z_]\w*")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
# An indented line that looks like "name = ..." is taken as a new key rather than as the
# continuation of the previous value, so that indenting a section's body does not silently glue
# two parameters together.
_KEY_LINE_RE = re.compile(r"[A-Za-z_][\w.\-]*\s*[=:]")
_INLINE_COMMENT_RE = re.compile(r"\s[#;].*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located as precisely as the reader could."""

    file: str
    section: str | None
    key: str | None
    value: str | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.section is not None:
            where += f" [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
            if self.value is not None:
                where += f" = '{self.value}'"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem of a config file, so the user can fix them in one pass."""

    def __init__(self, problems: Sequence[Problem], warnings: Sequence[str] = ()) -> None:
        self.problems: list[Problem] = list(problems)
        self.warnings: list[str] = list(warnings)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


@dataclass
class ExpandedConfig:
    """A validated config file with its pipelines fully expanded."""

    config_path: str
    process: dict[str, Any]
    monitor: dict[str, Any]
    pipelines: list[list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Values


def typed_scalar(raw: str) -> int | float | str:
    """Type one config value the way a Python literal would be: int, then float, else str."""
    text = raw.strip()
    try:
        if _INT_RE.fullmatch(text):
            return int(text)
        if _FLOAT_RE.fullmatch(text):
            return float(text)
    except ValueError:
        # int() refuses literals beyond Python's digit limit; such a thing is not a number a
        # constructor could want, so it stays text.
        return text
    return text


def _check_braces(text: str) -> None:
    depth = 0
    for char in text:
        if char == "{":
            if depth:
                raise ValueError("nested '{' inside a range; a range is written {start-end}")
            depth = 1
        elif char == "}":
            if not depth:
                raise ValueError("'}' without a matching '{'")
            depth = 0
        elif char == "," and depth:
            raise ValueError(
                "',' inside braces; a range is written {start-end}, "
                "separate values are written as a list: 1, 2, 3"
            )
    if depth:
        raise ValueError("'{' is never closed; a range is written {start-end}, e.g. {2-5}")


def _parse_range(item: str) -> list[int]:
    if not (item.startswith("{") and item.endswith("}")):
        raise ValueError(
            f"range '{item}' must be a whole list item, like {{2-5}}; "
            "text around the braces is not allowed"
        )
    inner = item[1:-1].strip()
    if not inner:
        raise ValueError("empty range {}; write {start-end}, e.g. {2-5}")
    match = _RANGE_PARTS_RE.fullmatch(inner)
    if match is None:
        raise ValueError(
            f"range {{{inner}}} needs a start and an end separated by '-', like {{2-5}}"
        )
    start_text, end_text = match.group(1).strip(), match.group(2).strip()
    if not start_text or not end_text:
        missing = "start" if not start_text else "end"
        raise ValueError(f"range {{{inner}}} has no {missing}; write {{start-end}}, e.g. {{2-5}}")
    if not (_INT_RE.fullmatch(start_text) and _INT_RE.fullmatch(end_text)):
        raise ValueError(
            f"range bounds must be integers, got '{start_text}' and '{end_text}'; "
            "for other values write a list, e.g. 0.1, 0.2, 0.5"
        )
    start, end = int(start_text), int(end_text)
    if start > end:
        raise ValueError(f"range start {start} is greater than end {end}; write {{{end}-{start}}}")
    if end - start + 1 > MAX_RANGE_SIZE:
        raise ValueError(
            f"range {{{start}-{end}}} has {end - start + 1} values; the limit is {MAX_RANGE_SIZE}"
        )
    return list(range(start, end + 1))


def parse_value(raw: str) -> list[int | float | str]:
    """Expand one parameter value into its typed values: a string, a list, a range or a mix.

    Raises ``ValueError`` with a message meant for the user when the value is malformed.
    """
    text = raw.strip()
    if not text:
        raise ValueError("empty value; write a value, a list (a, b) or a range ({2-5})")
    _check_braces(text)
    values: list[int | float | str] = []
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            raise ValueError(f"list item {position} is empty; remove the extra ','")
        if "{" in item or "}" in item:
            values.extend(_parse_range(item))
        else:
            values.append(typed_scalar(item))
    return values


def _split_names(text: str) -> list[str]:
    """Split a comma list of plain names; empty items are kept as '' so callers can report."""
    return [item.strip() for item in text.split(",")]


# --------------------------------------------------------------------------------------------
# Paths


def resolve_path(value: str, cwd: str, config_dir: str, must_exist: bool) -> str | None:
    """Resolve a user path: the client's cwd first, then the config file's directory.

    Returns an absolute path, or ``None`` when ``must_exist`` and neither location has it.
    Without ``must_exist`` a path found nowhere is taken relative to the cwd, which is where a
    user expects a new directory such as ``.runs`` to appear.
    """
    text = os.path.expanduser(value.strip())
    if os.path.isabs(text):
        path = os.path.normpath(text)
        return path if not must_exist or os.path.exists(path) else None
    for base in (cwd, config_dir):
        candidate = os.path.normpath(os.path.join(os.path.abspath(base), text))
        if os.path.exists(candidate):
            return candidate
    if must_exist:
        return None
    return os.path.normpath(os.path.join(os.path.abspath(cwd), text))


# --------------------------------------------------------------------------------------------
# INI reader


@dataclass
class _Entry:
    key: str
    value: str
    line: int


@dataclass
class _Section:
    name: str
    line: int
    entries: dict[str, _Entry] = field(default_factory=dict)


class _Report:
    """Collects problems and warnings located in one file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.warnings: list[str] = []

    def error(
        self,
        message: str,
        section: str | None = None,
        key: str | None = None,
        value: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problems.append(Problem(self.file, section, key, value, message, line))

    def entry_error(self, section: _Section, entry: _Entry, message: str) -> None:
        self.error(message, section.name, entry.key, entry.value, entry.line)

    def missing(self, section: _Section, key: str, hint: str) -> None:
        self.error(f"required key is missing ({hint})", section.name, key, line=section.line)

    def warn(
        self,
        message: str,
        section: str | None = None,
        key: str | None = None,
        value: str | None = None,
        line: int | None = None,
    ) -> None:
        self.warnings.append(str(Problem(self.file, section, key, value, message, line)))


def _read_ini(text: str, report: _Report) -> list[_Section]:
    sections: list[_Section] = []
    seen_sections: dict[str, _Section] = {}
    current: _Section | None = None
    last: _Entry | None = None
    for number, raw_line in enumerate(text.splitlines(), start=1):
        stripped = raw_line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        stripped = _INLINE_COMMENT_RE.sub("", stripped).strip()
        indented = raw_line[:1].isspace()
        if indented and last is not None and not _KEY_LINE_RE.match(stripped):
            # configparser's multi-line values; the break is a plain separator, so a list may
            # be spread over several lines as long as its items keep their commas.
            last.value = f"{last.value} {stripped}".strip()
            continue
        last = None
        if stripped.startswith("["):
            if not stripped.endswith("]"):
                report.error(
                    f"section header '{stripped}' is not closed; write [name]", line=number
                )
                # The lines below still belong to *a* section: reading them into a detached
                # one reports their own mistakes without a cascade of "before any section".
                current = _Section(stripped[1:].strip(), number)
                continue
            name = stripped[1:-1].strip()
            if not name:
                report.error("empty section name '[]'; write [name]", line=number)
                current = _Section("", number)
                continue
            current = _Section(name, number)
            if name in seen_sections:
                report.error(
                    f"duplicate section [{name}] (first defined at line "
                    f"{seen_sections[name].line}); give each section a unique name",
                    section=name,
                    line=number,
                )
                # The duplicate is still read so its own duplicate keys get reported, but it
                # never takes part in the expansion.
            else:
                seen_sections[name] = current
                sections.append(current)
            continue
        positions = [p for p in (stripped.find("="), stripped.find(":")) if p >= 0]
        if not positions:
            report.error(
                f"cannot read line '{stripped}'; expected 'key = value' or a [section] header",
                section=current.name if current else None,
                line=number,
            )
            continue
        split_at = min(positions)
        key, value = stripped[:split_at].strip(), stripped[split_at + 1 :].strip()
        if current is None:
            report.error(
                f"'{stripped}' comes before any [section] header", key=key or None, line=number
            )
            continue
        if not key:
            report.error(
                f"line '{stripped}' has no key name before '{stripped[split_at]}'",
                section=current.name,
                line=number,
            )
            continue
        if key in current.entries:
            report.error(
                f"duplicate key '{key}' (first set at line {current.entries[key].line}); "
                "set each key once, using a list (a, b) for several values",
                section=current.name,
                key=key,
                value=value,
                line=number,
            )
            continue
        last = _Entry(key, value, number)
        current.entries[key] = last
    return sections


# --------------------------------------------------------------------------------------------
# Validation


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    for choice in choices:
        if choice.lower() == word.lower():
            return f"; did you mean '{choice}'?"
    import difflib  # only on the error path, to keep the client's start-up lean

    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _as_int(
    report: _Report, section: _Section, entry: _Entry, minimum: int, what: str
) -> int | None:
    value = typed_scalar(entry.value)
    if not isinstance(value, int):
        report.entry_error(section, entry, f"expected {what}, an integer >= {minimum}")
        return None
    if value < minimum:
        report.entry_error(section, entry, f"must be at least {minimum} ({what})")
        return None
    return value


def _as_bool(report: _Report, section: _Section, entry: _Entry) -> bool | None:
    word = entry.value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    report.entry_error(section, entry, "expected true or false (also yes/no, on/off, 1/0)")
    return None


def _is_none(text: str) -> bool:
    return text.strip().lower() in ("", "none")


def _is_type_name(name: str) -> bool:
    return bool(name) and not any(c in "{}" or c.isspace() for c in name)


def _scheme(report: _Report, section: _Section, key: str) -> list[str] | None:
    entry = section.entries.get(key)
    if entry is None:
        report.missing(section, key, "a comma-separated list of module types, e.g. mlp")
        return None
    names = _split_names(entry.value)
    if names == [""]:
        report.entry_error(section, entry, "empty list; name at least one module type")
        return None
    ok = True
    for position, name in enumerate(names, start=1):
        if not name:
            report.entry_error(section, entry, f"item {position} is empty; remove the extra ','")
            ok = False
        elif not _is_type_name(name):
            report.entry_error(
                section, entry, f"'{name}' is not a type name; write plain words like mlp"
            )
            ok = False
    return names if ok else None


def _check_process(
    report: _Report, section: _Section, cwd: str, config_dir: str
) -> dict[str, Any] | None:
    entries = section.entries
    start = len(report.problems)
    process: dict[str, Any] = {}

    lr_entry = entries.get("lr")
    if lr_entry is None:
        report.missing(section, "lr", "the learning rate, e.g. lr = 0.001")
    else:
        lr = typed_scalar(lr_entry.value)
        if isinstance(lr, str):
            report.entry_error(section, lr_entry, "expected a number, e.g. 0.001")
        elif not math.isfinite(lr) or lr <= 0:
            report.entry_error(section, lr_entry, "the learning rate must be a positive number")
        else:
            process["lr"] = float(lr)

    epochs_entry = entries.get("epochs")
    if epochs_entry is None:
        report.missing(section, "epochs", "the number of training epochs, e.g. epochs = 10")
    else:
        process["epochs"] = _as_int(report, section, epochs_entry, 1, "the number of epochs")

    process["data_scheme"] = _scheme(report, section, "data_scheme")
    process["pipeline_scheme"] = _scheme(report, section, "pipeline_scheme")

    loss_entry = entries.get("loss_function")
    class_entry = entries.get("class_loss_function")
    path_entry = entries.get("path_to_class_loss_function")
    loss: str | None = None
    if loss_entry is not None and (class_entry is not None or path_entry is not None):
        report.entry_error(
            section,
            loss_entry,
            "give either loss_function or class_loss_function + path_to_class_loss_function, "
            "not both",
        )
    elif loss_entry is not None:
        loss = loss_entry.value.strip()
        if loss not in TORCH_LOSSES:
            report.entry_error(
                section,
                loss_entry,
                f"unknown loss '{loss}'; expected a torch.nn loss class name such as MSELoss, "
                f"BCELoss or CrossEntropyLoss{_suggest(loss, TORCH_LOSSES)}",
            )
            loss = None
    elif class_entry is None and path_entry is None:
        report.missing(
            section,
            "loss_function",
            "a torch.nn loss such as MSELoss, or class_loss_function + "
            "path_to_class_loss_function for your own loss class",
        )
    else:
        if class_entry is None:
            report.missing(
                section,
                "class_loss_function",
                "the name of the loss class in path_to_class_loss_function",
            )
        elif not _IDENTIFIER_RE.fullmatch(class_entry.value.strip()):
            report.entry_error(section, class_entry, "expected a Python class name")
        else:
            process["class_loss_function"] = class_entry.value.strip()
        if path_entry is None:
            report.missing(
                section,
                "path_to_class_loss_function",
                "the .py file that defines class_loss_function",
            )
        else:
            path = _existing_file(report, section, path_entry, cwd, config_dir)
            if path is not None:
                process["path_to_class_loss_function"] = path
    process["loss_function"] = loss

    runs_entry = entries.get("run_files_path")
    runs_value = ".runs" if runs_entry is None else runs_entry.value.strip()
    if runs_entry is not None and not runs_value:
        report.entry_error(section, runs_entry, "empty path; remove the key to use .runs")
    else:
        process["run_files_path"] = resolve_path(runs_value, cwd, config_dir, must_exist=False)

    optimizer_entry = entries.get("optimizer")
    optimizer = "Adam" if optimizer_entry is None else optimizer_entry.value.strip()
    if optimizer_entry is not None and optimizer not in TORCH_OPTIMIZERS:
        report.entry_error(
            section,
            optimizer_entry,
            f"unknown optimizer '{optimizer}'; expected one of "
            f"{', '.join(TORCH_OPTIMIZERS)}{_suggest(optimizer, TORCH_OPTIMIZERS)}",
        )
    process["optimizer"] = optimizer

    accuracy_entry = entries.get("accuracy")
    if accuracy_entry is None:
        process["accuracy"] = _DEFAULT_ACCURACY.get(loss or "", "none")
    else:
        mode = accuracy_entry.value.strip().lower()
        if mode not in ACCURACY_MODES:
            report.entry_error(
                section,
                accuracy_entry,
                f"unknown accuracy mode; expected one of {', '.join(ACCURACY_MODES)}",
            )
        process["accuracy"] = mode

    seed_entry = entries.get("seed")
    if seed_entry is None or _is_none(seed_entry.value):
        process["seed"] = None
    else:
        seed = typed_scalar(seed_entry.value)
        if not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
            report.entry_error(
                section, seed_entry, f"expected an integer seed between 0 and {_MAX_SEED}"
            )
        else:
            process["seed"] = seed

    for entry in entries.values():
        if entry.key not in _PROCESS_KEYS:
            report.warn(
                f"unknown key, ignored{_suggest(entry.key, _PROCESS_KEYS)}",
                section.name,
                entry.key,
                entry.value,
                entry.line,
            )
    return process if len(report.problems) == start else None


def _check_monitor(report: _Report, section: _Section) -> dict[str, Any] | None:
    entries = section.entries
    start = len(report.problems)
    monitor: dict[str, Any] = {}

    gpu_entry = entries.get("need_gpu")
    if gpu_entry is None:
        report.missing(section, "need_gpu", "true to train on GPUs, false for CPUs")
    else:
        monitor["need_gpu"] = _as_bool(report, section, gpu_entry)

    available_entry = entries.get("gpu_available")
    if available_entry is None:
        report.missing(
            section, "gpu_available", "GPU names separated by commas, or None when unused"
        )
    elif _is_none(available_entry.value):
        monitor["gpu_available"] = []
    else:
        names = _split_names(available_entry.value)
        if "" in names:
            report.entry_error(section, available_entry, "empty GPU name; remove the extra ','")
        monitor["gpu_available"] = [name for name in names if name]

    for key, minimum, what in (
        ("nb_processus", 1, "how many runs may train at once"),
        ("multiplicity", 1, "how many times each pipeline is repeated"),
    ):
        entry = entries.get(key)
        if entry is None:
            report.missing(section, key, what)
        else:
            monitor[key] = _as_int(report, section, entry, minimum, what)

    retries_entry = entries.get("retries")
    if retries_entry is None:
        monitor["retries"] = 0
    else:
        monitor["retries"] = _as_int(
            report, section, retries_entry, 0, "how many times a failed run is retried"
        )

    timeout_entry = entries.get("timeout")
    if timeout_entry is None or _is_none(timeout_entry.value):
        monitor["timeout"] = None
    else:
        timeout = typed_scalar(timeout_entry.value)
        if isinstance(timeout, str) or not math.isfinite(timeout) or timeout <= 0:
            report.entry_error(
                section, timeout_entry, "expected a positive number of seconds, or None"
            )
        else:
            monitor["timeout"] = float(timeout)

    if monitor.get("need_gpu") is False and monitor.get("gpu_available"):
        assert available_entry is not None
        report.warn(
            "GPUs are listed but need_gpu is false; they are not used",
            section.name,
            available_entry.key,
            available_entry.value,
            available_entry.line,
        )
    for entry in entries.values():
        if entry.key not in _MONITOR_KEYS:
            report.warn(
                f"unknown key, ignored{_suggest(entry.key, _MONITOR_KEYS)}",
                section.name,
                entry.key,
                entry.value,
                entry.line,
            )
    return monitor if len(report.problems) == start else None


def _existing_file(
    report: _Report, section: _Section, entry: _Entry, cwd: str, config_dir: str
) -> str | None:
    text = entry.value.strip()
    if not text:
        report.entry_error(section, entry, "empty path; expected a .py file")
        return None
    path = resolve_path(text, cwd, config_dir, must_exist=True)
    if path is None:
        expanded = os.path.expanduser(text)
        if os.path.isabs(expanded):
            message = f"file not found: {os.path.normpath(expanded)}"
        else:
            tried = (os.path.normpath(os.path.join(d, expanded)) for d in (cwd, config_dir))
            message = f"file not found; looked for {' and '.join(dict.fromkeys(tried))}"
        report.entry_error(section, entry, message)
        return None
    if not os.path.isfile(path):
        report.entry_error(section, entry, f"{path} is not a file; expected a .py file")
        return None
    return path


def _render_key(template: str, fields: dict[str, object]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: str(fields[m.group(1).strip()]), template)


@dataclass
class _ClassSection:
    name: str
    type: str
    cls: str
    path: str
    key_template: str
    params: list[tuple[str, list[int | float | str]]]

    def variant_count(self) -> int:
        return math.prod(len(values) for _, values in self.params)

    def variants(self) -> list[dict[str, Any]]:
        names = [name for name, _ in self.params]
        modules: list[dict[str, Any]] = []
        for combination in itertools.product(*(values for _, values in self.params)):
            values = dict(zip(names, combination, strict=True))
            fields: dict[str, object] = {
                "type": self.type,
                "class": self.cls,
                "name": self.name,
                **values,
            }
            key = _render_key(self.key_template, fields)
            modules.append(
                {
                    "type": self.type,
                    "class": self.cls,
                    "path_to_class": self.path,
                    **values,
                    "key": key,
                    "name": self.name,
                }
            )
        return modules


def _single(report: _Report, section: _Section, entry: _Entry, what: str) -> str | None:
    text = entry.value.strip()
    if not text:
        report.entry_error(section, entry, f"empty value; expected {what}")
        return None
    if "," in text:
        report.entry_error(
            section,
            entry,
            f"'{entry.key}' takes a single value ({what}), not a list; to compare "
            "alternatives write one section per alternative with the same type",
        )
        return None
    return text


def _check_key_template(
    report: _Report, section: _Section, entry: _Entry, available: list[str]
) -> str | None:
    template = _single(report, section, entry, "a key such as mlp_{class}")
    if template is None:
        return None
    ok = True
    leftover = _PLACEHOLDER_RE.sub("", template)
    if "{" in leftover or "}" in leftover:
        report.entry_error(section, entry, "unbalanced '{' or '}'; placeholders are written {name}")
        ok = False
    for match in _PLACEHOLDER_RE.finditer(template):
        name = match.group(1).strip()
        if not name:
            report.entry_error(
                section, entry, "empty placeholder {}; write a key of this section, e.g. {class}"
            )
            ok = False
        elif name not in available:
            report.entry_error(
                section,
                entry,
                f"unknown placeholder {{{name}}}; available: {', '.join(available)}",
            )
            ok = False
    return template if ok else None


def _check_class_section(
    report: _Report,
    section: _Section,
    scheme_types: set[str] | None,
    cwd: str,
    config_dir: str,
) -> tuple[str | None, _ClassSection | None]:
    """Return the section's declared type (None if unreadable) and, if valid, the section."""
    entries = section.entries
    type_entry = entries.get("type")
    if type_entry is None:
        report.missing(section, "type", "one of the types named in data_scheme or pipeline_scheme")
        return None, None
    start = len(report.problems)
    type_name = _single(report, section, type_entry, "a module type such as mlp")
    if type_name is None:
        return None, None
    if scheme_types is not None and type_name not in scheme_types:
        report.warn(
            f"type '{type_name}' is not in data_scheme or pipeline_scheme; section ignored",
            section.name,
            type_entry.key,
            type_entry.value,
            type_entry.line,
        )
        return type_name, None

    cls: str | None = None
    class_entry = entries.get("class")
    if class_entry is None:
        report.missing(section, "class", "the name of the Python class in path_to_class")
    else:
        cls = _single(report, section, class_entry, "a Python class name")
        if cls is not None and not _IDENTIFIER_RE.fullmatch(cls):
            report.entry_error(section, class_entry, "expected a Python class name")
            cls = None

    path: str | None = None
    path_entry = entries.get("path_to_class")
    if path_entry is None:
        report.missing(section, "path_to_class", "the .py file that defines the class")
    elif _single(report, section, path_entry, "the path of a .py file") is not None:
        path = _existing_file(report, section, path_entry, cwd, config_dir)

    params: list[tuple[str, list[int | float | str]]] = []
    for entry in entries.values():
        if entry.key in _RESERVED_CLASS_KEYS:
            continue
        if entry.key in _FORBIDDEN_PARAMS:
            report.entry_error(
                section,
                entry,
                f"'{entry.key}' is reserved (it holds the section name); rename the parameter",
            )
            continue
        try:
            params.append((entry.key, parse_value(entry.value)))
        except ValueError as exc:
            report.entry_error(section, entry, str(exc))

    template: str | None = None
    key_entry = entries.get("key")
    if key_entry is None:
        report.missing(section, "key", "a name for database queries, e.g. key = mlp_{class}")
    else:
        available = ["type", "class", "name"] + [
            e.key
            for e in entries.values()
            if e.key not in _RESERVED_CLASS_KEYS and e.key not in _FORBIDDEN_PARAMS
        ]
        template = _check_key_template(report, section, key_entry, available)

    if len(report.problems) != start or cls is None or path is None or template is None:
        return type_name, None
    return type_name, _ClassSection(section.name, type_name, cls, path, template, params)


# --------------------------------------------------------------------------------------------
# Entry point


def load_config(path: str, cwd: str | None = None) -> ExpandedConfig:
    """Read, validate and expand a config file; raise ConfigError listing every problem.

    Relative paths in the file (and ``path`` itself) are resolved against ``cwd``, which
    defaults to the process's working directory.
    """
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    config_path = os.path.normpath(os.path.join(base, os.path.expanduser(path)))
    config_dir = os.path.dirname(config_path)
    report = _Report(path)

    try:
        with open(config_path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(
            [Problem(path, None, None, None, f"config file not found ({config_path})")]
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            [Problem(path, None, None, None, "is a directory, expected an .ini file")]
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(path, None, None, None, f"cannot read config file: not UTF-8 text ({exc})")]
        ) from None
    except OSError as exc:
        raise ConfigError(
            [Problem(path, None, None, None, f"cannot read config file: {exc.strerror or exc}")]
        ) from None

    sections = _read_ini(text, report)
    by_name = {section.name: section for section in sections}

    process: dict[str, Any] | None = None
    monitor: dict[str, Any] | None = None
    for name in (PROCESS, MONITOR):
        if name not in by_name:
            near = [s for s in by_name if s.lower() == name.lower()]
            hint = f"; found [{near[0]}], but section names are case-sensitive" if near else ""
            report.error(f"required section is missing{hint}", section=name)
    if PROCESS in by_name:
        process = _check_process(report, by_name[PROCESS], base, config_dir)
    if MONITOR in by_name:
        monitor = _check_monitor(report, by_name[MONITOR])

    # When the schemes themselves are broken, sections are still checked (so their problems
    # show up now) but none is called "ignored" on the strength of a scheme we could not read.
    data_scheme = process["data_scheme"] if process else None
    pipeline_scheme = process["pipeline_scheme"] if process else None
    if PROCESS in by_name:
        raw = by_name[PROCESS].entries
        data_scheme = data_scheme or _quiet_scheme(raw.get("data_scheme"))
        pipeline_scheme = pipeline_scheme or _quiet_scheme(raw.get("pipeline_scheme"))
    known_types: set[str] | None = None
    if data_scheme is not None and pipeline_scheme is not None:
        known_types = set(data_scheme) | set(pipeline_scheme)

    declared_types: set[str] = set()
    by_type: dict[str, list[_ClassSection]] = {}
    for section in sections:
        if section.name in (PROCESS, MONITOR):
            continue
        declared, checked = _check_class_section(report, section, known_types, base, config_dir)
        if declared is not None:
            declared_types.add(declared)
        if checked is not None:
            by_type.setdefault(checked.type, []).append(checked)

    if PROCESS in by_name:
        process_section = by_name[PROCESS]
        for key, scheme in (("data_scheme", data_scheme), ("pipeline_scheme", pipeline_scheme)):
            entry = process_section.entries.get(key)
            if entry is None or scheme is None:
                continue
            for type_name in dict.fromkeys(scheme):
                if type_name and type_name not in declared_types:
                    report.entry_error(
                        process_section,
                        entry,
                        f"type '{type_name}' has no section; add a section with "
                        f"'type = {type_name}'",
                    )

    if report.problems or process is None or monitor is None:
        raise ConfigError(_in_file_order(report.problems), report.warnings)

    positions: list[str] = process["data_scheme"] + process["pipeline_scheme"]
    multiplicity: int = monitor["multiplicity"]
    count = multiplicity * math.prod(
        sum(cs.variant_count() for cs in by_type[type_name]) for type_name in positions
    )
    if count > MAX_PIPELINES:
        # Checked before building anything, since the point is not to build it.
        report.error(
            f"the file expands to {count} pipelines (multiplicity included); the limit is "
            f"{MAX_PIPELINES}: use fewer values or split the study into several files"
        )
        raise ConfigError(report.problems, report.warnings)

    variants_by_type = {
        type_name: [module for cs in group for module in cs.variants()]
        for type_name, group in by_type.items()
    }
    pipelines: list[list[dict[str, Any]]] = []
    for combination in itertools.product(*(variants_by_type[t] for t in positions)):
        for _ in range(multiplicity):
            # Fresh dicts per pipeline, so that a consumer annotating one run's modules cannot
            # change another's.
            pipelines.append([dict(module) for module in combination])

    return ExpandedConfig(
        config_path=config_path,
        process=process,
        monitor=monitor,
        pipelines=pipelines,
        warnings=report.warnings,
    )


def _in_file_order(found: list[Problem]) -> list[Problem]:
    # Read top to bottom like the file; problems of the file as a whole (a missing section)
    # come last. The sort is stable, so problems of one line keep the order they were found.
    return sorted(found, key=lambda p: (p.line is None, p.line or 0))


def _quiet_scheme(entry: _Entry | None) -> list[str] | None:
    """Best-effort reading of a scheme whose errors were already reported."""
    if entry is None:
        return None
    names = _split_names(entry.value)
    return names if all(_is_type_name(name) for name in names) else None


def pipelines_to_json(pipelines: Sequence[Sequence[dict[str, Any]]]) -> str:
    """The seed's pipelines file: a JSON list of pipelines, each a list of module dicts."""
    return json.dumps([list(p) for p in pipelines], indent=2, ensure_ascii=False) + "\n"
