"""NIfTI-folder and BIDS importers: real NIfTI files and BIDS trees built in tmp_path."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from sitebench.datasets import manifest as mf
from sitebench.datasets.importers import bids_sidecars, import_bids, import_nifti_folder
from sitebench.errors import SitebenchError

DICOM_REF = Path("/work/shared/data/dicom")
REAL_SIDECARS = {
    "philips": DICOM_REF / "dcm_qa_enh/Ref/Philips_WIP_AnatBrain_T1W3D_301.json",
    "siemens": DICOM_REF / "dcm_qa_xa30/Ref/5_anat-T1w_acq-tfl.json",
    "ge": DICOM_REF / "dcm_qa_deident/Ref/Accelerated_SAG_IR-SPGR_10.json",
}


def write_nifti(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(SitebenchError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def assert_round_trip(table: pd.DataFrame, folder: Path) -> None:
    """write_manifest + read_manifest (CSV and Parquet) give back the same values."""
    for name in ("manifest.csv", "manifest.parquet"):
        manifest = mf.read_manifest(mf.write_manifest(table, folder / name))
        assert len(manifest) == len(table)
        for column in mf.TEXT_COLUMNS:
            if column in table:
                # text stays text ("5.30" is not 5.3); a missing value may read back as None or
                # NaN (see test_manifest.py::test_missing_text_reads_back_as_none)
                got = [None if _missing(v) else v for v in manifest.table[column]]
                assert got == list(table[column]), (name, column)
                assert all(v is None or isinstance(v, str) for v in got), (name, column)
        assert manifest.table[mf.FIELD_STRENGTH].tolist() == table[mf.FIELD_STRENGTH].tolist()


# --------------------------------------------------------------------------- NIfTI folder

def nifti_trial(tmp_path: Path) -> tuple[Path, Path]:
    trial = tmp_path / "trial"
    images = trial / "images"
    write_nifti(images / "a.nii.gz", 1)
    write_nifti(images / "b.nii", 2)
    write_nifti(images / "sub" / "c.nii.gz", 3)
    table = pd.DataFrame({
        "filename": ["a.nii.gz", "b.nii", "sub/c.nii.gz"],
        mf.SUBJECT_ID: ["01", "01", "02"],
        mf.SESSION: ["ses-1", "ses-2", "ses-1"],
        mf.SITE: ["Nashville", "Nashville", "Bloomington"],
        mf.VENDOR: ["Philips", "Philips", "Siemens"],
        mf.SCANNER_MODEL: ["Achieva dStream", "Achieva dStream", "MAGNETOM Prisma Fit"],
        mf.SOFTWARE_VERSION: ["5.3", "5.30", "syngo MR XA30"],
        mf.FIELD_STRENGTH: [3, 3, 1.5],
        mf.ACQUISITION_DATE: ["2021-01-01", "2021-06-01", ""],
        mf.AGE: [30.5, 31.0, 44.0],
        mf.SEX: ["F", "F", "M"],
        "gm_volume_ml": [600.5, 601.0, 580.25],
    })
    csv = trial / "scans.csv"
    table.to_csv(csv, index=False)
    return images, csv


def test_nifti_folder_imports_and_round_trips(tmp_path):
    images, csv = nifti_trial(tmp_path)
    write_nifti(images / "extra.nii.gz", 9)  # not listed: ignored but counted
    (images / "notes.txt").write_text("not an image")
    table = import_nifti_folder(images, csv, reference_columns=["gm_volume_ml"])
    assert list(table.columns[: len(mf.REQUIRED_COLUMNS)]) == list(mf.REQUIRED_COLUMNS)
    assert table[mf.SCAN_ID].tolist() == ["a", "b", "c"]
    assert table[mf.IMAGE_PATH].tolist() == ["images/a.nii.gz", "images/b.nii", "images/sub/c.nii.gz"]
    assert table[mf.SOFTWARE_VERSION].tolist() == ["5.3", "5.30", "syngo MR XA30"]
    assert table[mf.SUBJECT_ID].tolist() == ["01", "01", "02"]
    assert table[mf.FIELD_STRENGTH].tolist() == [3.0, 3.0, 1.5]
    assert table["gm_volume_ml"].dtype == float
    assert table[mf.ACQUISITION_DATE].tolist()[2] is None
    assert table.attrs["unlisted_files"] == 1
    assert table.attrs["unlisted_file_names"] == ["extra.nii.gz"]
    assert_round_trip(table, csv.parent)


def test_nifti_folder_scan_id_column_and_other_root(tmp_path):
    images, csv = nifti_trial(tmp_path)
    table = pd.read_csv(csv, dtype=str).rename(columns={"filename": mf.IMAGE_PATH})
    table.insert(0, mf.SCAN_ID, ["s1", "", "s3"])
    table = table.drop(columns=[mf.ACQUISITION_DATE])
    table.to_csv(csv, index=False, na_rep="")
    out = tmp_path / "elsewhere"
    result = import_nifti_folder(images, csv, root=out)
    assert result[mf.SCAN_ID].tolist() == ["s1", "b", "s3"]  # blank scan_id falls back to the stem
    assert result[mf.ACQUISITION_DATE].isna().all()
    # images outside root: absolute paths, still readable from root
    assert all(Path(p).is_absolute() for p in result[mf.IMAGE_PATH])
    assert_round_trip(result, out)


def test_nifti_folder_missing_columns_named(tmp_path):
    images, csv = nifti_trial(tmp_path)
    pd.read_csv(csv).drop(columns=[mf.VENDOR, "filename"]).to_csv(csv, index=False)
    message = one_line_error(import_nifti_folder, images, csv, reference_columns=["ref_ml"])
    assert "scans.csv" in message
    for column in ("filename", mf.VENDOR, "ref_ml"):
        assert column in message


def test_nifti_folder_listed_file_not_in_folder(tmp_path):
    images, csv = nifti_trial(tmp_path)
    (images / "b.nii").unlink()
    message = one_line_error(import_nifti_folder, images, csv)
    assert "b.nii" in message and "scans.csv" in message


def test_nifti_folder_file_outside_folder_rejected(tmp_path):
    images, csv = nifti_trial(tmp_path)
    write_nifti(tmp_path / "outside.nii.gz")
    table = pd.read_csv(csv)
    table.loc[0, "filename"] = "../../outside.nii.gz"
    table.to_csv(csv, index=False)
    message = one_line_error(import_nifti_folder, images, csv)
    assert "outside.nii.gz" in message


@pytest.mark.parametrize("damage", ["garbage_gz", "garbage_nii", "truncated_nii", "truncated_gz"])
def test_nifti_folder_corrupt_file(tmp_path, damage):
    images, csv = nifti_trial(tmp_path)
    name = "b.nii" if damage.endswith("nii") else "a.nii.gz"
    path = images / name
    if damage.startswith("garbage"):
        path.write_bytes(b"this is not an image at all " * 20)
    elif damage == "truncated_nii":
        path.write_bytes(path.read_bytes()[:700])
    else:  # gzip stream cut inside the header
        path.write_bytes(gzip.compress(nib.load(str(images / "a.nii.gz")).header.binaryblock)[:60])
    message = one_line_error(import_nifti_folder, images, csv)
    assert f"{path}: not a readable NIfTI (" in message


def test_nifti_folder_duplicate_scan_id_and_bad_number(tmp_path):
    images, csv = nifti_trial(tmp_path)
    table = pd.read_csv(csv)
    table[mf.SCAN_ID] = ["x", "x", "y"]
    table.to_csv(csv, index=False)
    assert "duplicate scan_id 'x'" in one_line_error(import_nifti_folder, images, csv)
    table[mf.SCAN_ID] = ["x", "y", "z"]
    table[mf.FIELD_STRENGTH] = ["3", "3T", "1.5"]
    table.to_csv(csv, index=False)
    message = one_line_error(import_nifti_folder, images, csv)
    assert "scans.csv" in message and "3T" in message


# --------------------------------------------------------------------------- BIDS

SIEMENS = {"Manufacturer": "Siemens", "ManufacturersModelName": "MAGNETOM Prisma Fit",
           "SoftwareVersions": "syngo MR XA30", "MagneticFieldStrength": 3,
           "InstitutionName": "Top Institute", "RepetitionTime": 2.4}


def bids_tree(tmp_path: Path) -> Path:
    """Two subjects: sub-01 with two sessions, sub-02 single-session; a top-level T1w.json."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tgroup\tsite\n"
        "sub-01\t34.5\tF\tpatient\tNashville\n"
        "sub-02\tn/a\tM\tcontrol\tn/a\n"
        "sub-99\t50\tM\tcontrol\tX\n")  # listed without a folder: fine
    write_json(root / "T1w.json", SIEMENS)
    for ses, day in (("ses-1", "2021-02-03"), ("ses-2", None)):
        anat = root / "sub-01" / ses / "anat"
        write_nifti(anat / f"sub-01_{ses}_T1w.nii.gz", hash(ses) % 100)
        sidecar = {"Manufacturer": "Philips", "ManufacturersModelName": "Achieva dStream",
                   "SoftwareVersions": "5.3", "MagneticFieldStrength": 1.5}
        if day is None:
            sidecar["AcquisitionDateTime"] = "2021-08-09T10:11:12.000000"
        write_json(anat / f"sub-01_{ses}_T1w.json", sidecar)
        write_nifti(anat / f"sub-01_{ses}_T2w.nii.gz", 7)  # other suffix, no sidecar
    (root / "sub-01" / "ses-1" / "sub-01_ses-1_scans.tsv").write_text(
        "filename\tacq_time\nanat/sub-01_ses-1_T1w.nii.gz\t2021-02-03T09:00:00\n")
    write_nifti(root / "sub-02" / "anat" / "sub-02_T1w.nii", 5)
    write_json(root / "sub-02" / "anat" / "sub-02_T1w.json",
               {"SoftwareVersions": ["syngo MR E11", "patch 2"]})
    return root


