"""More repetitions of configuration groups on request (`mosaic repeat`, `compare
--until-decided`): the groups of the selected runs, the seeds that continue them, and the new
runs, queued as new submissions in one transaction.

A configuration group is the runs that share every param but the repetition's
(contract.REPETITION_PARAMS), as in the run_groups view of mosaicd/storage/store.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mosaic_client.contract import MAX_REPETITIONS_ADDED, REPETITION_PARAMS
from mosaic_client.protocol import ErrorCode, RepeatedGroup, RepeatReply
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.keeper.link import CALL_TIMEOUT_S, PER_ROW_S
from mosaicd.scheduling.control import Control, OwnerCheck
from mosaicd.scheduling.submissions import Run, check_submission, repetition
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.store import RunRecord, StoreError

# The most runs one request may queue: a selection of every group of a large study times a big
# --add is surely a mistake, and it would hold the daemon's loop while it writes.
MAX_RUNS_ADDED = 100_000

Signature = frozenset[tuple[str, Any]]


def signature(params: dict[str, Any]) -> Signature:
    """What the runs of one configuration group share: every param but the repetition's."""
    return frozenset((k, v) for k, v in params.items() if k not in REPETITION_PARAMS)


def next_seeds(
    existing: Iterable[int], numbered: bool, add: int, draw: Callable[[], int] | None = None
) -> list[int]:
    """The seeds of `add` more repetitions of a group whose runs have the seeds `existing`.

    Numbered groups (a PROCESS seed: repetition i got seed + i) continue after the largest
    seed, so that the groups of two families keep the same seeds and stay paired in `compare`;
    random-seed groups get fresh random seeds, none of them already used in the group."""
    used = set(existing)
    if numbered:
        start = max(used) + 1 if used else 0
        return list(range(start, start + add))
    draw = draw or (lambda: secrets.randbelow(2**31))
    seeds: list[int] = []
    while len(seeds) < add:
        seed = draw()
        if seed not in used:
            used.add(seed)
            seeds.append(seed)
    return seeds


def groups_of(store: StudyHandle, selected: list[int]) -> list[list[int]]:
    """The configuration groups of the selected runs, each as the sorted ids of all its runs
    (selected or not), ordered by their first run.

    Only the runs with the same `pipeline` param as a selected run can share its group: the
    params index finds them without reading the whole study."""
    params = store.params_of(sorted(store.pipeline_mates(selected)))
    by_signature: dict[Signature, list[int]] = {}
    for run_id in sorted(params):
        by_signature.setdefault(signature(params[run_id]), []).append(run_id)
    wanted = {signature(params[run_id]) for run_id in selected if run_id in params}
    return sorted((ids for sig, ids in by_signature.items() if sig in wanted), key=lambda g: g[0])


@dataclass
class _Batch:
    """The new runs built from one submission (and one epochs target): one new submission."""

    submission: dict[str, Any]
    epochs: int
    runs: list[Run] = field(default_factory=list)
    groups: list[RepeatedGroup] = field(default_factory=list)


