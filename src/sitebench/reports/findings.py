"""The report's findings: plain sentences read off one run's own numbers (nothing is written in advance).

They live with the report because they are report content; the pipeline only passes
the model cards it scored and the :class:`Evaluation` it derived.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from sitebench.datasets import manifest as mf
from sitebench.models.base import ModelCard
from sitebench.reports.content import biomarker_label, evaluation_for, frame, only
from sitebench.stratification.evaluation import REFERENCE_KEY, Evaluation

__all__ = ["findings"]


def _metric(metrics: pd.DataFrame, model: str, stratum: str, level: str, metric: str) -> pd.Series | None:
    rows = metrics[(metrics["model_key"] == model) & (metrics["stratum"] == stratum) &
                   (metrics["level"].astype(str) == str(level)) & (metrics["metric"] == metric)]
    if rows.empty or not bool(rows["estimable"].iloc[0]):
        return None
    return rows.iloc[0]


def _fmt(row: pd.Series | None) -> str:
    if row is None:
        return "not estimable"
    if pd.isna(row["ci_low"]):
        return f"{row['estimate']:.3g}"
    return f"{row['estimate']:.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}]"


def findings(models: Sequence[ModelCard], evaluation: Evaluation,
             biomarkers: list[dict[str, Any]] | None = None) -> list[str]:
    """Plain sentences on each model version's error by vendor, augmentation, upgrades, covariates, worst site.

    With declared ``biomarkers`` (default: the plan's) the sentences come per continuous biomarker in its unit,
    then each classification biomarker's overall AUC, and each segmentation label's mean Dice.
    """
    markers = list(biomarkers if biomarkers is not None else getattr(evaluation.plan, "biomarkers", None) or [])
    if not markers:
        return _continuous(models, evaluation, "ml")
    notes: list[str] = []
    for marker in markers:
        if (marker.get("analysis") or "continuous") == "continuous":
            prefix = f"{biomarker_label(marker)}: "
            part = evaluation_for(evaluation, marker, markers)
            present = set(part.table["model_key"]) if "model_key" in part.table else set()
            scored = [card for card in models if card.key in present]  # a model may give other biomarkers only
            notes += [prefix + n for n in _continuous(scored, part, marker.get("unit") or "")]
    for marker in markers:
        if marker.get("analysis") == "classification":
            notes += _classification_findings(evaluation, marker)
    notes += _overlap_findings(frame(evaluation, "overlap_by_stratum"))
    return notes


def _classification_findings(evaluation: Evaluation, marker: dict[str, Any]) -> list[str]:
    rows = only(frame(evaluation, "classification"), str(marker["name"]))
    if rows.empty or "metric" not in rows:
        return []
    overall = rows[(rows["stratum"] == "overall")]
    target = marker.get("reference_column") or "the reference class"
    if marker.get("reference_positive") is not None:
        target += f" = {marker['reference_positive']}"
    notes = []
    for key in dict.fromkeys(overall["model_key"]):
        part = overall[overall["model_key"] == key].set_index("metric")
        if "auc" not in part.index:
            continue
        text = f"{marker['name']}: {key} discriminates {target} with AUC {_fmt(_estimated(part.loc['auc']))}"
        threshold = marker.get("threshold")
        extra = [f"{m} {_fmt(_estimated(part.loc[m]))}" for m in ("sensitivity", "specificity") if m in part.index]
        if extra:
            text += f"; at threshold {threshold:g}: " if threshold is not None else "; "
            text += ", ".join(extra)
        sites = rows[(rows["model_key"] == key) & (rows["stratum"] == "site") & (rows["metric"] == "auc")]
        sites = sites[sites["estimate"].notna()]
        if len(sites) > 1:
            low = sites.loc[sites["estimate"].astype(float).idxmin()]
            text += f"; lowest site AUC at {low['level']}, {_fmt(low)}"
        notes.append(text + " (95% CIs).")
    return notes


def _overlap_findings(overlap: pd.DataFrame) -> list[str]:
    if overlap.empty or "dice_mean" not in overlap:
        return []
    rows = overlap[overlap["stratum"] == "overall"] if "stratum" in overlap else overlap
    notes = []
    for r in rows.itertuples(index=False):
        d = r._asdict()
        name = d.get("label_name") if isinstance(d.get("label_name"), str) and d.get("label_name") \
            else f"label {d.get('label')}"
        dice = f"{d['dice_mean']:.3g}"
        if d.get("dice_ci_low") is not None and not pd.isna(d.get("dice_ci_low")):
            dice += f" [{d['dice_ci_low']:.3g}, {d['dice_ci_high']:.3g}]"
        text = f"Segmentation of {name}: {d['model_key']} has mean Dice {dice}"
        if d.get("hd95_median_mm") is not None and not pd.isna(d.get("hd95_median_mm")):
            text += f", HD95 median {d['hd95_median_mm']:.3g} mm"
        notes.append(text + ".")
    return notes


def _estimated(row: pd.Series) -> pd.Series | None:
    return None if pd.isna(row["estimate"]) else row


def _continuous(models: Sequence[ModelCard], evaluation: Evaluation, unit: str) -> list[str]:
    metrics = evaluation.metrics
    vendors = sorted(evaluation.table[mf.VENDOR].unique())
    notes = []
    for card in models:
        per_vendor = ", ".join(f"{v} {_fmt(_metric(metrics, card.key, 'vendor', v, 'mae'))}" for v in vendors)
        training = card.training
        lead = card.key
        if training and training.vendor:
            lead += (f" (trained on {training.vendor} only"
                     f"{', with cross-vendor augmentation' if training.augmentation else ''})")
        notes.append(f"{lead}: MAE by vendor ({unit}, 95% CI): {per_vendor}.")
    trained = [c for c in models if c.training and c.training.vendor]
    base = next((c for c in trained if not c.training.augmentation), None)  # type: ignore[union-attr]
    aug = next((c for c in trained if c.training.augmentation), None)  # type: ignore[union-attr]
    if base and aug:
        home = base.training.vendor  # type: ignore[union-attr]
        for v in vendors:
            if str(v).casefold() == str(home).casefold():
                continue
            a, b = _metric(metrics, base.key, "vendor", v, "mae"), _metric(metrics, aug.key, "vendor", v, "mae")
            if a is None or b is None:
                continue
            verdict = "lower" if b["estimate"] < a["estimate"] else "higher"
            separated = b["ci_high"] < a["ci_low"] or b["ci_low"] > a["ci_high"]
            notes.append(f"At {v} (unseen in training), the augmented {aug.key} has {verdict} MAE than "
                         f"{base.key}: {b['estimate']:.3g} vs {a['estimate']:.3g} {unit}"
                         f"{' (CIs do not overlap)' if separated else ' (CIs overlap)'}.")
    for row in evaluation.upgrade.itertuples(index=False):
        row_d = row._asdict()
        if row_d.get("difference") is None or pd.isna(row_d.get("difference")):
            continue
        ci = (f"95% CI {row_d['ci_low']:.3g} to {row_d['ci_high']:.3g}" if not pd.isna(row_d.get("ci_low"))
              else "CI not estimable with so few scans")
        notes.append(f"{row_d['model_key']} at site {row_d['site']}: error changed by {row_d['difference']:.3g} {unit} "
                     f"after the software change ({row_d['n_before']} scans before, {row_d['n_after']} after; {ci}).")
    notes += _covariate_findings(evaluation.mixed, unit)
    worst = metrics[(metrics["stratum"] == "site") & (metrics["metric"] == "bias") & metrics["estimable"]]
    if not worst.empty:
        row = worst.loc[worst["estimate"].astype(float).abs().idxmax()]
        notes.append(f"Largest site bias: {row['model_key']} at site {row['level']}, {_fmt(row)} {unit}.")
    return notes


def _covariate_findings(mixed: list[dict[str, Any]], unit: str = "ml") -> list[str]:
    """Does each model reproduce the reference's covariate effects (age, group)? Read off the mixed fits."""
    reference = next((m for m in mixed if m["model_key"] == REFERENCE_KEY), None)
    if reference is None:
        return []
    notes = []
    for term, effect in reference["fixed_effects"].items():
        if not (term == mf.AGE or term.startswith(f"C({mf.GROUP})")):
            continue
        parts = [f"reference {effect['estimate']:.3g} [{effect['ci_low']:.3g}, {effect['ci_high']:.3g}]"]
        for fit in mixed:
            if fit["response"] == "prediction" and term in fit["fixed_effects"]:
                e = fit["fixed_effects"][term]
                inside = e["ci_low"] <= effect["estimate"] <= e["ci_high"]
                parts.append(f"{fit['model_key']} {e['estimate']:.3g} [{e['ci_low']:.3g}, {e['ci_high']:.3g}]"
                             f"{'' if inside else ' (misses the reference value)'}")
        notes.append(f"Effect of {term} on the biomarker ({unit}, mixed model, 95% CI): " + "; ".join(parts) + ".")
    return notes
