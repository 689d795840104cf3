"""A served study as the daemon sees it: calls on the keeper that holds it open
(mosaicd.keeper). It keeps the study's run counts, as every reply carries them, and the file's
identity as the kernel gave it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from mosaicd.keeper.link import FileIdentity, Link
from mosaicd.storage.store import RunRecord


def record_of(data: dict[str, Any] | None) -> RunRecord | None:
    """A run record from a keeper's (checked) reply."""
    return None if data is None else RunRecord(**data)


class StudyHandle:
    """One served study, as the daemon sees it: calls on the keeper that holds it open."""

    def __init__(self, path: str, link: Link, counts: dict[str, int], file: FileIdentity):
        self.path = path
        self.link = link
        self.counts: Counter[str] = Counter(counts)
        # The study file's owner, device and inode, from the kernel (fstat), never the keeper.
        self.file_uid, self.dev, self.ino = file.uid, file.dev, file.ino

    def call(
        self,
        op: str,
        hold: bool = False,
        timeout: float | None = None,
        within: bool = False,
        **args: Any,
    ) -> Any:
        extra = {} if timeout is None else {"timeout": timeout}
        result, counts = self.link.call(op, self.path, args, hold=hold, within=within, **extra)
        if counts is not None:
            self.counts = Counter(counts)
        return result

    def begin(self, op: str, timeout: float, **args: Any) -> None:
        """Send `op` without waiting for its reply (mosaicd.keeper.link.Link.begin)."""
        self.link.begin(op, self.path, args, timeout)

    def finished(self) -> tuple[bool, Any]:
        """(True, the begun call's result) once it came, else (False, None); its StoreError."""
        done = self.link.finished()
        if done is None:
            return False, None
        result, counts = done
        if counts is not None:
            self.counts = Counter(counts)
        return True, result

    # Reads, named as the Store's (mosaicd.storage.store) that the keeper calls.
    def status_of(self, run_id: int) -> str | None:
        return self.call("status_of", run_id=run_id)  # type: ignore[no-any-return]

    def run_record(self, run_id: int) -> RunRecord | None:
        return record_of(self.call("run_record", run_id=run_id))

    def run_records(self, run_ids: list[int]) -> list[RunRecord]:
        """The records of these runs, a few thousand per call (a keeper's reply is bounded)."""
        found: list[RunRecord] = []
        for at in range(0, len(run_ids), 5000):
            found += [
                RunRecord(**r) for r in self.call("run_records", run_ids=run_ids[at : at + 5000])
            ]
        return found

    def runs_in_state(self, status: str) -> list[RunRecord]:
        return [RunRecord(**r) for r in self.call("runs_in_state", status=status)]

    def submission(self, submission_id: int) -> dict[str, Any]:
        return self.call("submission", submission_id=submission_id)  # type: ignore[no-any-return]

    def submission_of(self, run_id: int) -> int | None:
        return self.call("submission_of", run_id=run_id)  # type: ignore[no-any-return]

    def submission_rows(self) -> list[list[Any]]:
        return self.call("submission_rows")  # type: ignore[no-any-return]

    def submission_counts(self, submission_id: int) -> dict[str, int]:
        result = self.call("submission_counts", submission_id=submission_id)
        return {k: v for k, v in result.items() if isinstance(k, str) and isinstance(v, int)}

    def recent(self, status: str, limit: int) -> list[dict[str, Any]]:
        return [r for r in self.call("recent", status=status, limit=limit) if isinstance(r, dict)]

    def describe(self, run_id: int) -> dict[str, Any] | None:
        return self.call("describe", run_id=run_id)  # type: ignore[no-any-return]

    def pipeline_text(self, run_id: int) -> str:
        return self.call("pipeline_text", run_id=run_id) or ""

    def params_of(self, run_ids: list[int]) -> dict[int, dict[str, Any]]:
        result = self.call("params_of", run_ids=list(run_ids))
        return {k: v for k, v in result.items() if isinstance(k, int) and isinstance(v, dict)}

    def pipeline_mates(self, run_ids: list[int]) -> set[int]:
        return set(self.call("pipeline_mates", run_ids=run_ids))
