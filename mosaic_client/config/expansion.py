"""Expansion of the validated sections into pipelines, and how the result is told and written."""

import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

from mosaic_client.config.class_sections import ClassSection
from mosaic_client.config.problems import ConfigError, Report

# Like MAX_RANGE_SIZE: a typo must not eat the client's memory before the user sees anything.
MAX_PIPELINES = 100_000


def expand(
    report: Report,
    process: dict[str, Any],
    monitor: dict[str, Any],
    by_type: dict[str, list[ClassSection]],
) -> list[list[dict[str, Any]]]:
    """Every pipeline: one module variant per scheme position, times the multiplicity."""
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
    return pipelines


def count_text(runs: int, multiplicity: int) -> str:
    """What a config expands to, in words: "16 distinct pipelines × multiplicity 2 = 32 runs"
    (each distinct pipeline is repeated `multiplicity` times, with successive seeds)."""
    distinct = runs // multiplicity if multiplicity > 0 else runs

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    return (
        f"{plural(distinct, 'distinct pipeline')} × multiplicity {multiplicity} = "
        f"{plural(runs, 'run')}"
    )


def pipelines_to_json(pipelines: Sequence[Sequence[dict[str, Any]]]) -> str:
    """The seed's pipelines file: a JSON list of pipelines, each a list of module dicts."""
    return json.dumps([list(p) for p in pipelines], indent=2, ensure_ascii=False) + "\n"
