"""``sitebench simulate sweep``: tolerances derived from the biomarker, on real simulated scans and real models.

Small sweeps (4 subjects x 3 levels, the classical GMM and gm_unet_v1) of superior coverage loss and
of noise, scored through the benchmark runner. The truth says more coverage loss and more noise must
give larger GM-volume error; the tolerance must be what the criterion says, read from the table and
recomputed by hand; the suggested rule must load as a protocol rule; the command line must work for
the sweep and for the plain ``simulate`` it lives beside.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from sitebench.cli import main
from sitebench.errors import SitebenchError
from sitebench.pipeline import DEEPBET_SOURCE, DEMO_MODELS, DEMO_REPORT
from sitebench.qc.protocol import load_protocol
from sitebench.reports.sections import sweep_section_html
from sitebench.reports.sweep_section import plot_error_vs_deviation, tolerance_sentence
from sitebench.sweep import (CONFIDENCE, DEFAULT_MARGIN, DEFAULT_MODELS, gm_wm_ratio_shift, parse_levels,
                             protocol_fragment, run_sweep)

MODELS = ["classical", "builtin:gm_unet_v1"]
SUBJECTS = 4
EXAMPLE_PROTOCOL = "configs/protocols/ge-t1w-3d.v1.locked.yaml"


@pytest.fixture(scope="module")
def coverage(tmp_path_factory):
    return run_sweep("coverage_loss", tmp_path_factory.mktemp("sweep"), levels="0,10,40", n_subjects=SUBJECTS,
                     models=MODELS, n_boot=500)


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    return run_sweep("noise", tmp_path_factory.mktemp("sweep"), levels="0,1,3", n_subjects=SUBJECTS,
                     models=MODELS, n_boot=500)


@pytest.mark.parametrize("which", ["coverage", "noise"])
def test_error_rises_with_the_deviation_as_the_truth_says(which, request):
    result = request.getfixturevalue(which)
    table = result.table
    print(result.summary())
    assert sorted(table["model"].unique()) == ["gm-tissue-gmm@1.0", "gm-unet@1.0.0"]
    assert (table["n"] == SUBJECTS).all()
    for model, rows in table.groupby("model"):
        rows = rows.sort_values("deviation")
        first, last = rows.iloc[0], rows.iloc[-1]
        # clearly larger: MAE at the largest deviation beyond its value at the protocol plus 25 ml,
        # and even the lower CI limit there above the protocol's MAE
        assert last["mae"] > first["mae"] + 25, (model, rows[["deviation", "mae"]])
        assert last["mae_lo"] > first["mae"], (model, rows[["deviation", "mae", "mae_lo", "mae_hi"]])


def test_coverage_loss_biases_volume_down(coverage):
    # losing the top of the brain can only lose grey matter: the error at 40 mm is negative and far below 0 mm's
    for _model, rows in coverage.table.groupby("model"):
        rows = rows.set_index("deviation")
        assert rows.loc[40.0, "mean_error_hi"] < rows.loc[0.0, "mean_error_lo"]
        assert rows.loc[40.0, "mean_error"] < -50


@pytest.mark.parametrize("which", ["coverage", "noise"])
def test_tolerance_is_the_largest_level_within_the_margin(which, request):
    result = request.getfixturevalue(which)
    table, margin = result.table, result.margin
    # the within flag is the criterion: the 90% CI of the mean error inside (-margin, margin)
    expected = (table["mean_error_lo"] > -margin) & (table["mean_error_hi"] < margin)
    assert (table["within_margin"] == expected).all()
    assert (table["mean_error_lo"] <= table["mean_error"]).all() and (table["mean_error"] <= table["mean_error_hi"]).all()
    for row in result.tolerances.itertuples(index=False):
        rows = table[table["model"] == row.model].sort_values("deviation")
        tolerated = math.nan
        for deviation, inside in zip(rows["deviation"], rows["within_margin"]):
            if not inside:
                break
            tolerated = deviation
        if math.isnan(tolerated):
            assert math.isnan(row.largest_within_margin) and row.rule == ""
        else:
            assert row.largest_within_margin == tolerated
            assert row.rule
    # the sweep must actually discriminate: some level fails for some model
    assert not table["within_margin"].all()


def test_statistics_match_a_hand_computation(coverage):
    """Mean error from the runner's own predictions file and the manifest; the 90% CI by hand (Rao-Wu rescaled
    percentile bootstrap of subjects within the level, the draw metrics.stratum_metrics documents)."""
    predictions = pd.read_csv(coverage.predictions_path, dtype={"scan_id": str})
    manifest = pd.read_csv(coverage.manifest_path, dtype={"scan_id": str})
    model = "gm-unet@1.0.0"
    joined = predictions[predictions["model_key"] == model].merge(manifest, on="scan_id")
    table = coverage.table[coverage.table["model"] == model].set_index("deviation")
    for level, part in joined.groupby("sweep_level"):
        part = part.sort_values("scan_id")
        errors = (part["prediction"] - part["gm_volume_ml"]).to_numpy()
        deviation = float(part["sweep_deviation"].iloc[0])
        row = table.loc[deviation]
        assert row["mean_error"] == pytest.approx(errors.mean(), abs=1e-9)
        assert row["mae"] == pytest.approx(np.abs(errors).mean(), abs=1e-9)
        k = len(errors)
        rng = np.random.default_rng(coverage.seed)
        draws = rng.integers(0, k, size=(coverage.n_boot, k - 1))
        weights = np.stack([np.bincount(d, minlength=k) for d in draws]) * (k / (k - 1))
        means = weights @ errors / weights.sum(axis=1)
        low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
        assert row["mean_error_lo"] == pytest.approx(low, abs=1e-9)
        assert row["mean_error_hi"] == pytest.approx(high, abs=1e-9)
    # the tolerance by hand for this model
    inside = [(d, (r["mean_error_lo"] > -50) and (r["mean_error_hi"] < 50)) for d, r in table.sort_index().iterrows()]
    tolerated = None
    for d, ok in inside:
        if not ok:
            break
        tolerated = d
    row = coverage.tolerances.set_index("model").loc[model]
    assert (tolerated is None and math.isnan(row["largest_within_margin"])) or row["largest_within_margin"] == tolerated


def _with_rule(tmp_path, rule_key, rule):
    """The example locked protocol (lock removed) with a suggested rule put in, loaded by the qc loader."""
    data = yaml.safe_load(open(EXAMPLE_PROTOCOL))
    data.pop("lock")
    data["version"] = 2
    for block, content in protocol_fragment(rule_key, rule).items():
        if isinstance(data.get(block), dict) and block in ("parameters", "image_quality"):
            data[block].update(content)
        else:
            data[block] = content
    path = tmp_path / "suggested.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_protocol(path)


def test_rules_load_as_protocol_rules(coverage, noise, tmp_path):
    rules = 0
    for result in (coverage, noise):
        for row in result.tolerances.itertuples(index=False):
            if not row.rule:
                continue
            rules += 1
            protocol = _with_rule(tmp_path, row.rule_key, row.rule)
            if row.rule_key == "coverage":
                assert protocol.coverage.min_mm == pytest.approx(160.0 - row.largest_within_margin)
            else:
                block, key = row.rule_key.split(".")
                rule = getattr(protocol, block)[key]
                assert rule.kind == "range" and rule.min > 0
                # a scan noisier than tolerated reads a lower SNR and fails; the protocol's own scans pass
                at_protocol = result.scans[result.scans["deviation"] == 0]["snrd_total"].median()
                at_worst = result.scans[result.scans["deviation"] == 3]["snrd_total"].median()
                assert rule.holds(at_protocol)
                if row.largest_within_margin < 3:
                    assert not rule.holds(at_worst)
    assert rules >= 1
    # every kind of rule the sweep writes, for a made-up tolerance, also loads
    from sitebench.datasets.simulator import TrialConfig
    from sitebench.sweep import _rule

    for parameter in ("slice_thickness", "coverage_loss", "contrast", "noise"):
        key, text = _rule(parameter, 1.0, TrialConfig(), 160.0, {1.0: 12.345})
        protocol = _with_rule(tmp_path, key, text)
        assert protocol.name == "ge-t1w-3d"
    slice_rule = _with_rule(tmp_path, *_rule("slice_thickness", 0.8, TrialConfig(), 160.0, {}))
    assert slice_rule.parameters["SliceThickness"].holds(2.8) and not slice_rule.parameters["SliceThickness"].holds(2.9)


def test_result_protocol(coverage):
    frame = coverage.to_frame()
    assert list(frame.columns[:13]) == ["model", "parameter", "level", "deviation", "deviation_label", "n",
                                        "mean_error", "mean_error_lo", "mean_error_hi", "mae", "mae_lo", "mae_hi",
                                        "within_margin"]
    assert frame["level"].tolist()[:3] == [160.0, 150.0, 120.0]  # coverage kept, mm
    data = json.loads(json.dumps(coverage.to_dict()))
    assert data["seed"] == 0 and data["provenance"]["seed"] == 0
    assert "numpy" in data["provenance"]["packages"] and "code_version" in data["provenance"]
    assert data["seconds"]["total"] > 0 and len(data["table"]) == 6
    assert "coverage_loss" in coverage.summary()
    fig = coverage.plot()
    assert fig.axes and fig.axes[0].get_xlabel() == "superior coverage lost (mm)"


def test_section_html_says_it_in_words_and_shows_the_figure(coverage):
    html = sweep_section_html(coverage.table, coverage.tolerances, "ml")
    assert "<img" in html and "data:image/png;base64," in html
    for row in coverage.tolerances.to_dict("records"):
        sentence = tolerance_sentence(row, coverage.margin, "ml")
        assert sentence.replace("'", "&#x27;") in html
    rows = [r for r in coverage.tolerances.to_dict("records") if r["rule"] and r["largest_within_margin"] > 0]
    assert rows, "at least one model tolerates some coverage loss here"
    row = rows[0]
    assert (f"{row['model']} stays within ±50 ml up to {row['largest_within_margin']:g} mm of lost superior "
            f"coverage") in tolerance_sentence(row, 50.0, "ml")
    assert f"suggested rule: {row['rule']}" in tolerance_sentence(row, 50.0, "ml")
    for code in ("mean_error_lo", "within_margin", "largest_within_margin"):
        assert code not in html.split("Criterion:")[0]
    assert plot_error_vs_deviation(coverage.table, 50.0).axes


def test_defaults_are_the_demos():
    assert list(DEFAULT_MODELS) == [m["source"] for m in DEMO_MODELS if m["source"] != DEEPBET_SOURCE]
    assert DEFAULT_MARGIN == DEMO_REPORT["equivalence_margin"]


def test_levels_are_checked():
    assert parse_levels("10,20", "coverage_loss") == [0.0, 10.0, 20.0]
    for text, parameter in (("0,x", "noise"), ("0,5", "coverage_loss"), ("0,-1", "slice_thickness"),
                            ("0,10,10", "noise"), ("0,-100", "contrast"), ("0,500", "coverage_loss")):
        with pytest.raises(SitebenchError):
            parse_levels(text, parameter)
    with pytest.raises(SitebenchError):
        parse_levels("0", "tube_current")


def test_contrast_mapping_follows_the_spgr_equation():
    assert gm_wm_ratio_shift(0.0, 0.58) == 0.0
    # a longer TR lets WM (short T1) recover less than GM relative to its maximum... in a T1w SPGR the
    # GM/WM ratio rises (weaker T1 weighting); a shorter TR lowers it
    assert gm_wm_ratio_shift(50.0, 0.58) > 0 > gm_wm_ratio_shift(-50.0, 0.58)
    assert gm_wm_ratio_shift(100.0, 0.58) > gm_wm_ratio_shift(50.0, 0.58)


def test_cli_sweep_json(tmp_path, capsys):
    code = main(["simulate", "sweep", "--parameter", "coverage_loss", "--levels", "0,30", "--subjects", "3",
                 "--models", "classical", "--bootstrap", "200", "--out", str(tmp_path), "--json",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["parameter"] == "coverage_loss" and data["levels"] == [0.0, 30.0]
    assert [t["model"] for t in data["tolerances"]] == ["gm-tissue-gmm@1.0"]
    assert (tmp_path / "coverage_loss" / "error_vs_deviation.png").stat().st_size > 1000
    assert (tmp_path / "coverage_loss" / "manifest.csv").exists()
    manifest = pd.read_csv(tmp_path / "coverage_loss" / "manifest.csv")
    assert sorted(manifest["sweep_level"].unique()) == [0, 1]
    # the same subjects at every level (paired design)
    assert manifest.groupby("sweep_level")["subject_id"].apply(sorted).map(tuple).nunique() == 1


@pytest.mark.parametrize("argv", [
    ["simulate", "sweep", "--parameter", "noise", "--levels", "0,lots"],
    ["simulate", "sweep", "--parameter", "coverage_loss", "--levels", "0,5"],
    ["simulate", "--seed", "3", "sweep", "--parameter", "noise"],
])
def test_cli_bad_input_is_one_line(argv, tmp_path, capsys):
    code = main(argv + (["--out", str(tmp_path)] if argv[1] == "sweep" else []))
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sitebench: error:"), captured.err
    assert "Traceback" not in captured.err


def test_plain_simulate_still_works(tmp_path, capsys):
    out = tmp_path / "trial"
    code = main(["simulate", "--out", str(out), "--sites", "1", "--scans-per-site", "1", "--workers", "1",
                 "--no-progress"])
    assert code == 0
    assert (out / "manifest.csv").exists() and (out / "truth.json").exists()
    assert "truth:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # --out is still required without 'sweep'
        main(["simulate"])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err
