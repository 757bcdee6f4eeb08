"""Self-contained HTML pages: an overlay gallery and a metrics report."""

from __future__ import annotations

import html
from pathlib import Path

from weakloc.report.paths import page_link
from weakloc.text import escape_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;padding:8px;font-size:12px}
.card img{width:100%;border-radius:4px;image-rendering:auto}
.card .name{font-weight:600;word-break:break-all}
table{border-collapse:collapse;background:#fff;font-size:14px}
td,th{border:1px solid #ddd;padding:5px 10px;text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:13px}
"""


def gallery_cards(items: list[dict], base: str | Path) -> str:
    """HTML cards for ``items`` (``image``: path, absolute or from the working directory;
    ``title``; ``lines``: list of str) on a page in the folder ``base``.

    Image links are relative to ``base`` and percent-encoded (:func:`~weakloc.report.paths.page_link`);
    titles and lines are shown as text, whatever they hold.
    """
    cards = []
    for it in items:
        src = html.escape(page_link(it["image"], base))
        lines = "".join(f"<div>{_text(line)}</div>" for line in it.get("lines", []))
        cards.append(f'<div class="card"><a href="{src}"><img src="{src}" loading="lazy"></a>'
                     f'<div class="name">{_text(it["title"])}</div>{lines}</div>')
    return '<div class="grid">' + "".join(cards) + "</div>"


def _text(value) -> str:
    """Any value as HTML text: escaped, and undecodable bytes / control characters as ``\\xNN``
    (:func:`~weakloc.text.escape_text`)."""
    return html.escape(escape_text(str(value)))


def metrics_table(rows: list[dict], columns: list[str]) -> str:
    """An HTML table of ``rows`` (dicts) with the given column keys; floats get one decimal."""
    head = "".join(f"<th>{_text(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"<td>{v:.1f}</td>" if isinstance(v, float) else f"<td>{_text(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_page(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write an HTML page with ``(heading, html)`` sections."""
    path = Path(path)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_text(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{_text(title)}</h1>"]
    for heading, body in sections:
        if heading:
            parts.append(f"<h2>{_text(heading)}</h2>")
        parts.append(body)
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    # sections are callers' HTML: a lone surrogate there is written escaped instead of failing
    path.write_text("".join(parts), encoding="utf-8", errors="backslashreplace")
    return path
