"""Report figures, each a function of tidy tables that draws on matplotlib axes and returns the Figure.

Like nilearn's plotting functions, each takes ``ax=None`` (one panel) or ``axes=None`` (one
panel per model version or site): give axes to place the plot in a figure of your own, or
leave it out for a new figure. Encoding (PNG for the report) belongs to the caller, which
also closes the figure. They take the same tables the report prints, so a reader can always
find the numbers behind a picture.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = ["forest_plot", "equivalence_plot", "bland_altman", "upgrade_plot", "variance_components_plot",
           "vendor_transfer_plot", "calibration_plot", "comparison_plot", "auc_forest_plot", "dice_by_site_plot",
           "pyplot"]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (reports render without a display), with the report's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "svg.hashsalt": "sitebench", "figure.dpi": 100})
    return plt


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """The given axes and its figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = pyplot().subplots(figsize=figsize)
    return fig, ax


def _axes_row(axes: Sequence[Any] | None, n: int, figsize: tuple[float, float], sharey: bool = False) -> tuple[Any, list]:
    """``n`` panels in a row: the given ones (at least ``n``) or a new figure."""
    if axes is not None:
        axes = list(np.ravel(axes))
        if len(axes) < n:
            raise ValueError(f"this plot needs {n} axes, got {len(axes)}")
        return axes[0].figure, axes[:n]
    fig, grid = pyplot().subplots(1, max(1, n), figsize=figsize, sharey=sharey, squeeze=False)
    return fig, list(grid[0])


COLOURS = ["#1b6ca8", "#d1495b", "#2e933c", "#edae49", "#6c4f70"]


def forest_plot(rows: pd.DataFrame, metric: str = "bias", stratum: str = "site", unit: str = "ml",
                ax: Any = None) -> Any:
    """Per-level estimate with CI, one marker per model; not-estimable levels are marked, not drawn."""
    data = rows[(rows["metric"] == metric) & (rows["stratum"] == stratum)]
    levels = sorted(data["level"].unique())
    models = list(dict.fromkeys(data["model_key"]))
    fig, ax = _axes(ax, (7.5, 0.32 * len(levels) + 1.4))
    offsets = np.linspace(-0.25, 0.25, len(models)) if len(models) > 1 else [0.0]
    for k, model in enumerate(models):
        part = data[data["model_key"] == model].set_index("level")
        labelled = False  # the legend names a model at its first drawn level (the first may be n.e.)
        for i, level in enumerate(levels):
            if level not in part.index:
                continue
            row = part.loc[level]
            y = i + offsets[k]
            if not row["estimable"] or pd.isna(row["estimate"]):
                ax.text(0, y, "n.e.", fontsize=6, color=COLOURS[k % 5], va="center")
                continue
            low = row["ci_low"] if not pd.isna(row["ci_low"]) else row["estimate"]
            high = row["ci_high"] if not pd.isna(row["ci_high"]) else row["estimate"]
            ax.errorbar(row["estimate"], y, xerr=[[row["estimate"] - low], [high - row["estimate"]]],
                        fmt="o", ms=3.5, color=COLOURS[k % 5], capsize=2,
                        label=None if labelled else model)
            labelled = True
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(levels)), levels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} ({unit}), 95% CI")
    ax.set_title(f"{metric.replace('_', ' ').capitalize()} by {stratum.replace('_', ' ')}")
    if ax.get_legend_handles_labels()[0]:  # every model not estimable here: no points, no legend
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)  # off the points
    return fig


