"""The worked example on real ABIDE data: ComBat removes site variance and keeps age, sex and diagnosis."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sitebench.datasets.abide import ABIDE_DIR, load_abide_freesurfer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not ABIDE_DIR.exists(), reason="needs ../shared/data/abide")


def test_abide_table_joins_sites_scanners_and_phenotype():
    table = load_abide_freesurfer()
    assert len(table) > 1000 and table.site.nunique() == 20
    assert set(table.vendor) == {"Siemens", "GE", "Philips"}  # 'Phillips' spelling fixed
    assert table.loc[table.site == "CALTECH", "scanner_model"].iloc[0] == "Magnetom TrioTim"  # 'CALTEC' fixed
    assert {"age", "sex", "diagnosis", "Left-Hippocampus"} <= set(table.columns)


def test_example_script_preserves_biology_and_removes_site(tmp_path):
    out = tmp_path / "abide.md"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "abide_example.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith((" yes |", " NO |"))]
    assert len(rows) == 6 and all(row.endswith(" yes |") for row in rows)  # every kept effect inside its CI
    before, after = map(float, re.search(r"Median over \d+ volumes: ([\d.]+) before, ([\d.]+) after", text).groups())
    assert before > 0.1 and after < before / 5  # site explains far less of each volume
