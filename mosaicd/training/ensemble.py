"""Ensembles: train the repetitions of one pipeline together, as one vmapped model.

Imported by workers only (it imports torch). The runs of one pipeline that differ only by their
repetition seed are trained in one pass per batch: every member is built exactly as an
individual run (:func:`mosaicd.training.execution.build`, so the same seed gives the same initial
weights and the same data), its trainable parameters and buffers are stacked along a new leading
dimension, and each step evaluates all members at once with ``torch.func.functional_call``
under ``torch.func.vmap``. The loss is computed per member; the sum of the members' losses is
back-propagated, which leaves each member's gradient its own (the members' parameters are
disjoint slices of the stacked tensors), and the run's optimizer steps the stacked parameters.
Only elementwise optimizers (:data:`ELEMENTWISE_OPTIMIZERS`) are grouped: for them a stacked
step is the members' individual steps side by side.

API for the worker and the scheduler (the integrator wires these in)
--------------------------------------------------------------------
``group_key(spec) -> Hashable | None``
    Runs whose keys are equal may be trained together: same pipeline (modules and their
    parameters), same PROCESS, same epoch target and start epoch; run id, seed and device do
    not count. ``None``: never group this run (e.g. a non-elementwise optimizer).
``fallback_reason(specs) -> str | None``
    The checks that need no torch objects (keys differ, a single member, duplicate run ids).
    The scheduler may call it before sending a group; :func:`execute_group` calls it too.
``execute_group(specs, channels, *, max_params=AUTO_MAX_PARAMS) -> dict[run_id, Outcome]``
    ``specs``: the N specs the daemon would send as N "run" messages (same shape:
    run_id, seed, device, modules, process, epochs_target, start_epoch, run_files_path,
    checkpoint_every). ``channels``: ``{run_id: MemberChannel}``; each member's ``on_epoch``
    receives exactly the epoch messages the run would send alone, its ``park_requested`` and
    ``cancel_requested`` are asked at each epoch boundary. Returns one :data:`Outcome` per run
    id: ``("done", {"results", "files"})``, ``("parked", {"epoch"})``,
    ``("failed", {"error", "traceback"})`` or ``("cancelled", {"epoch"})`` — the first three
    are what ``Worker.run_one`` sends today as "done"/"parked"/"failed" messages.
    Raises :class:`Fallback` (``.reason``) when the group cannot be trained as an ensemble;
    it is raised during set-up or the first epoch, before any epoch message was sent or any
    file written (but the reason line in each member's log), so the caller then simply runs
    each spec individually (``execution.execute``), exactly as without ensembles.
    ``max_params`` is the `auto` rule: members with more trainable parameters than this fall
    back, since above it training them together is no faster (:data:`AUTO_MAX_PARAMS`).

Wiring it in (for the integrator)
---------------------------------
Daemon: within a submission with ``[MONITOR] ensemble = auto``, runs whose ``group_key``
matches (and whose specs pass ``fallback_reason``) form groups of at most ``ensemble_max``;
a group goes to one worker as one ``run_group`` message carrying the N specs (each member
transitions to RUNNING as it would alone; the worker is busy until every member has
reported). Park and cancel of one member are messages naming its run id (``park`` as today,
a new ``cancel`` instead of killing the worker, which would take the whole group). The worker
reports each member with the usual ``epoch``/``done``/``parked``/``failed`` messages (plus
``cancelled`` or simply nothing for a cancelled member, whose state the daemon already set).
Worker: for ``run_group``, build one :class:`MemberChannel` per member (``on_epoch`` sends the
epoch message, ``park_requested``/``cancel_requested`` poll the socket and look the run id up
in sets of requested ids), redirect output to the first member's log (the engine writes each
member's own ``[mosaic]`` lines into its log itself), call :func:`execute_group`, send each
outcome; on :class:`Fallback`, run each spec through the usual ``run_one`` (the reason is
already in each run's log; send it to the daemon too so that ``mosaic show`` can say it).
Under ``--isolation process`` the forked child needs the park/cancel run ids through its pipe
instead of SIGUSR1, which cannot name a member.

The batched forward
-------------------
``vmap(functional_call)`` spends most of a small model's step on its own bookkeeping. When every
stage of the pipeline is provably a chain of ``nn.Linear`` layers and elementwise functions
(traced with ``torch.fx`` on a copy, in both modes; whitelisted modules by exact type, no
hooks, no use of run_info or module_info, no buffers, no random op), the group's forward runs
as batched matrix products on the stacked weights instead (:class:`_Batched`), and the
per-member loss of the plain torch losses is computed on the stacked outputs
(:func:`_member_loss`; other criteria go through vmap). The probe checks it like vmap; where it
differs, the group trains under vmap. Each member's log says which forward trained it.

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
at different epochs fall back (the scheduler should not group them: ``start_epoch`` is part of
the key). A member's ``duration`` per epoch is the group's epoch time divided by the number of
members trained in it.

Fallbacks (reason strings start with the cause): models that are not ``torch.nn.Module``;
parameters shared between modules; BatchNorm-like modules in training mode (in-place buffer
updates) and any buffer a training step changes; data-dependent control flow or any other
error while vmapping the first step; members whose batches differ in structure or shape, or
whose loaders differ in length; a user ``accuracy`` that cannot take stacked outputs;
outputs of the vmapped model that differ from the members' own (checked on one batch in
evaluation mode before training); members resuming from different epochs.
"""