def equivalence_plot(equivalence: pd.DataFrame, margin: float, unit: str = "ml", alpha: float = 0.05,
                     ax: Any = None) -> Any:
    """Each site's mean error minus the other sites', with its (1 - 2 alpha) CI, inside the shaded ±margin band.

    The picture of the TOST decision: a site is shown equivalent when its interval lies inside the band.
    """
    sites = sorted(equivalence["site"].astype(str).unique())
    models = list(dict.fromkeys(equivalence["model_key"]))
    fig, ax = _axes(ax, (7.5, 0.32 * len(sites) + 1.6))
    ax.axvspan(-margin, margin, color="#2e933c", alpha=0.10, lw=0, label=f"±{margin:g} {unit} margin")
    offsets = np.linspace(-0.25, 0.25, len(models)) if len(models) > 1 else [0.0]
    for k, model in enumerate(models):
        part = equivalence[equivalence["model_key"] == model].assign(site=lambda f: f["site"].astype(str))
        part = part.set_index("site")
        for i, site in enumerate(sites):
            if site not in part.index or pd.isna(part.loc[site, "difference"]):
                continue
            row = part.loc[site]
            inside = bool(row["ci_low"] > -margin and row["ci_high"] < margin)
            ax.errorbar(row["difference"], i + offsets[k], xerr=[[row["difference"] - row["ci_low"]],
                                                                 [row["ci_high"] - row["difference"]]],
                        fmt="o" if inside else "x", ms=4, color=COLOURS[k % 5], capsize=2,
                        label=model if i == 0 else None)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(sites)), sites)
    ax.invert_yaxis()
    ax.set_xlabel(f"site mean error − other sites' ({unit}), {100 * (1 - 2 * alpha):g}% CI")
    ax.set_title("Equivalence of sites (o: inside the margin, x: not shown)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def _panels_per_model(table: pd.DataFrame, width: float, axes: Sequence[Any] | None
                      ) -> tuple[Any, list, list[tuple[Any, str, pd.DataFrame]], list]:
    """One panel per model version, sharing the y axis; vendors coloured alike in every panel."""
    models = list(dict.fromkeys(table["model_key"]))
    fig, axes = _axes_row(axes, len(models), (width * len(models), 3.2), sharey=True)
    panels = [(ax, model, table[table["model_key"] == model]) for ax, model in zip(axes, models)]
    return fig, axes, panels, sorted(table["vendor"].unique())


def bland_altman(table: pd.DataFrame, unit: str = "ml", axes: Sequence[Any] | None = None) -> Any:
    """Difference vs mean per model, with bias and 95% limits of agreement."""
    fig, axes, panels, vendors = _panels_per_model(table, 3.6, axes)
    for ax, model, part in panels:
        mean = (part["prediction"] + part["reference"]) / 2
        diff = part["prediction"] - part["reference"]
        for v, vendor in enumerate(vendors):
            sel = part["vendor"] == vendor
            ax.scatter(mean[sel], diff[sel], s=8, alpha=0.7, color=COLOURS[v % 5], label=vendor)
        bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
        for value, style in ((bias, "-"), (bias - 1.96 * sd, "--"), (bias + 1.96 * sd, "--")):
            ax.axhline(value, color="black", lw=0.8, ls=style)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel(f"mean of model and reference ({unit})")
    axes[0].set_ylabel(f"model - reference ({unit})")
    axes[0].legend(fontsize=7, frameon=False)
    return fig


def upgrade_plot(table: pd.DataFrame, upgraded_column: str = "software_upgraded", unit: str = "ml",
                 axes: Sequence[Any] | None = None) -> Any:
    """Error before and after a software change, at each site that had one, per model (one panel per site)."""
    sites = sorted(table.loc[table[upgraded_column] == 1, "site"].unique())
    models = list(dict.fromkeys(table["model_key"]))
    fig, axes = _axes_row(axes, max(1, len(sites)), (4.5 * max(1, len(sites)), 3.2))
    for ax, site in zip(axes, sites or [None]):
        if site is None:
            ax.text(0.5, 0.5, "no software change in this trial", ha="center", transform=ax.transAxes)
            continue
        part = table[table["site"] == site]
        for k, model in enumerate(models):
            for phase in (0, 1):
                values = part[(part["model_key"] == model) & (part[upgraded_column] == phase)]["error"]
                x = k * 2.5 + phase
                ax.scatter(np.full(len(values), x) + np.linspace(-0.15, 0.15, len(values)), values, s=10,
                           color=COLOURS[k % 5], alpha=0.8, label=model if phase == 0 else None)
                if len(values):
                    ax.hlines(values.mean(), x - 0.3, x + 0.3, color="black", lw=1.2)
        versions = part.sort_values("acquisition_date")["software_version"].unique()
        ax.set_xticks([k * 2.5 + p for k in range(len(models)) for p in (0, 1)],
                      ["before", "after"] * len(models), fontsize=7)
        ax.legend(fontsize=6, frameon=False, loc="best")
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel(f"error ({unit})")
        ax.set_title(f"site {site}: {' -> '.join(versions)}", fontsize=9)
    return fig


