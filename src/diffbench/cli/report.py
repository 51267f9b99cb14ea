"""`python -m diffbench.report`: the verdict on each claim from the finished runs, as a
self-contained HTML page, a Markdown summary, PNG figures and a JSON file per group."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from diffbench.analysis.collect import by_group, from_wandb, scan
from diffbench.analysis.optimiser import TUNED_HTML, find_tuned, write_tuned
from diffbench.analysis.report import REPORT_HTML, build_report, write_axis_checks
from diffbench.analysis.tuning import config_of, is_tuning
from diffbench.analysis.verdicts import NO_VERDICT
from diffbench.atomic import unwritable_reason, writable_folder

T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbench.report", description=__doc__)
    parser.add_argument("--runs", default="runs", help="folder searched for run directories (default: runs)")
    parser.add_argument("--out", default=None, help="where reports go (default: <runs>/report)")
    parser.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT", help="read finished runs from W&B")
    parser.add_argument(
        "--no-figures", action="store_true", help="verdicts and tables only (seconds faster per group)"
    )
    options = parser.parse_args(argv)
    root = Path(options.runs)
    out = Path(options.out) if options.out else root / "report"
    if not writable_folder(out):
        print(
            f"diffbench.report: --out {out} cannot be written ({unwritable_reason(out)}); point --out at "
            "a folder you can write (it is created if missing). Nothing was read or written.",
            file=sys.stderr,
        )
        return 2
    if options.wandb:
        runs, incomplete = from_wandb(options.wandb)
    elif not root.is_dir():
        print(
            f"diffbench.report: no run folder {root}/. Train first (make sweep OBJ=all or "
            "python -m diffbench.run experiment=eps_simple), or point --runs at a folder of runs.",
            file=sys.stderr,
        )
        return 2
    else:
        runs, incomplete = scan(root)
    tuned, runs = find_tuned(runs, incomplete)
    incomplete = [i for i in incomplete if not is_tuning(config_of(i))]
    groups = by_group(runs, incomplete)
    if not groups:
        print(
            f"diffbench.report: found no run directories under {root}/ (a run directory holds "
            "config.yaml and, once finished, results.json). Train first with make sweep OBJ=all.",
            file=sys.stderr,
        )
        return 2
    optimiser = {group: t.agreements for t in tuned for group in t.groups}
    unreadable: list[str] = []
    draw = not options.no_figures
    for group, (group_runs, group_incomplete) in sorted(groups.items()):
        report = guarded(
            group,
            unreadable,
            build_report,
            group,
            group_runs,
            group_incomplete,
            out / group,
            draw,
            optimiser.get(group),
        )
        if report is None:
            continue
        print(f"[report] {group}: {len(group_runs)} finished runs, {len(group_incomplete)} incomplete")
        if report.plumbing:
            print(f"[report]   {NO_VERDICT} (smoke profile: every stage ran, no number means anything)")
        for claim in report.claims:
            tag = report.settlements[claim.number].tag
            print(f"[report]   claim {claim.number}: {claim.headline}{f' [{tag}]' if tag else ''}")
        print(f"[report]   {out / group / REPORT_HTML} (and report.md, report.json, figures/)")
    for item in tuned:
        where = out / f"{item.default_group}-tuned"
        if guarded(where.name, unreadable, write_tuned, item, where, draw) is None:
            continue
        print(
            f"[report] tuned learning rates: {len(item.runs)} evaluation runs, "
            f"{len(item.trials)} tuning trials"
        )
        for number, agreement in ({} if item.plumbing else item.agreements).items():
            print(f"[report]   claim {number}: {agreement.text}")
        print(f"[report]   {where / TUNED_HTML} (and tuned.md, tuned.json)")
    for path in write_axis_checks({group: pair[0] for group, pair in groups.items()}, out):
        print(f"[report] {path}")
    if unreadable:
        print(
            f"[report] not written: {', '.join(unreadable)}; every other report is complete.", file=sys.stderr
        )
        return 1
    return 0


def guarded(name: str, unreadable: list[str], make: Callable[..., T], *args: object) -> T | None:
    """One report's compute, render and write (`make(*args)`): a failure is said in one line and
    `name` added to `unreadable`, so the other reports still get written."""
    try:
        return make(*args)
    except Exception as error:
        unreadable.append(name)
        print(
            f"[report] {name}: unreadable, no report written ({type(error).__name__}: {error})",
            file=sys.stderr,
        )
        return None
