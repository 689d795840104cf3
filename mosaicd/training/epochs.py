"""What a run does at an epoch boundary: one decision for a run alone and for an ensemble member.

After each epoch, :func:`mosaicd.training.execution.train` (a run alone) and the ensemble's
loop (:mod:`mosaicd.training.ensemble.loop`, for each member still training) ask the same
questions in the same order (has the daemon asked to park the run? to cancel it, for an
ensemble member? is a timed checkpoint due? was this the last epoch?) and answer them with
:func:`epoch_end`, which decides whether the checkpoint is written now and what follows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# What follows an epoch: the next epoch, or the run's end.
CONTINUE = "continue"
DONE = "done"  # the target epoch reached: finish the run
PARKED = "parked"  # the daemon asked to park it: it resumes later from this checkpoint
CANCELLED = "cancelled"  # the daemon cancelled it (an ensemble member): no checkpoint


@dataclass(frozen=True)
class EpochEnd:
    """The decision at an epoch boundary: write the checkpoint now (the epoch message says so)
    and what follows (:data:`CONTINUE`, :data:`DONE`, :data:`PARKED` or :data:`CANCELLED`)."""

    checkpoint: bool
    outcome: str


def epoch_end(
    epoch: int, target: int, *, park: bool, checkpoint_due: bool, cancel: bool = False
) -> EpochEnd:
    """The decision after `epoch` (counted from 1) of a run that trains to `target`.

    A checkpoint is written when the run is parked, at the target, or when the timed one is
    due, but never for a cancelled run. A cancel wins over a park; at the target the run is
    done whatever was asked (a cancelled run then finishes without a new checkpoint)."""
    last = epoch == target
    checkpoint = (park or last or checkpoint_due) and not cancel
    if cancel and not last:
        outcome = CANCELLED
    elif last:
        outcome = DONE
    elif park:
        outcome = PARKED
    else:
        outcome = CONTINUE
    return EpochEnd(checkpoint, outcome)


class CheckpointClock:
    """When the timed checkpoint is due: `every` seconds after the clock (re)started."""

    def __init__(self, every: float, now: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.now = now
        self.started = now()

    def due(self) -> bool:
        return self.now() - self.started >= self.every

    def restart(self) -> None:
        self.started = self.now()
