"""What a run costs (issue 26), measured without disturbing its training (docs/resources.md).

Two kinds of figures:

- **per training pass** (:class:`PassMeter`, around each epoch's training pass): wall and process
  CPU time, on a GPU the CUDA time between two events, the peak memory growth over the pass
  (CUDA peak allocated on a GPU; the resident high-water mark on Linux, reset by writing "5" to
  ``/proc/self/clear_refs``), and on a GPU the energy NVML counts (optional ``pynvml``). They are
  kept per epoch in the run's history (so a resumed run keeps its first epochs') and summarised
  by :func:`summary`.
- **once, after the last epoch** (:func:`inference_figures`): forward FLOPs per sample
  (PyTorch's FLOP counter on one test batch under ``no_grad``, a multiply-add counted as 2), the
  latency of a batch of 1 (median of repeated timed calls after warm-up, under inference mode)
  and the throughput on one test batch. Training is over, so these disturb nothing; the random
  state is restored around them all the same (the caller's).

Nothing here may fail a run: a figure that cannot be had is None (NULL in the study).
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

MIB = 1024 * 1024
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
# Timed calls for the latency and throughput: at least this many, then until the time budget.
MIN_CALLS = 3
MAX_CALLS = 200
WARM_UP_CALLS = 1


# -- memory -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A "VmXXX:  1234 kB" line of /proc/self/status, in KiB (None off Linux). One raw read:
    it runs at every epoch, and parsing the file line by line costs more than the read."""
    try:
        fd = os.open(_STATUS, os.O_RDONLY)
        try:
            text = os.read(fd, 8192)
        finally:
            os.close(fd)
        start = text.index(field.encode() + b":") + len(field) + 1
        return int(text[start : text.index(b"kB", start)])
    except (OSError, ValueError):
        return None


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_trim = _libc_trim()


def reset_resident_peak() -> int | None:
    """Reset the process's resident high-water mark to its current size; that size in KiB, or
    None when the kernel does not allow it (then the peak cannot be measured).

    The memory earlier runs freed is first handed back to the system (glibc's malloc_trim): a
    persistent worker's allocator would otherwise serve this run from pages already resident,
    and a run would show no growth only because another ran before it."""
    if _trim is not None:
        _trim(0)
    try:
        fd = os.open(_CLEAR_REFS, os.O_WRONLY)
        try:
            os.write(fd, b"5")
        finally:
            os.close(fd)
    except OSError:
        return None
    return _status_kib("VmRSS")


# The resident size when the high-water mark was last reset, and for what (a run, or an
# ensemble's stack): reset once per run, at its first training pass, so that an epoch costs one
# read of /proc/self/status, not a reset and two reads (benchmarks/resources.py).
# The scope is held by a weak reference: a finished run's models must not stay alive for it.
_resident: dict[str, Any] = {"scope": None, "base": None}


def _same_scope(scope: object) -> bool:
    held = _resident["scope"]
    return held is not None and held() is scope


def resident_peak_kib() -> int | None:
    return _status_kib("VmHWM")


# -- energy (NVML) ----------------------------------------------------------------------------

_nvml: dict[int, Any] = {}


