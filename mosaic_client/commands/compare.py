"""`mosaic compare`: which model family wins at matched size, with CIs and corrected tests.

Reads the study on a read-only connection (works on a live study and on a `savedb` copy); the
statistics are in mosaic_client/verdict.py, imported only when the command runs. Exit 0
whatever the verdict, 2 for input it cannot use (docs/compare.md).

Sends no request: reads the study read-only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

NAME = "compare"
HELP = "which model family is better at matched size: CIs, corrected tests, verdicts"
EXAMPLE = "mosaic compare results.db --data data_dataset_OR --metric test_loss"
BAD_INPUT = 2


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
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _fail(message: str) -> int:
    print(f"mosaic: {message}", file=sys.stderr)
    return BAD_INPUT


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
    families = None
    if args.families:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        if len(families) < 2 or len(set(families)) != len(families):
            return _fail(
                f"--families {args.families}: give at least two different model keys, "
                "comma-separated"
            )
    try:
        analysis.check_criterion(args.metric)
    except analysis.AnalysisError as exc:
        return _fail(str(exc))
    # The bootstrap's matrix products are thin (repetitions wide): BLAS threads only spin, and
    # on a busy machine they double the CPU time. Set before numpy loads its BLAS.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    from mosaic_client import verdict

    try:
        verdict.direction(args.metric)
        conn = analysis.open_readonly(os.path.abspath(args.db))
        try:
            values = verdict.study_values(conn, args.metric)
        finally:
            conn.close()
        report = verdict.compare(
            values, args.db, args.data, families, args.alpha, args.size_tolerance, args.min_effect
        )
    except (analysis.AnalysisError, verdict.VerdictError) as exc:
        return _fail(str(exc))
    if args.json:
        sys.stdout.write(json.dumps(report.as_json(), indent=1) + "\n")  # one write: fast
    else:
        sys.stdout.write(render(report))
    return 0


def _num(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _interval(ci: list[float] | None, spec: str = ".3g") -> str:
    return "" if ci is None else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _sizes(line: Any) -> tuple[str, str]:
    if line.kind == "curve":
        low, high = line.a_nb_params
        return "curve", f"{low}-{high}"
    return str(line.a_nb_params), str(line.b_nb_params)


def render(report: Any) -> str:
    """The report as a table per dataset key and pair of families."""
    from mosaic_client import verdict

    tested = sum(1 for line in report.lines if line.p_holm is not None)
    out = [
        f"compare {report.metric} in {report.db} ({report.better} is better): "
        f"{len(report.lines)} comparison(s), {tested} tested; alpha {report.alpha:g} "
        "family-wise (Holm)"
    ]
    header = (
        "size A",
        "size B",
        "n A/B",
        "pairing",
        "mean A",
        "mean B",
        "A - B [95% CI]",
        "P(A better) [95% CI]",
        "p",
        "p Holm",
        "effect",
        "verdict",
    )
    blocks: dict[tuple[str, str, str], list[Any]] = {}
    for line in report.lines:
        blocks.setdefault((line.dataset_key, line.a, line.b), []).append(line)
    for (key, a, b), lines in blocks.items():
        out.append("")
        out.append(f"{key}: A = {a}, B = {b}")
        rows = [header]
        for line in lines:
            size_a, size_b = _sizes(line)
            advice = f": {line.repetitions_note}" if line.repetitions_note else ""
            rows.append(
                (
                    size_a,
                    size_b,
                    f"{line.n_a}/{line.n_b}",
                    "paired" if line.paired else "unpaired",
                    _num(line.mean_a, ".4g"),
                    _num(line.mean_b, ".4g"),
                    f"{line.diff:+.3g} {_interval(line.ci)}",
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
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        for r in rows:
            out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        lonely = [
            u
            for u in report.unmatched
            if u["dataset_key"] == key and {u["family"], u["against"]} == {a, b}
        ]
        if lonely:
            listing = ", ".join(f"{u['family']} {u['nb_params']}" for u in lonely)
            out.append(f"  without a partner within {report.size_tolerance:g}x: {listing}")
    if not report.lines:
        out.append("")
        out.append(
            "nothing to compare: the study needs at least two model keys with finished "
            "runs on one dataset key"
        )
    for note in report.notes:
        out.append(f"note: {note}")
    words = {
        w: sum(line.verdict == w for line in report.lines)
        for w in (verdict.A_BETTER, verdict.B_BETTER, verdict.NO_DIFFERENCE, verdict.TOO_FEW)
    }
    out.append("")
    out.append("verdicts: " + ", ".join(f"{n} {w}" for w, n in words.items()))
    target = (
        f"--min-effect {report.min_effect:g}" if report.min_effect else "the observed difference"
    )
    out.append(
        f"rule: decided when the Holm-adjusted p <= {report.alpha:g}; paired lines: "
        "exact sign-flip test, unpaired: Welch t test. CIs: 95% percentile bootstrap "
        f"({report.n_resamples} resamples, seed {report.seed}), not adjusted. "
        f"Repetitions needed: 80% power against {target} at level alpha / "
        f"{max(1, tested)} tested (docs/compare.md)"
    )
    return "\n".join(out) + "\n"
