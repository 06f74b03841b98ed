"""Importers that turn existing image collections into a scan manifest table.

Two layouts are supported:

* :func:`import_nifti_folder`: a folder of NIfTI files plus a CSV/TSV/Parquet table with one
  row per scan (the manifest's columns, and ``filename`` or ``image_path`` naming each file).
* :func:`import_bids`: a BIDS dataset (``participants.tsv``, ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]``
  with JSON sidecars, merged by the BIDS inheritance principle).

Both return a plain ``pd.DataFrame`` with every column of ``REQUIRED_COLUMNS``, the image
SHA-256 computed, and ``image_path`` relative to ``root`` (the folder the manifest will be
written to) when the image lies inside it, else absolute. Write it with
:func:`sitebench.datasets.manifest.write_manifest` into ``root`` and it reads back with
:func:`~sitebench.datasets.manifest.read_manifest`. Every input problem is a one-line
``SitebenchError`` naming the offending file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_file

NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: Columns :func:`import_nifti_folder` needs in its table (besides the file column).
#: ``scan_id`` defaults to the file name without extension and ``acquisition_date`` may be absent.
NIFTI_TABLE_COLUMNS: tuple[str, ...] = tuple(
    c for c in mf.REQUIRED_COLUMNS
    if c not in (mf.SCAN_ID, mf.IMAGE_PATH, mf.IMAGE_SHA256, mf.ACQUISITION_DATE)
)
FILE_COLUMNS = ("filename", mf.IMAGE_PATH)

#: BIDS sidecar key -> manifest column; all four must be present after inheritance.
SIDECAR_KEYS: dict[str, str] = {
    "Manufacturer": mf.VENDOR,
    "ManufacturersModelName": mf.SCANNER_MODEL,
    "SoftwareVersions": mf.SOFTWARE_VERSION,
    "MagneticFieldStrength": mf.FIELD_STRENGTH,
}

#: Session given to scans of single-session BIDS data (no ``ses-`` folder); the simulator's label.
DEFAULT_SESSION = "ses-1"


# --------------------------------------------------------------------------- helpers

def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def check_nifti(path: Path) -> None:
    """Raise ``SitebenchError('<path>: not a readable NIfTI (...)')`` unless the header loads."""
    try:
        image = nib.load(str(path))
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"loads as {type(image).__name__}, not NIfTI-1/2")
        header = image.header
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
        if not path.name.lower().endswith(".gz"):  # uncompressed: the data must all be there
            needed = int(header["vox_offset"]) + int(np.prod(shape)) * dtype.itemsize
            size = path.stat().st_size
            if size < needed:
                raise ValueError(f"truncated: {size} bytes, header needs {needed}")
    except Exception as exc:  # nibabel raises many types for corrupt input; all are user errors
        detail = str(exc).replace(str(path), path.name)  # the path already leads the message
        raise SitebenchError(f"not a readable NIfTI ({type(exc).__name__}: {detail})", path) from None


def _relative_to_root(path: Path, root: Path) -> str:
    full = path.resolve()
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        return str(full)


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip() or value.strip().lower() == "n/a"
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _text(value: Any) -> str | None:
    return None if _blank(value) else str(value).strip()


def _iso_date(value: Any) -> str | None:
    """``2021-03-04T10:00:00`` or ``20210304`` -> ``2021-03-04``; other text unchanged."""
    text = _text(value)
    if text is None:
        return None
    if re.match(r"^\d{4}-\d{2}-\d{2}", text):
        return text[:10]
    if re.fullmatch(r"\d{8}(\d{6}(\.\d+)?)?", text):
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}"
    return text


def _order_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Manifest column order; text columns as object dtype with ``None`` for missing values
    (pandas >= 3 would otherwise infer its ``str`` dtype, whose missing value is NaN)."""
    ordered = [c for c in mf.MANIFEST_COLUMNS if c in table] + \
              [c for c in table if c not in mf.MANIFEST_COLUMNS]
    table = table[ordered].reset_index(drop=True)
    for column in mf.TEXT_COLUMNS:
        if column in table:
            table[column] = pd.Series([_text(v) if _blank(v) else str(v) for v in table[column]],
                                      dtype=object, index=table.index)
    return table


def _numeric_column(table: pd.DataFrame, column: str, source: Path) -> pd.Series:
    converted = pd.to_numeric(table[column], errors="coerce")
    bad = converted.isna() & ~table[column].map(_blank)
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise SitebenchError(f"column '{column}' row {row + 2}: '{table[column].iloc[row]}' is not a number",
                             source)
    return converted.astype(float)