def variance_components_plot(shares: pd.DataFrame, ax: Any = None) -> Any:
    """Stacked share of variance (site, scanner, residual) per model and response."""
    labels = [f"{r.model_key}\n{r.response}" for r in shares.itertuples()]
    fig, ax = _axes(ax, (max(4.5, 1.3 * len(labels)), 3.2))
    bottom = np.zeros(len(shares))
    for k, component in enumerate(("site", "scanner", "residual")):
        values = shares[component].fillna(0).to_numpy(dtype=float)
        ax.bar(range(len(shares)), values, bottom=bottom, color=COLOURS[k], label=component)
        bottom += values
    ax.set_xticks(range(len(shares)), labels, fontsize=6)
    ax.set_ylabel("share of variance")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Variance components (REML)")
    return fig


def vendor_transfer_plot(rows: pd.DataFrame, metric: str = "mae", unit: str = "ml", ax: Any = None) -> Any:
    """Error per vendor per model: does a model trained on one vendor hold at the others?"""
    data = rows[(rows["metric"] == metric) & (rows["stratum"] == "vendor")]
    vendors = sorted(data["level"].unique())
    models = list(dict.fromkeys(data["model_key"]))
    fig, ax = _axes(ax, (6.5, 3.2))
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        part = data[data["model_key"] == model].set_index("level").reindex(vendors)
        x = np.arange(len(vendors)) + (k - (len(models) - 1) / 2) * width
        est = part["estimate"].astype(float).to_numpy()
        low = est - part["ci_low"].astype(float).to_numpy()
        high = part["ci_high"].astype(float).to_numpy() - est
        ax.bar(x, est, width, yerr=[np.nan_to_num(low), np.nan_to_num(high)], capsize=2,
               color=COLOURS[k % 5], label=model)
    ax.set_xticks(range(len(vendors)), vendors)
    label = {"mae": "MAE", "rmse": "RMSE", "dice": "Dice"}.get(metric, metric)
    ax.set_ylabel(f"{label} ({unit}), 95% CI" if unit != label else f"{label}, 95% CI")
    ax.set_title(f"{label} by vendor")
    ax.legend(fontsize=7, frameon=False)
    return fig


def calibration_plot(table: pd.DataFrame, unit: str = "ml", axes: Sequence[Any] | None = None) -> Any:
    """Reference against prediction per model, with the identity line and the fitted line."""
    fig, axes, panels, vendors = _panels_per_model(table, 3.4, axes)
    for ax, model, part in panels:
        x, y = part["prediction"].to_numpy(float), part["reference"].to_numpy(float)
        for v, vendor in enumerate(vendors):
            sel = (part["vendor"] == vendor).to_numpy()
            ax.scatter(x[sel], y[sel], s=8, alpha=0.7, color=COLOURS[v % 5], label=vendor)
        span = np.array([min(x.min(), y.min()), max(x.max(), y.max())])
        ax.plot(span, span, color="grey", lw=0.8, ls="--", label="identity")
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            ax.plot(span, intercept + slope * span, color="black", lw=1.0, label=f"fit, slope {slope:.2f}")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel(f"prediction ({unit})")
    axes[0].set_ylabel(f"reference ({unit})")
    axes[0].legend(fontsize=6, frameon=False)
    return fig


def comparison_plot(comparison: pd.DataFrame, unit: str = "ml", margin: float | None = None,
                    axes: Sequence[Any] | None = None) -> Any:
    """Paired difference in absolute error (second - first version) per site, with CIs, one panel per pair."""
    pairs = list(dict.fromkeys(zip(comparison["model_a"], comparison["model_b"])))
    n_levels = comparison.groupby(["model_a", "model_b"]).size().max()
    fig, axes = _axes_row(axes, len(pairs), (5.5 * len(pairs), 0.3 * n_levels + 1.4))
    for ax, (a, b) in zip(axes, pairs):
        part = comparison[(comparison["model_a"] == a) & (comparison["model_b"] == b)].reset_index(drop=True)
        for i, row in part.iterrows():
            colour = "black" if row["level"] == "overall" else COLOURS[0]
            if pd.isna(row["ci_low"]):
                ax.text(0, i, "n.e.", fontsize=6, va="center")
                continue
            ax.errorbar(row["difference"], i, xerr=[[row["difference"] - row["ci_low"]],
                                                    [row["ci_high"] - row["difference"]]],
                        fmt="s" if row["level"] == "overall" else "o", ms=3.5, color=colour, capsize=2)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        if margin:
            for edge in (-margin, margin):
                ax.axvline(edge, color="grey", lw=0.8, ls=":")
        ax.set_yticks(range(len(part)), part["level"].astype(str))
        ax.invert_yaxis()
        ax.set_xlabel(f"|error| {b} - |error| {a} ({unit}), 95% CI")
        ax.set_title(f"{b} vs {a}", fontsize=9)
    return fig


