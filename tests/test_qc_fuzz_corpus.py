"""The file-level check on receipt (``check_bytes``) over a seeded fuzz corpus derived from the real
GE 3D T1 series: it never raises, rejects what is broken, accepts what is valid, and its problem
lines are single lines that name no identifying value. The corpus itself is deterministic."""

from __future__ import annotations

import hashlib
import time
from collections import Counter

import pydicom
import pytest

from fuzz_corpus import FAMILIES, IDENTIFYING_KEYWORDS, SOURCE, make_corpus, valid_series
from sitebench.qc.dicom_files import FileCheck, check_bytes

pytestmark = pytest.mark.skipif(not SOURCE.exists(), reason="needs ../shared/data/dicom/dcm_qa_deident")

#: the least each family must hold (the brief's rough counts)
MIN_PER_FAMILY = {"trunc": 20, "flip": 30, "value": 25, "vr": 15, "seq": 8, "length": 10, "geometry": 20,
                  "syntax": 12, "notdicom": 10, "odd": 10, "collide": 3}


def _digests(cases) -> dict[str, str]:
    return {c.name: hashlib.sha256(c.path.read_bytes()).hexdigest() for c in cases}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    start = time.perf_counter()
    cases = make_corpus(tmp_path_factory.mktemp("fuzz") / "corpus", seed=12)
    return cases, time.perf_counter() - start


@pytest.fixture(scope="module")
def results(corpus):
    """name -> FileCheck, or the exception check_bytes raised; and the seconds all checks took."""
    cases, _ = corpus
    out: dict[str, object] = {}
    start = time.perf_counter()
    for case in cases:
        data = case.path.read_bytes()
        try:
            out[case.name] = check_bytes(data)
        except BaseException as exc:  # noqa: BLE001 - any escape is the finding
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            out[case.name] = exc
    return out, time.perf_counter() - start


def test_corpus_is_deterministic_and_spread_over_the_families(corpus, tmp_path):
    cases, seconds = corpus
    again = make_corpus(tmp_path / "again", seed=12)
    assert [(c.name, c.kind, c.expect) for c in again] == [(c.name, c.kind, c.expect) for c in cases]
    assert _digests(again) == _digests(cases)
    assert len(cases) >= 150 and len({c.name for c in cases}) == len(cases)
    counts = Counter(c.kind for c in cases)
    assert set(counts) == set(FAMILIES)
    short = {family: (counts[family], need) for family, need in MIN_PER_FAMILY.items() if counts[family] < need}
    assert not short, f"families below their size (have, need): {short}"
    assert {c.expect for c in cases} == {"usable", "bad", "either"}
    total = sum(c.path.stat().st_size for c in cases)
    assert total < 30 * 2**20, f"corpus is {total / 2**20:.1f} MB"
    print(f"fuzz corpus: {len(cases)} files, {total / 2**20:.1f} MB, generated in {seconds:.2f} s")


