"""The report's figures: one function per PNG, arms drawn the same way in every one."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from diffbench import atomic  # noqa: E402
from diffbench.analysis.collect import Curves, Run, Values  # noqa: E402
from diffbench.analysis.tuning import Choice  # noqa: E402
from diffbench.core.arms import Arm  # noqa: E402
from diffbench.rundir import RunDir  # noqa: E402

HEAD_COLORS = {"eps": "tab:blue", "x0": "tab:orange", "score": "tab:green", "v": "tab:purple"}
WEIGHTING_STYLES = {
    "elbo": ("-", "o"),
    "elbo_is": ("-.", "D"),
    "own": ("--", "s"),
    "eps": (":", "^"),
    "x0": (":", "v"),
    "score": (":", "<"),
    "v": (":", ">"),
    "minsnr": ((0, (5, 1, 1, 1)), "P"),
    "edm": ((0, (1, 3)), "X"),
}
"""One line style and marker per weighting, so an arm's ELBO and simple variants never look alike."""


def style(arm: Arm) -> dict:
    """Colour by head, line style and marker by weighting: arms read the same in every figure."""
    linestyle, marker = WEIGHTING_STYLES.get(arm.weighting, (":", "*"))
    return {"color": HEAD_COLORS.get(arm.head, "black"), "linestyle": linestyle, "marker": marker}


def log_axis(ax: plt.Axes, axis: str = "y") -> None:
    """A log axis with labels that never run into each other (3×10⁰ 4×10⁰ …): plain numbers at
    1, 2 and 5 times each power of ten over a decade or two, at powers of ten (thinned to about
    six) over wider ranges, and no minor labels. Call it after plotting: it reads the data range."""
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    decades = np.log10(high / low) if low > 0 and high > low else 1.0
    if decades > 3:
        locator = LogLocator(base=10, subs=(1.0,), numticks=7)
    elif decades > 1:
        locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    elif decades > 0.5:
        locator = LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0))
    else:
        locator = LogLocator(base=10, subs=tuple(np.arange(1.0, 10.0, 0.5)))
    target.set_major_locator(locator)
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(NullFormatter())


