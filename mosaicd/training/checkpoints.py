"""Loading a run's checkpoint without running code from it, and the RNG states put in a form
that such a load accepts.

A checkpoint is a pickle, and a pickle may name any callable to run when it is loaded. So a
checkpoint is read with ``torch.load(weights_only=True)`` (tensors, numbers, strings and plain
containers only). What Mosaic itself saves passes that load: the numpy RNG state, a numpy
array in a tuple, is stored as a tensor (:func:`storable_rng`). A checkpoint that still holds
other objects (a model's own ``state_dict`` of custom objects, or a checkpoint written before
this) is loaded with the full unpickler only when it is the process's own file: a regular file,
not a link, owned by the user this worker runs as, who could run that code anyway. The reason is
written to the run's log.
"""

from __future__ import annotations

import errno
import os
import pickle
import stat
import sys
from typing import Any

import torch


def storable_rng(states: dict[str, Any]) -> dict[str, Any]:
    """The RNG states (execution.rng_states) with numpy's array as a tensor."""
    numpy_state = states.get("numpy")
    if numpy_state is None:
        return states
    name, keys, *rest = numpy_state
    return {**states, "numpy": (name, torch.from_numpy(keys.astype("int64")), *rest)}


def loaded_rng(states: dict[str, Any]) -> dict[str, Any]:
    """The RNG states of a checkpoint as execution.set_rng_states takes them."""
    numpy_state = states.get("numpy")
    numpy = sys.modules.get("numpy")
    if numpy_state is None or numpy is None or not isinstance(numpy_state[1], torch.Tensor):
        return states
    name, keys, *rest = numpy_state
    return {**states, "numpy": (name, keys.numpy().astype(numpy.uint32), *rest)}


class UntrustedCheckpoint(Exception):
    """A checkpoint that holds more than weights and is not the process's own file."""


def own_file(path: str) -> bool:
    """A regular file (never a link) owned by this process's user."""
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def load(path: str, map_location: Any) -> Any:
    """The checkpoint at `path`: weights only, or the full unpickler for the process's own file
    (module docstring); its reason printed (the worker's output is the run's log then)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not own_file(path):
            raise UntrustedCheckpoint(
                f"checkpoint {path} holds more than weights ({reason}) and is not this user's "
                "own file: refusing to unpickle it"
            ) from None
    print(
        f"[mosaic] checkpoint {path} holds more than weights ({reason}); loaded in full, as "
        "it is this user's own file",
        flush=True,
    )
    return torch.load(path, map_location=map_location, weights_only=False)


def is_full_disk(exc: BaseException) -> bool:
    """Whether an error raised while writing run files means the disk is full: ENOSPC, or
    torch's zip writer's failures that hide it. A refused write leaves its stream in error:
    the writer then raises ``[enforce fail at inline_container.cc:…] unexpected pos …`` (its
    position stopped advancing), or for a small file ``basic_ios::clear: iostream error`` when
    it is closed; torch raises a RuntimeError instead of the OSError."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return ("inline_container.cc" in text and "unexpected pos" in text) or (
        "basic_ios::clear: iostream error" in text
    )