def test_new_instances_never_collide_with_the_real_series(corpus):
    """Derived files carry their family's own series UID and their own instance UIDs; only the
    ``collide`` family reuses a real slice's UIDs."""
    cases, _ = corpus
    real = pydicom.dcmread(sorted(SOURCE.iterdir())[0], stop_before_pixels=True)
    series_per_family: dict[str, set[str]] = {}
    sops: Counter = Counter()
    for case in cases:
        if case.kind in ("collide", "notdicom"):
            continue
        try:
            ds = pydicom.dcmread(case.path, stop_before_pixels=True, force=True,
                                 specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
            series, sop = str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        except Exception:  # noqa: BLE001 - many corpus files are unreadable on purpose
            continue
        assert series != str(real.SeriesInstanceUID), case.name
        if case.expect == "usable":
            series_per_family.setdefault(case.kind, set()).add(series)
            sops[sop] += 1
    assert all(len(uids) == 1 for uids in series_per_family.values()), series_per_family
    assert len(set().union(*series_per_family.values())) == len(series_per_family)
    assert max(sops.values()) == 1
    collide = [c for c in cases if c.kind == "collide" and c.expect == "usable"]
    for case in collide:
        assert pydicom.dcmread(case.path, stop_before_pixels=True).SOPInstanceUID == real.SOPInstanceUID


def _disagreement(case, result) -> str | None:
    if isinstance(result, BaseException):
        return f"raised {type(result).__name__}: {str(result).splitlines()[0][:120] if str(result) else ''}"
    if not isinstance(result, FileCheck):
        return f"returned {type(result).__name__}, not a FileCheck"
    if not isinstance(result.problems, list) or not all(isinstance(p, str) for p in result.problems):
        return "problems is not a list of strings"
    if result.summary is not None and not isinstance(result.summary, dict):
        return f"summary is a {type(result.summary).__name__}"
    if case.expect == "bad" and not result.problems and result.series_uid:
        return "expected bad: no problem reported and a series UID to group by"
    if case.expect == "usable" and (result.problems or result.summary is None):
        return f"expected usable: problems {result.problems}, summary {'present' if result.summary else 'None'}"
    return None


def test_check_bytes_never_raises_and_agrees_with_every_file(corpus, results):
    cases, _ = corpus
    checks, _ = results
    wrong = [(c, why) for c in cases if (why := _disagreement(c, checks[c.name])) is not None]
    lines = [f"{c.name} [{c.kind}, expect {c.expect}; {c.detail}]: {why}" for c, why in wrong]
    if wrong:
        pytest.fail(f"{len(wrong)} of {len(cases)} corpus files:\n" + "\n".join(lines), pytrace=False)


def test_problem_lines_are_single_lines_without_identifying_values(corpus, results):
    """Problem (and warning, where FileCheck has them) lines: one line each, no identifying value."""
    cases, _ = corpus
    checks, _ = results
    source = pydicom.dcmread(sorted(SOURCE.iterdir())[0], stop_before_pixels=True)
    values = {k: str(source.get(k, "")).strip() for k in (*IDENTIFYING_KEYWORDS, "StudyInstanceUID")}
    values = {k: v for k, v in values.items() if len(v) >= 3}
    assert values.get("PatientName") == "FRUIT" and values.get("PatientID") == "FRUIT"
    bad = []
    for case in cases:
        result = checks[case.name]
        if not isinstance(result, FileCheck):
            continue  # reported by the test above
        for line in [*result.problems, *getattr(result, "warnings", [])]:
            if not isinstance(line, str) or not line.strip() or "\n" in line or "\r" in line:
                bad.append(f"{case.name}: not a single line: {line!r}")
            leaked = [k for k, v in values.items() if v in line]
            if leaked:
                bad.append(f"{case.name}: problem line holds the value of {', '.join(leaked)}")
    assert not bad, "\n".join(bad)


def test_tally(corpus, results):
    """One line: files, usable, with problems, raised, by family; and the times."""
    cases, generate_s = corpus
    checks, check_s = results
    by_family: dict[str, Counter] = {}
    for case in cases:
        result = checks[case.name]
        verdict = ("raised" if isinstance(result, BaseException) else
                   "problems" if result.problems else "usable")
        by_family.setdefault(case.kind, Counter())[verdict] += 1
    total = Counter()
    for counter in by_family.values():
        total.update(counter)
    families = ", ".join(f"{k} {sum(v.values())} ({v['usable']}u/{v['problems']}p/{v['raised']}r)"
                         for k, v in by_family.items())
    print(f"fuzz tally: {len(cases)} files, {total['usable']} usable, {total['problems']} with problems, "
          f"{total['raised']} raised; generated {generate_s:.2f} s, checked {check_s:.2f} s; by family: {families}")
    assert sum(total.values()) == len(cases)


def test_valid_series_copies_the_real_series_under_new_uids(tmp_path):
    files = sorted(SOURCE.iterdir())
    paths = valid_series(tmp_path / "t1")
    assert [p.name for p in paths] == [f.name for f in files]
    real = pydicom.dcmread(files[0], stop_before_pixels=True)
    checks = [check_bytes(p.read_bytes()) for p in paths[:: max(1, len(paths) // 12)]]
    assert all(not c.problems and c.summary for c in checks)
    assert len({c.series_uid for c in checks}) == 1 and checks[0].series_uid != str(real.SeriesInstanceUID)
    assert checks[0].study_uid == str(real.StudyInstanceUID)
    assert len({c.sop_uid for c in checks}) == len(checks) and real.SOPInstanceUID not in {c.sop_uid for c in checks}
