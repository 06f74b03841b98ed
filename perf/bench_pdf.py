"""PDF rendering of a locked report: WeasyPrint's automatic table layout against the column widths
`sitebench.reports.pdf.with_column_widths` gives it, on the same HTML, in one run.

    .venv/bin/python perf/bench_pdf.py [REPORT_DIR_OR_HTML] [--repeats 3]

Default: the demo's report (``./run demo`` writes sitebench-demo/reports/demo/v001). Prints the
median seconds of each, the ratio, both page counts, and whether the text poppler extracts from
the two PDFs is the same words (``pdftotext``, when installed; order aside, as cells wrap differently).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(page: str, base: Path, out: Path) -> tuple[float, int]:
    from weasyprint import CSS, HTML

    from sitebench.reports.pdf import PAGE_CSS

    start = time.perf_counter()
    document = HTML(string=page, base_url=str(base)).render(stylesheets=[CSS(string=PAGE_CSS)])
    document.write_pdf(str(out))
    return time.perf_counter() - start, len(document.pages)


def text_of(pdf: Path) -> str | None:
    if not shutil.which("pdftotext"):
        return None
    words = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout.split()
    # the same words, in any order (a cell wraps differently); page numbers move with the layout
    return " ".join(sorted(w for w in words if not w.isdigit()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", default=str(ROOT / "sitebench-demo" / "reports" / "demo" / "v001"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    html_path = Path(args.report)
    html_path = html_path / "report.html" if html_path.is_dir() else html_path
    if not html_path.is_file():
        sys.exit(f"{html_path}: no report.html (run ./run demo first, or name a report folder)")
    from sitebench.provenance import code_version
    from sitebench.reports.pdf import with_column_widths

    page = html_path.read_text(encoding="utf-8")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_pdf_") as tmp:
        for name, html in (("automatic layout", page), ("column widths", with_column_widths(page))):
            out = Path(tmp) / f"{name.split()[0]}.pdf"
            runs = [render(html, html_path.parent, out) for _ in range(args.repeats)]
            rows[name] = {"seconds": statistics.median(t for t, _ in runs), "pages": runs[0][1], "text": text_of(out)}
    auto, fixed = rows["automatic layout"], rows["column widths"]
    same = None if auto["text"] is None else auto["text"] == fixed["text"]
    print(f"{html_path}: automatic layout {auto['seconds']:.1f} s, {auto['pages']} pages; column widths "
          f"{fixed['seconds']:.1f} s, {fixed['pages']} pages -> {fixed['seconds'] / auto['seconds']:.2f}x time; "
          f"same words: {same}")
    print(json.dumps({"report": str(html_path), "automatic_s": auto["seconds"], "column_widths_s": fixed["seconds"],
                      "ratio": fixed["seconds"] / auto["seconds"], "pages": [auto["pages"], fixed["pages"]],
                      "same_text": same, "code_version": code_version()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
