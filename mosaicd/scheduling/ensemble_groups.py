"""Which runs may train together as an ensemble (docs/ensembles.md), without torch.

The daemon's dispatch forms the groups with these (it must not import torch); the worker's
engine (:mod:`mosaicd.training.ensemble`) checks a group again with the same functions before
training it.
"""

from __future__ import annotations

import json
from collections.abc import Hashable

from mosaic_client.protocol import RunSpec

# Optimizers whose step on a stacked tensor is the members' steps side by side: every state
# entry is per element, or a scalar that depends on the step count only (NAdam's mu_product).
# Not LBFGS (global line search), not Adafactor (factored second moments of matrices), not
# SparseAdam, and not ASGD (its scalar eta and mu cannot be told from a scalar parameter's
# state when (un)stacking).
ELEMENTWISE_OPTIMIZERS = frozenset(
    {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "Rprop"}
)


def group_key(spec: RunSpec) -> Hashable | None:
    """Equal for runs of one pipeline that differ only by run id, seed and device."""
    process = spec["process"]
    optimizer = process["optimizer"]
    if optimizer not in ELEMENTWISE_OPTIMIZERS:
        return None
    try:
        text = json.dumps([process, spec["modules"]], sort_keys=True)
    except (TypeError, ValueError):
        return None
    return (text, spec["epochs_target"], spec["start_epoch"])


def fallback_reason(specs: list[RunSpec]) -> str | None:
    """Why these specs cannot form a group, from the specs alone; None when they can."""
    if len(specs) < 2:
        return "a group needs at least two members"
    run_ids = [s["run_id"] for s in specs]
    if len(set(run_ids)) != len(run_ids):
        return f"the group lists a run twice ({run_ids})"
    optimizer = specs[0]["process"]["optimizer"]
    if optimizer not in ELEMENTWISE_OPTIMIZERS:
        return (
            f"optimizer {optimizer} is not elementwise (ensembles support "
            f"{', '.join(sorted(ELEMENTWISE_OPTIMIZERS))})"
        )
    keys = {group_key(s) for s in specs}
    if len(keys) != 1:
        return (
            "the members are not repetitions of one pipeline (pipeline, PROCESS or epochs differ)"
        )
    if len({s["device"] for s in specs}) != 1:
        return "the members are on different devices"
    return None


def group_size(matching: int, ensemble_max: int) -> int:
    """How many of `matching` queued repetitions (the first included) train as one group: all
    of them, up to `ensemble_max`; 1 means the run starts alone. It depends on the study only,
    so the same config always trains the same groups (and gives the same numbers)."""
    if matching <= 1 or ensemble_max <= 1:
        return 1
    return min(ensemble_max, matching)
