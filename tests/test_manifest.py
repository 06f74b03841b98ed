"""read_manifest validation, round trips and the software-upgrade flag."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_file


def _make_trial(folder: Path, n: int = 3) -> pd.DataFrame:
    """A manifest table whose images are small real files under ``folder/images``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"images/scan{i}.nii.gz"
        (folder / rel).write_bytes(f"image {i}".encode() * 10)
        rows.append({
            mf.SCAN_ID: f"scan{i}", mf.SUBJECT_ID: f"0{i}", mf.SESSION: "ses-1",
            mf.SITE: "A" if i < 2 else "B", mf.VENDOR: "Philips", mf.SCANNER_MODEL: "Achieva",
            mf.SOFTWARE_VERSION: ["5.3", "5.30", "1.10"][i % 3], mf.FIELD_STRENGTH: 3.0,
            mf.ACQUISITION_DATE: f"2021-01-0{i + 1}", mf.IMAGE_PATH: rel,
            mf.IMAGE_SHA256: sha256_file(folder / rel), mf.AGE: 40.5 + i, mf.SEX: "F",
            mf.GROUP: "control",
        })
    return pd.DataFrame(rows)


def _error(path: Path) -> str:
    with pytest.raises(SitebenchError) as info:
        mf.read_manifest(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, "error message must be one line"
    assert str(path) in message, "error message must name the file"
    return message


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_round_trip_keeps_values_and_text(tmp_path, suffix):
    table = _make_trial(tmp_path)
    path = mf.write_manifest(table, tmp_path / f"manifest{suffix}")
    manifest = mf.read_manifest(path)
    assert len(manifest) == 3
    assert manifest.root == tmp_path.resolve()
    for column in table:
        got, want = list(manifest.table[column]), list(table[column])
        assert got == want, column
    # text stays text: "5.30" is not 5.3 and "01" keeps its zero
    assert manifest.table[mf.SOFTWARE_VERSION].tolist() == ["5.3", "5.30", "1.10"]
    assert manifest.table[mf.SUBJECT_ID].tolist() == ["00", "01", "02"]
    assert manifest.image_path("scan1") == tmp_path.resolve() / "images/scan1.nii.gz"
    assert list(manifest.table.columns[: len(mf.REQUIRED_COLUMNS)]) == list(mf.REQUIRED_COLUMNS)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_text_reads_back_as_none(tmp_path, suffix):
    table = _make_trial(tmp_path)
    table[mf.ACQUISITION_DATE] = pd.Series(["2021-01-01", None, "2021-01-03"], dtype=object)
    manifest = mf.read_manifest(mf.write_manifest(table, tmp_path / f"manifest{suffix}"))
    assert list(manifest.table[mf.ACQUISITION_DATE]) == ["2021-01-01", None, "2021-01-03"]


def test_missing_column_names_column_and_file(tmp_path):
    table = _make_trial(tmp_path).drop(columns=[mf.VENDOR])
    path = mf.write_manifest(table, tmp_path / "manifest.csv")
    message = _error(path)
    assert "missing column" in message and mf.VENDOR in message


def test_duplicate_scan_id(tmp_path):
    table = _make_trial(tmp_path)
    table.loc[2, mf.SCAN_ID] = "scan0"
    message = _error(mf.write_manifest(table, tmp_path / "manifest.parquet"))
    assert "duplicate scan_id" in message and "scan0" in message


def test_path_that_does_not_exist(tmp_path):
    table = _make_trial(tmp_path)
    (tmp_path / "images/scan1.nii.gz").unlink()
    message = _error(mf.write_manifest(table, tmp_path / "manifest.csv"))
    assert "images/scan1.nii.gz" in message and "does not exist" in message


def test_hash_mismatch_after_one_byte_changes(tmp_path):
    table = _make_trial(tmp_path)
    path = mf.write_manifest(table, tmp_path / "manifest.csv")
    mf.read_manifest(path)  # fine before the change
    image = tmp_path / "images/scan2.nii.gz"
    data = bytearray(image.read_bytes())
    data[5] ^= 0x01
    image.write_bytes(bytes(data))
    message = _error(path)
    assert "SHA-256" in message and "scan2" in message
    # hashes can be skipped on request
    assert len(mf.read_manifest(path, check_hashes=False)) == 3


def test_paths_are_relative_to_the_manifest_folder(tmp_path):
    table = _make_trial(tmp_path / "trial")
    path = mf.write_manifest(table, tmp_path / "trial/manifest.csv")
    moved = tmp_path / "moved"
    (tmp_path / "trial").rename(moved)
    manifest = mf.read_manifest(moved / "manifest.csv")
    assert manifest.with_absolute_paths()[mf.IMAGE_PATH].iloc[0] == str(moved.resolve() / "images/scan0.nii.gz")
    assert not path.exists()


def test_unsupported_suffix(tmp_path):
    table = _make_trial(tmp_path)
    bad = tmp_path / "manifest.xlsx"
    bad.write_text("scan_id\n")
    message = _error(bad)
    assert "unsupported" in message
    with pytest.raises(SitebenchError, match="unsupported"):
        mf.write_manifest(table, tmp_path / "manifest.json")


def test_missing_manifest_file(tmp_path):
    message = _error(tmp_path / "nope.csv")
    assert "does not exist" in message


def test_add_software_upgraded_per_scanner_dates_out_of_order():
    table = pd.DataFrame({
        mf.SCAN_ID: ["a3", "a1", "a2", "b2", "b1", "c1"],
        mf.SITE: ["S1", "S1", "S1", "S1", "S1", "S2"],
        mf.SCANNER_ID: ["A", "A", "A", "B", "B", "C"],
        mf.SOFTWARE_VERSION: ["VE11", "VB17", "VB17", "5.3", "5.3", "DV26"],
        mf.ACQUISITION_DATE: ["2021-03-01", "2019-12-31", "2020-06-01", "2020-02-01", "2019-01-01",
                              "2020-01-01"],
    })
    out = mf.add_software_upgraded(table)
    assert dict(zip(out[mf.SCAN_ID], out[mf.SOFTWARE_UPGRADED])) == {
        "a3": 1, "a1": 0, "a2": 0, "b2": 0, "b1": 0, "c1": 0}
    assert mf.SOFTWARE_UPGRADED not in table  # input untouched
    assert out[mf.SCAN_ID].tolist() == table[mf.SCAN_ID].tolist()  # row order kept


def test_add_software_upgraded_falls_back_to_site():
    table = pd.DataFrame({
        mf.SCAN_ID: ["x2", "x1", "y1"],
        mf.SITE: ["X", "X", "Y"],
        mf.SOFTWARE_VERSION: ["R2", "R1", "R2"],
        mf.ACQUISITION_DATE: ["2022-05-01", "2021-05-01", "2020-01-01"],
    })
    out = mf.add_software_upgraded(table)
    assert out[mf.SOFTWARE_UPGRADED].tolist() == [1, 0, 0]
