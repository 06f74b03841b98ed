"""ABIDE I as a real multi-site table: FreeSurfer volumes joined to site, scanner and phenotype.

Sources (``../shared/data/abide``, see its README for licences): ``freesurfer/aseg_table.tsv``
(FreeSurfer 6 subcortical volumes, rows like ``Caltech_0051456``), the Preprocessed
Connectomes phenotypic table (SUB_ID, SITE_ID, AGE_AT_SCAN, SEX, DX_GROUP) and mriqc-learn's
per-site scan parameters (vendor, model, software; two site names misspelled there).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from sitebench.errors import SitebenchError

__all__ = ["load_abide_freesurfer", "ABIDE_DIR"]

ABIDE_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "abide"
_SITE_SPELLING = {"CALTEC": "CALTECH"}
_VENDOR_SPELLING = {"Phillips": "Philips"}


def load_abide_freesurfer(root: str | Path = ABIDE_DIR) -> pd.DataFrame:
    """One row per subject: subject_id, site, vendor, scanner_model, software_version, age, sex
    ("M"/"F"), diagnosis ("autism"/"control") and every aseg volume (mm^3, FreeSurfer names)."""
    root = Path(root)
    aseg_path = root / "freesurfer" / "aseg_table.tsv"
    pheno_path = root / "Phenotypic_V1_0b_preprocessed1.csv"
    params_path = root / "abide_scan_parameters.tsv"
    for path in (aseg_path, pheno_path, params_path):
        if not path.exists():
            raise SitebenchError("ABIDE table not found", path)
    aseg = pd.read_csv(aseg_path, sep="\t").rename(columns={"Measure:volume": "fs_id"})
    aseg["subject_id"] = aseg["fs_id"].map(lambda s: int(re.search(r"(\d+)$", s).group(1)))
    pheno = pd.read_csv(pheno_path, usecols=["SUB_ID", "SITE_ID", "AGE_AT_SCAN", "SEX", "DX_GROUP"])
    pheno = pheno.rename(columns={"SUB_ID": "subject_id", "SITE_ID": "site", "AGE_AT_SCAN": "age"})
    pheno["sex"] = pheno.pop("SEX").map({1: "M", 2: "F"})
    pheno["diagnosis"] = pheno.pop("DX_GROUP").map({1: "autism", 2: "control"})
    params = pd.read_csv(params_path, sep="\t", index_col=0).T
    params.index = [_SITE_SPELLING.get(s, s) for s in params.index]
    scanners = pd.DataFrame({"site": params.index, "vendor": params["Vendor"].map(lambda v: _VENDOR_SPELLING.get(v, v)),
                             "scanner_model": params["Model"], "software_version": params["Version"].fillna("unknown")})
    table = pheno.merge(aseg.drop(columns="fs_id"), on="subject_id", how="inner")
    table = table.merge(scanners, on="site", how="left")
    unmatched = sorted(table.loc[table["vendor"].isna(), "site"].unique())
    if unmatched:
        raise SitebenchError(f"sites without scan parameters: {', '.join(unmatched)}", params_path)
    table = table.dropna(subset=["age", "sex", "diagnosis"])
    return table.reset_index(drop=True)