from __future__ import annotations

import array
import copy
import itertools
import math
import operator
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.func import functional_call, vmap
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from mosaic_client import contract
from mosaic_client.protocol import RunSpec
from mosaicd.scheduling.ensemble_groups import (  # the engine's API, kept torch-free for the daemon
    ELEMENTWISE_OPTIMIZERS as ELEMENTWISE_OPTIMIZERS,
)
from mosaicd.scheduling.ensemble_groups import fallback_reason as fallback_reason
from mosaicd.scheduling.ensemble_groups import group_key as group_key
from mosaicd.training import execution, provenance
from mosaicd.training.execution import BuiltRun, History

# The `auto` rule: above this many trainable parameters per member, an ensemble no longer
# pays on a CPU (benchmarks/ensemble.py, docs/ensembles.md: 16 members of 67k parameters
# train 1.7x faster together, of 265k 0.7x), so such groups fall back.
AUTO_MAX_PARAMS = 100_000

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


# -- grouping: group_key and fallback_reason live in mosaicd.scheduling.ensemble_groups (no torch),
# for the daemon's dispatch; they are re-exported here as the engine's API.


# -- batches ----------------------------------------------------------------------------------


def _tensor_loader(loader: Any) -> TensorDataset | None:
    """The dataset of a plain single-process DataLoader over a TensorDataset, else None: its
    batches can be cut from the tensors directly, with the loader's own sampler."""
    if type(loader) is not DataLoader or type(loader.dataset) is not TensorDataset:
        return None
    if (
        loader.num_workers != 0
        or loader.collate_fn is not default_collate
        or loader.pin_memory
        or loader.batch_size is None
    ):
        return None
    return loader.dataset


class MemberBatches:
    """One member's batches for one pass, drawn under the member's own random state, so that
    its loader shuffles exactly as it would in the run alone."""

    def __init__(self, loader: Any, rng: dict[str, Any]) -> None:
        self.rng = rng
        self.dataset = _tensor_loader(loader)
        execution.set_rng_states(rng)
        self.iterator = iter(loader)
        self.indices: list[list[int]] | None = None
        if self.dataset is not None:
            # A DataLoader draws its random numbers when the iterator is made and at the first
            # index: taking all the epoch's indices now draws exactly the same numbers.
            self.indices = []
            while True:
                try:
                    self.indices.append(list(self.iterator._next_index()))
                except StopIteration:
                    break
            self.position = 0
        self.rng.update(execution.rng_states())

    def next(self) -> Any:
        """The next batch, or None at the end of the pass."""
        if self.indices is not None:
            if self.position >= len(self.indices):
                return None
            index = torch.as_tensor(self.indices[self.position])
            self.position += 1
            return [t[index] for t in self.dataset.tensors]
        execution.set_rng_states(self.rng)
        try:
            batch = next(self.iterator)
        except StopIteration:
            batch = None
        self.rng.update(execution.rng_states())
        return batch