class Repetitions(Control):
    """The scheduler's `repeat` request (a part of mosaicd.scheduling.scheduler.Scheduler)."""

    def repeat(
        self, db: str, selection: dict[str, Any], add: int, check: OwnerCheck
    ) -> RepeatReply:
        """Queue `add` more repetitions of every configuration group of the selected runs;
        the runs already there are not touched."""
        if not 1 <= add <= MAX_REPETITIONS_ADDED:
            raise Refused(
                ErrorCode.INVALID,
                f"--add must be between 1 and {MAX_REPETITIONS_ADDED}, got {add}; "
                "nothing was queued",
            )
        selected = self._select(db, selection, check)
        store = self._studies[db]
        reply: RepeatReply = {
            "db": db,
            "selected": selected,
            "groups": [],
            "submission_ids": [],
            "run_ids": [],
            "paused": False,
        }
        if not selected:
            return reply
        groups = groups_of(store, selected)
        if len(groups) * add > MAX_RUNS_ADDED:
            raise Refused(
                ErrorCode.INVALID,
                f"{len(groups)} group(s) x {add} repetitions is more than {MAX_RUNS_ADDED} "
                "runs; select fewer groups or add fewer repetitions. Nothing was queued",
            )
        # The caller must own every run of the groups they repeat (like rerun): the new runs
        # are copies of them.
        every_run = sorted(run_id for group in groups for run_id in group)
        # Named only when the caller named the selected runs (-id): never a -request's.
        self._check_owners(db, store, every_run, check, named=selection.get("kind") == "ids")
        batches = self._batches(db, store, groups, add)
        for batch in batches:
            pipelines = [modules for modules, _, _, _ in batch.runs]
            process = batch.submission["process"]
            # The copies keep their submission's owner (the daemon's record), and run as them.
            owner = owners.of_uid(batch.submission["owner_uid"])
            self._executor.check_submission(process, pipelines, owner)
            check_submission(
                process, batch.submission["monitor"], pipelines, self._executor.slot_count("cuda")
            )
            sub = batch.submission
            problem = self.limit_problem(sub["owner_uid"], sub["owner"], len(batch.runs))
            if problem:
                raise Refused(ErrorCode.INVALID, f"{problem}. Nothing was queued.")

        wire = [
            {
                "owner_uid": batch.submission["owner_uid"],
                "owner": batch.submission["owner"],
                "config_path": batch.submission["config_path"],
                # The epochs the group's runs were trained for (a rerun may have extended them
                # beyond the submission's).
                "process": {**batch.submission["process"], "epochs": batch.epochs},
                "monitor": batch.submission["monitor"],
                "runs": [list(run) for run in batch.runs],
                "priority": batch.submission.get("priority", 0),
            }
            for batch in batches
        ]

        def record(added: Any) -> None:
            # Recorded before the study's COMMIT, as a submit's (mosaicd.storage.identity).
            for batch, (submission_id, _, created_at) in zip(batches, added):
                sub = batch.submission
                self._identities.record(
                    db, submission_id, sub["owner_uid"], sub["owner"], created_at
                )

        # Every new run, or none, in one transaction through the study's writer: a locked or
        # full study refuses the request rather than waiting in the daemon's loop.
        try:
            added = self._studies.writer(db).try_now(
                "add_submissions",
                {"batches": wire},
                record,
                CALL_TIMEOUT_S + PER_ROW_S * 8 * sum(len(b.runs) for b in batches),
            )
        except StoreError as exc:
            raise Refused(
                ErrorCode.INVALID, f"{exc}; nothing was queued: repeat again once it is solved"
            ) from None
        new = [(batch, item[0], item[1]) for batch, item in zip(batches, added)]
        for batch, submission_id, run_ids in new:
            at = 0
            for group in batch.groups:
                group["run_ids"] = run_ids[at : at + len(group["seeds"])]
                at += len(group["seeds"])
                reply["groups"].append(group)
            self._enqueue_new(db, store, run_ids)
            reply["submission_ids"].append(submission_id)
            reply["run_ids"].extend(run_ids)
            if self._holds.holds_submissions_of(batch.submission["owner_uid"]):
                reply["paused"] = True
        reply["groups"].sort(key=lambda g: g["first_run"])
        return reply

    def _batches(
        self, db: str, store: StudyHandle, groups: list[list[int]], add: int
    ) -> list[_Batch]:
        """The new runs of each group, batched by the submission of the group's first run,
        whose owner is the daemon's record of it: a study that disagrees with its records
        adds nothing (mosaicd.storage.identity)."""
        batches: dict[tuple[int, int], _Batch] = {}
        params = store.params_of([group[0] for group in groups])
        for group in groups:
            records = [store.run_record(run_id) for run_id in group]
            template: RunRecord | None = records[0]
            assert template is not None
            key = (template.submission_id, template.epochs_target)
            if key not in batches:
                submission = store.submission(template.submission_id)
                record = self._identities.check(db, store.submission_rows(), template.submission_id)
                aside = self._identities.aside(db)
                if record is None or aside is not None:
                    raise Refused(
                        ErrorCode.PERMISSION,
                        f"{db}: {aside or 'no owner recorded'}. Nothing was queued",
                    )
                submission["owner_uid"], submission["owner"] = record.uid, record.name
                batches[key] = _Batch(submission, template.epochs_target)
            batch = batches[key]
            numbered = isinstance(batch.submission["process"].get("seed"), int)
            seeds = next_seeds((r.seed for r in records if r is not None), numbered, add)
            batch.runs.extend(
                repetition(template.modules, params[template.run_id], seed) for seed in seeds
            )
            batch.groups.append(
                {"first_run": group[0], "runs": len(group), "seeds": seeds, "run_ids": []}
            )
        return list(batches.values())
