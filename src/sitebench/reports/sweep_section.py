"""The acquisition-tolerance sweep in the validation report, rendered from plain tables.

Reads the tidy tables that ``sitebench.sweep.run_sweep`` returns (``.table``: one row per model
version and level; ``.tolerances``: one row per model version) and never imports the sweep
itself: reports read results, they do not produce them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sitebench.reports.figures import COLOURS, _axes

__all__ = ["TITLES", "number_text", "plot_error_vs_deviation", "sweep_margin", "tolerance_sentence"]

#: How a tolerated deviation of each parameter reads in a sentence ({d}: the deviation).
PHRASES: dict[str, str] = {
    "coverage_loss": "{d} mm of lost superior coverage",
    "slice_thickness": "{d} mm of extra slice thickness",
    "noise": "{d}× extra noise (SNR divided by {snr})",
    "contrast": "a {d}% change of the repetition time",
}
#: What the sweep varied, as a heading reads.
TITLES: dict[str, str] = {
    "coverage_loss": "superior coverage", "slice_thickness": "slice thickness", "noise": "image noise",
    "contrast": "T1 contrast (repetition time)",
}


def number_text(value: float) -> str:
    return f"{float(value):g}"


def _deviation_words(parameter: str, deviation: float, label: str = "") -> str:
    template = PHRASES.get(parameter)
    if template is None:
        return f"{number_text(deviation)} ({label or 'deviation'})"
    return template.format(d=number_text(deviation), snr=number_text(1.0 + float(deviation)))


def plot_error_vs_deviation(table: pd.DataFrame, margin: float, ax: Any = None, unit: str = "ml") -> Any:
    """Mean biomarker error with its CI per model version against the deviation, the ±margin band shaded.

    ``table`` is a sweep table (model, deviation, mean_error, mean_error_lo, mean_error_hi,
    within_margin, deviation_label). A level inside the margin is drawn as a dot, one outside as a
    cross. Returns the matplotlib Figure (nilearn style: give ``ax`` to draw into your own figure).
    """
    fig, ax = _axes(ax, (6.5, 3.6))
    ax.axhspan(-margin, margin, color="#2e933c", alpha=0.10, lw=0, label=f"±{margin:g} {unit} margin")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    models = list(dict.fromkeys(table["model"]))
    deviations = np.sort(table["deviation"].astype(float).unique())
    spread = (deviations.max() - deviations.min()) if len(deviations) > 1 else 1.0
    offsets = np.linspace(-0.012, 0.012, len(models)) * spread if len(models) > 1 else [0.0]
    for k, model in enumerate(models):
        part = table[table["model"] == model].sort_values("deviation")
        x = part["deviation"].to_numpy(float) + offsets[k]
        y = part["mean_error"].to_numpy(float)
        low = y - part["mean_error_lo"].to_numpy(float)
        high = part["mean_error_hi"].to_numpy(float) - y
        colour = COLOURS[k % len(COLOURS)]
        ax.plot(x, y, "-", color=colour, lw=1, alpha=0.7)
        inside = part["within_margin"].to_numpy(bool)
        for mask, marker, label in ((inside, "o", model), (~inside, "x", None)):
            if mask.any():
                ax.errorbar(x[mask], y[mask], yerr=[low[mask], high[mask]], fmt=marker, ms=4, color=colour,
                            capsize=2, label=label if label and mask.any() else None)
        if not inside.any():  # the legend still names the model
            ax.plot([], [], "x", color=colour, label=model)
    label = str(table["deviation_label"].iloc[0]) if "deviation_label" in table and len(table) else "deviation"
    ax.set_xlabel(label)
    ax.set_ylabel(f"mean error, model − truth ({unit}), 90% CI")
    ax.set_title("Biomarker error against the acquisition deviation (o: inside the margin, x: not shown)",
                 fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def tolerance_sentence(row: pd.Series | dict[str, Any], margin: float, unit: str) -> str:
    """One sentence per model version, e.g. "gm-unet@2.0.0 stays within ±50 ml up to 12 mm of lost
    superior coverage; suggested rule: coverage: {min_mm: 148.0}"."""
    row = dict(row)
    model, parameter = row["model"], row["parameter"]
    tolerated = row.get("largest_within_margin")
    if tolerated is None or pd.isna(tolerated):
        return (f"{model} is not within ±{number_text(margin)} {unit} even at the protocol setting; no tolerance can "
                "be suggested for it.")
    words = _deviation_words(parameter, tolerated, row.get("deviation_label", ""))
    if float(tolerated) == 0:
        reach = f"{model} stays within ±{number_text(margin)} {unit} only at the protocol setting"
    else:
        reach = f"{model} stays within ±{number_text(margin)} {unit} up to {words}"
    first = row.get("first_outside")
    if first is not None and not pd.isna(first):
        reach += f" (not at {_deviation_words(parameter, first, row.get('deviation_label', ''))})"
    elif float(tolerated) > 0:
        reach += " (the largest deviation tested)"
    rule = row.get("rule") or ""
    return reach + (f"; suggested rule: {rule}" if rule else "; no rule value could be computed")


def sweep_margin(table: pd.DataFrame, tolerances: pd.DataFrame) -> float:
    """The equivalence margin the tables were judged against (their ``margin`` column)."""
    for frame in (table, tolerances):
        if "margin" in frame and len(frame):
            return float(frame["margin"].iloc[0])
    raise ValueError("the sweep table needs a 'margin' column (run_sweep writes it)")
