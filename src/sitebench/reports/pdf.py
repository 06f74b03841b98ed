"""The report as PDF, rendered from the very same HTML (WeasyPrint), so both carry the same content.

Figures are embedded as data URIs in the HTML, so the PDF needs no files beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sitebench.errors import SitebenchError

__all__ = ["render_pdf"]

PAGE_CSS = """
@page { size: A4 landscape; margin: 14mm 12mm 16mm 12mm;
        @bottom-right { content: "page " counter(page) " of " counter(pages); font-size: 8pt; } }
body { font-size: 9pt; }
img { max-width: 100%; }
table { font-size: 6.5pt; max-width: 100%; }
td, th { padding: 1px 3px; }
table.checklist td { text-align: left; }
h2 { break-after: avoid; }
figure { break-inside: avoid; }
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
