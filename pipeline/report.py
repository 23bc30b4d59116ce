"""Output for people and machines: aligned tables, JSON, CSV and an HTML results page."""

from __future__ import annotations

import csv
import html
import json
import os
import sys
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Sequence, TextIO

from clipgram import storage
from clipgram.search import Hit


def _plain(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any, width: int = 60) -> str:
    text = "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(_plain(value)))
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table",
               out: TextIO | None = None, notes: dict[int, str] | None = None) -> None:
    """Write rows as an aligned text table, JSON (a list of objects) or CSV; a table shows
    `notes` as lines of their own, each before the row of its index."""
    out = out or sys.stdout  # looked up now: tests and callers may have replaced it
    if fmt == "json":
        json.dump([{c: _plain(v) for c, v in zip(columns, row)} for row in rows], out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([[_plain(v) for v in row] for row in rows])
    else:
        cells = [[_cell(v) for v in row] for row in rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
        out.write(line.rstrip() + "\n" + "  ".join("-" * w for w in widths) + "\n")
        for i, r in enumerate(cells):
            if i in (notes or {}):
                out.write(f"{notes[i]}\n")
            out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


NOT_MATCHING = "— closest, but not matching —"


def print_hits(hits: Sequence[Hit], fmt: str = "table", out: TextIO | None = None) -> None:
    """Hits as rows; a table draws a line where the judged matches end (relevance.py)."""
    columns = ["rank", "score", "account", "shortcode", "caption", "path"]
    if fmt != "table":
        columns = list(Hit.__dataclass_fields__)
    first_not = next((i for i, h in enumerate(hits) if h.match is False), None)
    print_rows(columns, [[getattr(h, c) for c in columns] for h in hits], fmt, out,
               notes=None if first_not is None else {first_not: NOT_MATCHING})


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipgram results</title>
<link rel="icon" href="data:,">  <!-- no icon: else browsers log a 404 for /favicon.ico -->
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; background: #fafafa; color: #222; }}
h2 {{ margin-top: 2.5rem; font-weight: 600; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; background: #fff; border-radius: 8px; box-shadow: 0 1px 3px #0002; overflow: hidden; }}
figure img {{ width: 100%; aspect-ratio: 1; object-fit: cover; display: block; }}
figcaption {{ padding: .5rem .6rem; font-size: .8rem; line-height: 1.3; }}
.meta {{ display: flex; justify-content: space-between; color: #888; margin-bottom: .2rem; }}
/* a long account name is cut on one line (full name on hover), not wrapped */
.who {{ color: #888; margin-top: .2rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
.empty {{ color: #888; }}
</style></head><body><h1>clipgram results</h1>
{sections}
</body></html>
"""


def write_html(path: Path, sections: Sequence[tuple[str, Sequence[Hit]]]) -> Path:
    """A page of thumbnails (relative links, so it can move with the data), one grid per search."""
    storage.ensure_local(Path(h.path) for _, hits in sections for h in hits)
    parts = []
    for title, hits in sections:
        figures = "\n".join(
            f'<figure><a href="{html.escape(h.permalink)}"><img loading="lazy" '
            f'src="{html.escape(os.path.relpath(h.path, path.parent))}" alt="{html.escape(h.caption)}">'
            f'</a><figcaption><div class="meta"><span>#{h.rank}</span><span title="score">{h.score:.3f}'
            f'</span></div>{html.escape(h.caption)}<div class="who" title="@{html.escape(h.account)}">'
            f'@{html.escape(h.account)}</div></figcaption></figure>'
            for h in hits) or '<p class="empty">No results.</p>'
        parts.append(f"<h2>{html.escape(title)}</h2>\n<div class=\"grid\">\n{figures}\n</div>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_PAGE.format(sections="\n".join(parts)))
    return path
