"""Site, vendor and software-version stratified checks of a biomarker (tables in, results out).

Imports only ``sitebench.datasets``, ``sitebench.errors`` and ``sitebench.provenance``.
"""

from sitebench.stratification.agreement import bland_altman, icc, lins_ccc, metrology
from sitebench.stratification.classification import (
    calibration,
    classification_by_stratum,
    delong,
    sensitivity_specificity,
)
from sitebench.stratification.combat import ComBat, site_variance_share
from sitebench.stratification.equivalence import SiteEquivalence, site_equivalence
from sitebench.stratification.lmm import LmmResult, fit_lmm, lrt
from sitebench.stratification.metrics import StratumMetrics, stratum_metrics
from sitebench.stratification.paired import PairedAUC, PairedComparison, paired_auc, paired_comparison
from sitebench.stratification.mixed import (
    ScannerEffects,
    UpgradeEffect,
    fit_scanner_effects,
    upgrade_effect,
)

__all__ = [
    "ComBat",
    "LmmResult",
    "ScannerEffects",
    "SiteEquivalence",
    "bland_altman",
    "icc",
    "lins_ccc",
    "metrology",
    "calibration",
    "classification_by_stratum",
    "delong",
    "sensitivity_specificity",
    "site_equivalence",
    "StratumMetrics",
    "UpgradeEffect",
    "fit_lmm",
    "fit_scanner_effects",
    "lrt",
    "PairedAUC",
    "PairedComparison",
    "paired_auc",
    "paired_comparison",
    "site_variance_share",
    "stratum_metrics",
    "upgrade_effect",
]