def _nvml_handle(device: torch.device) -> Any:
    """The NVML handle of `device`, or None (no pynvml, no NVML, an old card)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _nvml:
        return _nvml[index]
    handle = None
    try:
        import pynvml  # optional: the `gpu` extra (nvidia-ml-py)

        pynvml.nvmlInit()
        try:  # NVML numbers the cards of the machine, CUDA those CUDA_VISIBLE_DEVICES shows
            physical = torch.cuda._get_nvml_device_index(index)
        except Exception:
            physical = index
        handle = pynvml.nvmlDeviceGetHandleByIndex(physical)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where not supported
    except Exception:
        handle = None
    _nvml[index] = handle
    return handle


def _energy_mj(handle: Any) -> int | None:
    if handle is None:
        return None
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception:
        return None


# -- one training pass ------------------------------------------------------------------------


class PassMeter:
    """Around one training pass: its wall, CPU and (on a GPU) CUDA time, peak memory growth and
    (on a GPU with NVML) energy. :meth:`figures` gives them, divided by `share` (the members of
    an ensemble that trained in the pass). On a GPU the peak is the pass's; on a CPU, with a
    `scope` (the run, or an ensemble's stack), the kernel's high-water mark is reset at the
    scope's first pass only and read by :func:`note_resident_peak`; without one, this pass's
    alone, read here."""

    def __init__(self, device: torch.device, share: int = 1, scope: object = None) -> None:
        self.device = device
        self.share = max(1, share)
        # What the CPU peak is measured over: from the first pass of this scope (the run) on.
        self.scope = scope
        self.cuda = device.type == "cuda"
        self._figures: dict[str, Any] = {}

    def __enter__(self) -> PassMeter:
        self._events: tuple[Any, Any] | None = None
        self._base_kib: int | None = None
        self._energy: tuple[Any, int | None] = (None, None)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_bytes = torch.cuda.memory_allocated(self.device)
            handle = _nvml_handle(self.device)
            self._energy = (handle, _energy_mj(handle))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, end)
        elif self.scope is None or not _same_scope(self.scope):
            self._base_kib = reset_resident_peak()
            held = None if self.scope is None else weakref.ref(self.scope)
            _resident.update(scope=held, base=self._base_kib)
        else:
            self._base_kib = _resident["base"]
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        gpu_seconds = peak = energy = None
        if self._events is not None:
            start, end = self._events
            end.record()
            torch.cuda.synchronize(self.device)
            gpu_seconds = start.elapsed_time(end) / 1000.0
            peak = (torch.cuda.max_memory_allocated(self.device) - self._base_bytes) / MIB
            handle, before = self._energy
            after = _energy_mj(handle)
            if before is not None and after is not None and after >= before:
                energy = (after - before) / 1000.0
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        if self._base_kib is not None and self.scope is None:
            high = resident_peak_kib()
            if high is not None:
                peak = max(0, high - self._base_kib) / 1024.0
        n = self.share
        self._figures = {
            "train_seconds": wall / n,
            "cpu_seconds": cpu / n,
            "gpu_seconds": None if gpu_seconds is None else gpu_seconds / n,
            "peak_memory_mb": None if peak is None else peak / n,
            "energy_j": None if energy is None else energy / n,
            "shared": n,
            "memory_method": "cuda_allocated"
            if self.cuda
            else ("resident_hwm" if self._base_kib is not None else None),
        }

    def figures(self) -> dict[str, Any]:
        return dict(self._figures)


def note_resident_peak(figures: dict[str, Any], scope: object) -> None:
    """Fill a CPU pass's peak memory (PassMeter.figures, its scope given): the resident growth
    since the scope's first pass, shared among the runs that trained in it. Called where the
    history is kept or ends (a checkpoint, the last epoch, a park), not at every epoch: the
    high-water mark only grows, and an epoch saves a read of /proc/self/status."""
    if figures.get("memory_method") != "resident_hwm" or figures.get("peak_memory_mb") is not None:
        return
    base = _resident["base"]
    if not _same_scope(scope) or base is None:
        return
    high = resident_peak_kib()
    if high is not None:
        figures["peak_memory_mb"] = max(0, high - base) / 1024.0 / max(1, figures["shared"])


def _mean(values: list[Any]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return math.fsum(known) / len(known) if known else None


def summary(usage: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's per-epoch training figures, summarised: times and energy per epoch (their mean
    over the epochs measured), memory the highest peak, `members` the most runs that shared a
    pass (an ensemble's)."""
    peaks = [u["peak_memory_mb"] for u in usage if u.get("peak_memory_mb") is not None]
    return {
        "train_seconds": _mean([u.get("train_seconds") for u in usage]),
        "cpu_seconds": _mean([u.get("cpu_seconds") for u in usage]),
        "gpu_seconds": _mean([u.get("gpu_seconds") for u in usage]),
        "energy_j": _mean([u.get("energy_j") for u in usage]),
        "peak_memory_mb": max(peaks) if peaks else None,
        "members": max((int(u.get("shared") or 1) for u in usage), default=1),
        "memory_method": next((u["memory_method"] for u in usage if u.get("memory_method")), None),
    }


# -- after the last epoch ---------------------------------------------------------------------


def _rows(x: Any) -> int | None:
    """The batch size of an input (a tensor, or a tuple/list/dict of them)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else None
    if isinstance(x, (tuple, list)) and x:
        return _rows(x[0])
    if isinstance(x, dict) and x:
        return _rows(next(iter(x.values())))
    return None


def first_rows(x: Any, n: int) -> Any:
    """The first `n` samples of an input; None when it cannot be sliced."""
    if isinstance(x, torch.Tensor):
        return x[:n] if x.dim() > 0 else None
    if isinstance(x, (tuple, list)):
        parts = [first_rows(v, n) for v in x]
        return None if any(p is None for p in parts) else type(x)(parts)
    if isinstance(x, dict):
        parts_d = {k: first_rows(v, n) for k, v in x.items()}
        return None if any(p is None for p in parts_d.values()) else parts_d
    return None


class _Flops(TorchDispatchMode):
    """PyTorch's FLOP counter (torch.utils.flop_counter: its formulas, one per op it knows),
    without FlopCounterMode's per-module breakdown, which doubles the cost of a count (a third
    of what measuring costs a small run, benchmarks/resources.py). tests/test_resources.py
    checks it against FlopCounterMode and against hand counts."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(forward: Callable[[Any], Any], x: Any) -> float | None:
    """Forward FLOPs per sample of `forward` on the batch `x` (PyTorch's counter: a
    multiply-add is 2 FLOPs; elementwise ops are not counted)."""
    rows = _rows(x)
    if not rows:
        return None
    with torch.no_grad(), _Flops() as counter:
        forward(x)
    return counter.total / rows


