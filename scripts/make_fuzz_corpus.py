"""Write the seeded QC fuzz corpus (``tests/fuzz_corpus.py``) to a folder, for sending by hand.

    .venv/bin/python scripts/make_fuzz_corpus.py OUT [--seed 12] [--source DIR] [--valid-series] [--check]

OUT gets ``corpus/`` (the crafted files) and ``manifest.tsv`` (name, family, expect, sha256,
detail); with ``--valid-series`` also ``valid/``, the real series under new UIDs. ``--check``
runs ``check_bytes`` over every corpus file and adds its verdict to the manifest (``raised:<type>``
when it raises).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_corpus import SOURCE, make_corpus, valid_series  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--valid-series", action="store_true", help="also write the real series under new UIDs")
    parser.add_argument("--check", action="store_true", help="record check_bytes' verdict per file")
    args = parser.parse_args()
    start = time.perf_counter()
    cases = make_corpus(args.out / "corpus", seed=args.seed, source=args.source)
    took = time.perf_counter() - start
    check = None
    if args.check:
        from sitebench.qc.dicom_files import check_bytes as check
    rows = ["name\tfamily\texpect\tsha256\tdetail" + ("\tverdict" if check else "")]
    for case in cases:
        data = case.path.read_bytes()
        row = [case.name, case.kind, case.expect, hashlib.sha256(data).hexdigest(), case.detail]
        if check is not None:
            try:
                result = check(data)
                row.append("; ".join(result.problems) if result.problems else "usable")
            except Exception as exc:  # noqa: BLE001 - the finding
                row.append(f"raised:{type(exc).__name__}")
        rows.append("\t".join(r.replace("\t", " ").replace("\n", " ") for r in row))
    (args.out / "manifest.tsv").write_text("\n".join(rows) + "\n")
    if args.valid_series:
        valid_series(args.out / "valid", seed=args.seed, source=args.source)
    print(f"{len(cases)} files in {args.out / 'corpus'} ({took:.1f} s); manifest {args.out / 'manifest.tsv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
