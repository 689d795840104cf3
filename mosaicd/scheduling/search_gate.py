"""A search's gate and its runs' search part (docs/tuning.md).

Trials of round r of a group start once every trial of the earlier rounds of that group has
finished, and a final run once all its group's trials have: then what a run's sampler (or its
choice of the best trial) sees is a fixed set of finished trials, whatever the timing, the
slot count or a daemon restart. The daemon only holds runs back and hands the finished
trials to the worker; the worker samples (the daemon never imports optuna).
"""

from __future__ import annotations

from typing import Any

from mosaic_client import search
from mosaicd.scheduling.submissions import Submission
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.store import RunRecord, StoreError


class SearchGate:
    """The open rounds of each search submission, read once per dispatch pass."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], dict[int, int] | None] = {}

    def reset(self) -> None:
        """Forget what was read: runs have finished since."""
        self._open.clear()

    def _open_rounds(self, store: StudyHandle, submission: Submission) -> dict[int, int] | None:
        key = (submission.study, submission.submission_id)
        if key not in self._open:
            try:
                pairs = store.call("search_open_rounds", submission_id=submission.submission_id)
                self._open[key] = {int(g): int(r) for g, r in pairs}
            except StoreError:
                self._open[key] = None  # unknown now: hold its search runs back
        return self._open[key]

    def wait(self, store: StudyHandle, submission: Submission, record: RunRecord) -> str | None:
        """Why a queued search run may not start yet, in words; None when it may."""
        info = record.search
        if info is None:
            return None
        open_rounds = self._open_rounds(store, submission)
        if open_rounds is None:
            return "its search's trials cannot be read now"
        group = int(info["group"])
        lowest = open_rounds.get(group)
        if info["stage"] == search.TRIAL:
            if lowest is None or lowest >= int(info["round"]):
                return None
            return (
                f"search: trial {info['trial']} (round {info['round']}) waits for round "
                f"{lowest} of its group to finish (docs/tuning.md)"
            )
        if lowest is None:
            return None
        return "search: the final runs wait for every trial of their group to finish"

    def ready(self, store: StudyHandle, submission: Submission, record: RunRecord) -> bool:
        return self.wait(store, submission, record) is None


def spec_part(store: StudyHandle, submission: Submission, record: RunRecord) -> dict[str, Any]:
    """The "search" of a run's spec: [SEARCH], the run's group, stage and trial, the study
    seed its sampler's seed derives from, and the finished trials of its group it may see."""
    info = record.search or {}
    settings = submission.search_settings
    assert settings is not None
    settings_map = dict(settings)
    trial = info.get("trial")
    dimensions = search.space(submission.process.get("lr"), record.modules)
    history = store.call(
        "search_history",
        submission_id=submission.submission_id,
        group=int(info["group"]),
        before_round=None if trial is None else int(info["round"]),
        metric=settings["metric"],
        names=list(dimensions),
    )
    return {
        "settings": settings_map,
        "group": int(info["group"]),
        "stage": info["stage"],
        "trial": trial,
        # Trial n trains with seed base + n (submissions.build_search_runs).
        "study_seed": record.seed - (trial or 0),
        "history": history,
    }
