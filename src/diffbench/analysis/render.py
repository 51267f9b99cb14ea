"""The last two stages every report shares (the group report and the tuned report): what a
report says as a `Document` (sections, the JSON, the figures to draw), and `write`, which draws
the figures and renders it once to Markdown, once to a self-contained HTML page (figures inlined
as data URIs) and once to JSON, so all three always say the same thing."""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffbench import atomic
from diffbench.analysis.verdicts import Verdict

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #1f2328; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #d0d7de; padding: 4px 8px; font-size: 13px; text-align: right;
  vertical-align: top; }
td:first-child, th:first-child { text-align: left; }
.verdict { font-weight: bold; padding: 2px 8px; border-radius: 4px; color: #fff; white-space: nowrap; }
.note { color: #57606a; }
img { max-width: 100%; border: 1px solid #d0d7de; margin: .5em 0; }
"""
VERDICT_COLORS = {
    Verdict.HOLDS: "#1a7f37",
    Verdict.EQUIVALENT: "#1a7f37",
    Verdict.CONTRADICTED: "#cf222e",
    Verdict.DIFFERENT: "#cf222e",
    Verdict.NOT_SHOWN: "#9a6700",
    Verdict.UNDETERMINED: "#9a6700",
    Verdict.NOT_TESTED: "#57606a",
}


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    anchor: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    level: int = 2


def markdown(title: str, sections: list[Section], figures: list[str]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"{'#' * section.level} {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.bullets:
            lines += [f"- {bullet}" for bullet in section.bullets] + [""]
        for table in section.tables:
            lines.append("| " + " | ".join(table.header) + " |")
            lines.append("|" + "---|" * len(table.header))
            lines += [
                "| " + " | ".join(cell.replace("|", "\\|").replace("\n", "<br>") for cell in row) + " |"
                for row in table.rows
            ]
            lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{name}](figures/{name})" for name in figures]
    return "\n".join(lines) + "\n"


def cell_html(text: str) -> str:
    """A verdict word becomes a coloured badge; anything else is escaped text with Markdown's
    **bold** and `code` kept, and line breaks."""
    if text in VERDICT_COLORS:
        return f"<span class='verdict' style='background:{VERDICT_COLORS[text]}'>{html.escape(text)}</span>"
    escaped = html.escape(text).replace("\n", "<br>")
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def html_page(title: str, sections: list[Section], figures: list[str], out: Path) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        level = min(6, section.level)
        parts.append(f"<h{level} id='{esc(section.anchor)}'>{esc(section.title)}</h{level}>")
        parts += [f"<p>{cell_html(paragraph)}</p>" for paragraph in section.paragraphs]
        if section.bullets:
            parts.append("<ul>" + "".join(f"<li>{cell_html(b)}</li>" for b in section.bullets) + "</ul>")
        for table in section.tables:
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.header) + "</tr>")
            parts += [
                "<tr>" + "".join(f"<td>{cell_html(c)}</td>" for c in row) + "</tr>" for row in table.rows
            ]
            parts.append("</table>")
    if figures:
        parts.append("<h2 id='figures'>Figures</h2>")
    for name in figures:
        data = base64.b64encode((out / "figures" / name).read_bytes()).decode()
        parts.append(
            f"<figure><img alt='figures/{esc(name)}' data-file='figures/{esc(name)}' "
            f"src='data:image/png;base64,{data}'><figcaption>figures/{esc(name)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


Drawing = Callable[[Path], "Path | None"]
"""Draws one figure into the given folder and returns its file (None when there is nothing to draw)."""


@dataclass
class Document:
    """What one report says, computed and rendered but not yet written: `stem` names its files
    (`<stem>.json`, `.md`, `.html`), `payload` is its JSON without the figure list, `drawings` the
    figures to draw beside it."""

    stem: str
    title: str
    sections: list[Section]
    payload: dict
    drawings: list[Drawing] = field(default_factory=list)


def write(document: Document, out: Path, draw: bool = True) -> dict:
    """Draw the figures (with `draw`) into `out/figures`, then write the JSON, Markdown and HTML
    atomically; return the JSON as written (the payload with `figures` last)."""
    out.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    if draw and document.drawings:
        folder = out / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        made = [path.name for drawing in document.drawings if (path := drawing(folder)) is not None]
    payload = {**document.payload, "figures": made}
    atomic.write_text(out / f"{document.stem}.json", json.dumps(payload, indent=2, default=str) + "\n")
    atomic.write_text(out / f"{document.stem}.md", markdown(document.title, document.sections, made))
    atomic.write_text(out / f"{document.stem}.html", html_page(document.title, document.sections, made, out))
    return payload
