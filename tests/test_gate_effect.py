"""The report's 'what the gate changed' numbers and the gate-record frames, against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sitebench.reports.coverage import GateRows
from sitebench.reports.qc_summary import qc_summary, rescan_frame
from sitebench.stratification.gate_effect import GATE_EFFECT_COLUMNS, gate_effect


def _table(rng: np.random.Generator, sites: dict[str, int], shift: float = 0.0, tag: str = "k") -> pd.DataFrame:
    rows = []
    for site, n in sites.items():
        for i in range(n):
            reference = float(rng.normal(600, 40))
            rows.append({"scan_id": f"{tag}{site}{i}", "subject_id": f"{tag}{site}{i}", "site": site,
                         "model_key": "m@1", "biomarker": "gm_volume_ml", "reference": reference,
                         "prediction": reference + float(rng.normal(5 + shift, 10))})
    return pd.DataFrame(rows)


def test_with_and_without_the_failed_scans_match_a_hand_computation():
    rng = np.random.default_rng(3)
    kept = _table(rng, {"S01": 6, "S02": 6, "S03": 5})
    failed = _table(rng, {"S03": 4}, shift=-60.0, tag="f")  # short-coverage scans: volumes under-measured
    effect = gate_effect(kept, failed, n_boot=200, seed=0)
    assert list(effect.columns) == list(GATE_EFFECT_COLUMNS)
    both = pd.concat([kept, failed])
    for side, table in (("kept", kept), ("all", both)):
        error = table["prediction"] - table["reference"]
        overall = effect[effect["stratum"] == "overall"].iloc[0]
        assert overall[f"mae_{side}"] == pytest.approx(error.abs().mean())
        assert overall[f"bias_{side}"] == pytest.approx(error.mean())
        assert overall[f"mae_{side}_ci_low"] <= overall[f"mae_{side}"] <= overall[f"mae_{side}_ci_high"]
        per_site = error.groupby(table["site"]).mean()
        rows = effect[effect["stratum"] == "site"].set_index("level")
        assert rows[f"bias_{side}"].to_dict() == pytest.approx(per_site.to_dict())
        spread = effect[effect["stratum"] == "site_bias_sd"].iloc[0]
        assert spread[f"bias_{side}"] == pytest.approx(per_site.std(ddof=1))
    s03 = effect[(effect["stratum"] == "site") & (effect["level"] == "S03")].iloc[0]
    assert (s03["n_failed"], s03["n_kept"], s03["n_all"]) == (4, 5, 9)
    assert s03["bias_all"] < s03["bias_kept"] - 20  # the failed scans pull the site's mean error down
    s01 = effect[(effect["stratum"] == "site") & (effect["level"] == "S01")].iloc[0]
    assert s01["n_failed"] == 0 and s01["mae_change"] == 0


def test_no_failed_scans_is_an_empty_comparison():
    kept = _table(np.random.default_rng(0), {"S01": 4})
    assert gate_effect(kept, kept.iloc[:0]).empty


def _verdict(vid: int, series: str, status: str, minute: int, study: str = "st1") -> dict:
    return {"id": vid, "series_key": series, "site": "S12", "study_key": study, "scanner": "scanner-1",
            "protocol": "t1", "status": status, "checked_utc": f"2026-03-01T10:{minute:02d}:00+00:00",
            "phi_attributes_present": ["PatientName"], "software_version": "E11"}


def test_rescans_pair_each_series_with_the_one_it_repeats_and_time_it():
    verdicts = [_verdict(1, "a", "fail", 0), _verdict(2, "b", "pass", 1, "st2"), _verdict(3, "c", "fail", 30),
                _verdict(4, "d", "pass", 45)]
    frame = rescan_frame(verdicts)
    assert frame[["original_series", "rescan_series"]].values.tolist() == [["a", "c"], ["c", "d"]]
    assert frame["minutes_to_rescan"].tolist() == [30.0, 15.0]


def test_qc_summary_from_gate_rows_exports_verdicts_and_resolves_deviations():
    verdicts = [_verdict(1, "a", "fail", 0), _verdict(2, "b", "pass", 20)]
    deviations = [{"verdict_id": 1, "parameter": "SliceCoverageMM", "expected": ">= 152 mm", "observed": 140,
                   "rule": "coverage", "severity": "fail"}]
    status = [{"site": "S12", "series": 2, "passed": 1, "warned": 0, "failed": 1, "undetermined": 0,
               "unmatched": 0, "open_deviations": 0, "drift_events": 0, "rescans": 1, "rescan_rate": 0.5,
               "rejected_files": 0}]
    summary = qc_summary(pd.DataFrame({"site": ["S12"], "software_version": ["E11"]}),
                         GateRows(drift_events=[], latest_verdicts=verdicts, source="test", site_status=status,
                                  deviations=deviations))
    assert summary.from_gate and set(summary.tables()) >= {"qc_by_site", "qc_verdicts", "qc_deviations",
                                                           "qc_rescans", "qc_drift_events", "qc_revalidation"}
    assert summary.verdicts["deviations"].tolist() == [1, 0]
    assert summary.verdicts["phi_attributes_present"].tolist() == ["PatientName"] * 2  # names, never values
    assert summary.deviations["resolved_by_rescan"].tolist() == [True]
    assert summary.table["median_minutes_to_rescan"].tolist() == [20.0]
    assert summary.table["revalidation"].tolist() == [""]