# --------------------------------------------------------------------------- NIfTI folder

def import_nifti_folder(image_dir: str | Path, table_csv: str | Path, *, root: str | Path | None = None,
                        reference_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Manifest table for a folder of NIfTI files described by a CSV/TSV/Parquet table.

    The table names each file in a ``filename`` or ``image_path`` column (relative to
    ``image_dir``; subfolders allowed) and holds the columns in ``NIFTI_TABLE_COLUMNS``.
    ``scan_id`` is optional (default: the file name without ``.nii``/``.nii.gz``),
    ``acquisition_date`` is optional (empty if absent), and every other column (age, sex,
    group, scanner_id, ...) is carried through. ``reference_columns`` must be present and
    numeric (e.g. a reference volume); they are returned as floats. If a ``label_path``
    column is present, labels are resolved like images and hashed into ``label_sha256``.

    ``root`` (default: the table's folder) is where the manifest will be written; paths are
    made relative to it. NIfTI files in ``image_dir`` that the table does not list are
    ignored and counted in ``table.attrs['unlisted_files']`` (names, relative to ``image_dir``,
    in ``table.attrs['unlisted_file_names']``).
    """
    image_dir = Path(image_dir)
    table_csv = Path(table_csv)
    if not image_dir.is_dir():
        raise SitebenchError("image folder does not exist", image_dir)
    root_path = (Path(root) if root is not None else table_csv.parent).resolve()
    table = mf.read_table(table_csv)

    present = [c for c in FILE_COLUMNS if c in table]
    if len(present) == 2:
        raise SitebenchError("has both 'filename' and 'image_path' columns; keep one", table_csv)
    missing = [c for c in NIFTI_TABLE_COLUMNS + tuple(reference_columns) if c not in table]
    if not present:
        missing = ["filename (or image_path)"] + missing
    if missing:
        raise SitebenchError(f"missing column(s): {', '.join(missing)}", table_csv)
    if table.empty:
        raise SitebenchError("has no rows", table_csv)
    file_column = present[0]

    folder = image_dir.resolve()
    images: list[Path] = []
    for row, name in enumerate(table[file_column]):
        if _blank(name):
            raise SitebenchError(f"row {row + 2} has no {file_column}", table_csv)
        images.append(_listed_file(str(name).strip(), folder, table_csv, row))

    table = table.copy()
    if file_column == "filename":
        table = table.drop(columns="filename")
    if mf.SCAN_ID not in table:
        table[mf.SCAN_ID] = None
    table[mf.SCAN_ID] = [nifti_stem(p) if _blank(s) else str(s).strip()
                         for s, p in zip(table[mf.SCAN_ID], images)]
    if mf.ACQUISITION_DATE not in table:
        table[mf.ACQUISITION_DATE] = None
    table[mf.FIELD_STRENGTH] = _numeric_column(table, mf.FIELD_STRENGTH, table_csv)
    for column in reference_columns:
        table[column] = _numeric_column(table, column, table_csv)

    given = table[mf.IMAGE_SHA256] if mf.IMAGE_SHA256 in table else [None] * len(table)
    hashes = []
    for path, expected in zip(images, given):
        check_nifti(path)
        digest = sha256_file(path)
        if not _blank(expected) and str(expected).strip().lower() != digest:
            raise SitebenchError(f"SHA-256 of '{path.name}' is {digest[:12]}…, the table says "
                                 f"{str(expected)[:12]}…", table_csv)
        hashes.append(digest)
    table[mf.IMAGE_PATH] = [_relative_to_root(p, root_path) for p in images]
    table[mf.IMAGE_SHA256] = hashes

    if mf.LABEL_PATH in table:
        label_paths, label_hashes = [], []
        for row, name in enumerate(table[mf.LABEL_PATH]):
            if _blank(name):
                label_paths.append(None)
                label_hashes.append(None)
                continue
            label = _listed_file(str(name).strip(), folder, table_csv, row)
            label_paths.append(_relative_to_root(label, root_path))
            label_hashes.append(sha256_file(label))
        table[mf.LABEL_PATH] = label_paths
        table[mf.LABEL_SHA256] = label_hashes

    listed = {p for p in images}
    if mf.LABEL_PATH in table:
        listed |= {(root_path / p).resolve() for p in table[mf.LABEL_PATH] if isinstance(p, str)}
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and is_nifti(p) and p.resolve() not in listed)

    table = _order_columns(table)
    mf.validate_manifest(table, root_path, table_csv, check_files=False)
    table.attrs["unlisted_files"] = len(unlisted)
    table.attrs["unlisted_file_names"] = unlisted
    return table


def _listed_file(name: str, folder: Path, source: Path, row: int) -> Path:
    path = Path(name)
    full = (path if path.is_absolute() else folder / path).resolve()
    try:
        full.relative_to(folder)
        inside = True
    except ValueError:
        inside = False
    if not inside or not full.is_file():
        raise SitebenchError(f"row {row + 2} lists '{name}', which is not in {folder}", source)
    return full


# --------------------------------------------------------------------------- BIDS

def import_bids(bids_root: str | Path, *, suffix: str = "T1w", root: str | Path | None = None) -> pd.DataFrame:
    """Manifest table for the ``*_<suffix>.nii[.gz]`` images of a BIDS dataset.

    * ``subject_id`` is the participant_id (``sub-01``); ``session`` the session folder
      (``ses-1``), or ``"ses-1"`` for single-session data without ``ses-`` folders, so the
      column is never empty; ``scan_id`` the image name without extension
      (``sub-01_ses-1_T1w``).
    * vendor, scanner_model, software_version, field_strength come from the sidecar keys
      Manufacturer, ManufacturersModelName, SoftwareVersions (a list is joined with " "),
      MagneticFieldStrength, after BIDS inheritance (``T1w.json`` at the top, then subject,
      session and ``anat`` levels; the nearer file wins).
    * site: the participants.tsv ``site`` column when it has a value, else the sidecar's
      InstitutionName.
    * acquisition_date (ISO date): sidecar AcquisitionDateTime or AcquisitionDate, else
      ``acq_time`` in the ``*_scans.tsv``, else empty.
    * age (float), sex and group from participants.tsv when those columns exist.

    ``root`` (default: ``bids_root``) is where the manifest will be written.
    """
    bids_root = Path(bids_root)
    if not bids_root.is_dir():
        raise SitebenchError("BIDS folder does not exist", bids_root)
    root_path = (Path(root) if root is not None else bids_root).resolve()
    participants = _read_participants(bids_root)

    rows = []
    subjects = sorted(p for p in bids_root.glob("sub-*") if p.is_dir())
    for subject_dir in subjects:
        if subject_dir.name not in participants.index:
            raise SitebenchError(f"subject folder '{subject_dir.name}' is not in participants.tsv",
                                 subject_dir)
        info = participants.loc[subject_dir.name]
        sessions = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir())
        for session_dir in [None] + sessions:
            level = session_dir if session_dir is not None else subject_dir
            anat = level / "anat"
            if not anat.is_dir():
                continue
            for image in sorted(anat.iterdir()):
                if not image.is_file() or not is_nifti(image) or not nifti_stem(image).endswith(f"_{suffix}"):
                    continue
                rows.append(_bids_row(bids_root, root_path, subject_dir, session_dir, image, info,
                                      suffix))
    if not rows:
        raise SitebenchError(f"no sub-*/[ses-*/]anat/*_{suffix}.nii[.gz] images found", bids_root)
    table = _order_columns(pd.DataFrame(rows))
    mf.validate_manifest(table, root_path, bids_root, check_files=False)
    return table


def _read_participants(bids_root: Path) -> pd.DataFrame:
    path = bids_root / "participants.tsv"
    if not path.is_file():
        raise SitebenchError("no participants.tsv in the BIDS folder", bids_root)
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=True)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise SitebenchError(f"cannot read table ({exc.__class__.__name__}: {exc})", path) from None
    if "participant_id" not in table:
        raise SitebenchError("missing column(s): participant_id", path)
    ids = table["participant_id"].map(lambda v: None if _blank(v) else str(v).strip())
    if ids.isna().any():
        raise SitebenchError(f"empty participant_id in row {int(ids.isna().to_numpy().argmax()) + 2}", path)
    ids = ids.map(lambda v: v if v.startswith("sub-") else f"sub-{v}")
    if ids.duplicated().any():
        raise SitebenchError(f"duplicate participant_id '{ids[ids.duplicated()].iloc[0]}'", path)
    table = table.assign(participant_id=ids).set_index("participant_id", drop=False)
    if mf.AGE in table:
        table[mf.AGE] = _numeric_column(table, mf.AGE, path)
    return table


def _entities(stem: str) -> tuple[dict[str, str], str]:
    """``sub-01_ses-1_acq-x_T1w`` -> ({'sub': '01', 'ses': '1', 'acq': 'x'}, 'T1w')."""
    parts = stem.split("_")
    entities = {}
    for part in parts[:-1]:
        key, _, value = part.partition("-")
        entities[key] = value
    return entities, parts[-1]


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SitebenchError(f"not valid JSON ({exc.__class__.__name__}: {exc})", path) from None
    if not isinstance(data, dict):
        raise SitebenchError("expected a JSON object at the top level", path)
    return data


def bids_sidecars(bids_root: Path, image: Path) -> list[Path]:
    """The JSON sidecars that apply to ``image``, farthest first (BIDS inheritance)."""
    entities, suffix = _entities(nifti_stem(image))
    bids_root = bids_root.resolve()
    folder = image.resolve().parent
    levels = [folder, *folder.parents]
    levels = list(reversed(levels[: levels.index(bids_root) + 1]))
    found: list[Path] = []
    for level in levels:
        candidates = []
        for path in level.glob(f"*{suffix}.json"):
            side_entities, side_suffix = _entities(path.name[: -len(".json")])
            if side_suffix == suffix and all(entities.get(k) == v for k, v in side_entities.items()):
                candidates.append((len(side_entities), path.name, path))
        found.extend(path for _, _, path in sorted(candidates))
    return found


def _bids_row(bids_root: Path, root_path: Path, subject_dir: Path, session_dir: Path | None,
              image: Path, info: pd.Series, suffix: str) -> dict[str, Any]:
    check_nifti(image)
    sidecars = bids_sidecars(bids_root, image)
    own = image.parent / f"{nifti_stem(image)}.json"
    if not sidecars:
        raise SitebenchError(f"no JSON sidecar (expected {own.name} or an inherited {suffix}.json)", image)
    merged: dict[str, Any] = {}
    for path in sidecars:
        merged.update(_load_json(path))
    nearest = sidecars[-1]
    missing = [key for key in SIDECAR_KEYS if _blank_sidecar(merged.get(key))]
    if missing:
        raise SitebenchError(f"sidecar of {image.name} lacks {', '.join(missing)}", nearest)

    software = merged["SoftwareVersions"]
    if isinstance(software, (list, tuple)):
        software = " ".join(str(v).strip() for v in software if not _blank(v))
    try:
        field = float(merged["MagneticFieldStrength"])
    except (TypeError, ValueError):
        raise SitebenchError(f"MagneticFieldStrength '{merged['MagneticFieldStrength']}' is not a number",
                             nearest) from None

    site = _text(info.get(mf.SITE)) if mf.SITE in info else None
    if site is None:
        site = _text(merged.get("InstitutionName"))
    if site is None:
        raise SitebenchError(f"no site for {image.name}: participants.tsv has no site for "
                             f"{subject_dir.name} and the sidecar has no InstitutionName", nearest)

    date = _iso_date(merged.get("AcquisitionDateTime")) or _iso_date(merged.get("AcquisitionDate"))
    if date is None:
        date = _scans_tsv_date(session_dir or subject_dir, image)

    row: dict[str, Any] = {
        mf.SCAN_ID: nifti_stem(image),
        mf.SUBJECT_ID: subject_dir.name,
        mf.SESSION: session_dir.name if session_dir is not None else DEFAULT_SESSION,
        mf.SITE: site,
        mf.VENDOR: str(merged["Manufacturer"]).strip(),
        mf.SCANNER_MODEL: str(merged["ManufacturersModelName"]).strip(),
        mf.SOFTWARE_VERSION: str(software).strip(),
        mf.FIELD_STRENGTH: field,
        mf.ACQUISITION_DATE: date,
        mf.IMAGE_PATH: _relative_to_root(image, root_path),
        mf.IMAGE_SHA256: sha256_file(image),
    }
    if mf.AGE in info:
        row[mf.AGE] = float(info[mf.AGE]) if not _blank(info[mf.AGE]) else np.nan
    for column in (mf.SEX, mf.GROUP):
        if column in info:
            row[column] = _text(info[column])
    return row


def _blank_sidecar(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return not any(not _blank(v) for v in value)
    return _blank(value)


def _scans_tsv_date(folder: Path, image: Path) -> str | None:
    for scans in sorted(folder.glob("*_scans.tsv")):
        try:
            table = pd.read_csv(scans, sep="\t", dtype=str, na_values=["n/a"])
        except (ValueError, OSError, pd.errors.ParserError) as exc:
            raise SitebenchError(f"cannot read table ({exc.__class__.__name__}: {exc})", scans) from None
        if "filename" not in table or "acq_time" not in table:
            continue
        wanted = image.resolve().relative_to(folder.resolve()).as_posix()
        match = table.loc[table["filename"].map(lambda v: isinstance(v, str) and v.strip() == wanted),
                          "acq_time"]
        if len(match):
            return _iso_date(match.iloc[0])
    return None
