"""The report's figures: one function per PNG, arms drawn the same way in every one."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffbench import atomic  # noqa: E402
from diffbench.analysis.collect import ARM_PARTS, Run  # noqa: E402
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
        if not (np.isfinite(y).all() and (y > 0).all()):
            continue
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


def budget_curves(budgets: dict[int, dict], arms: list[str], path: Path) -> Path | None:
    """Every per-budget metric against training steps: mean over seeds, band from the lowest to
    the highest seed, so a reader sees whether the arms have settled before reading a verdict."""
    steps = sorted(budgets)
    metrics = sorted({m for step in steps for arm in budgets[step].values() for m in arm})
    if not metrics:
        return None
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics):
        for arm in arms:
            points = [(s, list(budgets[s].get(arm, {}).get(metric, {}).values())) for s in steps]
            points = [(s, v) for s, v in points if v and all(np.isfinite(v))]
            if not points:
                continue
            x = [s for s, _ in points]
            ax.plot(x, [np.mean(v) for _, v in points], marker="o", ms=3, label=arm, **style(arm))
            ax.fill_between(
                x,
                [min(v) for _, v in points],
                [max(v) for _, v in points],
                color=style(arm)["color"],
                alpha=0.1,
            )
        ax.set(xlabel="training steps", ylabel=metric, xscale="log", title=metric)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def tradeoff(values: dict, arms: list[str], nll: str, quality: str, path: Path) -> Path | None:
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
            x.mean(), y.mean(), xerr=xerr, yerr=yerr, fmt="o", color=kw["color"], capsize=3, label=arm
        )
        ax.annotate(arm, (x.mean(), y.mean()), fontsize=7, xytext=(4, 4), textcoords="offset points")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(
        xlabel=f"{nll} (lower is better)",
        ylabel=f"{quality} (lower is better)",
        title="likelihood vs samples",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
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
