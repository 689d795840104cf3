"""One value of a config file: typed scalars, lists, ranges, type names and paths."""

import os
import re

from mosaic_client import search
from mosaic_client.config.problems import Entry, Report, Section

# Guards against a typo such as {1-1000000000} eating the client's memory before the user
# sees anything; a real study never needs more than this.
MAX_RANGE_SIZE = 100_000

INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_RANGE_PARTS_RE = re.compile(r"([+-]?[^-]*)-(.*)")


def typed_scalar(raw: str) -> int | float | str:
    """Type one config value the way a Python literal would be: int, then float, else str."""
    text = raw.strip()
    try:
        if INT_RE.fullmatch(text):
            return int(text)
        if _FLOAT_RE.fullmatch(text):
            return float(text)
    except ValueError:
        # int() refuses literals beyond Python's digit limit; such a thing is not a number a
        # constructor could want, so it stays text.
        return text
    return text


def _check_braces(text: str) -> None:
    """Refuse braces that do not form flat {start-end} ranges, before the list is split."""
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
    """The integers of one {start-end} list item, both ends included."""
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
    if not (INT_RE.fullmatch(start_text) and INT_RE.fullmatch(end_text)):
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
    if search.is_distribution_syntax(text):
        # A search dimension (docs/tuning.md): one value, its canonical text, resolved when a
        # run starts. Checked here, so a bad one is refused before anything is sent.
        return [search.parse(text).text]
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


def split_names(text: str) -> list[str]:
    """Split a comma list of plain names; empty items are kept as '' so callers can report."""
    return [item.strip() for item in text.split(",")]


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


def existing_file(
    report: Report, section: Section, entry: Entry, cwd: str, config_dir: str
) -> str | None:
    """The absolute path of the .py file the entry names, or None with the reason reported."""
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


def is_type_name(name: str) -> bool:
    """Whether a scheme item can name a module type: one word, no braces."""
    return bool(name) and not any(c in "{}" or c.isspace() for c in name)
