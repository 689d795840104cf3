"""The probe: before a group trains, check its stacked forward against each member alone.

On one test batch per member, in evaluation mode, the stacked model must give every member the
outputs, loss and accuracy count that the member computes alone. Where the batched forward
(:mod:`.forward`) differs, the group trains under vmap instead; where vmap differs too (the
forward depends on something vmap does not stack, e.g. run_info or non-tensor state), or the
accuracy cannot take stacked outputs, the group falls back to individual runs.
"""

from __future__ import annotations

from typing import Any

import torch

from mosaicd.training import execution
from mosaicd.training.ensemble.batches import MemberBatches, step_batches
from mosaicd.training.ensemble.members import Fallback, Member, short, vmap_reason
from mosaicd.training.ensemble.stack import Stack


def probe(stack: Stack, members: list[Member]) -> None:
    """Check on one test batch, in evaluation mode, that the vmapped model gives each member
    the outputs, losses and accuracy counts it computes alone; fall back otherwise. The
    batched forward is checked the same way first; where it differs, the group keeps vmap."""
    saved = execution.rng_states()
    try:
        batches = []
        for member in members:
            source = MemberBatches(member.run.test_data, dict(member.rng))
            batch = source.next()
            if batch is None:
                return  # an empty loader: the run fails the same way alone, let it
            batches.append(batch)
        device = members[0].run.device
        stack.train(False)
        for member in members:
            for model in member.run.models:
                model.train(False)
        with torch.no_grad():
            alone_losses, alone_outs, alone_counts = [], [], []
            for member, batch in zip(members, batches):
                x = execution.to_device(batch[0], device)
                y = execution.to_device(batch[1], device)
                out = x
                for model, info in zip(member.run.models, member.run.model_infos):
                    out = execution._call(model, out, member.run.run_info, info)
                alone_losses.append(member.run.criterion(out, y))
                alone_outs.append(out)
                alone_counts.append(member.run.count_correct(out, y))
            source_list = [_Fixed(b) for b in batches]
            x, y, shared = step_batches(source_list, device)  # type: ignore[arg-type]
            if stack.batched is not None:
                # The batched forward must give every member what it computes alone, or the
                # group trains under vmap (never individually for this reason).
                why = None
                try:
                    losses, outs = stack.losses(x, y, shared)
                    mismatch = _mismatch(members, outs, losses, alone_outs, alone_losses)
                    if mismatch is not None:
                        why = f"the batched forward does not reproduce {mismatch}"
                except Exception as exc:
                    why = f"the batched forward failed ({short(exc)})"
                if why is not None:
                    stack.use_vmap(why)
            if stack.batched is None:
                try:
                    losses, outs = stack.losses(x, y, shared)
                except Fallback:
                    raise
                except Exception as exc:
                    raise Fallback(vmap_reason(exc)) from exc
            counts = stack.correct(outs, y, shared)
        if not isinstance(outs, torch.Tensor):
            raise Fallback("the model's output is not a tensor")
        mismatch = _mismatch(members, outs, losses, alone_outs, alone_losses)
        if mismatch is not None:
            raise Fallback(
                f"the vmapped model does not reproduce {mismatch} (the forward depends on "
                "something vmap does not stack, e.g. run_info or non-tensor state)"
            )
        for i, member in enumerate(members):
            if (
                counts is not None
                and alone_counts[i] is not None
                and abs(float(counts[i]) - float(alone_counts[i])) > 0.5
            ):
                raise Fallback(
                    f"the accuracy cannot take stacked outputs (run "
                    f"{member.run_id}: {float(counts[i])} correct stacked, "
                    f"{float(alone_counts[i])} alone)"
                )
    finally:
        execution.set_rng_states(saved)


def _mismatch(
    members: list[Member],
    outs: Any,
    losses: torch.Tensor,
    alone_outs: list[Any],
    alone_losses: list[Any],
) -> str | None:
    """The first member whose stacked output or loss is not the one it computes alone."""
    for i, member in enumerate(members):
        if not isinstance(outs, torch.Tensor) or not isinstance(alone_outs[i], torch.Tensor):
            return "a member's output: it is not a tensor"
        if not (
            outs[i].shape == alone_outs[i].shape
            and torch.allclose(outs[i], alone_outs[i], rtol=1e-4, atol=1e-6, equal_nan=True)
            and torch.allclose(losses[i], alone_losses[i], rtol=1e-4, atol=1e-6, equal_nan=True)
        ):
            return f"run {member.run_id}'s outputs"
    return None


class _Fixed:
    """A single known batch in place of a member's loader (for the probe)."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.indices = None
        self.dataset = None

    def next(self) -> Any:
        return self.batch
