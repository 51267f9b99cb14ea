"""The report as Markdown and as one self-contained HTML page (figures inlined as data URIs)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from diffbench.analysis.claims import Claim, summary_line
from diffbench.analysis.collect import REFERENCE
from diffbench.analysis.stats import Interval
from diffbench.rundir import NOT_RANKED

RANK_NOTE = "not ranked: " + ", ".join(NOT_RANKED)
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #1f2328; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #d0d7de; padding: 4px 8px; font-size: 13px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.verdict { font-weight: bold; padding: 2px 8px; border-radius: 4px; color: #fff; }
.diff { color: #57606a; font-size: 12px; }
.best { font-weight: bold; background: #dafbe1; }
img { max-width: 100%; border: 1px solid #d0d7de; margin: .5em 0; }
"""
VERDICT_COLORS = {"holds": "#1a7f37", "fails": "#cf222e", "inconclusive": "#9a6700", "no data": "#6e7781"}


def cell(interval: Interval | None, with_n: bool = False) -> str:
    """`mean [low, high]`; table cells add n, since a value and its paired Δ may rest on
    different seeds and a single seed's interval is no interval at all."""
    if interval is None:
        return "—"
    n = f" (n={interval.n})" if with_n else ""
    return f"{interval.mean:.4g} [{interval.low:.4g}, {interval.high:.4g}]{n}"


def best_arms(table: dict, metrics: list[str]) -> dict[str, str]:
    """The arm with the lowest mean per metric (every table metric is better when lower)."""
    best = {}
    for metric in metrics:
        if metric in NOT_RANKED:
            continue
        means = {a: row[metric]["value"].mean for a, row in table.items() if row[metric]["value"] is not None}
        finite = {a: m for a, m in means.items() if math.isfinite(m)}
        if finite:
            best[metric] = min(finite, key=finite.__getitem__)
    return best


def markdown(group: str, table: dict, metrics: list[str], claims: list[Claim], context: dict) -> str:
    best = best_arms(table, metrics)
    lines = [f"# diffbench report: {group}", ""]
    lines += [f"- **{summary_line(c)}** — {c.title}" for c in claims]
    lines += [
        "",
        "## Comparison",
        "",
        "Mean over seeds [95% bootstrap interval]; second line: paired Δ to "
        f"`{REFERENCE}` (same seed). Lower is better; **bold** = best mean ({RANK_NOTE}).",
        "",
    ]
    lines.append("| arm | " + " | ".join(f"`{m}`" for m in metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for arm, row in table.items():
        cells = []
        for metric in metrics:
            text = cell(row[metric]["value"], with_n=True)
            if best.get(metric) == arm:
                text = f"**{text}**"
            if row[metric]["diff"] is not None:
                text += f"<br>Δ {cell(row[metric]['diff'], with_n=True)}"
            cells.append(text)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Claims", ""]
    for claim in claims:
        lines += [
            f"### {claim.number}. {claim.title}: {claim.verdict}",
            "",
            f"Expected: {claim.expectation}.",
            "",
        ]
        lines += ["| comparison | metric | mean [95% CI] | n | verdict |", "|---|---|---|---|---|"]
        for part in claim.parts:
            n = part.interval.n if part.interval else 0
            lines.append(f"| {part.label} | `{part.metric}` | {cell(part.interval)} | {n} | {part.verdict} |")
        lines.append("")
    lines += ["## Settings behind the numbers", ""]
    lines += [
        f"- {key}: " + "; ".join(f"`{v}`" for v in values) for key, values in context["settings"].items()
    ]
    lines += ["", f"Runs used: {context['runs']}.", ""]
    if context["incomplete"]:
        lines += ["## Incomplete runs and left-out values", ""]
        lines += [
            f"- `{item['directory']}` ({item['arm']}, seed {item['seed']}): {item['reason']}"
            for item in context["incomplete"]
        ]
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{name}](figures/{name})" for name in context["figures"]]
    return "\n".join(lines) + "\n"


def html_page(
    group: str, table: dict, metrics: list[str], claims: list[Claim], context: dict, out: Path
) -> str:
    """One file with everything inlined (figures as data URIs) so it can be mailed or archived."""
    esc = html.escape
    best = best_arms(table, metrics)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>diffbench report: {esc(group)}</title><style>",
        CSS,
        "</style></head><body>",
        f"<h1>diffbench report: {esc(group)}</h1>",
        "<h2>Verdicts</h2><ul>",
    ]

    def badge(verdict: str) -> str:
        return f"<span class='verdict' style='background:{VERDICT_COLORS[verdict]}'>{esc(verdict)}</span>"

    for claim in claims:
        parts.append(
            f"<li>{badge(claim.verdict)} <a href='#claim{claim.number}'>{esc(summary_line(claim))}</a>: "
            f"{esc(claim.title)}</li>"
        )
    parts += [
        "</ul><h2>Comparison</h2>",
        f"<p>Mean over seeds [95% bootstrap interval]; grey: seed-paired difference to {REFERENCE}. "
        f"Lower is better; green: best mean ({RANK_NOTE}).</p><table><tr><th>arm</th>",
    ]
    parts += [f"<th>{esc(m)}</th>" for m in metrics]
    parts.append("</tr>")
    for arm, row in table.items():
        parts.append(f"<tr><td>{esc(arm)}</td>")
        for metric in metrics:
            klass = " class='best'" if best.get(metric) == arm else ""
            diff = row[metric]["diff"]
            extra = f"<br><span class='diff'>Δ {esc(cell(diff, True))}</span>" if diff is not None else ""
            parts.append(f"<td{klass}>{esc(cell(row[metric]['value'], True))}{extra}</td>")
        parts.append("</tr>")
    parts.append("</table><h2>Claims</h2>")
    for claim in claims:
        parts.append(
            f"<h3 id='claim{claim.number}'>{claim.number}. {esc(claim.title)} {badge(claim.verdict)}</h3>"
        )
        parts.append(
            f"<p>Expected: {esc(claim.expectation)}.</p><table><tr><th>comparison</th><th>metric</th>"
            "<th>mean [95% CI]</th><th>n</th><th>verdict</th></tr>"
        )
        for part in claim.parts:
            n = part.interval.n if part.interval else 0
            parts.append(
                f"<tr><td>{esc(part.label)}</td><td>{esc(part.metric)}</td><td>{esc(cell(part.interval))}"
                f"</td><td>{n}</td><td>{badge(part.verdict)}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Settings behind the numbers</h2><ul>")
    for key, values in context["settings"].items():
        parts.append(
            f"<li><b>{esc(key)}</b>: " + "; ".join(f"<code>{esc(v)}</code>" for v in values) + "</li>"
        )
    parts.append(f"</ul><p>Runs used: {context['runs']}.</p>")
    if context["incomplete"]:
        parts.append("<h2 id='incomplete'>Incomplete runs and left-out values</h2><ul>")
        parts += [
            f"<li><code>{esc(item['directory'])}</code> ({esc(str(item['arm']))}, seed "
            f"{esc(str(item['seed']))}): {esc(item['reason'])}</li>"
            for item in context["incomplete"]
        ]
        parts.append("</ul>")
    parts.append("<h2>Figures</h2>")
    for name in context["figures"]:
        data = base64.b64encode((out / "figures" / name).read_bytes()).decode()
        parts.append(
            f"<figure><img alt='figures/{esc(name)}' data-file='figures/{esc(name)}' "
            f"src='data:image/png;base64,{data}'><figcaption>figures/{esc(name)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
