"""`mosaic show RUN [--db DB] [--json]`: everything known about one run.

Sends `show` (and `studies` when --db is not given). With no daemon answering and --db given,
reads the run from the study database instead, and says so.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mosaic_client import contract
from mosaic_client.commands import common
from mosaic_client.commands.common import OK
from mosaic_client.render import data_cache_text, fmt

NAME = "show"
HELP = "everything known about one run"
EXAMPLE = "mosaic show 3 --db results.db"


def run(args: argparse.Namespace) -> int:
    _, info, _ = common.run_info(args, "the run is in")
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print("\n".join(run_text(info)))
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=int, help="run id")
    parser.add_argument("--db", help="its study database (default: the daemon's only study)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run_text(info: dict[str, Any]) -> list[str]:
    """The lines of `mosaic show` for a `show` reply (`protocol.ShowReply`)."""
    lines = [
        f"run {info['run_id']}: {info['status']}",
        f"  pipeline: {info['pipeline']}",
        f"  seed: {info['seed']}, epochs target: {info['epochs_target']}, checkpoint at "
        f"epoch {info['checkpoint_epoch']}",
    ]
    group = info.get("group")
    if group:
        others = ", ".join(str(r) for r in group["members"] if r != info["run_id"])
        if group.get("fallback"):
            lines.append(
                f"  ensemble: sent with runs {others}, trained individually: {group['fallback']}"
            )
        else:
            lines.append(f"  ensemble: trained together with runs {others} (one vmapped model)")
    live = info.get("live")
    if live and live.get("data_cache"):
        figures = live["data_cache"]
        cache = data_cache_text(figures).strip() or "data cache empty"
        lines.append(f"  data stages: {figures['outcome']} (worker {live['worker']}: {cache})")
    results = info.get("results")
    if results:
        shown = {k: v for k, v in results.items() if k not in contract.RESOURCE_COLUMNS}
        lines.append("  results: " + ", ".join(f"{k}={fmt(v)}" for k, v in shown.items()))
        lines += resources_text(results, info.get("measurement"))
    lines.append("  parameters:")
    lines += [
        f"    {name} = {value}" for name, value in info["params"].items() if name != "pipeline"
    ]
    lines.append("  history:")
    for event in info["events"]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
        lines.append(
            f"    {stamp}  {event['from'] or '-'} -> {event['to']}  {event['detail'] or ''}"
        )
    if info.get("queued_ahead") is not None:
        lines.append(f"  queued: {info['queued_ahead']} run(s) of this study start before it")
    if info.get("waiting_for"):
        lines.append(f"  waiting: {info['waiting_for']}")
    if info["history"]:
        lines.append(f"  epochs recorded: {len(info['history'])}")
    lines += provenance_text(info.get("provenance"))
    if info["status"] == contract.FAILED and info.get("return_status"):
        lines.append("  failure:")
        lines.append("    " + info["return_status"].replace("\n", "\n    "))
    return lines


# How `show` writes each resource figure: its short label and unit (contract.RESOURCE_UNITS
# has the full description).
_RESOURCE_LABELS = {
    "flops_per_sample": ("forward", "FLOP/sample"),
    "train_seconds": ("train", "s/epoch wall"),
    "cpu_seconds": ("", "s/epoch CPU"),
    "peak_memory_mb": ("peak memory", "MiB"),
    "latency_ms": ("latency", "ms (batch of 1)"),
    "throughput_per_s": ("throughput", "samples/s"),
    "energy_j": ("energy", "J/epoch"),
}


def resources_text(results: dict[str, Any], measurement: dict[str, Any] | None) -> list[str]:
    """The `resources:` lines of `mosaic show`: the figures with units, then where and under
    what load they were measured (docs/resources.md)."""
    if all(results.get(c) is None for c in contract.RESOURCE_COLUMNS):
        return ["  resources: not measured (a run before Mosaic measured them)"]
    parts = []
    for column, (label, unit) in _RESOURCE_LABELS.items():
        value = results.get(column)
        if value is not None:
            parts.append(f"{label + ' ' if label else ''}{fmt(value)} {unit}")
    lines = ["  resources: " + ", ".join(parts)]
    m = measurement or {}
    if m:
        gpu = f", CUDA {fmt(m['gpu_seconds'])} s/epoch" if m.get("gpu_seconds") else ""
        shared = (
            f", shared by {int(m['members'])} ensemble members"
            if (m.get("members") or 1) > 1
            else ""
        )
        lines.append(
            f"    measured on {m.get('device') or '-'} (load {fmt(m.get('load_1m'), '.2f')} on "
            f"{fmt(m.get('cpus'), '.0f')} CPUs, {fmt(m.get('threads'), '.0f')} torch threads), "
            f"latency spread {fmt(m.get('latency_spread'), '.0%')}{gpu}{shared}"
        )
    return lines


def provenance_text(record: dict[str, Any] | None) -> list[str]:
    """The provenance lines of `mosaic show` (study_reading.run_provenance's record)."""
    if not record:
        return ["  provenance: none recorded (not started yet, or run before Mosaic recorded it)"]
    lines = ["  provenance:"]
    env = record.get("environment")
    if env:
        lines.append(
            f"    python {env['python']}, torch {env['torch']}, CUDA {env['cuda'] or '-'}, "
            f"cuDNN {env['cudnn'] or '-'}"
        )
        lines.append(
            f"    device {env['device']} ({env['device_name']}), {env['threads']} torch thread(s)"
        )
        lines.append("    determinism: " + determinism_text(env))
    for entry in record.get("code", []):
        git = "no git repository"
        if entry.get("git_commit"):
            git = f"git {entry['git_commit'][:12]}" + (
                " (uncommitted changes)" if entry.get("git_dirty") else ""
            )
        lines.append(
            f"    [{entry['section']}] {entry['path']}: sha256 {entry['sha256'][:16]}, {git}"
        )
    return lines


def determinism_text(env: dict[str, Any]) -> str:
    """The determinism settings a run had, in words."""
    flags = (
        f"cudnn.deterministic={bool(env.get('cudnn_deterministic'))}, "
        f"cudnn.benchmark={bool(env.get('cudnn_benchmark'))}, "
        f"CUBLAS_WORKSPACE_CONFIG={env.get('cublas_workspace_config') or 'unset'}"
    )
    state = "deterministic algorithms on" if env.get("deterministic") else "off"
    return f"{state} ({flags})"