def test_bids_imports_with_inheritance_and_round_trips(tmp_path):
    root = bids_tree(tmp_path)
    table = import_bids(root)
    assert list(table.columns[: len(mf.REQUIRED_COLUMNS)]) == list(mf.REQUIRED_COLUMNS)
    rows = table.set_index(mf.SCAN_ID)
    assert list(rows.index) == ["sub-01_ses-1_T1w", "sub-01_ses-2_T1w", "sub-02_T1w"]
    one, two, three = (rows.loc[i] for i in rows.index)
    # nearer sidecar overrides the top-level one
    assert (one[mf.VENDOR], one[mf.SCANNER_MODEL], one[mf.SOFTWARE_VERSION], one[mf.FIELD_STRENGTH]) == \
        ("Philips", "Achieva dStream", "5.3", 1.5)
    # sub-02 inherits vendor/model/field from T1w.json; its list of software versions is joined
    assert (three[mf.VENDOR], three[mf.SCANNER_MODEL], three[mf.SOFTWARE_VERSION], three[mf.FIELD_STRENGTH]) == \
        ("Siemens", "MAGNETOM Prisma Fit", "syngo MR E11 patch 2", 3.0)
    # site: participants.tsv first, else InstitutionName
    assert (one[mf.SITE], three[mf.SITE]) == ("Nashville", "Top Institute")
    # dates: scans.tsv acq_time, sidecar AcquisitionDateTime, or empty
    assert one[mf.ACQUISITION_DATE] == "2021-02-03"
    assert two[mf.ACQUISITION_DATE] == "2021-08-09"
    assert (one[mf.SESSION], two[mf.SESSION], three[mf.SESSION]) == ("ses-1", "ses-2", "ses-1")
    assert (one[mf.SUBJECT_ID], three[mf.SUBJECT_ID]) == ("sub-01", "sub-02")
    assert one[mf.AGE] == 34.5 and np.isnan(three[mf.AGE])
    assert (three[mf.SEX], three[mf.GROUP]) == ("M", "control")
    assert three[mf.IMAGE_PATH] == "sub-02/anat/sub-02_T1w.nii"
    assert_round_trip(table, root)


