"""The report's first page: every pre-specified decision, read off the :class:`Evaluation`, in plain words.

Nothing here computes a statistic: each number is a cell of a locked result table (or of the
mixed-model record), so the summary page and ``tables/*.csv`` cannot disagree. The function is
pure (no HTML), so a test can check the decisions without rendering a report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from sitebench.reports.content import biomarker_label, evaluation_for, frame, only
from sitebench.reports.tables import fmt_ci, fmt_p, fmt_value
from sitebench.stratification.evaluation import ERROR, MODEL_KEY, Evaluation

__all__ = ["Decision", "decisions", "MET", "NOT_MET"]

MET, NOT_MET = "met", "not met"
UPGRADE_TERM = "software_upgraded"


@dataclass(frozen=True)
class Decision:
    """One pre-specified question and its answer, as a sentence a reader can check against a table."""

    topic: str  # "Equivalence across sites", "Version comparison", ...
    model: str  # the model version (or "B vs A") the decision is about
    claim: str  # what is claimed, in words
    criterion: str  # the pre-specified margin / alpha / test
    result: str  # "met", "not met", or a plain finding ("no change shown")
    estimate: float | None = None
    ci: tuple[float, float] | None = None
    ci_label: str = "95% CI"
    detail: str = ""
    section: str = ""  # the report section that shows the table behind it
    unit: str = ""  # the estimate's unit ("" for an AUC difference)
    prespecified: bool = True  # False for a pointer chosen from the results (the worst site), not a planned test
    kind: str = "num"  # how the estimate is rounded (see reports.tables.fmt_value)

    @property
    def met(self) -> bool | None:
        """True/False for a decision against a pre-specified margin, None for a finding."""
        return {MET: True, NOT_MET: False}.get(self.result)

    def number(self) -> str:
        """The estimate with its CI, e.g. ``-7.5 ml (90% CI -10.9 to -4.4)``."""
        kind, unit = self.kind, self.unit
        if self.estimate is None or pd.isna(self.estimate):
            return "not estimable"
        text = f"{fmt_value(self.estimate, kind)}{' ' + unit if unit else ''}"
        if self.ci is not None and not any(pd.isna(v) for v in self.ci):
            low, high = fmt_ci(*self.ci, kind=kind)[1:-1].split(", ")
            text += f" ({self.ci_label} {low} to {high})"
        elif self.ci is not None:
            text += f" ({self.ci_label} not estimable)"
        return text


def decisions(evaluation: Evaluation, unit: str = "ml", biomarkers: list[dict[str, Any]] | None = None,
              overlap: pd.DataFrame | None = None) -> list[Decision]:
    """Each pre-specified decision of ``evaluation``, in the order the summary page lists them.

    With declared ``biomarkers`` (default: the plan's), the continuous decisions come once per continuous
    biomarker in its unit, then each classification biomarker's AUC, sensitivity and specificity at its
    threshold, then the mean Dice of each segmentation label (``overlap``: the per-stratum overlap table,
    default the evaluation's). Without biomarkers: one legacy biomarker in ``unit``, as ever.
    """
    markers = list(biomarkers if biomarkers is not None else getattr(evaluation.plan, "biomarkers", None) or [])
    if not markers:
        return _single(evaluation, unit)
    out: list[Decision] = []
    for marker in markers:
        if (marker.get("analysis") or "continuous") != "continuous":
            continue
        label = biomarker_label(marker)
        for d in _single(evaluation_for(evaluation, marker, markers), marker.get("unit") or ""):
            out.append(replace(d, topic=f"{label}: {d.topic}"))
    for marker in markers:
        if marker.get("analysis") == "classification":
            out += _classification(evaluation, marker)
    if overlap is None:
        overlap = frame(evaluation, "overlap_by_stratum")
    out += _overlap(overlap)
    return out


def _single(evaluation: Evaluation, unit: str) -> list[Decision]:
    out: list[Decision] = []
    models = list(dict.fromkeys(evaluation.table[MODEL_KEY]))
    out += _equivalence(evaluation, models, unit)
    out += _comparisons(evaluation, unit)
    out += _upgrade(evaluation, models, unit)
    out += _worst_sites(evaluation, models, unit)
    return [replace(d, unit=unit) if d.kind == "num" else d for d in out]


def _equivalence(ev: Evaluation, models: list[str], unit: str) -> list[Decision]:
    margin, alpha = ev.plan.equivalence_margin, ev.plan.alpha
    if margin is None or ev.equivalence.empty:
        return [Decision("Equivalence across sites", "all versions", "Every site's mean error is within a margin "
                         "of the other sites'.", "no margin pre-specified", "not assessed",
                         detail="No equivalence margin was pre-specified, so no equivalence decision is made.",
                         section="results-equivalence")]
    level = f"{100 * (1 - 2 * alpha):g}% CI"
    out = []
    for key in models:
        part = ev.equivalence[ev.equivalence[MODEL_KEY] == key]
        if part.empty:
            continue
        met = _true(part["all_within_margin"].iloc[0])
        failing = part[~part["equivalent_holm"].map(_true)]
        worst = part.loc[part["difference"].abs().idxmax()] if part["difference"].notna().any() else part.iloc[0]
        if failing.empty:
            detail = f"All {len(part)} sites within ±{margin:g} {unit} (Holm)."
        else:
            detail = (f"{len(part) - len(failing)} of {len(part)} sites within ±{margin:g} {unit} (Holm); not "
                      f"shown: {', '.join(str(s) for s in failing['site'])}.")
        out.append(Decision(
            "Equivalence across sites", key,
            f"Every site's mean error is within ±{margin:g} {unit} of the other sites'.",
            f"±{margin:g} {unit}; two one-sided tests per site at alpha {alpha:g}; all sites by intersection–union",
            MET if met else NOT_MET, estimate=_f(worst["difference"]), ci=(_f(worst["ci_low"]), _f(worst["ci_high"])),
            ci_label=level, detail=f"Estimate: the largest site difference from the other sites ({worst['site']}). "
                                   f"{detail}",
            section="results-equivalence"))
    return out


def _comparisons(ev: Evaluation, unit: str) -> list[Decision]:
    out: list[Decision] = []
    table, auc, plan = ev.comparison, ev.discrimination, ev.plan
    if table.empty:
        return [Decision("Version comparison", "-", "Is a new version's error within a margin of the old one's?",
                         "no pair of versions named for comparison", "not assessed",
                         detail="The benchmark spec names no versions to compare (report.compare).",
                         section="comparison")]
    margin, alpha = plan.comparison_margin, plan.alpha
    for (a, b), part in table.groupby(["model_a", "model_b"], sort=False):
        pair = f"{b} vs {a}"
        overall = part[part["level"] == "overall"]
        sites = part[part["level"] != "overall"]
        row = overall.iloc[0] if len(overall) else part.iloc[-1]
        if margin is not None:
            met = _true(row["equivalent"])
            within = int(sites["equivalent_holm"].map(_true).sum())
            every = bool(len(sites)) and bool((sites["estimable"].map(_true) & sites["equivalent"].map(_true)).all())
            out.append(Decision(
                "Version comparison", pair,
                f"{b}'s absolute error is within ±{margin:g} {unit} of {a}'s on the same scans.",
                f"±{margin:g} {unit}; paired two one-sided tests at alpha {alpha:g}",
                MET if met else NOT_MET, estimate=_f(row["difference"]),
                ci=(_f(row["tost_ci_low"]), _f(row["tost_ci_high"])), ci_label=f"{100 * (1 - 2 * alpha):g}% CI",
                detail=(f"Difference = {b} − {a} in mean absolute error over {int(row['n_pairs'])} paired scans "
                        f"(negative favours {b}); p (TOST) {fmt_p(row['p_tost'])}. Per site: {within} of "
                        f"{len(sites)} within the margin after Holm; every site within: "
                        f"{'yes' if every else 'no'}."),
                section="comparison"))
        else:
            shown = _f(row["ci_low"]) is not None and not (row["ci_low"] <= 0 <= row["ci_high"])
            out.append(Decision(
                "Version comparison", pair, f"{b} and {a} differ in absolute error on the same scans.",
                f"paired t-test at alpha {alpha:g} (no equivalence margin pre-specified)",
                "difference shown" if shown else "no difference shown", estimate=_f(row["difference"]),
                ci=(_f(row["ci_low"]), _f(row["ci_high"])),
                detail=f"p {fmt_p(row['p'])}, Wilcoxon p {fmt_p(row['p_wilcoxon'])}.", section="comparison"))
        if not auc.empty and plan.endpoint is not None:
            rows = auc[(auc["model_a"] == a) & (auc["model_b"] == b)]
            rows = rows[rows["level"] == "overall"] if (rows["level"] == "overall").any() else rows
            if rows.empty:
                continue
            r = rows.iloc[0]
            ep = plan.endpoint
            ok = str(r.get("status", "ok")) == "ok"
            shown = ok and _f(r["p"]) is not None and float(r["p"]) < alpha
            out.append(Decision(
                "Endpoint discrimination", pair,
                f"Does {b} discriminate {ep.column} = {ep.positive} differently from {a} (AUC)?",
                f"paired DeLong test at alpha {alpha:g}",
                ("difference shown" if shown else "no difference shown") if ok else "not estimable",
                estimate=_f(r["difference"]) if ok else None, ci=(_f(r["ci_low"]), _f(r["ci_high"])), kind="auc",
                detail=(f"AUC {fmt_value(r['auc_a'], 'auc')} ({a}) and {fmt_value(r['auc_b'], 'auc')} ({b}) "
                        f"over {int(r['n'])} scans; p {fmt_p(r['p'])}." if ok else
                        f"Not estimable: {r.get('reason', '')}"),
                section="comparison"))
    return out


def _upgrade(ev: Evaluation, models: list[str], unit: str) -> list[Decision]:
    out: list[Decision] = []
    if ev.upgrade.empty:
        return [Decision("Software upgrade", "all versions", "Did the error change after a scanner software change?",
                         "within-site Welch test", "not assessed",
                         detail="No site changed its scanner software during this study.", section="results-upgrade")]
    sites = ev.upgrade.sort_values("site", kind="stable")
    for r in sites.itertuples(index=False):  # one group per upgraded site, a row per version
        d = r._asdict()
        ci = (_f(d.get("ci_low")), _f(d.get("ci_high")))
        out.append(Decision(
            "Software upgrade", str(d[MODEL_KEY]),
            f"Did the error change after the scanner software change at site {d['site']}?",
            "within-site Welch 95% CI of after − before", _change(ci), estimate=_f(d["difference"]), ci=ci,
            detail=(f"{int(d['n_before'])} scans before, {int(d['n_after'])} after"
                    + (f"; {d['note']}" if isinstance(d.get("note"), str) and d["note"] else "") + "."),
            section="results-upgrade"))
    for key in models:
        term = _mixed_term(ev.mixed, key, ERROR, UPGRADE_TERM)
        if term is None:
            continue
        ci = (_f(term.get("ci_low")), _f(term.get("ci_high")))
        df = _f(term.get("df"))
        out.append(Decision(
            "Software upgrade", key, "Across all sites, did the error change after a scanner software change?",
            "upgrade term of the mixed model of the error, 95% CI", _change(ci), estimate=_f(term.get("estimate")),
            ci=ci, detail=f"p {fmt_p(term.get('p'))}" + (f", {fmt_value(df, 'ratio')} df" if df is not None else "")
            + ".", section="results-variance"))
    return out


def _worst_sites(ev: Evaluation, models: list[str], unit: str) -> list[Decision]:
    """Per model, the site a reader should look at first: failing equivalence first, then the largest bias."""
    out = []
    metrics = ev.metrics
    bias = metrics[(metrics["stratum"] == "site") & (metrics["metric"] == "bias")]
    margin = ev.plan.equivalence_margin
    for key in models:
        part = bias[(bias[MODEL_KEY] == key) & bias["estimable"].map(_true) & bias["estimate"].notna()]
        if part.empty:
            continue
        eq = ev.equivalence[ev.equivalence[MODEL_KEY] == key] if not ev.equivalence.empty else pd.DataFrame()
        failing = set(eq.loc[~eq["equivalent_holm"].map(_true), "site"]) if len(eq) else set()
        candidates = part[part["level"].isin(failing)] if failing else part
        if candidates.empty:
            candidates = part
        row = candidates.loc[candidates["estimate"].astype(float).abs().idxmax()]
        site = row["level"]
        if margin is not None and len(eq):
            result = f"{site}: not shown within ±{margin:g} {unit}" if site in failing else f"{site}: within margin"
        else:
            result = str(site)
        out.append(Decision(
            "Worst site", key, "Which site should a reader look at first?",
            "the largest |mean error| among sites not shown equivalent (else among all sites)", result,
            prespecified=False,
            estimate=_f(row["estimate"]), ci=(_f(row["ci_low"]), _f(row["ci_high"])),
            detail=f"Mean error (model − reference) at {site} over {int(row['n_scans'])} scans, bootstrap 95% CI.",
            section="results-strata"))
    return out


def _classification(ev: Evaluation, marker: dict[str, Any]) -> list[Decision]:
    """A classification biomarker's headline: overall AUC (DeLong CI), and sensitivity/specificity at its threshold."""
    name = str(marker["name"])
    rows = only(frame(ev, "classification"), name)
    column, positive, threshold = (marker.get("reference_column"), marker.get("reference_positive"),
                                   marker.get("threshold"))
    target = f"{column} = {positive}" if column and positive is not None else column or "the reference class"
    topic = f"{name}: discrimination"
    criterion = "AUC with DeLong 95% CI" + (f"; sensitivity and specificity at the pre-specified threshold "
                                            f"{threshold:g}" if threshold is not None else "")
    if rows.empty or "metric" not in rows:
        return [Decision(topic, "all versions", f"How well does the probability discriminate {target}?", criterion,
                         "not assessed", detail="No classification results were computed for this biomarker.",
                         section="results-classification", kind="auc")]
    out = []
    overall = rows[rows["stratum"] == "overall"]
    for key in dict.fromkeys(rows[MODEL_KEY]):
        part = overall[overall[MODEL_KEY] == key].set_index("metric")
        if "auc" not in part.index:
            continue
        auc = part.loc["auc"]
        ok = not pd.isna(auc["estimate"])
        detail = f"{_int(auc.get('n_positive'))} positive and {_int(auc.get('n_negative'))} negative scans"
        for metric in ("sensitivity", "specificity"):
            if metric in part.index:
                r = part.loc[metric]
                detail += (f"; {metric} {fmt_value(r['estimate'], 'auc')} "
                           f"{fmt_ci(r['ci_low'], r['ci_high'], 'auc')}" if not pd.isna(r["estimate"]) else
                           f"; {metric} not estimable")
        if threshold is not None and ("sensitivity" in part.index or "specificity" in part.index):
            detail += f" at threshold {threshold:g}"
        detail += "." if ok else f". Not estimable: {auc.get('reason', '')}."
        out.append(Decision(topic, str(key), f"How well does the probability discriminate {target} (AUC)?",
                            criterion, "estimated" if ok else "not estimable",
                            estimate=_f(auc["estimate"]) if ok else None,
                            ci=(_f(auc["ci_low"]), _f(auc["ci_high"])), detail=detail,
                            section="results-classification", kind="auc"))
    paired = only(ev.discrimination, name) if "biomarker" in ev.discrimination else pd.DataFrame()
    if len(paired) and {"model_a", "model_b", "auc_a", "auc_b", "difference"} <= set(paired.columns):
        alpha = ev.plan.alpha
        for (a, b), part in paired.groupby(["model_a", "model_b"], sort=False):
            rows_ = part[part["level"] == "overall"] if (part["level"] == "overall").any() else part
            r = rows_.iloc[0]
            ok = str(r.get("status", "ok")) == "ok"
            shown = ok and _f(r.get("p")) is not None and float(r["p"]) < alpha
            out.append(Decision(
                f"{name}: version comparison", f"{b} vs {a}",
                f"Does {b} discriminate {target} differently from {a} (AUC)?", f"paired DeLong test at alpha {alpha:g}",
                ("difference shown" if shown else "no difference shown") if ok else "not estimable",
                estimate=_f(r["difference"]) if ok else None, ci=(_f(r.get("ci_low")), _f(r.get("ci_high"))),
                kind="auc", section="results-classification",
                detail=(f"AUC {fmt_value(r['auc_a'], 'auc')} ({a}) and {fmt_value(r['auc_b'], 'auc')} ({b}) over "
                        f"{_int(r.get('n'))} scans; p {fmt_p(r.get('p'))}." if ok else
                        f"Not estimable: {r.get('reason', '')}")))
    return out


def _overlap(overlap: pd.DataFrame) -> list[Decision]:
    """Each segmentation label's mean Dice over all scans, per version, with its CI, HD95 and volume error."""
    if overlap is None or overlap.empty or "dice_mean" not in overlap:
        return []
    rows = overlap[overlap["stratum"] == "overall"] if "stratum" in overlap else overlap
    out = []
    keys = [k for k in ("biomarker", "label") if k in rows]
    for group, part in rows.groupby(keys, sort=False) if keys else [((), rows)]:
        group = group if isinstance(group, tuple) else (group,)
        values = dict(zip(keys, group))
        name = str(part["label_name"].dropna().iloc[0]) if "label_name" in part and part["label_name"].notna().any() \
            else f"label {values.get('label')}"
        for r in part.itertuples(index=False):
            d = r._asdict()
            hd = d.get("hd95_median_mm")
            err = d.get("volume_error_mean_ml")
            detail = f"Over {_int(d.get('n_scans'))} scans"
            if _f(hd) is not None:
                detail += f"; HD95 median {fmt_value(hd, 'ratio')} mm"
            if _f(err) is not None:
                detail += f"; mean volume error {fmt_value(err, 'ratio')} ml"
            ci = (_f(d.get("dice_ci_low")), _f(d.get("dice_ci_high")))
            out.append(Decision(f"Segmentation overlap: {name}", str(d[MODEL_KEY]),
                                f"How well does the segmentation of {name} overlap the reference (mean Dice)?",
                                "mean Dice over scans with its 95% CI (1 is perfect)", "estimated",
                                estimate=_f(d.get("dice_mean")), ci=ci if ci != (None, None) else None,
                                detail=detail + ".", section="results-overlap", kind="auc"))
    return out


def _int(value: Any) -> str:
    return fmt_value(value, "int")


def _mixed_term(mixed: list[dict[str, Any]], key: str, response: str, term: str) -> dict[str, Any] | None:
    for fit in mixed:
        if fit.get(MODEL_KEY) == key and fit.get("response") == response:
            return (fit.get("fixed_effects") or {}).get(term)
    return None


def _change(ci: tuple[float | None, float | None]) -> str:
    low, high = ci
    if low is None or high is None:
        return "not estimable"
    return "no change shown" if low <= 0 <= high else "changed"


def _f(value: Any) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if pd.isna(v) else v


def _true(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and not pd.isna(value)
