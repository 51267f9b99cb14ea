"""The report's figures: one function per PNG, arms drawn the same way in every one."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffbench import atomic  # noqa: E402
from diffbench.analysis.collect import ARM_PARTS, REFERENCE, Run  # noqa: E402
from diffbench.analysis.stats import Interval  # noqa: E402
from diffbench.rundir import RunDir  # noqa: E402

HEAD_COLORS = {"eps": "tab:blue", "x0": "tab:orange", "score": "tab:green", "v": "tab:purple"}


def style(arm: str) -> dict:
    """Colour by head; solid for elbo, dash-dot for elbo_is, dashed for the head's own MSE, dotted
    for the other weightings, so arms read the same everywhere."""
    head, weighting = ARM_PARTS.get(arm, ("?", "?"))
    linestyle = {"elbo": "-", "elbo_is": "-.", "own": "--"}.get(weighting, ":")
    return {"color": HEAD_COLORS.get(head, "black"), "linestyle": linestyle}


def save(fig: plt.Figure, path: Path) -> Path:
    """Write through a temporary file so a reader never sees half a PNG."""
    atomic.save_with(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def implied_weights(log_snr: np.ndarray, weights: dict[str, np.ndarray], path: Path) -> Path:
    """Theory: each arm's weight on ‖ε − ε̂‖², normalised to mean one over t, against log-SNR."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    drawn_elbo = False
    for arm in ARM_PARTS:
        if arm not in weights:
            continue
        if ARM_PARTS[arm][1] == "elbo":
            if drawn_elbo:
                continue
            drawn_elbo, label, kw = True, "every *_elbo arm", {"color": "black", "linestyle": "-"}
        else:
            label, kw = arm, style(arm)
        w = weights[arm]
        ax.plot(log_snr, w / w.mean(), label=label, **kw)
    ax.set(
        xlabel="log SNR(t)  (t = 2 at the right, t = T at the left)",
        ylabel="ε-space weight / its mean over t",
        yscale="log",
        title="implied ε-space weight of each loss",
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def per_t_curves(
    curves: dict[str, dict[int, tuple[list[float], list[float]]]],
    path: Path,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path | None:
    """Measured per-t curves: mean over seeds, band from the lowest to the highest seed."""
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for arm in ARM_PARTS:
        seeds = curves.get(arm)
        if not seeds:
            continue
        lengths = {len(t) for t, _ in seeds.values()}
        if len(lengths) != 1:
            continue
        t = np.array([steps for steps, _ in seeds.values()]).mean(0)
        y = np.array([values for _, values in seeds.values()])
        ax.plot(t, y.mean(0), label=f"{arm} (n={len(y)})", **style(arm))
        if len(y) > 1:
            ax.fill_between(t, y.min(0), y.max(0), color=style(arm)["color"], alpha=0.12)
    ax.set(xlabel="t", ylabel=ylabel, yscale="log", title=title)
    if logx:
        ax.set_xscale("log")
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
    labelled: set[str] = set()
    drawn = False
    order = list(ARM_PARTS)
    for run in sorted(runs, key=lambda r: (order.index(r.arm) if r.arm in order else len(order), r.seed)):
        if run.directory is None:
            continue
        series = metric_columns(RunDir(run.directory).metrics_csv, names)
        for ax, name in zip(axes, names):
            steps, values = series.get(name, ([], []))
            if steps:
                label = None if run.arm in labelled else run.arm
                ax.plot(steps, values, label=label, alpha=0.8, **style(run.arm))
                drawn = True
        labelled.add(run.arm)
    if not drawn:
        plt.close(fig)
        return None
    for ax, name in zip(axes, names):
        ax.set(xlabel="step", ylabel=name, yscale="log", title=f"{name} (EMA weights), every seed")
    axes[0].legend(fontsize=8)
    return save(fig, path)


def paired_differences(
    table: dict[str, dict[str, Interval | None]], metrics: list[str], path: Path
) -> Path | None:
    """Forest plot: each arm's seed-paired difference to eps_simple with its 95% interval."""
    metrics = [m for m in metrics if any(table.get(arm, {}).get(m) for arm in ARM_PARTS)]
    if not metrics:
        return None
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics):
        arms = [arm for arm in ARM_PARTS if table.get(arm, {}).get(metric) and arm != REFERENCE]
        for y, arm in enumerate(arms):
            diff = table[arm][metric]
            ax.errorbar(
                diff.mean,
                y,
                xerr=[[diff.mean - diff.low], [diff.high - diff.mean]],
                fmt="o",
                color=style(arm)["color"],
                mfc="white" if ARM_PARTS[arm][1] == "own" else style(arm)["color"],
                capsize=3,
            )
        low = min(0.0, *(table[arm][metric].low for arm in arms))
        high = max(0.0, *(table[arm][metric].high for arm in arms))
        ax.set_xlim(2 * low if low < 0 else -0.1, 2 * high if high > 0 else 0.1)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(arms)), arms)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set(xlabel=f"Δ {metric} vs {REFERENCE} (lower is better)", title=metric)
    fig.tight_layout()
    return save(fig, path)


def image_panels(images: dict[str, list[Path]], titles: list[str], path: Path) -> Path | None:
    """Existing PNG grids side by side: one column per arm, one row per kind of image."""
    arms = [arm for arm in ARM_PARTS if arm in images]
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
