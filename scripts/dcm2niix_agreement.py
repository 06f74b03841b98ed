"""Agreement of ``sitebench qc inspect`` with dcm2niix's sidecars on dcm2niix validation sets.

    .venv/bin/python scripts/dcm2niix_agreement.py ../shared/data/dicom ../shared/data/dicom-more
    .venv/bin/python scripts/dcm2niix_agreement.py ~/dcm_qa_canon ~/dcm_qa_toshiba ~/dcm_qa_uih

Each argument is one set in the ``neurolabusc/dcm_qa*`` layout (``In/`` scanner DICOM, ``Ref/``
dcm2niix's .json/.bval/.bvec) or a folder of such sets. Prints agreement per vendor and every
disagreement; exits 1 when a vendor agrees on fewer than ``--min-percent`` of its keys.
"""

from __future__ import annotations

import argparse
import sys

from sitebench.errors import SitebenchError
from sitebench.qc.reference_agreement import agreement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", help="validation sets (In/ + Ref/) or folders of them")
    parser.add_argument("--min-percent", type=float, default=99.0)
    args = parser.parse_args()
    try:
        result = agreement(args.roots)
    except SitebenchError as exc:
        print(f"sitebench: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    low = [v for v, (a, n) in result.by_vendor().items() if 100.0 * a / n < args.min_percent]
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
