"""The report as PDF, rendered from the very same HTML (WeasyPrint), so both carry the same content.

Figures are embedded as data URIs in the HTML, so the PDF needs no files beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sitebench.errors import SitebenchError

__all__ = ["render_pdf"]

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
    HTML(filename=str(html_path), base_url=str(html_path.parent)).write_pdf(
        str(pdf_path), stylesheets=[CSS(string=PAGE_CSS)])
    return pdf_path
