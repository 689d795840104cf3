"""The Stack: the members' parameters, buffers and optimizer state stacked along dimension 0.

Each member's trainable parameters and buffers are stacked along a new leading dimension, and
each step evaluates all members at once: with the batched forward (:mod:`.forward`) where the
pipeline allows it, else with ``torch.func.functional_call`` under ``torch.func.vmap``. The
loss is computed per member; the sum of the members' losses is back-propagated, which leaves
each member's gradient its own (the members' parameters are disjoint slices of the stacked
tensors), and the run's optimizer steps the stacked parameters. Only elementwise optimizers
(:data:`mosaicd.scheduling.ensemble_groups.ELEMENTWISE_OPTIMIZERS`) are grouped: for them a
stacked step is the members' individual steps side by side. :meth:`Stack.unstack` copies each
member's slice back into its own modules and optimizer (for checkpoints and results).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import functional_call, vmap

from mosaicd.training.ensemble import forward as forward_module
from mosaicd.training.ensemble.batches import DataCache
from mosaicd.training.ensemble.members import Fallback, Member, short


def _named(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return dict(model.named_parameters()), dict(model.named_buffers())


class Stack:
    """The members' parameters, buffers and optimizer state, stacked along dimension 0."""

    def __init__(
        self,
        members: list[Member],
        lr: float,
        forward: tuple[forward_module.Batched | None, str] | None = None,
    ) -> None:
        """`forward`: the group's choice of forward, (batched, why not), when a stack is
        rebuilt for fewer members; decided from the lead's modules otherwise."""
        self.members = members
        lead = members[0].run
        self.bases: list[torch.nn.Module] = lead.models
        self.infos = lead.model_infos
        self.run_info = lead.run_info
        self.criterion = lead.criterion
        self.count = lead.count_correct
        self.counts = lead.user_accuracy is not None or lead.accuracy_mode != "none"
        # A built-in accuracy mode is counted on the stacked outputs directly (a second vmap
        # per step costs as much as the arithmetic); a user's accuracy() goes through vmap.
        self.accuracy_mode = lead.accuracy_mode if lead.user_accuracy is None else None
        self.data_cache: DataCache = {}
        self.batched, self.why_vmap = forward or forward_module.batched_forward(self.bases)
        self.member_loss = (
            forward_module.member_loss(self.criterion) if self.batched is not None else None
        )
        self.seed_forward(0, False)
        # stacked[s][name]: stage s's parameter or buffer, one slice per member.
        self.stacked: list[dict[str, torch.Tensor]] = []
        trainable: dict[int, tuple[int, str]] = {}
        for s, base in enumerate(self.bases):
            params, buffers = _named(base)
            per_stage: dict[str, torch.Tensor] = {}
            for name, param in params.items():
                values = torch.stack(
                    [dict(m.run.models[s].named_parameters())[name].detach() for m in members]
                )
                per_stage[name] = values.requires_grad_(param.requires_grad)
                if param.requires_grad:
                    trainable[id(param)] = (s, name)
            for name in buffers:
                per_stage[name] = torch.stack(
                    [dict(m.run.models[s].named_buffers())[name] for m in members]
                )
            self.stacked.append(per_stage)
        # The optimizer's parameters in the order of the member's own optimizer, so that its
        # state dict maps index for index onto each member's.
        self.slots = [trainable[id(p)] for p in lead.optimizer.param_groups[0]["params"]]
        params = [self.stacked[s][n] for s, n in self.slots]
        # Built as execution.make_optimizer builds the member's own, on torch's multi-tensor
        # path (see _multi_tensor_optimizer).
        self.optimizer, self.fast = _multi_tensor_optimizer(type(lead.optimizer), params, lr)
        self._load_optimizer_state()

    def _load_optimizer_state(self) -> None:
        states = [m.run.optimizer.state_dict() for m in self.members]
        if not states[0]["state"]:
            return
        stacked_state: dict[int, dict[str, Any]] = {}
        for index, entry in states[0]["state"].items():
            param = self.members[0].run.optimizer.param_groups[0]["params"][index]
            stacked_state[index] = {
                key: torch.stack([st["state"][index][key] for st in states])
                if key != "step" and isinstance(value, torch.Tensor) and value.shape == param.shape
                else value
                for key, value in entry.items()
            }
        # The member's groups carry its own foreach/fused flags: keep the stacked path's.
        groups = [{**group, **self.fast} for group in states[0]["param_groups"]]
        self.optimizer.load_state_dict({"state": stacked_state, "param_groups": groups})

    def unstack(self) -> None:
        """Copy each member's slice back into its own modules and optimizer."""
        stacked_state = self.optimizer.state_dict()
        with torch.no_grad():
            for i, member in enumerate(self.members):
                for s, model in enumerate(member.run.models):
                    params, buffers = _named(model)
                    for name, tensor in {**params, **buffers}.items():
                        tensor.copy_(self.stacked[s][name][i])
                state = {}
                for index, entry in stacked_state["state"].items():
                    shape = self.optimizer.param_groups[0]["params"][index].shape
                    state[index] = {
                        key: value[i].clone()
                        if key != "step"
                        and isinstance(value, torch.Tensor)
                        and value.shape == shape
                        else (value.clone() if isinstance(value, torch.Tensor) else value)
                        for key, value in entry.items()
                    }
                # With the member's own foreach/fused flags, so that its checkpoint resumes
                # alone exactly as a run trained alone would.
                own = member.run.optimizer.param_groups
                groups = [
                    {
                        **{k: v for k, v in group.items() if k not in self.fast},
                        **{k: mine[k] for k in self.fast if k in mine},
                    }
                    for group, mine in zip(stacked_state["param_groups"], own)
                ]
                member.run.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _forward(
        self,
        stacked: list[dict[str, torch.Tensor]],
        x: Any,
        y: Any,
    ) -> tuple[torch.Tensor, Any]:
        out = x
        for base, info, tensors in zip(self.bases, self.infos, stacked):
            out = functional_call(base, tensors, (out, self.run_info, info))
        return self.criterion(out, y), out

    def seed_forward(self, epoch: int, train: bool) -> None:
        """Start the pass's stream of forward randomness (dropout): from the members' seeds
        and the epoch, so that a resumed group draws what an uninterrupted one would."""
        seeds = tuple(int(m.spec["seed"]) for m in self.members)
        generator = torch.Generator().manual_seed(hash((seeds, epoch, train)) % 2**63)
        self.forward_rng = generator.get_state()

    @property
    def forward_choice(self) -> tuple[forward_module.Batched | None, str]:
        return self.batched, self.why_vmap

    @property
    def forward_path(self) -> str:
        """Which forward trains the group, for the members' logs."""
        if self.batched is not None:
            return "batched matmul"
        return f"vmap ({self.why_vmap})"

    def use_vmap(self, why: str) -> None:
        self.batched, self.member_loss, self.why_vmap = None, None, why

    def losses(self, x: Any, y: Any, shared: bool) -> tuple[torch.Tensor, Any]:
        dim = None if shared else 0
        if self.batched is not None:
            # No random op in a batched forward (Dropout is not accepted): the forward's
            # random stream is neither needed nor advanced.
            out = self.batched.forward(self.stacked, x, shared)
            losses = self.member_loss(out, y, shared) if self.member_loss is not None else None
            if losses is None:
                losses = vmap(self.criterion, in_dims=(0, dim))(out, y)
            return losses, out
        # Random ops draw from the group's own stream, never from a member's loader stream;
        # randomness="different" gives each member its own draws.
        torch.set_rng_state(self.forward_rng)
        try:
            return vmap(self._forward, in_dims=(0, dim, dim), randomness="different")(
                self.stacked, x, y
            )
        finally:
            self.forward_rng = torch.get_rng_state()

    def correct(self, out: Any, y: Any, shared: bool) -> torch.Tensor | None:
        if not self.counts:
            return None
        if self.accuracy_mode is not None:
            count = _stacked_correct(self.accuracy_mode, out, y, shared)
            if count is not None:
                return count
        try:
            count = vmap(self.count, in_dims=(0, None if shared else 0))(out, y)
        except Exception as exc:
            raise Fallback(
                "the accuracy cannot take stacked outputs (the model's accuracy() "
                f"fails under vmap: {short(exc)})"
            ) from exc
        if not isinstance(count, torch.Tensor):
            raise Fallback(
                "the accuracy cannot take stacked outputs (it returned "
                f"{type(count).__name__}, not a tensor)"
            )
        return count

    def train(self, mode: bool) -> None:
        for base in self.bases:
            base.train(mode)

    def buffers(self) -> list[torch.Tensor]:
        return [
            t
            for s, base in enumerate(self.bases)
            for n, _ in base.named_buffers()
            for t in [self.stacked[s][n]]
        ]


