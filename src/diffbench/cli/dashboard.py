"""A W&B workspace that compares the six arms side by side: verdict metrics, training curves, samples."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from diffbench.rundir import METRIC_INFO, SAMPLE_GRID, VLB_TERMS, X0_TRAJECTORY, media_key, sample_grid
from diffbench.tracking import has_wandb_credentials

GROUP_BY = "arm"  # config key naming the arm (head x weighting); the seeds of an arm pool into one group
STEP = "trainer/global_step"  # the step metric Lightning's WandbLogger logs everything against
AGGREGATE, SPREAD = "mean", "stddev"  # as the sweep's summary table: mean ± standard deviation over seeds


def final(*names: str) -> dict[str, str]:
    """W&B summary keys (`final/<metric>`, written by the run command) with the registry's labels."""
    return {f"final/{name}": METRIC_INFO[name].label for name in names}


LIKELIHOOD = final("nll_vlb_bpd", "nll_ode_bpd")
# The evaluation metrics that only some datasets have.
DATASET_METRICS = {
    "digits": final("fd_digits"),
    "gmm": final("nll_exact_bpd", "fd_digits", "eps_star_mse"),
    "mnist": final("fd_mnist"),
    "cifar10": final("fid"),
}
CURVES = {
    "train/loss": "Training loss (the arm's own objective)",
    "val/loss": "Validation loss (the arm's own objective)",
    "val/vlb_bpd": "Validation VLB (bits/dim)",
    "val/eps_mse": "Validation ε MSE",
}
MEDIA = {
    media_key(SAMPLE_GRID): "Samples",
    media_key(sample_grid("ddim")): "DDIM samples",
    media_key(X0_TRAJECTORY): "x̂0 along the reverse process",
    media_key(VLB_TERMS.png): "VLB terms per timestep",
}
Panel = wr.BarPlot | wr.LinePlot | wr.MediaBrowser


def build_workspace(entity: str, project: str, name: str, data: str = "digits") -> ws.Workspace:
    """The whole dashboard as an object model, so it can be checked and printed without W&B."""
    if data not in DATASET_METRICS:
        raise ValueError(f"unknown --data {data!r}; choose one of {', '.join(DATASET_METRICS)}.")
    verdict = [
        wr.BarPlot(
            title=title,
            metrics=[key],
            groupby=wr.Config(GROUP_BY),
            groupby_aggfunc=AGGREGATE,
            groupby_rangefunc=SPREAD,
        )
        for key, title in {**LIKELIHOOD, **DATASET_METRICS[data]}.items()
    ]
    curves = [
        wr.LinePlot(
            title=title,
            x=STEP,
            y=[key],
            groupby=wr.Config(GROUP_BY),
            groupby_aggfunc=AGGREGATE,
            groupby_rangefunc=SPREAD,
        )
        for key, title in CURVES.items()
    ]
    media = [wr.MediaBrowser(title=title, media_keys=[key]) for key, title in MEDIA.items()]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[
            ws.Section(
                name="Verdict: likelihood and sample quality",
                panels=verdict,
                is_open=True,
                layout_settings=ws.SectionLayoutSettings(columns=3, rows=2),
            ),
            ws.Section(
                name="Training curves",
                panels=curves,
                is_open=True,
                layout_settings=ws.SectionLayoutSettings(columns=2, rows=2),
            ),
            ws.Section(
                name="Samples",
                panels=media,
                is_open=True,
                layout_settings=ws.SectionLayoutSettings(columns=2, rows=2),
            ),
        ],
        # Every run is tagged with its dataset (run.build_trainer): other datasets' runs in the same
        # project would otherwise be averaged into the same arm.
        runset_settings=ws.RunsetSettings(groupby=[ws.Config(GROUP_BY)], filters=[ws.Tags().isin([data])]),
    )


def describe(panel: Panel) -> str:
    """The run keys a panel reads, whatever its kind (line plots with their x-axis)."""
    if isinstance(panel, wr.BarPlot):
        return ", ".join(panel.metrics)
    if isinstance(panel, wr.LinePlot):
        return ", ".join(f"{key} vs {panel.x}" for key in panel.y)
    return ", ".join(panel.media_keys)


def outline(workspace: ws.Workspace) -> str:
    """What `save` would create, one line per panel, for --dry-run and for reviewing changes."""
    runset = workspace.runset_settings
    groups = ", ".join(str(group) for group in runset.groupby)
    lines = [
        f"{workspace.name!r} in {workspace.entity}/{workspace.project}: runs where {runset.filters}, "
        f"grouped by {groups}",
    ]
    for section in workspace.sections:
        lines.append(f"\n{section.name}")
        lines += [
            f"  {type(panel).__name__:<12} {panel.title}: {describe(panel)}" for panel in section.panels
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """--data is checked by build_workspace, so a bad value is reported the same way from code and CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m diffbench.dashboard",
        description="Create (or print, with --dry-run) the W&B workspace that compares the six arms.",
    )
    parser.add_argument("--entity", required=True, help="W&B user or team that owns the project")
    parser.add_argument("--project", required=True, help="W&B project the runs were logged to")
    parser.add_argument("--name", default="diffbench comparison", help="workspace (view) name")
    parser.add_argument(
        "--data",
        default="digits",
        help=f"dataset of the runs to compare, which decides the metrics: {', '.join(DATASET_METRICS)}",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the outline; contact nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        workspace = build_workspace(args.entity, args.project, args.name, args.data)
    except ValueError as error:
        print(f"diffbench.dashboard: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(outline(workspace))
        return 0
    if not has_wandb_credentials():
        print(
            "diffbench.dashboard: no W&B credentials found, so the workspace cannot be saved to "
            f"{args.entity}/{args.project}. Run `wandb login` (or set WANDB_API_KEY) and try again, "
            "or pass --dry-run to print the workspace without contacting W&B.",
            file=sys.stderr,
        )
        return 2
    print(workspace.save().url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
