"""The report as PDF, rendered from the very same HTML (WeasyPrint), so both carry the same content.

Figures are embedded as data URIs in the HTML, so the PDF needs no files beside it.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

from sitebench.errors import SitebenchError

__all__ = ["render_pdf", "with_column_widths"]

PAGE_CSS = """
@page { size: A4 landscape; margin: 12mm 12mm 14mm 12mm;
        @bottom-right { content: "page " counter(page) " of " counter(pages); font-size: 7pt; } }
body { font-size: 8.5pt; }
h1 { font-size: 15pt; margin: 0 0 .2em 0; }
h2 { font-size: 12pt; margin: 1.2em 0 .4em 0; break-after: avoid; }
h3 { font-size: 9.5pt; margin: .8em 0 .3em 0; break-after: avoid; }
.meta { font-size: 7pt; }
code { font-size: 7pt; }
img { max-width: 100%; max-height: 170mm; }  /* a 20-site forest plot may take a page; never shrink it to a stamp */
figure { break-inside: avoid; margin: .6em 0; }
figcaption { font-size: 7.5pt; max-width: 200mm; }
table { font-size: 7.5pt; max-width: 100%; }
td, th { padding: 1px 4px; }
table[style*="table-layout:fixed"] td, table[style*="table-layout:fixed"] th { overflow-wrap: anywhere; }
tr { break-inside: avoid; }
section#summary { break-after: page; }
section#summary h2 { margin-top: .5em; }
section#summary p { margin: .25em 0; }
table.decisions { font-size: 7.5pt; width: 100%; margin-top: .3em; }
.glossary { font-size: 6.5pt; columns: 3; column-gap: 6mm; }
"""


def render_pdf(html_path: str | Path, pdf_path: str | Path) -> Path:
    """Render ``html_path`` to ``pdf_path``; a missing system library is a one-line error."""
    try:
        from weasyprint import CSS, HTML
    except OSError as exc:  # pango / harfbuzz not installed
        raise SitebenchError(f"PDF rendering needs Pango (apt-get install libpango-1.0-0 libpangoft2-1.0-0): {exc}")
    for noisy in ("weasyprint", "fontTools"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    html_path, pdf_path = Path(html_path), Path(pdf_path)
    page = with_column_widths(html_path.read_text(encoding="utf-8"))
    HTML(string=page, base_url=str(html_path.parent)).write_pdf(str(pdf_path), stylesheets=[CSS(string=PAGE_CSS)])
    return pdf_path


#: Width of the page's text block in ``ch`` of a table's font: A4 landscape less the margins is 273 mm, and a
#: DejaVu Sans "0" at 7.5 pt is 1.68 mm (162 ch), less a little for the table's own border and spacing.
_LINE_CH = 156
_WORD_CH = 20
_TABLE = re.compile(r"<table\b([^>]*)>(.*?)</table>", re.S)
_CELL = re.compile(r"<t([hd])\b([^>]*)>(.*?)</t\1>", re.S)
_TAG = re.compile(r"<[^>]+>")


def with_column_widths(page: str) -> str:
    """The page with a ``<colgroup>`` and ``table-layout: fixed`` on each table that has neither
    widths of its own nor merged cells, the widths those of CSS 2.1's automatic table layout (17.5.2.2)
    computed from the cells' text: a column gets its longest word, then a share of the remaining
    line in proportion to how much longer its longest cell is.

    Why: WeasyPrint lays out an automatic table by measuring every cell's text at several widths,
    and a report's two thousand cells took it 16 s of a 17 s render; with the widths given it takes
    5 s. The text, and so the PDF's content, is the HTML's; only the measuring moves here."""
    return _TABLE.sub(_fixed_table, page)


def _fixed_table(match: re.Match) -> str:
    attributes, inner = match.group(1), match.group(2)
    if "<colgroup" in inner or "<table" in inner or "colspan" in inner or "rowspan" in inner or "style=" in attributes:
        return match.group(0)
    rows = [row for row in re.findall(r"<tr\b[^>]*>(.*?)</tr>", inner, re.S)]
    cells = [[html.unescape(_TAG.sub(" ", c[2])).split() for c in _CELL.findall(row)] for row in rows]
    n = max((len(row) for row in cells), default=0)
    if n == 0 or any(len(row) != n for row in cells):
        return match.group(0)
    # in ch, the width of "0": letters and bold headers run wider (up to 30%), padding 1px 4px;
    # a token longer than _WORD_CH (a SHA-256, a path) wraps anywhere rather than squeeze every other column
    shortest = [2 + 1.3 * max((min(_WORD_CH, max((len(w) for w in cell), default=0)) for cell in col), default=0)
                for col in zip(*cells)]
    longest = [max(lo, 2 + 1.1 * max((len(" ".join(cell)) for cell in col), default=0))
               for lo, col in zip(shortest, zip(*cells))]
    if sum(longest) <= _LINE_CH:  # fits unbroken: as narrow as its text
        widths, width = longest, f"{sum(longest):.0f}ch"
    elif sum(shortest) >= _LINE_CH:
        widths, width = shortest, "100%"
    else:
        spare = (_LINE_CH - sum(shortest)) / (sum(longest) - sum(shortest))
        widths, width = [lo + (hi - lo) * spare for lo, hi in zip(shortest, longest)], "100%"
    total = sum(widths)
    cols = "".join(f"<col style='width:{100 * w / total:.2f}%'/>" for w in widths)
    return (f"<table{attributes} style='table-layout:fixed;width:{width}'><colgroup>{cols}</colgroup>"
            f"{inner}</table>")