def median_seconds(
    call: Callable[[], Any], device: torch.device, budget_s: float
) -> tuple[float, float]:
    """The median time of `call` after warm-up, from MIN_CALLS to MAX_CALLS timed calls within
    about `budget_s`; and the spread of those times (interquartile range / median)."""
    cuda = device.type == "cuda"

    def timed() -> float:
        started = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for _ in range(WARM_UP_CALLS):
        timed()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < MAX_CALLS and (len(times) < MIN_CALLS or time.perf_counter() < deadline):
        times.append(timed())
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4)
    spread = (quartiles[2] - quartiles[0]) / median if median > 0 else 0.0
    return median, spread


def machine_load() -> dict[str, Any]:
    """Under what load the times were taken: the 1-minute load average, the CPUs this process
    may use, torch's threads."""
    try:
        load: float | None = os.getloadavg()[0]
    except OSError:
        load = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return {"load_1m": load, "cpus": cpus, "threads": torch.get_num_threads()}


def inference_figures(
    forward: Callable[[Any], Any], batch: Any, device: torch.device, budget_s: float
) -> dict[str, Any]:
    """FLOPs per sample, latency (batch of 1) and throughput (this batch) of `forward` on the
    input `batch` (already on the device); each None when it cannot be measured."""
    found: dict[str, Any] = {
        "flops_per_sample": None,
        "latency_ms": None,
        "throughput_per_s": None,
        "latency_spread": None,
    }
    rows = _rows(batch)
    if not rows:
        return found
    found["flops_per_sample"] = count_flops(forward, batch)
    with torch.inference_mode():
        single = first_rows(batch, 1)
        if single is not None:
            median, spread = median_seconds(lambda: forward(single), device, budget_s)
            found["latency_ms"] = median * 1000.0
            found["latency_spread"] = spread
        median, _ = median_seconds(lambda: forward(batch), device, budget_s)
        if median > 0:
            found["throughput_per_s"] = rows / median
    return found


def timing_budget(usage: list[dict[str, Any]]) -> float:
    """Seconds for each timing (latency, throughput): a small share of the run's training time,
    so that measuring stays under 2 % of the run (benchmarks/resources.py)."""
    trained = math.fsum(float(u.get("train_seconds") or 0.0) for u in usage)
    return min(0.25, max(0.0001, 0.001 * trained))


def after_training(
    models: list[Any],
    test_data: Any,
    device: torch.device,
    forward: Callable[[Any], Any],
    to_device: Callable[[Any, torch.device], Any],
    usage: list[dict[str, Any]],
    test_input: Any = None,
) -> dict[str, Any]:
    """After the last epoch: the pipeline (`forward`) measured on the first test batch (the last
    test pass's, `test_input`, else drawn from the loader), and the machine's load. A pipeline
    that cannot be measured gets None figures, never fails the run."""
    found: dict[str, Any] = {"device": str(device)} | machine_load()
    try:
        for model in models:
            if isinstance(model, torch.nn.Module):
                model.train(False)
        x = test_input
        if x is None:  # an ensemble member: its batches came from the group's loaders
            x = to_device(next(iter(test_data))[0], device)
        found |= inference_figures(forward, x, device, timing_budget(usage))
    except Exception as exc:  # the user's pipeline: a figure it cannot give is None
        print(f"[mosaic] resources not measured: {type(exc).__name__}: {exc}"[:300], flush=True)
    return found