def test_bids_sidecar_order(tmp_path):
    root = bids_tree(tmp_path)
    write_json(root / "acq-x_T1w.json", {"Manufacturer": "never"})  # entity not in the image
    write_json(root / "sub-02" / "sub-02_T1w.json", {"InstitutionName": "Subject level"})
    found = bids_sidecars(root, root / "sub-02" / "anat" / "sub-02_T1w.nii")
    assert [p.relative_to(root).as_posix() for p in found] == [
        "T1w.json", "sub-02/sub-02_T1w.json", "sub-02/anat/sub-02_T1w.json"]
    assert import_bids(root).set_index(mf.SCAN_ID).loc["sub-02_T1w", mf.SITE] == "Subject level"


def test_bids_real_sidecars(tmp_path):
    missing = [p for p in REAL_SIDECARS.values() if not p.exists()]
    if missing:
        pytest.skip(f"real sidecars not available: {missing[0]}")
    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tgroup\n" + "".join(f"sub-{v}\t40\tF\tcontrol\n" for v in REAL_SIDECARS))
    for i, (vendor, source) in enumerate(REAL_SIDECARS.items()):
        anat = root / f"sub-{vendor}" / "anat"
        write_nifti(anat / f"sub-{vendor}_T1w.nii.gz", i)
        shutil.copy(source, anat / f"sub-{vendor}_T1w.json")
    table = import_bids(root).set_index(mf.SUBJECT_ID)
    for vendor, source in REAL_SIDECARS.items():
        sidecar = json.loads(source.read_text())
        row = table.loc[f"sub-{vendor}"]
        assert row[mf.VENDOR] == sidecar["Manufacturer"]
        assert row[mf.SCANNER_MODEL] == sidecar["ManufacturersModelName"]
        assert row[mf.SOFTWARE_VERSION] == sidecar["SoftwareVersions"]
        assert row[mf.FIELD_STRENGTH] == float(sidecar["MagneticFieldStrength"])
        assert row[mf.SITE] == sidecar["InstitutionName"]
    assert table.loc["sub-philips", mf.SOFTWARE_VERSION] == "5.3.0\\5.3.0.3"
    assert_round_trip(table.reset_index(), root)


