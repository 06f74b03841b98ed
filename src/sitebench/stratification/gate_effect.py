"""What the upload-time QC gate changed: the biomarker's error with and without the scans it failed.

A gate that fails scans protects the analysis only if those scans would have hurt it. The
question a biostatistician asks ("what did site 12's coverage failures do to the biomarker?")
is answered by scoring the failed series too and comparing, per model version and biomarker,
the error on the scans the gate kept with the error on those plus the failed ones: overall and
per site (the site's mean error is its site effect), with the between-site spread of the site
effects. Every number comes from :func:`~sitebench.stratification.metrics.stratum_metrics`
(MAE and bias with the same percentile bootstrap as the rest of the report), so the two sides
are estimated alike; the difference is descriptive, not a test (the failed scans were not
sampled at random: they are the ones the gate stopped).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sitebench.stratification.metrics import OVERALL, stratum_metrics

#: Columns of :func:`gate_effect` (``tables/gate_effect.csv``).
GATE_EFFECT_COLUMNS: tuple[str, ...] = (
    "model_key", "biomarker", "stratum", "level", "n_failed",
    "n_kept", "mae_kept", "mae_kept_ci_low", "mae_kept_ci_high", "bias_kept",
    "n_all", "mae_all", "mae_all_ci_low", "mae_all_ci_high", "bias_all", "mae_change")
SIDES = (("kept", "the scans the gate passed"), ("all", "those and the scans it failed"))


def _side(table: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """MAE (with CI) and bias overall and per site, wide: one row per (stratum, level)."""
    metrics = stratum_metrics(table, prediction="prediction", reference="reference", strata=("site",), dice=None,
                              n_boot=n_boot, seed=seed).to_frame()
    metrics = metrics[metrics["metric"].isin(["mae", "bias"])]
    wide = metrics.set_index(["stratum", "level", "metric"])[["estimate", "ci_low", "ci_high"]].unstack("metric")
    out = pd.DataFrame({"mae": wide[("estimate", "mae")], "mae_ci_low": wide[("ci_low", "mae")],
                        "mae_ci_high": wide[("ci_high", "mae")], "bias": wide[("estimate", "bias")]})
    out["n"] = metrics.drop_duplicates(["stratum", "level"]).set_index(["stratum", "level"])["n_scans"]
    return out


def _named(metric: str, side: str) -> str:
    """``mae_ci_low`` on side ``kept`` is the column ``mae_kept_ci_low``."""
    name, _, ci = metric.partition("_ci_")
    return f"{name}_{side}_ci_{ci}" if ci else f"{name}_{side}"


def gate_effect(kept: pd.DataFrame, failed: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per model version and biomarker: error on the kept scans against error on kept plus failed scans.

    ``kept`` and ``failed`` are evaluation tables (``evaluation_table``: one row per scan and
    model, with ``prediction``, ``reference``, ``site``). Rows are overall, each site, and a
    ``site_bias_sd`` row (the standard deviation of the per-site mean errors: how far apart the
    sites are) per model version; sites without failed scans are the same on both sides.
    """
    rows = []
    group = ["model_key", "biomarker"] if "biomarker" in kept else ["model_key"]
    keys = list(dict.fromkeys(map(tuple, failed[group].astype(str).values))) if len(failed) else []
    for key in keys:
        def part(table: pd.DataFrame) -> pd.DataFrame:
            mask = np.logical_and.reduce([table[g].astype(str) == k for g, k in zip(group, key)])
            return table[mask]

        kept_part, failed_part = part(kept), part(failed)
        if kept_part.empty:
            continue
        with_failed = pd.concat([kept_part, failed_part], ignore_index=True)
        a, b = _side(kept_part, n_boot, seed), _side(with_failed, n_boot, seed)
        n_failed = failed_part.groupby("site").size()
        for stratum, level in b.index:
            ka = a.loc[(stratum, level)] if (stratum, level) in a.index else None
            kb = b.loc[(stratum, level)]
            rows.append({"model_key": key[0], "biomarker": key[1] if len(key) > 1 else "",
                         "stratum": stratum, "level": level,
                         "n_failed": int(len(failed_part) if stratum == OVERALL else n_failed.get(level, 0)),
                         **{_named(m, "kept"): (ka[m] if ka is not None else np.nan)
                            for m in ("mae", "mae_ci_low", "mae_ci_high", "bias")},
                         "n_kept": int(ka["n"]) if ka is not None and pd.notna(ka["n"]) else 0,
                         **{_named(m, "all"): kb[m] for m in ("mae", "mae_ci_low", "mae_ci_high", "bias")},
                         "n_all": int(kb["n"]) if pd.notna(kb["n"]) else 0})
        sd = {name: float(np.nanstd(side.xs("site", level="stratum")["bias"], ddof=1))
              if (side.index.get_level_values("stratum") == "site").sum() > 1 else np.nan
              for name, side in (("kept", a), ("all", b))}
        rows.append({"model_key": key[0], "biomarker": key[1] if len(key) > 1 else "", "stratum": "site_bias_sd",
                     "level": "between sites", "n_failed": int(len(failed_part)), "bias_kept": sd["kept"],
                     "bias_all": sd["all"], "n_kept": int(len(kept_part)), "n_all": int(len(with_failed))})
    out = pd.DataFrame(rows, columns=[c for c in GATE_EFFECT_COLUMNS if c != "mae_change"])
    out["mae_change"] = out["mae_all"] - out["mae_kept"]
    return out[list(GATE_EFFECT_COLUMNS)]
