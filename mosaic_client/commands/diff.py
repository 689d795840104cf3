"""`mosaic diff RUN_A RUN_B [--db DB] [--db-b DB_B] [--json]`: why two runs differ.

Sends no request: both runs are read from their study databases on read-only connections, so it
works without a daemon, on a `savedb` copy and across two studies (--db-b). Compares what each
run was given and what produced it: parameters, seeds, class file contents (a unified diff of
the recorded texts), and environment (versions, device, threads, determinism); says "nothing
but the seed" when that is all.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sqlite3
from typing import Any

from mosaic_client import contract, provenance, study_reading
from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, OK, CommandError

NAME = "diff"
HELP = "what differs between two runs: parameters, code, environment, seeds"
EXAMPLE = "mosaic diff 1 2 --db results.db"

# The params that say which repetition a run is, compared as its seeds.
SEED_PARAMS = ("seed", contract.PROCESS_SEED_PARAM)
# Params that never change what a run computes: who queued it, and the pipeline's JSON (its
# values are compared one by one as {class}_{param} rows, its files as code).
IGNORED_PARAMS = ("owner", "owner_uid", "pipeline")


def run(args: argparse.Namespace) -> int:
    db_a = _study(args.db)
    db_b = _study(args.db_b) if args.db_b else db_a
    a = _read(db_a, args.run_a)
    b = _read(db_b, args.run_b)
    found = compare_runs(a, b)
    if args.json:
        print(json.dumps(found, indent=1))
    else:
        label_a = f"run {args.run_a}" + (f" of {db_a}" if db_b != db_a else "")
        label_b = f"run {args.run_b}" + (f" of {db_b}" if db_b != db_a else "")
        print("\n".join(diff_text(found, label_a, label_b)))
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", type=int, help="the first run's id")
    parser.add_argument("run_b", type=int, help="the second run's id")
    parser.add_argument(
        "--db", help="the study database of both runs (default: the only study a daemon served)"
    )
    parser.add_argument("--db-b", help="the second run's study database, when it is another one")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _study(db: str | None) -> str:
    known = db or common.only_known_study()
    if not known:
        raise CommandError("say which study the runs are in with --db DB", BAD_INPUT)
    return common.existing_db(known)


def _read(db: str, run_id: int) -> dict[str, Any]:
    conn: sqlite3.Connection = common.analysis_db(db)
    try:
        info = study_reading.describe_run(conn, run_id)
        if info is None:
            raise CommandError(
                f"no run {run_id} in {db}; `mosaic export {db}` lists its runs", BAD_INPUT
            )
        info["provenance"] = study_reading.run_provenance(conn, run_id, with_text=True)
    finally:
        conn.close()
    return info


def _changed(a: dict[str, Any], b: dict[str, Any], names: Any) -> dict[str, list[Any]]:
    return {n: [a.get(n), b.get(n)] for n in sorted(names) if a.get(n) != b.get(n)}


def trained(info: dict[str, Any]) -> tuple[str, str]:
    """How a run was last trained: (its kind, in words with the members). A member of a
    vmapped ensemble equals the run alone within float rounding only (docs/ensembles.md)."""
    group = info.get("group")
    if not group or group.get("fallback"):
        return "alone", "alone"
    members = group["members"]
    kind = f"in an ensemble of {len(members)}"
    return kind, f"{kind} (runs {', '.join(str(m) for m in members)})"


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What differs between two runs (`show` records with provenance texts): a pure function."""
    pa, pb = a["params"], b["params"]
    names = (set(pa) | set(pb)) - set(SEED_PARAMS) - set(IGNORED_PARAMS)
    seeds = {"seed": [a.get("seed"), b.get("seed")]}
    seeds.update(_changed(pa, pb, [contract.PROCESS_SEED_PARAM]))
    prov_a, prov_b = a.get("provenance"), b.get("provenance")
    found: dict[str, Any] = {
        "parameters": _changed(pa, pb, names),
        "seeds": seeds if seeds["seed"][0] != seeds["seed"][1] or len(seeds) > 1 else {},
        "code": [],
        "environment": {},
        # Alone against in an ensemble (or ensembles of other sizes): other rounding, so other
        # numbers, even when nothing else differs.
        "training": [trained(a)[1], trained(b)[1]] if trained(a)[0] != trained(b)[0] else [],
        "missing_provenance": [
            label for label, p in (("A", prov_a), ("B", prov_b)) if not p or not p["environment"]
        ],
    }
    if prov_a and prov_b:
        code_a = {e["section"]: e for e in prov_a["code"]}
        code_b = {e["section"]: e for e in prov_b["code"]}
        for section in sorted(set(code_a) | set(code_b)):
            ea, eb = code_a.get(section), code_b.get(section)
            if ea and eb and ea["sha256"] == eb["sha256"]:
                continue
            found["code"].append(_code_difference(section, ea, eb))
        if prov_a["environment"] and prov_b["environment"]:
            found["environment"] = _changed(
                prov_a["environment"], prov_b["environment"], provenance.ENVIRONMENT_FIELDS
            )
    differs = found["parameters"] or found["code"] or found["environment"]
    if found["missing_provenance"]:
        found["verdict"] = "code and environment unknown: no provenance recorded for run " + (
            " and ".join(found["missing_provenance"])
        )
    elif differs:
        found["verdict"] = "they differ"
    elif found["training"]:
        found["verdict"] = "how they were trained (an ensemble's numbers equal a run alone's "
        found["verdict"] += "within float rounding only)" + (" and the seed" * bool(found["seeds"]))
    elif found["seeds"]:
        found["verdict"] = "nothing but the seed"
    else:
        found["verdict"] = "nothing"
    return found


def _code_difference(
    section: str, a: dict[str, Any] | None, b: dict[str, Any] | None
) -> dict[str, Any]:
    """One class file that differs: its paths, hashes and a unified diff of the texts."""
    text_a = (a or {}).get("text") or ""
    text_b = (b or {}).get("text") or ""
    path_a = a["path"] if a else "(none)"
    path_b = b["path"] if b else "(none)"
    lines = difflib.unified_diff(
        text_a.splitlines(keepends=True),
        text_b.splitlines(keepends=True),
        fromfile=f"A {path_a}",
        tofile=f"B {path_b}",
    )
    return {
        "section": section,
        "path": [path_a, path_b],
        "sha256": [a["sha256"] if a else None, b["sha256"] if b else None],
        "diff": "".join(lines),
    }


def diff_text(found: dict[str, Any], label_a: str, label_b: str) -> list[str]:
    """The lines of `mosaic diff` for compare_runs' result."""
    lines = [f"A = {label_a}, B = {label_b}"]
    if found["seeds"]:
        lines.append("seeds:")
        lines += [f"  {n}: {va} | {vb}" for n, (va, vb) in found["seeds"].items()]
    if found["parameters"]:
        lines.append("parameters:")
        lines += [f"  {n}: {va} | {vb}" for n, (va, vb) in found["parameters"].items()]
    for entry in found["code"]:
        lines.append(f"code of [{entry['section']}] differs:")
        lines += ["  " + line for line in entry["diff"].splitlines()]
        if not entry["diff"]:
            lines.append(f"  {entry['path'][0]} | {entry['path'][1]} (same text, other bytes)")
    if found["training"]:
        lines.append(f"trained: {found['training'][0]} | {found['training'][1]}")
    if found["environment"]:
        lines.append("environment:")
        lines += [f"  {n}: {va} | {vb}" for n, (va, vb) in found["environment"].items()]
    lines.append(f"differs: {found['verdict']}")
    return lines