def save(fig: plt.Figure, path: Path) -> Path:
    """Write through a temporary file so a reader never sees half a PNG."""
    atomic.save_with(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def implied_weights(log_snr: np.ndarray, weights: dict[Arm, np.ndarray], path: Path) -> Path:
    """Theory: each arm's weight on ‖ε − ε̂‖², normalised to mean one over t, against log-SNR.
    Arms with the same ε-space weight (every head's ELBO) are one line."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    same_weight: dict[bytes, list[Arm]] = {}
    for arm in sorted(weights, key=lambda a: a.order):
        normalised = weights[arm] / weights[arm].mean()
        same_weight.setdefault(np.round(np.log(normalised), 8).tobytes(), []).append(arm)
    for members in same_weight.values():
        labels = [a.label for a in members]
        label = labels[0] if len(labels) == 1 else f"{', '.join(labels)} (one weight)"
        kw = style(members[0])
        w = weights[members[0]]
        ax.plot(log_snr, w / w.mean(), label=label, color=kw["color"], linestyle=kw["linestyle"])
    ax.set(
        xlabel="log SNR(t)  (t = 2 at the right, t = T at the left)",
        ylabel="ε-space weight / its mean over t",
        title="implied ε-space weight of each loss",
    )
    log_axis(ax)
    ax.legend(fontsize=8)
    return save(fig, path)


def per_t_curves(
    curves: Curves,
    path: Path,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path | None:
    """Measured per-t curves: mean over seeds, band from the lowest to the highest seed."""
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for arm in sorted(curves, key=lambda a: a.order):
        seeds = curves[arm]
        lengths = {len(t) for t, _ in seeds.values()}
        if len(lengths) != 1:
            continue
        t = np.array([steps for steps, _ in seeds.values()]).mean(0)
        y = np.array([values for _, values in seeds.values()])
        if not (np.isfinite(y).all() and (y > 0).all()):
            continue
        kw = style(arm)
        ax.plot(t, y.mean(0), label=f"{arm} (n={len(y)})", markevery=max(1, len(t) // 8), ms=4, **kw)
        if len(y) > 1:
            ax.fill_between(t, y.min(0), y.max(0), color=kw["color"], alpha=0.12)
    ax.set(xlabel="t", ylabel=ylabel, title=title)
    log_axis(ax)
    if logx:
        log_axis(ax, "x")
    ax.legend(fontsize=8)
    return save(fig, path)


def metric_columns(path: Path, names: tuple[str, ...]) -> dict[str, tuple[list[float], list[float]]]:
    """(step, value) series of the named columns of a Lightning CSV log, empty cells skipped."""
    series: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    try:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                for name in names:
                    if row.get(name) and row.get("step"):
                        series[name][0].append(float(row["step"]))
                        series[name][1].append(float(row[name]))
    except (OSError, ValueError):
        return {}
    return series


def training_curves(runs: list[Run], path: Path) -> Path | None:
    """Validation VLB and ε-MSE against step, one line per run (comparable across heads)."""
    names = ("val/vlb_bpd", "val/eps_mse")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labelled: set[Arm] = set()
    drawn = False
    for run in sorted(runs, key=lambda r: (r.arm.order, r.seed)):
        if run.directory is None:
            continue
        series = metric_columns(RunDir(run.directory).metrics_csv, names)
        for ax, name in zip(axes, names):
            steps, values = series.get(name, ([], []))
            if steps:
                label = None if run.arm in labelled else run.arm.label
                ax.plot(
                    steps,
                    values,
                    label=label,
                    alpha=0.8,
                    markevery=max(1, len(steps) // 6),
                    ms=4,
                    **style(run.arm),
                )
                drawn = True
        labelled.add(run.arm)
    if not drawn:
        plt.close(fig)
        return None
    for ax, name in zip(axes, names):
        ax.set(xlabel="step", ylabel=name, title=f"{name} (EMA weights), every seed")
        log_axis(ax)
    axes[0].legend(fontsize=8)
    return save(fig, path)


ZOOM_RATIO = 10.0
"""A budget panel whose arms end more than this factor apart gets a second, zoomed panel."""


def budget_curves(budgets: dict[int, Values], arms: list[Arm], path: Path) -> Path | None:
    """Every per-budget metric against training steps on log-log axes: mean over seeds, band from
    the lowest to the highest seed, a panel only for a metric that some arm measured at two
    budgets or more. Where one arm ends ten times above the best (x0's hundreds of bpd), a second
    panel shows the arms within 3× of the best, so they are not flattened into the floor."""
    steps = sorted(budgets)
    series: dict[str, dict[Arm, list[tuple[int, list[float]]]]] = {}
    for metric in sorted({m for step in steps for arm in budgets[step].values() for m in arm}):
        for arm in arms:
            points = [(s, list(budgets[s].get(arm, {}).get(metric, {}).values())) for s in steps]
            points = [(s, v) for s, v in points if v and all(np.isfinite(v)) and min(v) > 0]
            if len(points) >= 2:
                series.setdefault(metric, {})[arm] = points
        finals = {arm: float(np.mean(p[-1][1])) for arm, p in series.get(metric, {}).items()}
        if finals and max(finals.values()) > ZOOM_RATIO * min(finals.values()):
            best = min(finals.values())
            series[f"{metric} (arms within 3× of the best)"] = {
                arm: series[metric][arm] for arm, final in finals.items() if final <= 3 * best
            }
    if not series:
        return None
    columns = min(3, len(series))
    rows = -(-len(series) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(series) :]:
        fig.delaxes(ax)
    for ax, (title, by_arm) in zip(axes.flat, series.items()):
        for arm, points in by_arm.items():
            x = [s for s, _ in points]
            kw = style(arm)
            ax.plot(x, [np.mean(v) for _, v in points], ms=4, label=arm.label, **kw)
            ax.fill_between(
                x, [min(v) for _, v in points], [max(v) for _, v in points], color=kw["color"], alpha=0.1
            )
        ax.set(xlabel="training steps", ylabel=title.split(" ")[0], title=title)
        log_axis(ax)
        log_axis(ax, "x")
        ax.xaxis.set_major_locator(FixedLocator(steps))
    handles: dict[str, object] = {}
    for ax in axes.flat[: len(series)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return save(fig, path)


def tradeoff(values: Values, arms: list[Arm], nll: str, quality: str, path: Path) -> Path | None:
    """Every arm in the (NLL, sample quality) plane with ±1 sd crosses over seeds: the trade-off
    front of the weightings (lower-left is better on both)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    drawn = False
    for arm in arms:
        seeds = values.get(arm, {}).get(nll, {}).keys() & values.get(arm, {}).get(quality, {}).keys()
        x = np.array([values[arm][nll][s] for s in sorted(seeds)])
        y = np.array([values[arm][quality][s] for s in sorted(seeds)])
        if not len(x) or not (np.isfinite(x).all() and np.isfinite(y).all()):
            continue
        xerr = x.std(ddof=1) if len(x) > 1 else 0.0
        yerr = y.std(ddof=1) if len(y) > 1 else 0.0
        kw = style(arm)
        ax.errorbar(
            x.mean(),
            y.mean(),
            xerr=xerr,
            yerr=yerr,
            fmt=kw["marker"],
            color=kw["color"],
            capsize=3,
            label=arm.label,
        )
        ax.annotate(arm.label, (x.mean(), y.mean()), fontsize=7, xytext=(4, 4), textcoords="offset points")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(
        xlabel=f"{nll} (lower is better)",
        ylabel=f"{quality} (lower is better)",
        title="likelihood vs samples",
    )
    log_axis(ax, "x")
    log_axis(ax)
    ax.legend(fontsize=7)
    return save(fig, path)


def image_panels(images: dict[Arm, list[Path]], titles: list[str], path: Path) -> Path | None:
    """Existing PNG grids side by side: one column per arm, one row per kind of image."""
    arms = sorted(images, key=lambda a: a.order)
    if not arms:
        return None
    rows = len(titles)
    fig, axes = plt.subplots(rows, len(arms), figsize=(2.6 * len(arms), 2.8 * rows), squeeze=False)
    for col, arm in enumerate(arms):
        for row in range(rows):
            ax = axes[row][col]
            ax.axis("off")
            if row < len(images[arm]) and images[arm][row].is_file():
                ax.imshow(plt.imread(images[arm][row]), cmap="gray")
            ax.set_title(f"{arm}\n{titles[row]}" if row == 0 else titles[row], fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def tuning_curves(choices: dict[str, dict[Arm, Choice]], path: Path) -> Path | None:
    """Stage 1 of a tuned sweep: each arm's final validation metric against the learning rate,
    divided by the arm's best (so x0's hundreds of bpd and eps's threes share one axis and every
    chosen setting, ringed, sits at 1), one panel per claim family; the chosen clipping in full,
    the other faint with open markers; a diverged rate leaves a gap."""
    panels = {
        f: c for f, c in choices.items() if any(v is not None for x in c.values() for v in x.values.values())
    }
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.0), squeeze=False)
    for ax, (family, by_arm) in zip(axes.flat, panels.items()):
        for arm in sorted(by_arm, key=lambda a: a.order):
            choice = by_arm[arm]
            if choice.rate is None:
                continue
            best = choice.values[choice.rate]
            kw = style(arm)
            grid = choice.grid or {(r, choice.clip): v for r, v in choice.values.items()}
            clips = sorted({c for _, c in grid}, key=lambda c: (c != choice.clip, c is not None, c or 0.0))
            for clip in clips:
                rates = sorted(r for r, c in grid if c == clip)
                ratios = [np.nan if grid[r, clip] is None else grid[r, clip] / best for r in rates]
                if clip == choice.clip:
                    ax.plot(rates, ratios, ms=4, label=arm.label, **kw)
                else:
                    ax.plot(rates, ratios, ms=4, mfc="none", alpha=0.4, lw=0.8, **kw)
            ax.plot([choice.rate], [1.0], "o", ms=11, mfc="none", color=kw["color"])
        metric = next((c.metric for c in by_arm.values() if c.metric), "")
        ax.set(
            xlabel="optim.lr",
            ylabel=f"final {metric} ÷ the arm's best",
            title=f"{family}: {metric} on the tuning seed\n(ringed: chosen; faint: the other clipping)",
        )
        ax.set_xscale("log")
        rates = sorted({r for c in by_arm.values() for r in c.rates})
        ax.xaxis.set_major_locator(FixedLocator(rates))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        log_axis(ax)
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return save(fig, path)
