"""Ensembles: train the repetitions of one pipeline together, as one vmapped model.

Imported by workers only (it imports torch). The runs of one pipeline that differ only by their
repetition seed are trained in one pass per batch: every member is built exactly as an
individual run (:func:`mosaicd.training.execution.build`, so the same seed gives the same
initial weights and the same data), its trainable parameters and buffers are stacked along a
new leading dimension, and each step evaluates all members at once (docs/ensembles.md).

The package, by concept:

- :mod:`.members`: a member (built, restored, reported), the up-front checks, :class:`Fallback`;
- :mod:`.batches`: each member's batches drawn as alone, shared or stacked per step;
- :mod:`.forward`: the batched forward (fx-traced Linear/elementwise pipelines as matmuls);
- :mod:`.stack`: the stacked parameters, buffers and optimizer, and the per-member losses;
- :mod:`.probe`: the stacked forward checked against each member alone before training;
- :mod:`.loop`: :func:`execute_group`, the epochs and each member's epoch boundary.

How it is used
--------------
The daemon's dispatch groups the queued runs of a submission with ``[MONITOR] ensemble = auto``
by :func:`group_key` (same pipeline, PROCESS, epoch target and start epoch; run id, seed and
device do not count; ``None`` for a non-elementwise optimizer), at most ``ensemble_max``
together, and sends a group to one worker as one ``run_group`` message carrying the members'
specs (those of ``run`` messages). The worker (``Worker.run_group`` in
:mod:`mosaicd.training.worker`) gives each member a :class:`MemberChannel` (``on_epoch`` sends
its epoch messages, ``park_requested`` and ``cancel_requested`` look its run id up in the park
and cancel requests the daemon sent), redirects output to the first member's log and calls
``execute_group(specs, channels, *, max_params=AUTO_MAX_PARAMS)``. That returns one
:data:`Outcome` per run id: ``("done", {"results", "files"})``, ``("parked", {"epoch"})``,
``("failed", {"error", "traceback"})`` or ``("cancelled", {"epoch"})``, which the worker sends
as that member's message. :func:`fallback_reason` gives the checks that need no torch
objects (keys differ, a single member, duplicate run ids); ``execute_group`` applies them too.

``execute_group`` raises :class:`Fallback` (``.reason``) when the group cannot be trained as
an ensemble: during set-up or the first epoch, before any epoch message was sent or any file
written but the reason line in each member's log. The worker then sends the reason
(``fallback``, for ``mosaic show``) and runs each spec individually, exactly as without
ensembles. ``max_params`` is the `auto` rule: members with more trainable parameters fall
back, since above it training them together is no faster (:data:`AUTO_MAX_PARAMS`).
"""

from __future__ import annotations

from mosaicd.scheduling.ensemble_groups import (  # the engine's API, kept torch-free for the daemon
    ELEMENTWISE_OPTIMIZERS as ELEMENTWISE_OPTIMIZERS,
)
from mosaicd.scheduling.ensemble_groups import fallback_reason as fallback_reason
from mosaicd.scheduling.ensemble_groups import group_key as group_key
from mosaicd.training.ensemble.loop import AUTO_MAX_PARAMS as AUTO_MAX_PARAMS
from mosaicd.training.ensemble.loop import execute_group as execute_group
from mosaicd.training.ensemble.members import Fallback as Fallback
from mosaicd.training.ensemble.members import MemberChannel as MemberChannel
from mosaicd.training.ensemble.members import Outcome as Outcome
