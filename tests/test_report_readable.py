"""The report as a regulatory writer reads it: a first page of decisions, human tables, captioned figures.

Fast tests run the real analyses (``evaluate_models``) on a small synthetic trial whose effects are
known: one version biased at one site, a software change at another. The slow test builds a real
report through the pipeline and reads its PDF back with poppler (``pdftotext``, ``pdftoppm``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import yaml

from sitebench.reports import figures
from sitebench.reports.summary import MET, NOT_MET, decisions
from sitebench.reports.tables import COLUMNS, MAX_COLUMNS, CI, header, is_code_name, readable
from sitebench.stratification.evaluation import AnalysisPlan, Endpoint, evaluate_models, evaluation_table

SITES = ("S01", "S02", "S03", "S04", "S05", "S06")
VENDORS = {"S01": "GE", "S02": "GE", "S03": "Siemens", "S04": "Siemens", "S05": "Philips", "S06": "Philips"}
#: Code names that must never reach a reader's page (column names of the locked tables).
CODE_NAMES = ("model_key", "p_lower", "p_upper", "equivalent_holm", "p_holm", "ci_low", "ci_high", "n_site",
              "mean_site", "all_within_margin", "n_pairs", "tost_ci_low", "software_upgraded", "auc_a")


def _trial(n: int = 8, seed: int = 1) -> pd.DataFrame:
    """Predictions of two versions on one trial: v2 is unbiased everywhere, v1 is +90 ml at S03.

    S01's scanner software changes halfway through, after which v1 reads 40 ml high there.
    """
    rng = np.random.default_rng(seed)
    manifest, predictions = [], []
    for site in SITES:
        for i in range(n):
            scan = f"{site}-{i:02d}"
            upgraded = site == "S01" and i >= n // 2
            reference = rng.normal(650, 40)
            group = "patient" if i % 2 else "control"
            manifest.append({"scan_id": scan, "subject_id": f"sub-{scan}", "session": "1", "site": site,
                             "scanner_id": f"{site}-A", "vendor": VENDORS[site], "scanner_model": "M",
                             "software_version": "2.0" if upgraded else "1.0", "field_strength": 3.0,
                             "acquisition_date": f"2025-01-{i + 1:02d}", "image_path": f"{scan}.nii.gz",
                             "image_sha256": "0" * 64, "age": 60 + i, "sex": "F" if i % 3 else "M",
                             "group": group, "gm_ml": reference - (25 if group == "patient" else 0)})
            truth = manifest[-1]["gm_ml"]
            v1 = truth + rng.normal(0, 6) + (90 if site == "S03" else 0) + (40 if upgraded else 0)
            v2 = truth + rng.normal(0, 6)
            predictions += [{"scan_id": scan, "model_key": "seg@1", "prediction": v1},
                            {"scan_id": scan, "model_key": "seg@2", "prediction": v2}]
    return evaluation_table(pd.DataFrame(predictions), pd.DataFrame(manifest), "gm_ml")


@pytest.fixture(scope="module")
def evaluation():
    plan = AnalysisPlan(strata=["site", "vendor", "software_version"], bootstrap=50, seed=0, equivalence_margin=50.0,
                        compare=[["seg@1", "seg@2"]], comparison_margin=20.0,
                        endpoint=Endpoint("group", "patient", higher_is_positive=False))
    return evaluate_models(_trial(), plan)


def test_every_pre_specified_decision_is_stated_from_the_evaluation(evaluation):
    found = decisions(evaluation, "ml")
    by_topic = {}
    for d in found:
        by_topic.setdefault(d.topic, []).append(d)
    assert set(by_topic) == {"Equivalence across sites", "Version comparison", "Endpoint discrimination",
                             "Software upgrade", "Worst site"}
    # one equivalence claim per version; the biased version fails at S03 and only there is named
    eq = {d.model: d for d in by_topic["Equivalence across sites"]}
    assert set(eq) == {"seg@1", "seg@2"}
    table = evaluation.equivalence.set_index(["model_key", "site"])
    for key, d in eq.items():
        assert d.result == (MET if table.loc[key, "all_within_margin"].all() else NOT_MET)
    assert eq["seg@1"].result == NOT_MET and "S03" in eq["seg@1"].detail and "±50 ml" in eq["seg@1"].claim
    # the number is a cell of the locked table, not a recomputation
    assert eq["seg@1"].estimate == table.loc[("seg@1", "S03"), "difference"]
    assert eq["seg@1"].ci == (table.loc[("seg@1", "S03"), "ci_low"], table.loc[("seg@1", "S03"), "ci_high"])
    assert eq["seg@1"].ci_label == "90% CI"
    # the worst site of the biased version is S03, read off the per-site bias
    worst = {d.model: d for d in by_topic["Worst site"]}
    assert worst["seg@1"].result.startswith("S03")
    bias = evaluation.metrics.set_index(["model_key", "stratum", "level", "metric"])
    assert worst["seg@1"].estimate == bias.loc[("seg@1", "site", "S03", "bias"), "estimate"]
    # the paired TOST of the two versions, with its 90% interval, and the paired DeLong test
    (cmp,) = by_topic["Version comparison"]
    overall = evaluation.comparison.set_index("level").loc["overall"]
    assert cmp.result == (MET if overall["equivalent"] else NOT_MET) and "±20 ml" in cmp.claim
    assert cmp.ci == (overall["tost_ci_low"], overall["tost_ci_high"])
    (auc,) = by_topic["Endpoint discrimination"]
    assert auc.estimate == evaluation.discrimination.iloc[0]["difference"] and auc.unit == ""
    # the upgrade: S01 within-site for each version, and the mixed-model term for each version
    upgrade = by_topic["Software upgrade"]
    assert {d.model for d in upgrade if "site S01" in d.claim} == {"seg@1", "seg@2"}
    mixed = {d.model: d for d in upgrade if "Across all sites" in d.claim}
    assert set(mixed) == {"seg@1", "seg@2"}
    fit = next(m for m in evaluation.mixed if m["model_key"] == "seg@1" and m["response"] == "error")
    assert mixed["seg@1"].estimate == fit["fixed_effects"]["software_upgraded"]["estimate"]
    site = next(d for d in upgrade if d.model == "seg@1" and "site S01" in d.claim)
    assert site.result == "changed" and site.estimate > 20  # the injected +40 ml
    for d in found:  # plain words: no code name in anything a reader sees
        text = " ".join([d.claim, d.criterion, d.result, d.number(), d.detail])
        assert not any(name in text for name in CODE_NAMES), text


def test_no_margin_means_no_decision_not_a_silent_pass(evaluation):
    from dataclasses import replace

    bare = replace(evaluation, plan=replace(evaluation.plan, equivalence_margin=None), equivalence=pd.DataFrame())
    (eq,) = [d for d in decisions(bare) if d.topic == "Equivalence across sites"]
    assert eq.result == "not assessed" and "No equivalence margin" in eq.detail


def test_every_locked_column_has_a_human_header(evaluation):
    frames = {**evaluation.result_tables(), "evaluation": evaluation.table}
    for stem, frame in frames.items():
        for column in frame.columns:
            assert column in COLUMNS, f"{stem}.{column} has no entry in the header registry"
            assert not is_code_name(header(column, "ml")), (stem, column)
    wide = readable(evaluation.equivalence, ["site", "difference", CI("ci_low", "ci_high", "90% CI"), "p_holm",
                                              "equivalent_holm"], "ml")
    assert list(wide.columns) == ["Site", "Difference (ml)", "90% CI (ml)", "p (TOST, Holm)", "Within margin? (Holm)"]
    assert set(wide["Within margin? (Holm)"]) <= {"Yes", "No"}
    assert all(re.fullmatch(r"\[-?[\d.]+, -?[\d.]+\]", v) for v in wide["90% CI (ml)"])
    with pytest.raises(ValueError, match="at most"):
        readable(evaluation.equivalence)  # all 16 columns: a section must choose


def test_figure_functions_draw_on_given_axes_and_return_the_figure(evaluation):
    plt = figures.pyplot()
    ev = evaluation
    single = [lambda ax: figures.forest_plot(ev.metrics, "bias", "site", "ml", ax=ax),
              lambda ax: figures.equivalence_plot(ev.equivalence, 50.0, "ml", ax=ax),
              lambda ax: figures.vendor_transfer_plot(ev.metrics, "mae", "ml", ax=ax)]
    for draw in single:
        fig, ax = plt.subplots()
        assert draw(ax) is fig and ax.has_data()
        plt.close(fig)
        new = draw(None)
        assert new.__class__.__name__ == "Figure"
        plt.close(new)
    fig, axes = plt.subplots(1, 2)
    assert figures.bland_altman(ev.table, "ml", axes=axes) is fig and all(a.has_data() for a in axes)
    assert figures.calibration_plot(ev.table, "ml", axes=axes) is fig
    plt.close(fig)
    with pytest.raises(ValueError, match="needs 2 axes"):
        figures.bland_altman(ev.table, "ml", axes=[plt.subplots()[1]])
    plt.close("all")


# --------------------------------------------------------------------------- the built report


class _Page(HTMLParser):
    """Table headers and column counts, and each <img> with its enclosing <figure>'s caption."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.stack: list[str] = []
        self.images: list[dict] = []
        self._cell: list[str] | None = None
        self._caption: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)
        if tag == "table":
            self.tables.append({"headers": [], "widths": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["widths"].append(0)
        elif tag in ("td", "th") and self.tables:
            self.tables[-1]["widths"][-1] += int(dict(attrs).get("colspan", 1))
            self._cell = [] if tag == "th" else None
        elif tag == "img":
            self.images.append({"in_figure": "figure" in self.stack, "caption": None})
        elif tag == "figcaption":
            self._caption = []

    def handle_endtag(self, tag):
        if tag == "th" and self._cell is not None:
            self.tables[-1]["headers"].append("".join(self._cell).strip())
            self._cell = None
        if tag == "figcaption" and self._caption is not None:
            for image in self.images:
                if image["caption"] is None:
                    image["caption"] = "".join(self._caption).strip()
            self._caption = None
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        self.stack.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._caption is not None:
            self._caption.append(data)


@pytest.fixture(scope="module")
def report(small_trial, tmp_path_factory):
    """A real pipeline run: three versions, a comparison with margin, a DeLong endpoint, an equivalence margin."""
    from sitebench.pipeline import run_pipeline

    if not (shutil.which("pdftotext") and shutil.which("pdftoppm")):
        pytest.fail("reading the PDF needs poppler-utils (apt-get install poppler-utils)", pytrace=False)
    root = tmp_path_factory.mktemp("readable")
    spec = {"name": "readable", "manifest": str(small_trial.out_dir / "manifest.csv"), "reference": "gm_volume_ml",
            "bootstrap": 50, "seed": 1, "results_dir": str(root / "results"),
            "models": [{"source": "classical"}, {"source": "builtin:gm_unet_v1"}, {"source": "builtin:gm_unet_v2"}],
            "mlflow": {"experiment": "readable", "register_models": False},
            "report": {"intended_use": "Grey-matter volume as a trial endpoint.", "equivalence_margin": 60.0,
                       "compare": [["gm-unet@1.0.0", "gm-unet@2.0.0"]], "comparison_margin": 20.0,
                       "endpoint": {"column": "group", "positive": "patient", "higher_is_positive": False}}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_pipeline(root / "spec.yaml", workers=1, progress=False)
    return result.report.report_dir


@pytest.mark.slow
def test_first_page_states_every_decision_in_plain_words(report, tmp_path):
    pdf = report / "report.pdf"
    subprocess.run(["pdftoppm", "-r", "50", "-png", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "page")],
                   check=True)
    assert any(p.stat().st_size > 5000 for p in tmp_path.glob("page*.png"))  # a rendered page, not a blank
    text = subprocess.run(["pdftotext", "-layout", "-f", "1", "-l", "1", str(pdf), "-"], check=True,
                          capture_output=True, text=True).stdout
    flat = " ".join(text.split())
    assert "Summary of pre-specified decisions" in flat and "Grey-matter volume as a trial endpoint." in flat
    for key in ("gm-tissue-gmm@1.0", "gm-unet@1.0.0", "gm-unet@2.0.0"):
        assert key in flat
    assert flat.count("Every site's mean error is within ±60 ml") == 1  # the claim once, a row per version
    equivalence = pd.read_csv(report / "tables" / "equivalence.csv")
    assert equivalence["model_key"].nunique() == 3
    assert "absolute error is within ±20 ml" in flat  # the paired TOST of the two versions
    assert "DeLong" in flat and "Endpoint discrimination" in flat
    assert "scanner software change at site S01" in flat and "Across all sites" in flat  # upgrade, both ways
    assert flat.count("Worst site") == 1 and "Which site" in flat
    assert re.search(r"\b(Met|Not met)\b", flat)
    assert re.search(r"90% CI -?[\d.]+ to -?[\d.]+", flat)  # numbers come with their intervals
    for name in CODE_NAMES:
        assert name not in flat, name
    assert not re.search(r"\b[a-z]+_[a-z_]+\b", flat.replace("gm_volume_ml", "")), "a code name on page 1"


@pytest.mark.slow
def test_tables_are_narrow_with_human_headers_and_every_figure_is_captioned(report):
    page = _Page()
    page.feed((report / "report.html").read_text(encoding="utf-8"))
    assert len(page.tables) > 10
    for table in page.tables:
        assert max(table["widths"], default=0) <= MAX_COLUMNS, table["headers"]
        for head in table["headers"]:
            assert head and not is_code_name(head), head
    assert len(page.images) >= 7
    for image in page.images:
        assert image["in_figure"] and image["caption"], image
    html_text = (report / "report.html").read_text(encoding="utf-8")
    assert "id='summary'" in html_text and "id='appendix-tables'" in html_text
    # the appendix lists every locked table with its row count, and the CSVs keep every column
    for csv in sorted((report / "tables").glob("*.csv")):
        rows = len(pd.read_csv(csv)) if csv.stat().st_size > 1 else 0
        assert f"tables/{csv.name}</td><td>" in html_text
        assert f"<td>{rows}</td>" in html_text, csv.name
    assert list(pd.read_csv(report / "tables" / "equivalence.csv").columns)[-2:] == ["equivalent_holm",
                                                                                   "all_within_margin"]
    pages = subprocess.run(["pdfinfo", str(report / "report.pdf")], capture_output=True, text=True).stdout
    assert int(re.search(r"Pages:\s+(\d+)", pages).group(1)) < 25


def test_a_plan_without_comparison_says_so_on_the_summary(evaluation):
    from dataclasses import replace

    bare = replace(evaluation, plan=replace(evaluation.plan, compare=[]), comparison=pd.DataFrame(),
                   discrimination=pd.DataFrame())
    found = [d for d in decisions(bare) if d.topic in ("Version comparison", "Endpoint discrimination")]
    assert [d.result for d in found] == ["not assessed"] and "report.compare" in found[0].detail


def test_pdf_tables_get_the_automatic_layouts_widths_and_keep_their_text():
    """render_pdf gives each plain table fixed column widths (WeasyPrint's automatic layout measured
    every cell at several widths: 16 s of a 17 s report); a column's share follows its text, merged
    cells and tables with widths of their own are left as written, and no text changes."""
    import re

    from sitebench.reports.pdf import with_column_widths

    plain = ("<table class='x'><thead><tr><th>Item</th><th>Asks for</th></tr></thead><tbody>"
             "<tr><td>1</td><td>Explain how the study size was arrived at, and justify it &amp; more</td></tr>"
             "<tr><td>10b</td><td>Short</td></tr></tbody></table>")
    merged = "<table><tr><td colspan='2'>a b</td></tr><tr><td>a</td><td>b</td></tr></table>"
    sized = "<table><colgroup><col style='width:20%'/><col/></colgroup><tr><td>a</td><td>b</td></tr></table>"
    wide = ("<table><tr>" + "".join(f"<th>Header{i}</th>" for i in range(8)) + "</tr><tr>"
            + "".join(f"<td>{'word ' * 12}</td>" for _ in range(8)) + "</tr></table>")
    page = f"<p>before</p>{plain}{merged}{sized}{wide}"
    out = with_column_widths(page)
    tags = re.compile(r"<[^>]+>")
    assert tags.sub("", out) == tags.sub("", page)  # the same text
    assert merged in out and sized in out
    tables = re.findall(r"<table[^>]*>.*?</table>", out, re.S)
    first = [float(w) for w in re.findall(r"width:([\d.]+)%", tables[0])]
    assert "table-layout:fixed" in tables[0] and len(first) == 2 and abs(sum(first) - 100) < 0.1
    assert first[1] > 3 * first[0]  # the long text column gets the room
    assert re.search(r"width:\d+ch", tables[0])  # fits a line unbroken: as narrow as its text
    assert "width:100%" in tables[3]  # does not: the whole line, shared out
    assert with_column_widths("<p>no table</p>") == "<p>no table</p>"
