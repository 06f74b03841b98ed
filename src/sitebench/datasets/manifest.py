"""The scan manifest: one row per scan, the contract every stage reads and writes.

Columns are named here and nowhere else. Paths in the file are relative to the
manifest's own folder, so a trial folder can be moved or archived whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_file

SCAN_ID = "scan_id"
SUBJECT_ID = "subject_id"
SESSION = "session"
SITE = "site"
SCANNER_ID = "scanner_id"
VENDOR = "vendor"
SCANNER_MODEL = "scanner_model"
SOFTWARE_VERSION = "software_version"
FIELD_STRENGTH = "field_strength"
ACQUISITION_DATE = "acquisition_date"
IMAGE_PATH = "image_path"
IMAGE_SHA256 = "image_sha256"
LABEL_PATH = "label_path"
LABEL_SHA256 = "label_sha256"
AGE = "age"
SEX = "sex"
GROUP = "group"

REQUIRED_COLUMNS: tuple[str, ...] = (
    SCAN_ID, SUBJECT_ID, SESSION, SITE, VENDOR, SCANNER_MODEL, SOFTWARE_VERSION,
    FIELD_STRENGTH, ACQUISITION_DATE, IMAGE_PATH, IMAGE_SHA256,
)
OPTIONAL_COLUMNS: tuple[str, ...] = (SCANNER_ID, LABEL_PATH, LABEL_SHA256, AGE, SEX, GROUP)
MANIFEST_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

#: Columns read as text whatever they look like (software "5.3" is not a number).
TEXT_COLUMNS = (SCAN_ID, SUBJECT_ID, SESSION, SITE, SCANNER_ID, VENDOR, SCANNER_MODEL,
                SOFTWARE_VERSION, ACQUISITION_DATE, IMAGE_PATH, IMAGE_SHA256, LABEL_PATH,
                LABEL_SHA256, SEX, GROUP)

#: Strata a benchmark is split by unless its spec says otherwise.
DEFAULT_STRATA = (SITE, VENDOR, SOFTWARE_VERSION)


@dataclass
class Manifest:
    """A validated manifest table plus the folder its relative paths start from."""

    table: pd.DataFrame
    root: Path
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.table)

    def image_path(self, scan_id: str) -> Path:
        return self.resolve(self.table.loc[self.table[SCAN_ID] == scan_id, IMAGE_PATH].iloc[0])

    def resolve(self, relative: str | Path) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else (self.root / path)

    def with_absolute_paths(self) -> pd.DataFrame:
        """A copy whose path columns are absolute, for workers that do not know the root."""
        table = self.table.copy()
        for column in (IMAGE_PATH, LABEL_PATH):
            if column in table:
                table[column] = [str(self.resolve(p)) if isinstance(p, str) and p else p
                                 for p in table[column]]
        return table

    def write(self, path: str | Path) -> Path:
        return write_manifest(self.table, path)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet table, with text columns kept as text."""
    path = Path(path)
    if not path.exists():
        raise SitebenchError("file does not exist", path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pd.read_parquet(path)
            for column in TEXT_COLUMNS:
                if column in table:
                    table[column] = pd.Series([None if pd.isna(v) else str(v) for v in table[column]],
                                              dtype=object, index=table.index)
            return table
        if suffix in (".csv", ".tsv"):
            dtypes = {c: "string" for c in TEXT_COLUMNS}
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=dtypes,
                                keep_default_na=True)
            for column in TEXT_COLUMNS:
                if column in table:
                    table[column] = table[column].astype(object).where(table[column].notna(), None)
            return table
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise SitebenchError(f"cannot read table ({exc.__class__.__name__}: {exc})", path) from None
    raise SitebenchError(f"unsupported table format '{suffix}' (use .csv, .tsv or .parquet)", path)


