"""An ensemble's data: each member's batches, drawn as in the run alone, cut and stacked per step.

Every member draws from its own loaders under its own random state (:class:`MemberBatches`:
the global generators are swapped in around the member's loader), so that it shuffles exactly
as it would alone. A step's batches are then either one batch that every member shares, or the
members' batches stacked along a new leading dimension (:func:`steps`). Members' plain
TensorDatasets are stacked once per group and cut with one indexing operation per step, or per
pass for small data.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from mosaicd.training import execution
from mosaicd.training.ensemble.members import Fallback

# Members' TensorDatasets are stacked once per group, so that a step cuts every member's batch
# with one indexing operation, when they take at most this much memory.
STACKED_DATA_MAX_BYTES = 256 * 2**20
# Stacked data up to this size is gathered once per pass rather than once per step.
PASS_GATHER_MAX_BYTES = 32 * 2**20

# The members' dataset tensors stacked, and whether they are all identical, by pass (True:
# training); None where they cannot be stacked. One per Stack, filled on first use.
DataCache = dict[bool, tuple[list[torch.Tensor], bool] | None]


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


def step_batches(
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


def _stacked_data(
    cache: DataCache,
    sources: list[MemberBatches],
    train: bool,
) -> tuple[list[torch.Tensor], bool] | None:
    """The members' dataset tensors stacked (and whether they are all identical), or None."""
    if train in cache:
        return cache[train]
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
    cache[train] = found
    return found


def steps(
    cache: DataCache,
    sources: list[MemberBatches],
    train: bool,
    device: torch.device,
) -> Iterator[tuple[Any, Any, bool]]:
    """A pass's steps as (x, y, shared): x and y stacked over the members, or one batch that
    all members share (shared). `cache`: the stack's stacked datasets, filled on first use."""
    data = _stacked_data(cache, sources, train)
    sizes = [len(b) for b in sources[0].indices] if sources[0].indices is not None else None
    if data is None or any(
        s.indices is None or [len(b) for b in s.indices] != sizes for s in sources
    ):
        while (step := step_batches(sources, device)) is not None:
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
