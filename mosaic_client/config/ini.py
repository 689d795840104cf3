"""The INI reader: a config file's text into sections and entries, each with its line.

It is hand-written rather than :mod:`configparser` because the client must report *every*
problem of a file at once (configparser in strict mode stops at the first duplicate, and in lax
mode silently lets later duplicates win), must know the line of each value, and must keep the
case of parameter names, which are passed by name to the user's constructors.
"""

import re

from mosaic_client.config.problems import Entry, Report, Section

# An indented line that looks like "name = ..." is taken as a new key rather than as the
# continuation of the previous value, so that indenting a section's body does not silently glue
# two parameters together.
_KEY_LINE_RE = re.compile(r"[A-Za-z_][\w.\-]*\s*[=:]")
_INLINE_COMMENT_RE = re.compile(r"\s[#;].*$")


def read_ini(text: str, report: Report) -> list[Section]:
    """The file's sections, first definitions only; every unreadable line goes to `report`."""
    sections: list[Section] = []
    seen_sections: dict[str, Section] = {}
    current: Section | None = None
    last: Entry | None = None
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
                current = Section(stripped[1:].strip(), number)
                continue
            name = stripped[1:-1].strip()
            if not name:
                report.error("empty section name '[]'; write [name]", line=number)
                current = Section("", number)
                continue
            current = Section(name, number)
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
        last = Entry(key, value, number)
        current.entries[key] = last
    return sections
