"""The ensemble's training loop: :func:`execute_group` trains the group epoch after epoch.

It builds the members (:mod:`.members`), checks them, stacks them (:mod:`.stack`) and probes
the stacked forward (:mod:`.probe`); then each epoch is one training and one test pass of all
members at once (:func:`_pass`, on the batches of :mod:`.batches`), after which every member
is decided on alone (:func:`mosaicd.training.epochs.epoch_end`, the decision of a run alone).
Nothing reaches the daemon (no epoch message, no file but the fallback reason in each member's
log) before the first epoch has been computed: until then any failure is a :class:`Fallback`.

Equivalence and its limits
--------------------------
Without randomness in the forward pass, a member's per-epoch losses and accuracies equal the
same run trained alone up to float rounding (vmapped kernels sum in another order; the tests
check 1e-5 relative): the data loaders of each member draw from the member's own random
state (the global generators are swapped in and out around each member's loader), the
optimizer is the same elementwise update. With dropout or other random ops in the forward,
``vmap(randomness="different")`` gives every member its own independent stream, but not the
stream the run would have drawn alone: only independence is guaranteed, not equality.

Per member: a non-finite epoch loss fails that member alone (same message as an individual
run); park and cancel are honoured per member at epoch boundaries, the others continue with
their numbers unchanged. Checkpoints, history, run_info and saved models are written by
execution's own functions on each member's own modules (the stacked state is copied back
first), so a member checkpointed in a group resumes alone or in another group, and the
reverse. A group resumes when all its members resume from the same checkpoint epoch; members
at different epochs fall back (the scheduler does not group them: ``start_epoch`` is part of
the group key). A member's ``duration`` per epoch is the group's epoch time divided by the
number of members trained in it; so are its training pass's times, memory growth and energy
(resources.PassMeter with ``share``), while its FLOPs, latency and throughput are measured on
the member's own modules after its last epoch (docs/resources.md).

Fallbacks (reason strings start with the cause): models that are not ``torch.nn.Module``;
parameters shared between modules; BatchNorm-like modules in training mode (in-place buffer
updates) and any buffer a training step changes; data-dependent control flow or any other
error while vmapping the first step; members whose batches differ in structure or shape, or
whose loaders differ in length; a user ``accuracy`` that cannot take stacked outputs;
outputs of the vmapped model that differ from the members' own (checked on one batch in
evaluation mode before training); members resuming from different epochs; members of more
than :data:`AUTO_MAX_PARAMS` trainable parameters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from mosaic_client import contract
from mosaic_client.protocol import RunSpec
from mosaicd.scheduling.ensemble_groups import fallback_reason
from mosaicd.training import epochs, execution, resources
from mosaicd.training.ensemble import batches
from mosaicd.training.ensemble.members import (
    Fallback,
    Member,
    MemberChannel,
    Outcome,
    build_members,
    check_modules,
    failed_outcome,
    log_line,
    vmap_reason,
)
from mosaicd.training.ensemble.probe import probe
from mosaicd.training.ensemble.stack import Stack

# The `auto` rule: above this many trainable parameters per member, an ensemble no longer
# pays on a CPU (benchmarks/ensemble.py, docs/ensembles.md: 16 members of 67k parameters
# train 1.7x faster together, of 265k 0.7x), so such groups fall back.
AUTO_MAX_PARAMS = 100_000


def _pass(
    stack: Stack,
    members: list[Member],
    train: bool,
    first_step: bool,
) -> tuple[list[float], list[float | None]]:
    """One pass of all members over their loaders; their mean losses and accuracies."""
    stack.train(train)
    stack.seed_forward(int(members[0].run.run_info["epoch"]), train)
    device = members[0].run.device
    sources = [
        batches.MemberBatches(m.run.train_data if train else m.run.test_data, m.rng)
        for m in members
    ]
    steps = batches.steps(stack.data_cache, sources, train, device)
    loss_sum = torch.zeros(len(members), device=device)
    correct: torch.Tensor | None = None
    n_batches = n_samples = 0
    with torch.set_grad_enabled(train):
        for x, y, shared in steps:
            check_buffers = train and first_step and n_batches == 0
            before = [b.clone() for b in stack.buffers()] if check_buffers else []
            try:
                losses, out = stack.losses(x, y, shared)
            except (Fallback, execution.UserCodeError):
                raise
            except Exception as exc:
                if first_step:
                    raise Fallback(vmap_reason(exc)) from exc
                raise
            if train:
                stack.optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
                stack.optimizer.step()
            if check_buffers and any(
                not torch.equal(a, b) for a, b in zip(before, stack.buffers())
            ):
                raise Fallback(
                    "in-place buffer updates: a module changes its buffers while training"
                )
            loss_sum += losses.detach()
            count = stack.correct(out.detach() if isinstance(out, torch.Tensor) else out, y, shared)
            if count is not None:
                correct = count if correct is None else correct + count
            n_batches += 1
            n_samples += execution._batch_size(y if shared else y[0])
    if n_batches == 0:
        raise execution.UserCodeError(
            "a data loader yielded no batch; check data_size and train_prop"
        )
    losses_out = [value / n_batches for value in loss_sum.tolist()]
    accs: list[float | None] = (
        [None] * len(members)
        if correct is None
        else [value / n_samples for value in correct.double().tolist()]
    )
    return losses_out, accs


def execute_group(
    specs: list[RunSpec],
    channels: dict[int, MemberChannel],
    *,
    max_params: int | None = AUTO_MAX_PARAMS,
) -> dict[int, Outcome]:
    """Train the members together; see the package's docstring for the contract. Members of
    more than `max_params` trainable parameters fall back (None: no limit)."""
    reason = fallback_reason(specs) or deterministic_reason(specs)
    try:
        if reason is not None:
            raise Fallback(reason)
        return _execute(specs, channels, max_params)
    except Fallback as fallback:
        for spec in specs:
            try:
                log_line(
                    spec,
                    f"[mosaic] ensemble of runs {[int(s['run_id']) for s in specs]} not "
                    f"used: {fallback.reason}; the run trains individually",
                )
            except OSError:
                pass
        raise


def deterministic_reason(specs: list[RunSpec]) -> str | None:
    """Why a group asked for ``deterministic = true`` trains alone: a member's numbers equal
    its run alone only within float rounding (docs/ensembles.md), and deterministic promises
    the same bits. The client turns ensembles off for such a study; this covers a request
    made by hand."""
    if any(spec["process"]["deterministic"] for spec in specs):
        return "deterministic = true: every run trains alone, for bit-identical numbers"
    return None


def _execute(
    specs: list[RunSpec], channels: dict[int, MemberChannel], max_params: int | None
) -> dict[int, Outcome]:
    lr = float(specs[0]["process"]["lr"])
    members, stack = _set_up(specs, channels, max_params, lr)
    return _Group(specs, members, stack, lr).train()


def _set_up(
    specs: list[RunSpec],
    channels: dict[int, MemberChannel],
    max_params: int | None,
    lr: float,
) -> tuple[list[Member], Stack]:
    """The members built, checked, stacked and probed; whatever fails there is a Fallback."""
    try:
        members = build_members(specs, channels)
        nb_params = members[0].run.nb_params
        if max_params is not None and nb_params > max_params:
            raise Fallback(
                f"the model is too large to gain from an ensemble ({nb_params} "
                f"trainable parameters per member, more than {max_params})"
            )
        check_modules(members)
        stack = Stack(members, lr)
        probe(stack, members)
    except Fallback:
        raise
    except Exception as exc:
        # Whatever the user code does wrong, the individual runs report it the usual way.
        raise Fallback(
            f"the group could not be set up ({type(exc).__name__}: {exc})"[:400]
        ) from exc
    return members, stack


@dataclass
class _Figures:
    """One epoch's figures, per member, and each member's share of the epoch's time."""

    train_loss: list[float]
    train_acc: list[float | None]
    test_loss: list[float]
    test_acc: list[float | None]
    duration: float
    usage: dict[str, Any]  # each member's share of the training pass (resources.PassMeter)