def auc_forest_plot(classification: pd.DataFrame, stratum: str = "site", metric: str = "auc",
                    ax: Any = None) -> Any:
    """Per-level AUC (or another classification metric) with its CI, one marker per model; overall as a square.

    Takes the ``classification_by_stratum`` rows of one biomarker; levels not estimable are marked "n.e.".
    """
    data = classification[classification["metric"] == metric]
    overall = data[data["stratum"] == "overall"]
    data = data[data["stratum"] == stratum]
    levels = sorted(data["level"].astype(str).unique()) + (["all scans"] if len(overall) else [])
    models = list(dict.fromkeys(pd.concat([data, overall])["model_key"]))
    fig, ax = _axes(ax, (7.5, 0.32 * len(levels) + 1.4))
    offsets = np.linspace(-0.25, 0.25, len(models)) if len(models) > 1 else [0.0]
    rows = pd.concat([data.assign(_level=data["level"].astype(str)), overall.assign(_level="all scans")])
    for k, model in enumerate(models):
        part = rows[rows["model_key"] == model].drop_duplicates("_level").set_index("_level")
        for i, level in enumerate(levels):
            if level not in part.index:
                continue
            row = part.loc[level]
            y = i + offsets[k]
            if pd.isna(row["estimate"]):
                ax.text(0.5, y, "n.e.", fontsize=6, color=COLOURS[k % 5], va="center")
                continue
            low = row["ci_low"] if not pd.isna(row["ci_low"]) else row["estimate"]
            high = row["ci_high"] if not pd.isna(row["ci_high"]) else row["estimate"]
            ax.errorbar(row["estimate"], y, xerr=[[row["estimate"] - low], [high - row["estimate"]]],
                        fmt="s" if level == "all scans" else "o", ms=3.5, color=COLOURS[k % 5], capsize=2,
                        label=model if i == 0 else None)
    if metric == "auc":
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1.02)
    ax.set_yticks(range(len(levels)), levels)
    ax.invert_yaxis()
    label = {"auc": "AUC", "sensitivity": "Sensitivity", "specificity": "Specificity"}.get(metric, metric)
    ax.set_xlabel(f"{label}, 95% CI")
    ax.set_title(f"{label} by {stratum.replace('_', ' ')}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def dice_by_site_plot(scores: pd.DataFrame, site: str = "site", axes: Sequence[Any] | None = None) -> Any:
    """Per-scan Dice by site, one panel per label and one colour per model (a strip plot; bars are means).

    Takes per-scan overlap scores with a ``site`` column (the report joins it from the evaluation table).
    """
    key = "label_name" if "label_name" in scores and scores["label_name"].notna().any() else "label"
    labels = list(dict.fromkeys(scores[key].astype(str)))
    sites = sorted(scores[site].astype(str).unique())
    models = list(dict.fromkeys(scores["model_key"]))
    per_panel = max(4.0, 0.3 * len(sites) * max(1, len(models)) + 1.0)
    fig, axes = _axes_row(axes, max(1, len(labels)), (per_panel * max(1, len(labels)), 3.2), sharey=True)
    width = 0.7 / max(1, len(models))
    for ax, label in zip(axes, labels or [None]):
        part = scores[scores[key].astype(str) == label] if label is not None else scores.iloc[:0]
        for k, model in enumerate(models):
            for i, s in enumerate(sites):
                values = part[(part["model_key"] == model) & (part[site].astype(str) == s)]["dice"].dropna()
                x = i + (k - (len(models) - 1) / 2) * width
                if len(values):
                    jitter = np.linspace(-width / 4, width / 4, len(values)) if len(values) > 1 else [0.0]
                    ax.scatter(x + np.asarray(jitter), values, s=8, alpha=0.75, color=COLOURS[k % 5],
                               label=model if i == 0 else None)
                    ax.hlines(values.mean(), x - width / 2.5, x + width / 2.5, color="black", lw=1.0)
        ax.set_xticks(range(len(sites)), sites, fontsize=7, rotation=90 if len(sites) > 8 else 0)
        ax.set_ylim(0, 1.02)
        ax.set_title(str(label) if label is not None else "no overlap scores", fontsize=9)
        ax.set_xlabel("site")
    axes[0].set_ylabel("Dice")
    axes[0].legend(fontsize=6, frameon=False, loc="lower left")
    return fig