def write_manifest(table: pd.DataFrame, path: str | Path) -> Path:
    """Write CSV or Parquet by suffix, required columns first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = [c for c in MANIFEST_COLUMNS if c in table] + [c for c in table if c not in MANIFEST_COLUMNS]
    table = table[ordered]
    if path.suffix.lower() == ".parquet":
        table.to_parquet(path, index=False)
    elif path.suffix.lower() in (".csv", ".tsv"):
        table.to_csv(path, index=False, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        raise SitebenchError("unsupported manifest format (use .csv, .tsv or .parquet)", path)
    return path


def validate_manifest(table: pd.DataFrame, root: Path, source: str | Path,
                      check_files: bool = True, check_hashes: bool = True,
                      required: Iterable[str] = REQUIRED_COLUMNS) -> None:
    """Raise a one-line ``SitebenchError`` naming the file and the first problem found."""
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise SitebenchError(f"missing column(s): {', '.join(missing)}", source)
    empty = table[SCAN_ID].isna()
    if empty.any():
        raise SitebenchError(f"empty scan_id in row {int(empty.idxmax()) + 2}", source)
    duplicated = table[SCAN_ID][table[SCAN_ID].duplicated()]
    if len(duplicated):
        raise SitebenchError(f"duplicate scan_id '{duplicated.iloc[0]}'", source)
    for column in (SITE, VENDOR, IMAGE_PATH):
        blank = table[column].isna()
        if blank.any():
            scan = table.loc[blank, SCAN_ID].iloc[0]
            raise SitebenchError(f"scan '{scan}' has no {column}", source)
    if not check_files:
        return
    for row in table.itertuples(index=False):
        row_dict = row._asdict()
        for path_col, hash_col in ((IMAGE_PATH, IMAGE_SHA256), (LABEL_PATH, LABEL_SHA256)):
            relative = row_dict.get(path_col)
            if not isinstance(relative, str) or not relative:
                continue
            full = Path(relative) if Path(relative).is_absolute() else root / relative
            if not full.exists():
                raise SitebenchError(f"scan '{row_dict[SCAN_ID]}': {path_col} '{relative}' does not exist",
                                     source)
            expected = row_dict.get(hash_col)
            if check_hashes and isinstance(expected, str) and expected:
                actual = sha256_file(full)
                if actual != expected:
                    raise SitebenchError(
                        f"scan '{row_dict[SCAN_ID]}': SHA-256 of '{relative}' is {actual[:12]}…, "
                        f"manifest says {expected[:12]}…", source)


def read_manifest(path: str | Path, check_files: bool = True, check_hashes: bool = True) -> Manifest:
    """Load and validate a manifest; every problem is a one-line error naming the file."""
    path = Path(path)
    table = read_table(path)
    validate_manifest(table, path.parent, path, check_files=check_files, check_hashes=check_hashes)
    return Manifest(table=table.reset_index(drop=True), root=path.parent.resolve(), source=path.resolve())


SOFTWARE_UPGRADED = "software_upgraded"


def add_software_upgraded(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``software_upgraded``: 1 once a scanner runs other software than at its first scan.

    Software versions are nested in vendors, so a plain ``C(software_version)`` term is
    collinear with vendor; the within-scanner change is what an upgrade analysis needs.
    The scanner is ``scanner_id`` where present, else the site. A manifest that already has the
    column with 0/1 values keeps it: ``sitebench qc manifest`` writes it from the QC gate's own
    software drift events, which are what the upgrade analysis is keyed by.
    """
    table = table.copy()
    if SOFTWARE_UPGRADED in table:
        given = pd.to_numeric(table[SOFTWARE_UPGRADED], errors="coerce")
        if given.notna().all() and given.isin([0, 1]).all():
            table[SOFTWARE_UPGRADED] = given.astype(int)
            return table
    scanner = table[SCANNER_ID] if SCANNER_ID in table else table[SITE]
    order = table.assign(_scanner=scanner).sort_values([ACQUISITION_DATE, SCAN_ID], kind="stable")
    baseline = order.groupby("_scanner")[SOFTWARE_VERSION].first()
    table[SOFTWARE_UPGRADED] = (table[SOFTWARE_VERSION].to_numpy() !=
                                scanner.map(baseline).to_numpy()).astype(int)
    return table
