"""PDF rendering of a locked report: WeasyPrint's automatic table layout against the column widths
`sitebench.reports.pdf.with_column_widths` gives it, on the same HTML, in one run.

    .venv/bin/python perf/bench_pdf.py [REPORT_DIR_OR_HTML] [--repeats 3]

Default: the demo's report (``./run demo`` writes sitebench-demo/reports/demo/v001). Prints the
median seconds of each, the ratio and both page counts. That the widths change no text is tested
on the HTML (tests/test_report_readable.py); extracted PDF text differs only where a table breaks
across pages at another row and so repeats its header another time.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
            rows[name] = {"seconds": statistics.median(t for t, _ in runs), "pages": runs[0][1]}
    auto, fixed = rows["automatic layout"], rows["column widths"]
    print(f"{html_path}: automatic layout {auto['seconds']:.1f} s, {auto['pages']} pages; column widths "
          f"{fixed['seconds']:.1f} s, {fixed['pages']} pages -> {fixed['seconds'] / auto['seconds']:.2f}x time")
    print(json.dumps({"report": str(html_path), "automatic_s": auto["seconds"], "column_widths_s": fixed["seconds"],
                      "ratio": fixed["seconds"] / auto["seconds"], "pages": [auto["pages"], fixed["pages"]],
                      "code_version": code_version()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