class _Group:
    """The members still training together, their stack, and the outcomes of those that
    left the group."""

    def __init__(
        self, specs: list[RunSpec], members: list[Member], stack: Stack, lr: float
    ) -> None:
        self.members = members
        self.stack = stack
        self.lr = lr
        self.outcomes: dict[int, Outcome] = {}
        self.target = int(specs[0]["epochs_target"])
        self.clock = epochs.CheckpointClock(float(specs[0].get("checkpoint_every", 30.0)))
        self.first = True  # no epoch computed yet: nothing has reached the daemon

    def train(self) -> dict[int, Outcome]:
        """Every member's outcome, once each has finished, failed, parked or been cancelled."""
        epoch = self.members[0].checkpoint_epoch
        while self.members and epoch < self.target:
            epoch += 1
            figures = self._epoch(epoch)
            if figures is None:  # failed after the first epoch: so did every member
                return self.outcomes
            if self.first:
                self._announce()
                self.first = False
            survivors = self._record(epoch, figures)
            self._end_epoch(epoch, survivors)
        for member in self.members:  # already at the target when the group started
            if self.first:
                member.resend_epochs()
            self.outcomes[member.run_id] = (
                "done",
                execution.finish(member.run, member.spec, member.history),
            )
        return self.outcomes

    def _epoch(self, epoch: int) -> _Figures | None:
        """Train then test every member for `epoch`. A failure in the first epoch is a
        Fallback; after it, every member fails with it (None, the outcomes set)."""
        for member in self.members:
            member.run.run_info["epoch"] = epoch
        started = time.perf_counter()
        meter = resources.PassMeter(
            self.members[0].run.device, share=len(self.members), scope=self.stack
        )
        try:
            with meter:
                train_loss, train_acc = _pass(self.stack, self.members, True, self.first)
            test_loss, test_acc = _pass(self.stack, self.members, False, self.first)
        except BaseException as exc:
            if self.first:
                if isinstance(exc, Fallback):
                    raise
                raise Fallback(
                    f"the first ensemble epoch failed ({type(exc).__name__}: {exc})"[:400]
                ) from exc
            failure = failed_outcome(exc)
            self.outcomes.update({m.run_id: failure for m in self.members})
            return None
        duration = (time.perf_counter() - started) / len(self.members)
        return _Figures(train_loss, train_acc, test_loss, test_acc, duration, meter.figures())

    def _announce(self) -> None:
        """Only now, with the first epoch computed, may anything reach the daemon."""
        ids = [m.run_id for m in self.members]
        for member in self.members:
            log_line(
                member.spec,
                f"[mosaic] run {member.run_id} trains in an ensemble with runs {ids}",
            )
            log_line(member.spec, f"[mosaic] ensemble forward: {self.stack.forward_path}")
            member.resend_epochs()

    def _record(self, epoch: int, figures: _Figures) -> list[Member]:
        """Append the epoch to each member's history; a member whose loss is not finite fails
        alone (as a run alone would). The members that did not fail."""
        survivors = []
        for i, member in enumerate(self.members):
            train_loss, test_loss = figures.train_loss[i], figures.test_loss[i]
            if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                try:
                    raise execution.UserCodeError(
                        f"loss is not finite at epoch {epoch} (train {train_loss}, test "
                        f"{test_loss}); lower lr, check the data for NaN, or use a "
                        "numerically stable loss"
                    )
                except execution.UserCodeError as exc:
                    self.outcomes[member.run_id] = failed_outcome(exc)
                    log_line(member.spec, self.outcomes[member.run_id][1]["traceback"])
                continue
            member.history.append(
                train_loss, test_loss, figures.train_acc[i], figures.test_acc[i], figures.duration
            )
            member.history.usage.append(dict(figures.usage))
            survivors.append(member)
        return survivors

    def _end_epoch(self, epoch: int, survivors: list[Member]) -> None:
        """Each surviving member's epoch boundary, decided as for a run alone: the members
        asked to park or cancel, or at the target, leave the group; the others train on (in a
        smaller stack when some left)."""
        requests = [
            (member, member.channel.park_requested(), member.channel.cancel_requested())
            for member in survivors
        ]
        due = self.clock.due()
        ends = [
            (member, epochs.epoch_end(epoch, self.target, park=p, checkpoint_due=due, cancel=c))
            for member, p, c in requests
        ]
        if len(survivors) != len(self.members) or any(
            end.checkpoint or end.outcome != epochs.CONTINUE for _, end in ends
        ):
            self.stack.unstack()  # into the members' own modules, to save or to restack
        if due:  # (at the target too, but the group ends there)
            self.clock.restart()
        for member, end in ends:  # the history is kept: the peak so far (resources)
            if end.checkpoint or end.outcome != epochs.CONTINUE:
                resources.note_resident_peak(member.history.usage[-1], self.stack)
        remaining = [member for member, end in ends if self._close_epoch(member, epoch, end)]
        if remaining and len(remaining) != len(self.members):
            self.stack = Stack(remaining, self.lr, self.stack.forward_choice)
        self.members = remaining

    def _close_epoch(self, member: Member, epoch: int, end: epochs.EpochEnd) -> bool:
        """Checkpoint and report the member's epoch, then finish, cancel or park it as `end`
        says; whether it trains on."""
        if end.checkpoint:
            execution.set_rng_states(member.rng)
            execution.save_checkpoint(
                member.run,
                member.history,
                epoch,
                contract.checkpoint_path(member.files_dir, member.run_id),
            )
        history = member.history
        log_line(
            member.spec,
            f"[mosaic] run {member.run_id} epoch {epoch}/{self.target} "
            f"train_loss={history.train_loss[-1]:.6g} "
            f"test_loss={history.test_loss[-1]:.6g}",
        )
        member.channel.on_epoch(history.event(member.run_id, epoch - 1, end.checkpoint))
        if end.outcome == epochs.CANCELLED:
            self.outcomes[member.run_id] = ("cancelled", {"epoch": epoch})
            log_line(member.spec, f"[mosaic] run {member.run_id} cancelled after epoch {epoch}")
        elif end.outcome == epochs.DONE:
            try:
                self.outcomes[member.run_id] = (
                    "done",
                    execution.finish(member.run, member.spec, history),
                )
            except BaseException as exc:
                self.outcomes[member.run_id] = failed_outcome(exc)
        elif end.outcome == epochs.PARKED:
            self.outcomes[member.run_id] = ("parked", {"epoch": epoch})
            log_line(member.spec, f"[mosaic] run {member.run_id} parked after epoch {epoch}")
        else:
            return True
        return False
