"""An ensemble's members: how each is built, checked and reported, and the fallback.

A member is built exactly as the run would be alone (:func:`mosaicd.training.execution.build`,
restored from its checkpoint when it resumes), with its own random state, channel, history and
provenance. :class:`Fallback` is how any part of the engine says that the group cannot train as
an ensemble: the caller then runs the members individually.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mosaic_client import contract
from mosaic_client.protocol import RunSpec
from mosaicd.training import data_cache, execution, provenance
from mosaicd.training.execution import BuiltRun
from mosaicd.training.history import History

Outcome = tuple[str, dict[str, Any]]


class Fallback(Exception):
    """The group cannot be trained as an ensemble; run its members individually."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class MemberChannel(execution.Channel):
    """A member's channel: an individual run's, plus a per-member cancel request."""

    cancel_requested: Callable[[], bool] = field(default=lambda: False)


@dataclass
class Member:
    spec: RunSpec
    run: BuiltRun
    channel: MemberChannel
    history: History
    rng: dict[str, Any]
    resend_from: int = 0  # stored epoch of a resumed run: epochs to send again first
    checkpoint_epoch: int = 0
    # What the member's start loaded and ran in (issue 16), sent with its first report.
    provenance: dict[str, Any] | None = None

    @property
    def run_id(self) -> int:
        return self.run.run_id

    @property
    def files_dir(self) -> str:
        return str(self.spec["run_files_path"])

    def resend_epochs(self) -> None:
        """The member's first reports, once the group is sure to train (nothing reaches the
        daemon before: a fallback then runs the members alone, as if never grouped): its
        provenance, then the epochs the daemon missed before the group started (a resume)."""
        if self.provenance is not None and self.channel.on_provenance is not None:
            self.channel.on_provenance(self.provenance)
        execution.resend_epochs(
            self.channel, self.run_id, self.history, self.resend_from, self.checkpoint_epoch
        )


def check_modules(members: list[Member]) -> None:
    """Up-front fallbacks that need the built modules."""
    for obj, info in zip(members[0].run.models, members[0].run.model_infos):
        if not isinstance(obj, torch.nn.Module):
            raise Fallback(
                f"model {type(obj).__name__} (section [{info.get('name')}]) is not "
                "a torch.nn.Module"
            )
        for sub in obj.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._NormBase) and sub.track_running_stats:
                raise Fallback(
                    f"in-place buffer updates: {type(sub).__name__} in "
                    f"{type(obj).__name__} updates its running statistics in "
                    "training mode"
                )
    seen: set[int] = set()
    for obj in members[0].run.models:
        for param in obj.parameters():
            if id(param) in seen:
                raise Fallback("a parameter is shared between modules of the pipeline")
            seen.add(id(param))
    ref = [
        (
            list((n, p.shape) for n, p in m.named_parameters()),
            list((n, b.shape) for n, b in m.named_buffers()),
        )
        for m in members[0].run.models
    ]
    for member in members[1:]:
        mine = [
            (
                list((n, p.shape) for n, p in m.named_parameters()),
                list((n, b.shape) for n, b in m.named_buffers()),
            )
            for m in member.run.models
        ]
        if mine != ref:
            raise Fallback("the members' modules have different parameters or shapes")
    base_info = {k: v for k, v in members[0].run.run_info.items() if k not in ("run_id", "seed")}
    for member in members[1:]:
        info = {k: v for k, v in member.run.run_info.items() if k not in ("run_id", "seed")}
        try:
            same = info == base_info
        except (RuntimeError, TypeError, ValueError):  # tensors in run_info
            same = False
        if not same:
            raise Fallback("the members' run_info differ (a module's info() depends on the seed)")


def log_line(spec: RunSpec, text: str) -> None:
    """Append a line to the run's log, as the worker's redirected output would."""
    os.makedirs(spec["run_files_path"], exist_ok=True)
    with open(contract.run_log_path(spec["run_files_path"], int(spec["run_id"])), "a") as fh:
        fh.write(text + "\n")


def build_members(specs: list[RunSpec], channels: dict[int, MemberChannel]) -> list[Member]:
    """Each member built (and restored) as its run alone, with its provenance; a Fallback when
    they resume from different epochs."""
    members = []
    git: dict[str, tuple[str | None, bool | None]] = {}  # the members start at the same moment
    for spec in specs:
        os.makedirs(spec["run_files_path"], exist_ok=True)
        # As execution.execute records it: the environment as the run starts, with the
        # determinism it asked for, and the bytes of the class files it executed.
        provenance.apply_determinism(spec["process"])
        environment = provenance.environment(torch.device(spec["device"]))
        execution.executed_sources.clear()
        run = execution.build(spec)
        if run.val_data is not None:
            # Its validation pass is a run's alone (docs/tuning.md).
            raise Fallback("a data stage gives a validation loader")
        code = provenance.code(spec, execution.executed_sources, git)
        history = History()
        start_epoch = int(spec.get("start_epoch") or 0)
        member = Member(
            spec=spec,
            run=run,
            channel=channels[run.run_id],
            history=history,
            rng={},
            resend_from=start_epoch,
            checkpoint_epoch=start_epoch,
            provenance={
                "environment": environment,
                "code": code,
                "data_cache": data_cache.figures(),
            },
        )
        if start_epoch > 0:
            member.checkpoint_epoch, member.history = execution.restore(run, member.files_dir)
        member.rng = execution.rng_states()  # after build (and restore): the run's own state
        members.append(member)
    epochs = {m.checkpoint_epoch for m in members}
    if len(epochs) != 1:
        raise Fallback(f"the members resume from different epochs ({sorted(epochs)})")
    return members


def failed_outcome(exc: BaseException) -> Outcome:
    """A member's "failed" outcome for `exc`, as a run alone reports it (in an except block)."""
    text = traceback.format_exc()
    return ("failed", {"error": execution.failure_message(exc), "traceback": text})


def short(exc: BaseException) -> str:
    """An exception's first sentence: torch's vmap errors go on to ask for a bug report."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text.split(". ")[0].rstrip(".")[:300]


def vmap_reason(exc: BaseException) -> str:
    text = short(exc)
    if (
        "data-dependent control flow" in text
        or "data dependent" in text.lower()
        or ".item()" in text
    ):
        return f"data-dependent control flow cannot be vmapped ({text})"
    return f"the pipeline cannot be vmapped ({text})"