def _stack_tree(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack_tree([it[i] for it in items]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _stack_tree([it[k] for it in items]) for k in first}
    raise TypeError(f"a batch holds a {type(first).__name__}, which cannot be stacked")


def _same_tree(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and (a is b or bool(torch.equal(a, b)))
        )
    if isinstance(a, (tuple, list)):
        return (
            isinstance(b, (tuple, list))
            and len(a) == len(b)
            and all(_same_tree(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
        )
    return a == b


def _shape_of(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return (tuple(tree.shape), tree.dtype)
    if isinstance(tree, (tuple, list)):
        return tuple(_shape_of(t) for t in tree)
    if isinstance(tree, dict):
        return tuple((k, _shape_of(v)) for k, v in sorted(tree.items()))
    return type(tree).__name__


def _step_batches(
    sources: list[MemberBatches],
    device: torch.device,
) -> tuple[Any, Any, bool] | None:
    """All members' next batches as (x, y, shared); None when the pass is over."""
    batches = [s.next() for s in sources]
    ended = [b is None for b in batches]
    if all(ended):
        return None
    if any(ended):
        raise Fallback("the members' loaders yield different numbers of batches")
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise execution.UserCodeError(
                "each batch must be an (x, y) pair; the data "
                "module's loaders yielded " + type(batch).__name__
            )
    first = batches[0]
    if all(b is first for b in batches) or (
        sources[0].indices is not None
        and all(s.dataset is sources[0].dataset for s in sources)
        and all(s.indices == sources[0].indices for s in sources)
    ):
        shared = True
    else:
        shape = _shape_of(first)
        if any(_shape_of(b) != shape for b in batches[1:]):
            raise Fallback("the members' batches differ in shape or structure")
        shared = all(_same_tree(first, b) for b in batches[1:])
    if shared:
        return execution.to_device(first[0], device), execution.to_device(first[1], device), True
    x = _stack_tree([execution.to_device(b[0], device) for b in batches])
    y = _stack_tree([execution.to_device(b[1], device) for b in batches])
    return x, y, False


# -- the stacked model ------------------------------------------------------------------------


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


def _named(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return dict(model.named_parameters()), dict(model.named_buffers())


def _check_modules(members: list[Member]) -> None:
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


# -- the batched forward ----------------------------------------------------------------------
# vmap(functional_call) costs most of a small model's step in its own bookkeeping (0.47 ms of a
# 1.06 ms step for 16 members of a 2-16-16-1 MLP, where the same forward as batched matrix
# products takes 0.04 ms). So a pipeline whose every stage is provably a chain of Linear layers
# and elementwise functions is run as batched matrix products instead: the same computation,
# each member's slice computed from its own weights. Anything else keeps vmap.


class _NotBatched(Exception):
    """A stage's graph is not (provably) a chain of Linear layers and elementwise functions."""


# Activation modules, by exact type (a subclass may override forward), and what they compute.
_ACTIVATION_MODULES: dict[type[torch.nn.Module], Callable[[Any], Callable[[Any], Any]]] = {
    torch.nn.ReLU: lambda m: torch.relu,
    torch.nn.Sigmoid: lambda m: torch.sigmoid,
    torch.nn.Tanh: lambda m: torch.tanh,
    torch.nn.GELU: lambda m: lambda v: torch.nn.functional.gelu(v, approximate=m.approximate),
    torch.nn.LeakyReLU: lambda m: lambda v: torch.nn.functional.leaky_relu(v, m.negative_slope),
    torch.nn.Identity: lambda m: lambda v: v,
}
_UNARY_FUNCTIONS = {
    torch.relu: torch.relu,
    torch.sigmoid: torch.sigmoid,
    torch.tanh: torch.tanh,
    torch.nn.functional.relu: torch.relu,
    torch.nn.functional.sigmoid: torch.sigmoid,
    torch.nn.functional.tanh: torch.tanh,
}
_UNARY_METHODS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
# Arithmetic with a Python number: elementwise, so a stacked or shared operand gives each
# member what it gives alone.
_SCALAR_OPERATORS = {operator.add, operator.sub, operator.mul, operator.truediv}
_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
)


def _has_hooks(model: torch.nn.Module) -> bool:
    """Module hooks run under functional_call but not in a traced graph: such a model keeps
    vmap (global hooks too)."""
    glob = torch.nn.modules.module
    if any(
        getattr(glob, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    ):
        return True
    for sub in model.modules():
        if any(getattr(sub, name, None) for name in _HOOKS[:4]):
            return True
    return False


def _plain_state(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Each submodule's Python attributes (not its tensors nor submodules): a trace that
    changes them ran a forward with side effects, which a fixed graph would not repeat."""
    skip = {"_parameters", "_buffers", "_modules", *_HOOKS}
    return [{k: v for k, v in sub.__dict__.items() if k not in skip} for sub in model.modules()]


def _trace(model: torch.nn.Module) -> torch.fx.Graph:
    """The stage's graph, traced on a copy in both modes: a forward whose graph depends on
    the mode (`if self.training:`) or that changes its own state is not batched. Tracing runs
    the user's forward on proxies: it must neither draw from the run's random state nor
    touch the real module."""
    saved = execution.rng_states()
    try:
        twin = copy.deepcopy(model)
        graphs = []
        for mode in (True, False):
            twin.train(mode)
            before = _plain_state(twin)
            tracer = torch.fx.Tracer()
            # A buffer read in the forward becomes a node (rejected), not a constant that a
            # traced-away in-place update would leave behind.
            tracer.proxy_buffer_attributes = True
            graph = tracer.trace(twin)
            try:
                unchanged = _plain_state(twin) == before
            except Exception:  # attributes that cannot be compared: assume the worst
                unchanged = False
            if not unchanged:
                raise _NotBatched("the forward changes the module's state")
            graphs.append(graph)
    except _NotBatched:
        raise
    except Exception as exc:
        raise _NotBatched(f"it cannot be traced ({_short(exc)})") from exc
    finally:
        execution.set_rng_states(saved)
    if str(graphs[0]) != str(graphs[1]):
        raise _NotBatched("its forward differs in training and evaluation mode")
    return graphs[0]


@dataclass
class _Op:
    """One node of a stage: `linear` (a Linear layer: `prefix` names its weight and bias in
    the stacked tensors) or an elementwise function `fn`; `src` names its input node."""

    name: str
    src: str
    prefix: str | None = None
    fn: Callable[[Any], Any] | None = None


def _scalar_op(fn: Callable[[Any, Any], Any], c: float, left: bool) -> Callable[[Any], Any]:
    return (lambda v: fn(v, c)) if left else (lambda v: fn(c, v))


def _sole_use(model: torch.nn.Module, node: torch.fx.Node) -> bool:
    """Whether `node`'s value, and every value it aliases (through Identity or Dropout, which
    may return their input), is used once and is not the stage's input."""
    while True:
        if node.op == "placeholder" or len(node.users) != 1:
            return False
        if node.op != "call_module" or type(model.get_submodule(node.target)) not in (
            torch.nn.Identity,
            torch.nn.Dropout,
        ):
            return True
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node):
            return False
        node = source


def _compile_stage(model: torch.nn.Module, names: set[str]) -> tuple[str, list[_Op], str]:
    """A stage's graph as (input node, ops, output node); _NotBatched when any node is not a
    Linear layer or an elementwise function of one value (or uses run_info / module_info)."""
    if type(model).__call__ is not torch.nn.Module.__call__:
        raise _NotBatched(f"{type(model).__name__} overrides __call__")
    if _has_hooks(model):
        raise _NotBatched("it has module hooks")
    graph = _trace(model)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders or any(n.users for n in placeholders[1:]):
        raise _NotBatched("its forward uses run_info or module_info")
    ops: list[_Op] = []
    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output = node.args[0]
            if not isinstance(output, torch.fx.Node):
                raise _NotBatched("its forward does not return one tensor")
            continue
        args, kwargs = node.args, dict(node.kwargs)
        what = f"{node.op} {getattr(node.target, '__name__', node.target)}"
        if node.op == "call_module":
            sub = model.get_submodule(node.target)
            kind = type(sub)
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.fx.Node):
                raise _NotBatched(f"{kind.__name__} is called with other arguments")
            if "forward" in vars(sub):  # a forward replaced on the instance, not the class's
                raise _NotBatched(f"{kind.__name__} has its own forward")
            if getattr(sub, "inplace", False) and not _sole_use(model, args[0]):
                # Alone, an in-place op also changes what other users of its input see; the
                # batched ops never work in place.
                raise _NotBatched(f"in-place {kind.__name__} on a value used elsewhere")
            if kind is torch.nn.Linear:
                if {n for n, _ in sub.named_parameters()} - {"weight", "bias"}:
                    raise _NotBatched("a Linear layer with other parameters")
                prefix = f"{node.target}."
                if prefix + "weight" not in names:
                    raise _NotBatched("a Linear layer whose weight is not one of its parameters")
                ops.append(_Op(node.name, args[0].name, prefix=prefix))
            elif kind is torch.nn.Dropout and sub.p == 0:
                ops.append(_Op(node.name, args[0].name, fn=lambda v: v))
            elif kind in _ACTIVATION_MODULES:
                ops.append(_Op(node.name, args[0].name, fn=_ACTIVATION_MODULES[kind](sub)))
            elif kind is torch.nn.Dropout:
                # Random: its per-member streams are vmap's (randomness="different").
                raise _NotBatched("Dropout draws random masks")
            else:
                raise _NotBatched(f"{kind.__name__} is not one of the batched layers")
            continue
        single = len(args) == 1 and isinstance(args[0], torch.fx.Node)
        if node.op == "call_function" and node.target in _UNARY_FUNCTIONS and single:
            if kwargs not in ({}, {"inplace": False}):
                raise _NotBatched(f"{what} with arguments {sorted(kwargs)}")
            ops.append(_Op(node.name, args[0].name, fn=_UNARY_FUNCTIONS[node.target]))
        elif node.op == "call_method" and node.target in _UNARY_METHODS and single and not kwargs:
            ops.append(_Op(node.name, args[0].name, fn=_UNARY_METHODS[node.target]))
        elif (
            node.op == "call_function"
            and node.target in _SCALAR_OPERATORS
            and len(args) == 2
            and not kwargs
            and sum(isinstance(a, torch.fx.Node) for a in args) == 1
            and all(isinstance(a, torch.fx.Node) or type(a) in (int, float) for a in args)
        ):
            left = isinstance(args[0], torch.fx.Node)
            src, c = (args[0], args[1]) if left else (args[1], args[0])
            ops.append(_Op(node.name, src.name, fn=_scalar_op(node.target, c, left)))
        else:
            raise _NotBatched(f"{what} is not one of the batched operations")
    if output is None:
        raise _NotBatched("its graph has no output")
    return placeholders[0].name, ops, output.name


def _stacked_linear(x: torch.Tensor, shared: bool, w: torch.Tensor, b: Any) -> torch.Tensor:
    """Each member's Linear layer at once: w (M, out, in), b (M, out) or None; x stacked
    (M, ..., in) or one input for all members (..., in). Leading dims are flattened into
    one batch dim, as F.linear does."""
    members, width = w.shape[0], x.shape[-1]
    if shared:
        lead = x.shape[:-1]
        flat = x.reshape(1, -1, width).expand(members, -1, -1)
    else:
        if x.dim() < 2 or x.shape[0] != members:
            raise ValueError("a stacked input without the members' dimension")
        lead = x.shape[1:-1]
        flat = x.reshape(members, -1, width)
    weights = w.transpose(1, 2)
    out = torch.bmm(flat, weights) if b is None else torch.baddbmm(b.unsqueeze(1), flat, weights)
    return out.reshape(members, *lead, w.shape[1])


class _Batched:
    """The pipeline's forward as batched matrix products over the stacked parameters."""

    def __init__(self, stages: list[tuple[str, list[_Op], str]]) -> None:
        self.stages = stages

    def forward(self, stacked: list[dict[str, torch.Tensor]], x: Any, shared: bool) -> Any:
        members = len(next(iter(t for s in stacked for t in s.values())))
        out = x
        for (start, ops, end), tensors in zip(self.stages, stacked):
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"a stage's input is a {type(out).__name__}, not a tensor")
            values = {start: (out, shared)}
            for op in ops:
                value, is_shared = values[op.src]
                if op.prefix is not None:
                    weight = tensors[op.prefix + "weight"]
                    bias = tensors.get(op.prefix + "bias")
                    values[op.name] = (_stacked_linear(value, is_shared, weight, bias), False)
                else:
                    values[op.name] = (op.fn(value), is_shared)  # type: ignore[misc]
            out, shared = values[end]
        if shared:  # no Linear layer at all: every member's output is the input's function
            out = out.expand(members, *out.shape)
        return out


def _batched_forward(bases: list[Any]) -> tuple[_Batched | None, str]:
    """The batched forward of the pipeline, or None and why not (then vmap)."""
    stages = []
    for base in bases:
        try:
            names = {n for n, _ in base.named_parameters()}
            stages.append(_compile_stage(base, names))
        except _NotBatched as why:
            return None, f"model {type(base).__name__}: {why}"
    return _Batched(stages), ""


def _mean_per_member(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _member_loss(criterion: Any) -> Callable[[Any, Any, bool], torch.Tensor | None] | None:
    """Each member's mean loss from stacked outputs, for the torch losses whose per-member
    value is a plain mean of elementwise terms (defaults: no weights, no label smoothing);
    None for any other criterion. The function returns None for shapes it does not handle
    (a target that broadcasts, say): the caller then vmaps the criterion itself."""
    nn = torch.nn
    F = torch.nn.functional
    kind = type(criterion)
    if getattr(criterion, "reduction", None) != "mean":
        return None
    elementwise: dict[type, Callable[..., torch.Tensor]] = {
        nn.MSELoss: F.mse_loss,
        nn.L1Loss: F.l1_loss,
        nn.BCELoss: F.binary_cross_entropy,
        nn.BCEWithLogitsLoss: F.binary_cross_entropy_with_logits,
    }
    if kind in elementwise:
        if getattr(criterion, "weight", None) is not None:
            return None
        if getattr(criterion, "pos_weight", None) is not None:
            return None
        fn = elementwise[kind]

        def plain(out: Any, y: Any, shared: bool) -> torch.Tensor | None:
            if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor):
                return None
            if y.shape != (out.shape[1:] if shared else out.shape):
                return None  # alone it broadcasts (or raises): vmap does the same
            return _mean_per_member(fn(out, y.expand(out.shape), reduction="none"))

        return plain
    if kind is nn.CrossEntropyLoss and criterion.weight is None and criterion.label_smoothing == 0:
        ignore = criterion.ignore_index

        def cross_entropy(out: Any, y: Any, shared: bool) -> torch.Tensor | None:
            if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor):
                return None
            if out.dim() != 3:  # per member (batch, classes) only
                return None
            members, batch, classes = out.shape
            y = y.expand(members, *y.shape) if shared else y
            flat = out.reshape(members * batch, classes)
            if y.shape == (members, batch) and not y.is_floating_point():
                terms = F.cross_entropy(
                    flat, y.reshape(-1), ignore_index=ignore, reduction="none"
                ).reshape(members, batch)
                # Alone: the mean over the targets that are not ignored.
                return terms.sum(dim=1) / (y != ignore).sum(dim=1)
            if y.shape == out.shape and y.is_floating_point():  # class probabilities
                terms = F.cross_entropy(flat, y.reshape(flat.shape), reduction="none")
                return terms.reshape(members, batch).mean(dim=1)
            return None

        return cross_entropy
    return None


class Stack:
    """The members' parameters, buffers and optimizer state, stacked along dimension 0."""

    def __init__(
        self,
        members: list[Member],
        lr: float,
        forward: tuple[_Batched | None, str] | None = None,
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
        self.data_cache: dict[bool, tuple[list[torch.Tensor], bool] | None] = {}
        self.batched, self.why_vmap = forward or _batched_forward(self.bases)
        self.member_loss = _member_loss(self.criterion) if self.batched is not None else None
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
    def forward_choice(self) -> tuple[_Batched | None, str]:
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
                f"fails under vmap: {_short(exc)})"
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


def _probe(stack: Stack, members: list[Member]) -> None:
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
            x, y, shared = _step_batches(source_list, device)  # type: ignore[arg-type]
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
                    why = f"the batched forward failed ({_short(exc)})"
                if why is not None:
                    stack.use_vmap(why)
            if stack.batched is None:
                try:
                    losses, outs = stack.losses(x, y, shared)
                except Fallback:
                    raise
                except Exception as exc:
                    raise Fallback(_vmap_reason(exc)) from exc
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


def _short(exc: BaseException) -> str:
    """An exception's first sentence: torch's vmap errors go on to ask for a bug report."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text.split(". ")[0].rstrip(".")[:300]


def _vmap_reason(exc: BaseException) -> str:
    text = _short(exc)
    if (
        "data-dependent control flow" in text
        or "data dependent" in text.lower()
        or ".item()" in text
    ):
        return f"data-dependent control flow cannot be vmapped ({text})"
    return f"the pipeline cannot be vmapped ({text})"


# Members' TensorDatasets are stacked once per group, so that a step cuts every member's batch
# with one indexing operation, when they take at most this much memory.
STACKED_DATA_MAX_BYTES = 256 * 2**20
# Stacked data up to this size is gathered once per pass rather than once per step.
PASS_GATHER_MAX_BYTES = 32 * 2**20


def _stacked_data(
    stack: Stack,
    sources: list[MemberBatches],
    train: bool,
) -> tuple[list[torch.Tensor], bool] | None:
    """The members' dataset tensors stacked (and whether they are all identical), or None."""
    if train in stack.data_cache:
        return stack.data_cache[train]
    found: tuple[list[torch.Tensor], bool] | None = None
    datasets = [s.dataset for s in sources]
    if all(d is not None and len(d.tensors) == 2 for d in datasets):  # (x, y) pairs only
        first = datasets[0].tensors  # type: ignore[union-attr]
        layouts = [
            [(t.shape, t.dtype, t.device) for t in d.tensors]  # type: ignore[union-attr]
            for d in datasets
        ]
        if (
            all(layout == layouts[0] for layout in layouts)
            and sum(t.nbytes for t in first) * len(datasets) <= STACKED_DATA_MAX_BYTES
        ):
            tensors = [
                torch.stack([d.tensors[k] for d in datasets])  # type: ignore[union-attr]
                for k in range(len(first))
            ]
            identical = all(
                d is datasets[0] or all(torch.equal(a, b) for a, b in zip(d.tensors, first))  # type: ignore[union-attr]
                for d in datasets
            )
            found = (tensors, identical)
    stack.data_cache[train] = found
    return found


def _steps(
    stack: Stack,
    sources: list[MemberBatches],
    train: bool,
    device: torch.device,
) -> Iterator[tuple[Any, Any, bool]]:
    """A pass's steps as (x, y, shared): x and y stacked over the members, or one batch that
    all members share (shared)."""
    data = _stacked_data(stack, sources, train)
    sizes = [len(b) for b in sources[0].indices] if sources[0].indices is not None else None
    if data is None or any(
        s.indices is None or [len(b) for b in s.indices] != sizes for s in sources
    ):
        while (step := _step_batches(sources, device)) is not None:
            yield step
        return
    tensors, identical = data
    if not sizes:
        return  # an empty loader: _pass reports it as a run alone would
    # The pass's indices as int64 buffers: converting a list of Python ints to a tensor costs
    # four times more, at every pass.
    flat = [array.array("q", itertools.chain.from_iterable(s.indices)) for s in sources]  # type: ignore[arg-type]
    # Small data: one gather for the whole pass, then a view per step (the same values as
    # cutting each step's batch, without two indexing operations per step). Larger data is cut
    # step by step, so that a pass does not hold a second copy of it (on the device, too).
    whole_pass = sum(t.nbytes for t in tensors) <= PASS_GATHER_MAX_BYTES
    if identical and all(f == flat[0] for f in flat):
        index = torch.frombuffer(flat[0], dtype=torch.int64)
        shared_data = [t[0] for t in tensors]
        if whole_pass:
            xs, ys = (execution.to_device(t[index], device) for t in shared_data)
        start = 0
        for size in sizes:  # type: ignore[union-attr]
            if whole_pass:
                yield xs[start : start + size], ys[start : start + size], True
            else:
                batch = index[start : start + size]
                x, y = (execution.to_device(t[batch], device) for t in shared_data)
                yield x, y, True
            start += size
        return
    whole = array.array("q")
    for f in flat:
        whole.extend(f)
    index = torch.frombuffer(whole, dtype=torch.int64).view(len(sources), -1)
    rows = torch.arange(len(sources)).unsqueeze(1)
    if whole_pass:
        xs, ys = (execution.to_device(t[rows, index], device) for t in tensors)
    start = 0
    for size in sizes:  # type: ignore[union-attr]
        if whole_pass:
            yield xs[:, start : start + size], ys[:, start : start + size], False
        else:
            batch = index[:, start : start + size]
            x, y = (execution.to_device(t[rows, batch], device) for t in tensors)
            yield x, y, False
        start += size


# -- one epoch --------------------------------------------------------------------------------


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
        MemberBatches(m.run.train_data if train else m.run.test_data, m.rng) for m in members
    ]
    steps = _steps(stack, sources, train, device)
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
                    raise Fallback(_vmap_reason(exc)) from exc
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


# -- the group --------------------------------------------------------------------------------


def _log(spec: RunSpec, text: str) -> None:
    """Append a line to the run's log, as the worker's redirected output would."""
    os.makedirs(spec["run_files_path"], exist_ok=True)
    with open(contract.run_log_path(spec["run_files_path"], int(spec["run_id"])), "a") as fh:
        fh.write(text + "\n")


def _build_members(specs: list[RunSpec], channels: dict[int, MemberChannel]) -> list[Member]:
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
            provenance={"environment": environment, "code": code},
        )
        if start_epoch > 0:
            member.checkpoint_epoch, member.history = execution.restore(run, member.files_dir)
        member.rng = execution.rng_states()  # after build (and restore): the run's own state
        members.append(member)
    epochs = {m.checkpoint_epoch for m in members}
    if len(epochs) != 1:
        raise Fallback(f"the members resume from different epochs ({sorted(epochs)})")
    return members


