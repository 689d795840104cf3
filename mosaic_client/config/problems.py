"""What is wrong with a config file, and where: the reader's located problems.

The INI text's sections and entries are defined here, beside the report that locates problems
by them, so that every step of the reading (the INI reader, the checks of each section, the
expansion) can report into one place without depending on one another.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field


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
class Entry:
    """One "key = value" of a section; the line is where the key was written."""

    key: str
    value: str
    line: int


@dataclass
class Section:
    """One [section] of the file with its entries, in the order they were written."""

    name: str
    line: int
    entries: dict[str, Entry] = field(default_factory=dict)


class Report:
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

    def entry_error(self, section: Section, entry: Entry, message: str) -> None:
        self.error(message, section.name, entry.key, entry.value, entry.line)

    def missing(self, section: Section, key: str, hint: str) -> None:
        self.error(f"required key is missing ({hint})", section.name, key, line=section.line)

    def entry_warning(self, section: Section, entry: Entry, message: str) -> None:
        problem = Problem(self.file, section.name, entry.key, entry.value, message, entry.line)
        self.warnings.append(str(problem))


def in_file_order(found: list[Problem]) -> list[Problem]:
    """The problems as the user reads the file: top to bottom."""
    # Read top to bottom like the file; problems of the file as a whole (a missing section)
    # come last. The sort is stable, so problems of one line keep the order they were found.
    return sorted(found, key=lambda p: (p.line is None, p.line or 0))