def _multi_tensor_optimizer(
    cls: type[torch.optim.Optimizer], params: list[torch.Tensor], lr: float
) -> tuple[torch.optim.Optimizer, dict[str, bool]]:
    """The stacked optimizer and the flags it was built with. On a CPU a run alone steps each
    parameter in a Python loop (torch's default there); the stacked parameters are few and
    large, so one fused kernel (Adam, AdamW, SGD, Adagrad) or one foreach call per step is
    several times cheaper. It is the same elementwise update, so each member's slice gets the
    step it would alone, equal within float rounding (the equivalence tests bound it). On a GPU
    torch already picks the multi-tensor path for the run alone: keep its default."""
    if all(p.device.type == "cpu" for p in params):
        for flags in ({"fused": True}, {"foreach": True}):
            try:
                return cls(params, lr=lr, **flags), flags
            except (TypeError, RuntimeError, ValueError):  # not offered by this optimizer
                continue
    return cls(params, lr=lr), {}


def _stacked_correct(mode: str, out: Any, y: Any, shared: bool) -> torch.Tensor | None:
    """execution.correct_count for every member at once: outputs stacked along dimension 0,
    targets stacked too unless shared. None when the shapes are not the plain ones
    (per member: outputs (batch, ...) and targets of as many elements, or for argmax targets
    whose shape is the predictions'), so that broadcasting cannot count otherwise than alone:
    the caller then vmaps correct_count itself."""
    if not (isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor)) or out.dim() < 2:
        return None
    members, batch = out.shape[0], out.shape[1]
    if not shared and (y.dim() == 0 or y.shape[0] != members):
        return None
    y_member = y.shape if shared else y.shape[1:]
    if mode in ("binary", "logits"):
        if math.prod(y_member) != out[0].numel():  # alone: truth.reshape(pred.shape)
            return None
        threshold = 0.5 if mode == "binary" else 0.0
        pred = out > threshold
        truth = (y > 0.5).reshape(pred.shape[1:] if shared else pred.shape)
        agree = pred == truth
        return agree.reshape(members, batch, -1).all(dim=2).sum(dim=1)
    if mode == "argmax":
        if out.dim() < 3:
            return None
        pred = out.argmax(dim=2)
        if len(y_member) == out.dim() - 1:
            truth = y.argmax(dim=1 if shared else 2)
        else:
            truth = y
        if (truth.shape if not shared else (members, *truth.shape)) != pred.shape:
            return None
        return (pred == truth).reshape(members, -1).sum(dim=1)
    return None