def _failure(exc: BaseException) -> Outcome:
    text = traceback.format_exc()
    message = (
        str(exc) if isinstance(exc, execution.UserCodeError) else f"{type(exc).__name__}: {exc}"
    )
    return ("failed", {"error": message, "traceback": text})


def execute_group(
    specs: list[RunSpec],
    channels: dict[int, MemberChannel],
    *,
    max_params: int | None = AUTO_MAX_PARAMS,
) -> dict[int, Outcome]:
    """Train the members together; see the module docstring for the contract. Members of more
    than `max_params` trainable parameters fall back (None: no limit)."""
    reason = fallback_reason(specs)
    try:
        if reason is not None:
            raise Fallback(reason)
        return _execute(specs, channels, max_params)
    except Fallback as fallback:
        for spec in specs:
            try:
                _log(
                    spec,
                    f"[mosaic] ensemble of runs {[int(s['run_id']) for s in specs]} not "
                    f"used: {fallback.reason}; the run trains individually",
                )
            except OSError:
                pass
        raise


def _execute(
    specs: list[RunSpec], channels: dict[int, MemberChannel], max_params: int | None
) -> dict[int, Outcome]:
    lr = float(specs[0]["process"]["lr"])
    try:
        members = _build_members(specs, channels)
        nb_params = members[0].run.nb_params
        if max_params is not None and nb_params > max_params:
            raise Fallback(
                f"the model is too large to gain from an ensemble ({nb_params} "
                f"trainable parameters per member, more than {max_params})"
            )
        _check_modules(members)
        stack = Stack(members, lr)
        _probe(stack, members)
    except Fallback:
        raise
    except Exception as exc:
        # Whatever the user code does wrong, the individual runs report it the usual way.
        raise Fallback(
            f"the group could not be set up ({type(exc).__name__}: {exc})"[:400]
        ) from exc
    outcomes: dict[int, Outcome] = {}
    target = int(specs[0]["epochs_target"])
    checkpoint_every = float(specs[0].get("checkpoint_every", 30.0))
    last_checkpoint = time.monotonic()
    first = True
    epoch = members[0].checkpoint_epoch
    while members and epoch < target:
        epoch += 1
        for member in members:
            member.run.run_info["epoch"] = epoch
        started = time.perf_counter()
        try:
            train_loss, train_acc = _pass(stack, members, True, first)
            test_loss, test_acc = _pass(stack, members, False, first)
        except BaseException as exc:
            if first:
                if isinstance(exc, Fallback):
                    raise
                raise Fallback(
                    f"the first ensemble epoch failed ({type(exc).__name__}: {exc})"[:400]
                ) from exc
            failure = _failure(exc)
            outcomes.update({m.run_id: failure for m in members})
            return outcomes
        duration = (time.perf_counter() - started) / len(members)
        if first:
            # Only now, with the first epoch computed, may anything reach the daemon.
            ids = [m.run_id for m in members]
            for member in members:
                _log(
                    member.spec,
                    f"[mosaic] run {member.run_id} trains in an ensemble with runs {ids}",
                )
                _log(member.spec, f"[mosaic] ensemble forward: {stack.forward_path}")
                member.resend_epochs()
            first = False
        survivors = []
        for i, member in enumerate(members):
            if not (math.isfinite(train_loss[i]) and math.isfinite(test_loss[i])):
                try:
                    raise execution.UserCodeError(
                        f"loss is not finite at epoch {epoch} (train {train_loss[i]}, test "
                        f"{test_loss[i]}); lower lr, check the data for NaN, or use a "
                        "numerically stable loss"
                    )
                except execution.UserCodeError as exc:
                    outcomes[member.run_id] = _failure(exc)
                    _log(member.spec, outcomes[member.run_id][1]["traceback"])
                continue
            member.history.append(train_loss[i], test_loss[i], train_acc[i], test_acc[i], duration)
            survivors.append(member)
        last = epoch == target
        decisions = []
        for member in survivors:
            park = member.channel.park_requested()
            cancel = member.channel.cancel_requested()
            decisions.append((member, park, cancel))
        checkpoint_all = last or time.monotonic() - last_checkpoint >= checkpoint_every
        if (
            checkpoint_all
            or len(survivors) != len(members)
            or any(park or cancel for _, park, cancel in decisions)
        ):
            stack.unstack()
        if checkpoint_all:
            last_checkpoint = time.monotonic()
        remaining = []
        for member, park, cancel in decisions:
            checkpointed = (checkpoint_all or park) and not cancel
            if checkpointed:
                execution.set_rng_states(member.rng)
                execution.save_checkpoint(
                    member.run,
                    member.history,
                    epoch,
                    contract.checkpoint_path(member.files_dir, member.run_id),
                )
            history = member.history
            _log(
                member.spec,
                f"[mosaic] run {member.run_id} epoch {epoch}/{target} "
                f"train_loss={history.train_loss[-1]:.6g} "
                f"test_loss={history.test_loss[-1]:.6g}",
            )
            member.channel.on_epoch(history.event(member.run_id, epoch - 1, checkpointed))
            if cancel and not last:
                outcomes[member.run_id] = ("cancelled", {"epoch": epoch})
                _log(member.spec, f"[mosaic] run {member.run_id} cancelled after epoch {epoch}")
            elif last:
                try:
                    outcomes[member.run_id] = (
                        "done",
                        execution.finish(member.run, member.spec, history),
                    )
                except BaseException as exc:
                    outcomes[member.run_id] = _failure(exc)
            elif park:
                outcomes[member.run_id] = ("parked", {"epoch": epoch})
                _log(member.spec, f"[mosaic] run {member.run_id} parked after epoch {epoch}")
            else:
                remaining.append(member)
        if remaining and len(remaining) != len(members):
            stack = Stack(remaining, lr, stack.forward_choice)
        members = remaining
    for member in members:  # already at the target when the group started
        if first:
            member.resend_epochs()
        outcomes[member.run_id] = (
            "done",
            execution.finish(member.run, member.spec, member.history),
        )
    return outcomes


def run_individually(
    specs: list[RunSpec], channels: dict[int, execution.Channel]
) -> Iterator[tuple[int, Outcome]]:
    """The fallback path as the tests and the benchmark use it: each spec through
    execution.execute (the worker uses its own run_one instead, for logs and isolation)."""
    for spec in specs:
        run_id = int(spec["run_id"])
        try:
            yield run_id, ("done", execution.execute(spec, channels[run_id]))
        except execution.Parked as parked:
            yield run_id, ("parked", {"epoch": parked.epoch})
        except Exception as exc:
            yield run_id, _failure(exc)
