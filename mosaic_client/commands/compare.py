"""`mosaic compare`: which model family wins at matched size, with CIs and corrected tests.

Reads the study on a read-only connection (works on a live study and on a `savedb` copy); the
statistics are in the package mosaic_client/verdict/, imported only when the command runs.
Exit 0 whatever the verdict, 2 for input it cannot use (docs/compare.md).

Sends no request for a report: it reads the study read-only. With --until-decided it sends
`repeat` (more repetitions of the groups of the undecided comparisons) and `status` (to wait
for them), and tests again with the sequential plan (verdict.sequential.until_decided) until
every comparison is decided or --max-repetitions is reached; then it sends `record_plan`, which
keeps the plan and the alpha it spent in the study. A later plain compare reads the recorded
plans and tests the lines they cover at the level that remains (verdict.recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, CommandError

NAME = "compare"
HELP = "which model family is better at matched size: CIs, corrected tests, verdicts"
EXAMPLE = "mosaic compare results.db --data data_dataset_OR --metric test_loss"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", help="study database (read only)")
    parser.add_argument(
        "--data",
        metavar="KEY",
        action="append",
        help="dataset key to compare on (repeatable; default: every key)",
    )
    parser.add_argument(
        "--metric",
        default="test_loss",
        help="run_results column compared (default test_loss): train_loss, "
        "test_loss, train_acc, test_acc, duration(s), overfit, "
        "trainability or slope",
    )
    parser.add_argument(
        "--size-by",
        default="nb_params",
        metavar="COLUMN",
        help="run_results column the families are matched on (default nb_params): "
        "nb_params, duration(s), flops_per_sample, train_seconds, cpu_seconds, peak_memory_mb, "
        "latency_ms, throughput_per_s, energy_j, or the short names flops, train_time, "
        "peak_memory, latency, energy (docs/resources.md)",
    )
    parser.add_argument(
        "--families",
        metavar="A,B,...",
        help="model keys to compare, comma-separated (default: all)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="family-wise error rate of the report (Holm), default 0.05",
    )
    parser.add_argument(
        "--size-tolerance",
        type=float,
        default=1.5,
        metavar="FACTOR",
        help="match a size of A with the nearest size of B within this factor (default 1.5)",
    )
    parser.add_argument(
        "--min-effect",
        type=float,
        metavar="X",
        help="smallest difference worth detecting, in the metric's unit: the "
        "repetitions advice aims at it instead of the observed difference",
    )
    parser.add_argument(
        "--margin",
        type=float,
        metavar="DELTA",
        help="equivalence margin, in the metric's unit: a line whose difference lies within "
        "+-DELTA by two one-sided tests (TOST) says 'equivalent within +-DELTA'",
    )
    parser.add_argument(
        "--exclude-failures",
        action="store_true",
        help="P(A better) over finished runs only (default: a failed or NaN run counts as a "
        "loss); the failure-rate test is reported either way",
    )
    parser.add_argument(
        "--across-datasets",
        action="store_true",
        help="also one verdict per pair of families over every dataset key (Stouffer's "
        "combination of each key's curve line, else its size line; Holm across the pairs)",
    )
    parser.add_argument(
        "--until-decided",
        action="store_true",
        help="queue more repetitions of the undecided comparisons through the daemon, wait, "
        "test again (sequential plan: alpha spent over the looks) until every comparison is "
        "decided or --max-repetitions is reached",
    )
    parser.add_argument(
        "--max-repetitions",
        type=int,
        metavar="R",
        help="with --until-decided: the most repetitions a group gets (required)",
    )
    parser.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="with --until-decided: repetitions added per round (default: a quarter of the "
        "way from the first look to R)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _fail(message: str) -> NoReturn:
    raise CommandError(message, BAD_INPUT)


def run(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    if not 0 < args.alpha < 1:
        return _fail(f"--alpha {args.alpha}: give a level between 0 and 1, e.g. 0.05")
    if not args.size_tolerance >= 1:
        return _fail(f"--size-tolerance {args.size_tolerance}: give a factor >= 1, e.g. 1.5")
    if args.min_effect is not None and not args.min_effect > 0:
        return _fail(
            f"--min-effect {args.min_effect}: give a positive difference in the unit "
            f"of {args.metric}"
        )
    if args.margin is not None and not args.margin > 0:
        return _fail(
            f"--margin {args.margin}: give a positive difference in the unit of {args.metric}"
        )
    families = None
    if args.families:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        if len(families) < 2 or len(set(families)) != len(families):
            return _fail(
                f"--families {args.families}: give at least two different model keys, "
                "comma-separated"
            )
    if args.until_decided:
        if args.max_repetitions is None or args.max_repetitions < 2:
            return _fail(
                "--until-decided needs --max-repetitions R (R >= 2): the most repetitions "
                "a group may get, fixed before the first look"
            )
        if args.step is not None and args.step < 1:
            return _fail(f"--step {args.step}: give how many repetitions a round adds (>= 1)")
        if args.across_datasets:
            return _fail("--across-datasets goes with a plain compare, not --until-decided")
    elif args.max_repetitions is not None or args.step is not None:
        return _fail("--max-repetitions and --step go with --until-decided")
    try:
        analysis.check_criterion(args.metric)
    except analysis.AnalysisError as exc:
        return _fail(str(exc))
    from mosaic_client import contract

    try:
        args.size_by = contract.size_column(args.size_by)
    except ValueError as exc:
        return _fail(f"--size-by {exc}")
    # The statistics' matrix products are thin (repetitions wide): BLAS threads only spin, and
    # on a busy machine they double the CPU time. Set before numpy loads its BLAS.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    from mosaic_client.verdict import reading

    if args.until_decided:
        return until_decided(args, families)
    from mosaic_client.verdict import recorded

    try:
        reading.direction(args.metric)
        values = read_values(args.db, args.metric, args.size_by)
        report = recorded.compare_after_plans(
            values,
            args.db,
            read_plans(args.db, args.metric),
            args.alpha,
            data_keys=args.data,
            families=families,
            size_tolerance=args.size_tolerance,
            min_effect=args.min_effect,
            margin=args.margin,
            failures_as_losses=not args.exclude_failures,
        )
    except (analysis.AnalysisError, reading.VerdictError) as exc:
        return _fail(str(exc))
    if args.across_datasets:
        from mosaic_client.verdict import across

        found = across.across_datasets(report.lines, report.better, report.alpha)
        report.across_datasets = [f.as_json() for f in found]
    from mosaic_client.verdict import tuned

    tuning = tuned.tuning_of(os.path.abspath(args.db))
    tuned.attach(report, tuning)
    if args.json:
        sys.stdout.write(json.dumps(report.as_json(), indent=1) + "\n")  # one write: fast
    else:
        text = render(report)
        extra = tuned.lines(tuning)
        if extra:
            # Before the verdicts' summary: what was compared, and at what tuning cost.
            head, _, tail = text.rpartition("\nverdicts: ")
            text = head + "\n".join(extra) + "\n\nverdicts: " + tail
        sys.stdout.write(text)
    return 0


def read_values(db: str, metric: str, size_by: str = "nb_params") -> Any:
    from mosaic_client import analysis
    from mosaic_client.verdict import reading

    conn = analysis.open_readonly(os.path.abspath(db))
    try:
        return reading.study_values(conn, metric, size_by)
    finally:
        conn.close()


def read_plans(db: str, metric: str) -> list[dict[str, Any]]:
    from mosaic_client import analysis, study_reading

    conn = analysis.open_readonly(os.path.abspath(db))
    try:
        return study_reading.sequential_plans(conn, metric)
    finally:
        conn.close()


def record_plan(
    args: argparse.Namespace, db: str, plan: Any, looks: list[Any], report: Any
) -> None:
    """Keep the plan and the alpha it spent in the study (`record_plan`), one row per dataset
    key; a daemon that cannot is a warning, not a failure of the report."""
    from mosaic_client.verdict import recorded

    for payload in recorded.plan_records(plan, looks, report):
        try:
            reply = common.call(args, "record_plan", db=db, plan=payload)
        except CommandError as exc:
            print(
                f"warning: the plan was not recorded in the study ({exc}); a later plain "
                "`compare` will test these runs at full alpha: report the plan's verdict",
                file=sys.stderr,
            )
            return
        print(
            f"recorded the plan on {payload['data_key']} in the study (plan {reply['plan_id']}, "
            f"alpha spent {payload['spent']:.3g})",
            file=sys.stderr if args.json else sys.stdout,
            flush=True,
        )


def plan_alpha(args: argparse.Namespace, db: str, families: list[str] | None) -> float:
    """The alpha of a new plan: --alpha less what the recorded plans of these lines spent
    (a union bound, as for a plain compare); refused (exit 2) when they spent it all."""
    from mosaic_client.verdict import recorded

    earlier = recorded.overlapping(read_plans(db, args.metric), args.data, families)
    alpha = recorded.remaining_level(args.alpha, earlier)
    if not earlier:
        return alpha
    ids = ", ".join(str(p["plan_id"]) for p in earlier)
    if alpha <= 0:
        _fail(
            f"the recorded sequential plan(s) {ids} spent all of alpha {args.alpha:g} on these "
            "comparisons: their verdicts stand (a plain `compare` shows them); choose other "
            "families or dataset keys (--families, --data) for a new plan"
        )
    print(
        f"note: the recorded sequential plan(s) {ids} spent {args.alpha - alpha:.3g} of alpha "
        f"on these comparisons: this plan has the remaining {alpha:.3g}",
        file=sys.stderr if args.json else sys.stdout,
        flush=True,
    )
    return alpha


def until_decided(args: argparse.Namespace, families: list[str] | None) -> int:
    """--until-decided: the loop of sequential.until_decided, with the daemon adding the runs."""
    from mosaic_client import analysis
    from mosaic_client.verdict import reading, sequential

    db = common.existing_db(args.db)
    plan = sequential.SequentialPlan(plan_alpha(args, db, families), args.max_repetitions)
    options = {
        "db": args.db,
        "data_keys": args.data,
        "families": families,
        "size_tolerance": args.size_tolerance,
        "min_effect": args.min_effect,
        "margin": args.margin,
        "failures_as_losses": not args.exclude_failures,
    }
    say = sys.stderr if args.json else sys.stdout  # --json keeps stdout for the report

    def add(requests: dict[int, list[int]]) -> None:
        submissions = []
        for n, run_ids in sorted(requests.items()):
            reply = common.call(
                args, "repeat", db=db, selection={"kind": "ids", "ids": run_ids}, add=n
            )
            print(
                f"  queued {len(reply['run_ids'])} run(s): {n} more repetition(s) of "
                f"{len(reply['groups'])} group(s)",
                file=say,
                flush=True,
            )
            if reply["paused"]:
                print(
                    "  note: a pause holds them; they start after `mosaic resume`",
                    file=say,
                    flush=True,
                )
            submissions.extend(reply["submission_ids"])
        counts = common.wait_for_submissions(args, db, submissions)
        if counts.get("failed") or counts.get("cancelled"):
            print(
                f"  {counts.get('failed', 0)} failed, {counts.get('cancelled', 0)} cancelled: "
                "left out of the comparison (`mosaic status` says why)",
                file=say,
                flush=True,
            )

    so_far: list[Any] = []  # each look's (repetitions, level, round), for an interruption
    last: list[Any] = []  # the last look's report

    def on_round(look: int, n: int, report: Any, decision: Any) -> None:
        so_far.append((n, report.alpha, decision))
        last[:] = [report]
        print(round_summary(look, n, report, decision), file=say, flush=True)

    try:
        reading.direction(args.metric)
        report, looks = sequential.until_decided(
            plan,
            lambda: read_values(db, args.metric, args.size_by),
            add,
            options,
            args.step,
            on_round,
        )
    except (analysis.AnalysisError, reading.VerdictError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        if last:  # the looks made so far spent alpha too
            record_plan(args, db, plan, so_far, last[0])
        raise
    record_plan(args, db, plan, looks, report)
    if args.json:
        out = report.as_json()
        out["sequential"] = sequential_json(plan, looks)
        sys.stdout.write(json.dumps(out, indent=1) + "\n")
    else:
        sys.stdout.write("\n" + render(report))
        sys.stdout.write(sequential_note(plan, looks))
    return 0


def round_summary(look: int, n: int, report: Any, decision: Any) -> str:
    from mosaic_client.verdict.comparison import A_BETTER, B_BETTER

    decided = sum(line.verdict in (A_BETTER, B_BETTER) for line in report.lines)
    text = (
        f"round {look}: look at {n} repetitions, level {report.alpha:.3g}: "
        f"{decided} of {len(report.lines)} comparison(s) decided"
    )
    if decision.stop:
        return f"{text}\nstopped: {decision.reason}"
    lacking = sum(n for _, n in decision.additions)
    return (
        f"{text}; next look at {decision.target}: {lacking} more run(s) for "
        f"{len(decision.additions)} group(s) of the undecided ones; waiting for them"
    )


def sequential_json(plan: Any, looks: list[Any]) -> dict[str, Any]:
    return {
        "alpha": plan.alpha,
        "max_repetitions": plan.max_repetitions,
        "spending": plan.spending,
        "method": "group-sequential: Lan-DeMets alpha spending, boundaries by numerical "
        "integration; each look tests at the nominal level of its boundary",
        "spent": plan.spent(),
        "looks": [
            {
                "repetitions": n,
                "level": level,
                "runs_added": sum(k for _, k in d.additions),
                "stopped": d.reason or None,
            }
            for n, level, d in looks
        ],
    }


def sequential_note(plan: Any, looks: list[Any]) -> str:
    levels = ", ".join(f"{level:.3g} at {n}" for n, level, _ in looks)
    return (
        f"sequential plan: group-sequential boundaries for alpha {plan.alpha:g} (Lan-DeMets "
        f"{plan.spending}-type spending, R = {plan.max_repetitions}); nominal levels "
        f"{levels}; alpha spent so far {plan.spent():.3g}; comparisons decided at a look keep "
        "their verdict. The plan is recorded in the study: a later plain `compare` of these "
        "lines tests them at the level that remains (docs/compare.md)\n"
    )


def _num(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or x != x else format(x, spec)  # x != x: NaN


def _interval(ci: list[float] | None, spec: str = ".3g") -> str:
    return "" if ci is None else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _size(size: Any) -> str:
    """A size as shown: a count as it is, a measured figure (--size-by) to 4 digits."""
    if not isinstance(size, float):
        return str(size)
    return f"{size:.4g}" if abs(size) < 1000 else f"{size:.0f}"


def _sizes(line: Any) -> tuple[str, str]:
    if line.kind == "curve":
        low, high = line.a_nb_params
        return "curve", f"{_size(low)}-{_size(high)}"
    return _size(line.a_nb_params), _size(line.b_nb_params)


def _row(line: Any) -> tuple[str, ...]:
    """One line of the table."""
    size_a, size_b = _sizes(line)
    advice = f": {line.repetitions_note}" if line.repetitions_note else ""
    pairing = "paired" if line.paired else "unpaired"
    if line.kind == "curve" and line.paired:
        pairing = "by seed"  # clustered: the per-seed contrasts
    elif line.paired and line.pairing != "paired by seed":
        pairing = "paired*"  # complete pairs only: the note below says how many were left out
    return (
        size_a,
        size_b,
        f"{line.n_a}/{line.n_b}",
        f"{line.failed_a}/{line.failed_b}",
        pairing,
        _num(line.mean_a, ".4g"),
        _num(line.mean_b, ".4g"),
        f"{_num(line.diff, '+.3g')} {_interval(line.ci)}",
        "-"
        if line.p_improvement is None
        else f"{line.p_improvement:.2f} {_interval(line.p_improvement_ci, '.2f')}",
        _num(line.p_value, ".2g"),
        _num(line.p_holm, ".2g"),
        "-"
        if line.effect_size is None
        else f"{'dz' if line.paired else 'g'} {line.effect_size:+.2f}",
        line.verdict + advice,
    )


HEADER = (
    "size A",
    "size B",
    "n A/B",
    "failed A/B",
    "pairing",
    "mean A",
    "mean B",
    "A - B [95% CI]",
    "P(A better) [95% CI]",
    "p",
    "p adj",
    "effect",
    "verdict",
)


def _line_notes(line: Any) -> list[str]:
    """What the table cannot hold: the test used when not the usual one, partial pairing, the
    failure and equivalence tests, a conflict or an interval that excludes 0."""
    where = "curve" if line.kind == "curve" else "/".join(_sizes(line))
    notes = []
    usual = ("paired t", "Welch t", "Welch-Satterthwaite t of the contrast")
    if line.test not in usual and line.kind != "curve":
        notes.append(f"test: {line.test}")
    if line.kind == "curve" or (line.paired and line.pairing != "paired by seed"):
        notes.append(line.pairing)
    if line.failure_p is not None:
        notes.append(
            f"failure rates {line.failed_a}/{line.runs_a} against {line.failed_b}/{line.runs_b}: "
            f"Fisher p {_num(line.failure_p, '.2g')}, adjusted {_num(line.failure_p_holm, '.2g')}"
        )
    if line.tost_p is not None:
        notes.append(
            f"equivalence within ±{line.margin:g}: TOST p {_num(line.tost_p, '.2g')}, "
            f"adjusted {_num(line.tost_p_holm, '.2g')}"
        )
    if line.band:
        points = "; ".join(
            f"{p['nb_params']}: {p['diff']:+.3g} [{p['low']:.3g}, {p['high']:.3g}]"
            for p in line.band
        )
        notes.append(f"A - B along the overlap, 95% simultaneous band (by seed): {points}")
    if line.note:
        notes.append(line.note)
    return [f"    {where}: {n}" for n in notes]


def _across(found: list[dict[str, Any]]) -> list[str]:
    """The --across-datasets section: one verdict per pair of families."""
    out = [
        "",
        "across datasets (Stouffer's combination of each dataset key's curve line, else its "
        "only size line; Holm across the pairs of families):",
    ]
    for f in found:
        head = f"  A = {f['a']}, B = {f['b']}: "
        if f["z"] is None:
            out.append(head + f"{f['verdict']} (no dataset key with a t-tested line)")
        else:
            pi = f["mean_p_improvement"]
            out.append(
                head + f"{len(f['datasets'])} dataset key(s), A better in {f['a_better_in']}; "
                f"Z {f['z']:+.2f}, p {_num(f['p_value'], '.2g')}, adjusted "
                f"{_num(f['p_holm'], '.2g')}"
                + ("" if pi is None else f"; mean P(A better) {pi:.2f}")
                + f": {f['verdict']}"
            )
        out.extend(f"    left out {why}" for why in f["left_out"])
    return out


def _plans(plans: list[dict[str, Any]]) -> list[str]:
    """The recorded sequential plans that cover lines of the report, under its header."""
    out = []
    for p in plans:
        looks = ", ".join(f"{x['level']:.3g} at {x['repetitions']}" for x in p["looks"])
        left = (
            f"its lines are tested at the remaining {p['remaining']:.3g}"
            if p["remaining"] > 1e-12
            else "nothing remains: its verdicts stand"
        )
        out.append(
            f"recorded plan {p['plan_id']} on {p['data_key']} ({', '.join(p['families'])}): "
            f"{p['method']}; alpha {p['alpha']:g}, spent {p['spent']:.3g} over "
            f"{len(p['looks'])} look(s) (levels {looks}); {left}"
        )
    return out


def render(report: Any) -> str:
    """The report as a table per dataset key and pair of families, with the sizes left
    without a partner under their pair, even when the pair has no line."""
    from mosaic_client.verdict.comparison import (
        A_BETTER,
        B_BETTER,
        EQUIVALENT,
        NO_DIFFERENCE,
        TOO_FEW,
    )

    tested = sum(1 for line in report.lines if line.p_holm is not None)
    size_by = getattr(report, "size_by", "nb_params")
    matched = "" if size_by == "nb_params" else f", sizes are {size_by}"
    out = [
        f"compare {report.metric} in {report.db} ({report.better} is better{matched}): "
        f"{len(report.lines)} comparison(s), {tested} tested; alpha {report.alpha:g} "
        "family-wise (Holm, Tarone's screen)"
    ]
    out.extend(_plans(report.plans or []))
    blocks: dict[tuple[str, str, str], list[Any]] = {}
    for line in report.lines:
        blocks.setdefault((line.dataset_key, line.a, line.b), []).append(line)
    for u in report.unmatched:
        pair = tuple(sorted((u["family"], u["against"])))
        blocks.setdefault((u["dataset_key"], *pair), [])
    for (key, a, b), lines in sorted(blocks.items()):
        out.append("")
        out.append(f"{key}: A = {a}, B = {b}")
        if lines:
            rows = [HEADER, *(_row(line) for line in lines)]
            widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
            for r in rows:
                out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
            for line in lines:
                out.extend(_line_notes(line))
        else:
            out.append("  no size within the tolerance and no overlapping curves: no comparison")
        lonely = [
            u
            for u in report.unmatched
            if u["dataset_key"] == key and {u["family"], u["against"]} == {a, b}
        ]
        if lonely:
            lonely.sort(key=lambda u: (u["family"] != a, u["nb_params"]))
            listing = ", ".join(f"{u['family']} {_size(u['nb_params'])}" for u in lonely)
            out.append(f"  without a partner within {report.size_tolerance:g}x: {listing}")
    if not report.lines:
        out.append("")
        out.append(
            "nothing to compare: the study needs at least two model keys with finished "
            "runs on one dataset key"
        )
    for note in report.notes:
        out.append(f"note: {note}")
    if report.across_datasets is not None:
        out.extend(_across(report.across_datasets))
    counts = [(w, sum(line.verdict == w for line in report.lines)) for w in (A_BETTER, B_BETTER)]
    if report.margin:
        counts.append(
            (
                f"{EQUIVALENT}{report.margin:g}",
                sum(line.verdict.startswith(EQUIVALENT) for line in report.lines),
            )
        )
    counts += [
        (w, sum(line.verdict == w for line in report.lines)) for w in (NO_DIFFERENCE, TOO_FEW)
    ]
    out.append("")
    out.append("verdicts: " + ", ".join(f"{n} {w}" for w, n in counts))
    target = (
        f"--min-effect {report.min_effect:g}" if report.min_effect else "the observed difference"
    )
    losses = "a failed run counts as a loss" if report.failures_as_losses else "finished runs only"
    out.append(
        f"rule: decided when the adjusted p <= {report.alpha:g} (Holm over every mean, failure "
        f"and equivalence test of the report, {report.family_size} group(s)); paired lines: "
        "paired t test, unpaired: Welch t test, curves: t test of the per-seed contrasts, no "
        "spread: exact permutation test; failures: "
        "Fisher's exact test. CIs: 95% t intervals (they exclude 0 exactly when p < 0.05, "
        f"before the correction). P(A better): {losses}, Wilson / Newcombe score intervals. "
        f"Repetitions needed: 80% power against {target} at level alpha / "
        f"{max(1, report.family_size)} (docs/compare.md)"
    )
    return "\n".join(out) + "\n"
