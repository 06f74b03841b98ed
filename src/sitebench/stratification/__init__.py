"""Site, vendor and software-version stratified checks of a biomarker (tables in, results out).

Imports only ``sitebench.datasets``, ``sitebench.errors`` and ``sitebench.provenance``.
Names load on first use, so ``stats icc`` does not pay for scikit-learn (ComBat) or
statsmodels (calibration).
"""

from __future__ import annotations

from sitebench.lazy import lazy_exports

_WHERE = {
    "bland_altman": "agreement", "icc": "agreement", "lins_ccc": "agreement", "metrology": "agreement",
    "calibration": "classification", "classification_by_stratum": "classification", "delong": "classification",
    "sensitivity_specificity": "classification",
    "ComBat": "combat", "site_variance_share": "combat",
    "SiteEquivalence": "equivalence", "site_equivalence": "equivalence",
    "LmmResult": "lmm", "fit_lmm": "lmm", "lrt": "lmm",
    "StratumMetrics": "metrics", "stratum_metrics": "metrics",
    "PairedAUC": "paired", "PairedComparison": "paired", "paired_auc": "paired", "paired_comparison": "paired",
    "ScannerEffects": "mixed", "UpgradeEffect": "mixed", "fit_scanner_effects": "mixed", "upgrade_effect": "mixed",
}

__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
