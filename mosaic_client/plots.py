"""Drawing for `plotloss` and `metaplot`. Imported only by those commands: matplotlib is slow
to import and the rest of the client must start fast.

Figures are built with matplotlib's object API on the Agg backend (no pyplot state, no display),
so the commands work over SSH and inside the daemon's service account alike.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mosaic_client import contract  # noqa: E402
from mosaic_client.analysis import MetaData, RunLosses, pages_needed, spans_decades  # noqa: E402
from mosaic_client.render import fmt  # noqa: E402

TRAIN_COLOR, TEST_COLOR = "tab:blue", "tab:orange"
PAGE_SIZE = (11.69, 8.27)  # A4 landscape, in inches

# Axis labels with what each criterion measures and its unit (docs/analysis.md has formulas).
CRITERION_LABELS = {
    "train_loss": "train loss at the last epoch (mean over batches)",
    "test_loss": "test loss at the last epoch (mean over batches)",
    "train_acc": "train accuracy at the last epoch (fraction of samples)",
    "test_acc": "test accuracy at the last epoch (fraction of samples)",
    "nb_params": "trainable parameters",
    "duration(s)": "training time (s, sum of epoch durations)",
    "epochs": "epochs trained",
    "overfit": "overfit = |test - train| / loss range (no unit)",
    "trainability": "trainability = mean test loss over epochs",
    "slope": "slope = train-loss change per epoch (last 10%)",
    # What a run costs (issue 26): the unit of each figure, as the contract states it.
    **{c: f"{c}: {unit}" for c, unit in contract.RESOURCE_UNITS.items()},
}


def _fmt(value: object) -> str:
    # The client's one number format (4 significant digits: 0.9499 stays 0.9499, 1.0 is 1.000).
    return fmt(value)


def _title(run: RunLosses, width: int) -> str:
    pipeline = textwrap.shorten(run.pipeline, width * 2, placeholder="...")
    lines = [f"run {run.run_id} ({run.status})", *textwrap.wrap(pipeline, width)]
    results = run.results
    if results:
        metrics = (
            f"loss train {_fmt(results['train_loss'])} / test {_fmt(results['test_loss'])}"
            f"; {results['nb_params']} params"
        )
        if results.get("test_acc") is not None:
            metrics += (
                f"\nacc train {_fmt(results['train_acc'])} / test "
                f"{_fmt(results['test_acc'])}; {results['epochs']} epochs"
            )
        else:
            metrics += f"; {results['epochs']} epochs"
        lines.append(metrics)
    elif run.train_loss:
        lines.append(
            f"epoch {run.epochs[-1]}: loss train {_fmt(run.train_loss[-1])} / test "
            f"{_fmt(run.test_loss[-1])}"
        )
    return "\n".join(lines)


def _loss_page(
    runs: Sequence[RunLosses], plot_size: int, page: int, pages: int, source: str
) -> Figure:
    fig = Figure(figsize=PAGE_SIZE)
    font = max(5.5, 11.0 - 1.2 * plot_size)
    axes = fig.subplots(plot_size, plot_size, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(runs):
            ax.set_axis_off()
            continue
        run = runs[index]
        ax.set_title(_title(run, max(30, 170 // plot_size)), fontsize=font, loc="left")
        ax.tick_params(labelsize=font)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not run.epochs:
            why = run.status
            if run.failure:
                why += ":\n" + "\n".join(textwrap.wrap(run.failure, max(30, 150 // plot_size)))
            ax.text(
                0.5,
                0.5,
                f"no epoch recorded\n({why})",
                ha="center",
                va="center",
                fontsize=font,
                transform=ax.transAxes,
                color="dimgray",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.plot(run.epochs, run.train_loss, color=TRAIN_COLOR, marker=".", lw=1.2)
        ax.plot(run.epochs, run.test_loss, color=TEST_COLOR, marker=".", lw=1.2)
        log = spans_decades([*run.train_loss, *run.test_loss])
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("epoch", fontsize=font)
        ax.set_ylabel("loss (log scale)" if log else "loss", fontsize=font)
        ax.grid(True, alpha=0.3)
    first, last = runs[0].run_id, runs[-1].run_id
    which = f"run {first}" if first == last else f"runs {first} to {last}"
    fig.suptitle(f"{source}: loss per epoch, {which} (page {page}/{pages})", fontsize=11)
    fig.legend(
        [
            Line2D([], [], color=TRAIN_COLOR, marker="."),
            Line2D([], [], color=TEST_COLOR, marker="."),
        ],
        ["train loss (mean over the epoch's batches)", "test loss (mean over the epoch's batches)"],
        loc="lower center",
        ncol=2,
        fontsize=9,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    return fig


def plot_losses(
    runs: Sequence[RunLosses], out_pdf: str, plot_size: int, source: str, png: str | None = None
) -> int:
    """Write the loss curves, plot_size x plot_size runs per page; return the page count.
    With png, page 1 is also written there, drawn by the same code."""
    per_page = plot_size * plot_size
    pages = pages_needed(len(runs), plot_size)
    with PdfPages(out_pdf) as pdf:
        for page in range(pages):
            fig = _loss_page(
                runs[page * per_page : (page + 1) * per_page], plot_size, page + 1, pages, source
            )
            pdf.savefig(fig)
            if png and page == 0:
                fig.savefig(png, dpi=130)
    return pages


def plot_meta(data: MetaData, out: str, spread: str, fmt: str) -> None:
    """CRITERION against the size axis (nb_params or `metaplot --x`), one line per model key:
    mean with min-max or std bars."""
    fig = Figure(figsize=(9.5, 6.0))
    ax = fig.subplots()
    xs: list[float] = []
    ys: list[float] = []
    for model, points in sorted(data.series.items()):
        x = [p.nb_params for p in points]
        mean = [p.mean for p in points]
        if spread == "std":
            low = [p.std for p in points]
            high = low
        elif spread == "ci":  # issue 15: metaplot --ci
            low = [p.mean - (p.ci_low if p.ci_low is not None else p.mean) for p in points]
            high = [(p.ci_high if p.ci_high is not None else p.mean) - p.mean for p in points]
        else:
            low = [p.mean - p.min for p in points]
            high = [p.max - p.mean for p in points]
        runs = sum(p.n for p in points)
        ax.errorbar(
            x, mean, yerr=[low, high], marker="o", capsize=3, lw=1.4, label=f"{model} ({runs} runs)"
        )
        xs.extend(x)
        ys.extend([m - lo for m, lo in zip(mean, low)] + [m + hi for m, hi in zip(mean, high)])
    # A resource axis is always logarithmic (its sizes are positive: analysis.configuration_sizes).
    log_x = spans_decades(xs) or data.x != "nb_params"
    log_y = spans_decades(ys)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    x_label = (
        "nb_params: trainable parameters" if data.x == "nb_params" else CRITERION_LABELS[data.x]
    )
    ax.set_xlabel(x_label + (" (log scale)" if log_x else ""), fontsize=11)
    label = CRITERION_LABELS.get(data.criterion, data.criterion)
    ax.set_ylabel(label + (" (log scale)" if log_y else ""), fontsize=10)
    bars = {
        "std": "bars: ± standard deviation over runs",
        "ci": "bars: 95% t interval of the mean\n(none for a single run)",
    }.get(spread, "bars: min to max over runs")
    ax.legend(title=f"model key: mean, {bars}", fontsize=9, title_fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    note = f"{data.used} run(s)"
    skipped = sum(len(ids) for ids in data.skipped.values())
    if skipped:
        note += f", {skipped} skipped (failed, unfinished or no value)"
    ax.set_title(f"{data.criterion} vs {data.x}, dataset {data.dataset_key} ({note})", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, format=fmt, dpi=120)


def plot_pareto(front: Any, out: str, fmt: str) -> None:
    """The metric's mean (95% t interval) against the cost, one marker per family; the points on
    the front (verdict.pareto) filled and joined in cost order, the dominated ones hollow; one
    panel per dataset key; the cost on a log axis."""
    keys = sorted({p.dataset_key for p in front.points})
    fig = Figure(figsize=(9.5, 5.8 * len(keys)))
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    families = sorted({p.family for p in front.points})
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    markers = {f: "osD^v<>ph*"[i % 10] for i, f in enumerate(families)}
    for ax, key in zip(axes, keys):
        points = [p for p in front.points if p.dataset_key == key]
        for family in families:
            for on_front in (True, False):
                mine = [p for p in points if p.family == family and p.on_front == on_front]
                if not mine:
                    continue
                ax.errorbar(
                    [p.cost for p in mine],
                    [p.mean for p in mine],
                    yerr=[[p.mean - p.ci[0] for p in mine], [p.ci[1] - p.mean for p in mine]],
                    fmt=markers[family],
                    color=colors[family],
                    mfc=colors[family] if on_front else "none",
                    ms=8,
                    capsize=3,
                    lw=1.0,
                    label=f"{family} ({'on the front' if on_front else 'dominated'})",
                )
        # The best mean a budget affords on the front (verdict.pareto.cost_ranges), as steps.
        steps = [r for r in front.ranges if r["dataset_key"] == key]
        if steps:
            xs = [r["from"] for r in steps]
            ys = [r["mean"] for r in steps]
            ends = [p.cost for p in points]
            xs.append(max(ends) if front.cost_better == "lower" else min(ends))
            ys.append(ys[-1])
            ax.step(xs, ys, where="post", color="0.4", lw=1, ls="--", zorder=0,
                    label="best mean a budget affords on the front")  # fmt: skip
        ax.set_xscale("log")
        unit = contract.RESOURCE_UNITS.get(front.cost, "trainable parameters")
        ax.set_xlabel(f"{front.cost}: {unit} (log scale)", fontsize=10)
        ax.set_ylabel(
            f"{CRITERION_LABELS.get(front.metric, front.metric)}\n(mean, 95% t interval)",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9, title=f"{front.better} {front.metric} is better", title_fontsize=9)
        ax.set_title(
            f"{front.metric} vs {front.cost}, dataset {key}: dominated only when compare's test "
            f"says so (alpha {front.alpha:g}, Holm)",
            fontsize=11,
        )
    fig.tight_layout()
    fig.savefig(out, format=fmt, dpi=120)


def plot_tuning(groups: list[Any], importances: list[dict[str, float]], out: str) -> None:
    """`mosaic tuning`'s picture: the best so far against the trials per group (equal-effort
    curves, docs/tuning.md), and each searched param's importance per group."""
    fig = Figure(figsize=(11, 4.2))
    curves, bars = fig.subplots(1, 2)
    for group in groups:
        xs = [trial + 1 for trial, _, best in group.curve if best is not None]
        ys = [best for _, _, best in group.curve if best is not None]
        label = f"{group.family}" + (f" ({group.nb_params})" if group.nb_params else "")
        curves.step(xs, ys, where="post", marker="o", label=label)
    metric = groups[0].settings["metric"]
    curves.set_xlabel("trials (the same budget for every family)")
    curves.set_ylabel(f"best {metric} so far")
    curves.set_title("equal-effort curves")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.legend()
    names = sorted({name for weights in importances for name in weights})
    width = 0.8 / max(1, len(groups))
    for index, (group, weights) in enumerate(zip(groups, importances)):
        xs = [i + index * width for i in range(len(names))]
        bars.bar(xs, [weights.get(n, 0.0) for n in names], width=width, label=group.family)
    bars.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    bars.set_ylim(0, 1)
    bars.set_ylabel(f"share of {metric}'s spread explained")
    bars.set_title("importance of each searched parameter")
    bars.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