def test_bids_no_participants(tmp_path):
    root = bids_tree(tmp_path)
    (root / "participants.tsv").unlink()
    assert "participants.tsv" in one_line_error(import_bids, root)


def test_bids_subject_not_in_participants(tmp_path):
    root = bids_tree(tmp_path)
    write_nifti(root / "sub-03" / "anat" / "sub-03_T1w.nii.gz")
    message = one_line_error(import_bids, root)
    assert "sub-03" in message and "participants.tsv" in message


def test_bids_sidecar_missing_keys(tmp_path):
    root = bids_tree(tmp_path)
    sidecar = root / "T1w.json"
    write_json(sidecar, {k: v for k, v in SIEMENS.items() if k not in ("Manufacturer", "MagneticFieldStrength")})
    message = one_line_error(import_bids, root)
    assert "sub-02_T1w.json" in message and "Manufacturer" in message and "MagneticFieldStrength" in message


def test_bids_no_sidecar(tmp_path):
    root = bids_tree(tmp_path)
    message = one_line_error(import_bids, root, suffix="T2w")
    assert "sub-01_ses-1_T2w.nii.gz" in message and "sidecar" in message


def test_bids_no_site(tmp_path):
    root = bids_tree(tmp_path)
    write_json(root / "T1w.json", {k: v for k, v in SIEMENS.items() if k != "InstitutionName"})
    message = one_line_error(import_bids, root)
    assert "sub-02_T1w" in message and "site" in message


def test_bids_corrupt_image_and_bad_json(tmp_path):
    root = bids_tree(tmp_path)
    image = root / "sub-02" / "anat" / "sub-02_T1w.nii"
    image.write_bytes(b"\x00" * 100)
    assert f"{image}: not a readable NIfTI" in one_line_error(import_bids, root)
    write_nifti(image)
    (root / "T1w.json").write_text("{not json")
    assert "T1w.json" in one_line_error(import_bids, root)


def test_bids_no_images(tmp_path):
    root = bids_tree(tmp_path)
    assert "FLAIR" in one_line_error(import_bids, root, suffix="FLAIR")
