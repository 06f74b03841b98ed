"""Write ``src/sitebench/qc/_dicom_dictionary.py`` from pydicom's data dictionaries.

The header reader (:mod:`sitebench.qc.dicom_header`) needs the VR of every element of an
implicit-VR file (DICOM PS3.5 A.1 / 7.1.3: implicit VR carries no VR, so it comes from the data
dictionary, PS3.6, and for private elements from the creator's dictionary, PS3.5 7.8) and the
keyword <-> tag map of the standard dictionary. Importing pydicom costs ~0.3 s and ~40 MB, so the
dictionaries are copied once into this module.

They are written as plain text tables (one string literal each), not dict literals: this
project runs with PYTHONDONTWRITEBYTECODE, so every import compiles the module, and compiling
15,000 dict entries costs ~130 ms where one string costs ~1 ms. The reader parses the standard
table on first use and a private creator's table only when an implicit-VR file uses it.

Run ``.venv/bin/python scripts/make_dicom_dictionary.py`` after upgrading pydicom.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom._dicom_dict import DicomDictionary, RepeatersDictionary
from pydicom._private_dict import private_dictionaries

OUT = Path(__file__).resolve().parents[1] / "src" / "sitebench" / "qc" / "_dicom_dictionary.py"


def _vr(vr: str) -> str:
    """One token per VR: "US or SS" (and pydicom's "OB_OW") become "US/SS"."""
    return vr.replace(" or ", "/").replace("_", "/")


def main() -> None:
    standard = [f"{tag:08X} {_vr(vr)} {keyword}".rstrip()
                for tag, (vr, _vm, _name, _retired, keyword) in sorted(DicomDictionary.items())]
    repeaters = [f"{mask} {_vr(vr)} {keyword}".rstrip()
                 for mask, (vr, _vm, _name, _retired, keyword) in RepeatersDictionary.items()]  # pydicom's order: first match wins
    private: dict[str, str] = {}
    skipped = 0
    for creator, entries in sorted(private_dictionaries.items()):
        rows = []
        for key, (vr, *_rest) in sorted(entries.items()):
            # pydicom's lookup (datadict.get_private_entry) tries "ggggeeee", "ggggxxee" and
            # "ggxxxxee"; a key of any other pattern ("001110xx") can never match, so it is left out
            if ("x" not in key or (key[4:6] == "xx" and "x" not in key[:4] + key[6:])
                    or (key[2:6] == "xxxx" and "x" not in key[:2] + key[6:])):
                rows.append(f"{key} {_vr(vr)}")
            else:
                skipped += 1
        private[creator] = " ".join(rows)

    out = [
        f'"""DICOM data dictionaries for the header reader, generated from pydicom {pydicom.__version__}',
        "by scripts/make_dicom_dictionary.py -- do not edit.",
        "",
        "STANDARD: lines 'TAG VR Keyword' (PS3.6; keyword absent for a few entries); REPEATERS: lines",
        "'MASK VR Keyword' with pydicom's masks ('60xx0010'); PRIVATE: creator -> 'KEY VR KEY VR ...'",
        "with pydicom's private keys ('ggggxxee', 'ggggeeee', 'ggxxxxee'; PS3.5 7.8.1). Ambiguous VRs",
        "are written 'US/SS' (PS3.6 'US or SS'). Plain text so that importing costs ~1 ms.",
        '"""',
        "",
        f"PYDICOM_VERSION = {pydicom.__version__!r}",
        "",
        "STANDARD = " + repr("\n".join(standard)),
        "",
        "REPEATERS = " + repr("\n".join(repeaters)),
        "",
        "PRIVATE = {",
        *[f"    {creator!r}: {rows!r}," for creator, rows in private.items()],
        "}",
        "",
    ]
    OUT.write_text("\n".join(out))
    print(f"wrote {OUT}: {len(standard)} standard, {len(repeaters)} repeater entries, "
          f"{len(private)} private creators ({skipped} private keys pydicom cannot match left out)")


if __name__ == "__main__":
    main()
