"""`--json` means one thing everywhere: exactly one JSON document on stdout.

Every command that has ``--json`` is run here on real (small) inputs, and its stdout must
parse with a single ``json.loads``. A new command with ``--json`` must be added to CASES:
``test_every_json_command_is_here`` finds them from the parser itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from sitebench.cli import build_parser

DICOM_T1 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "dcm_qa_deident" / "In"
needs_dicom = pytest.mark.skipif(not DICOM_T1.exists(), reason="needs ../shared/data/dicom")


def _csv(folder: Path, name: str, frame: pd.DataFrame) -> Path:
    path = folder / name
    frame.to_csv(path, index=False)
    return path


def _sites(folder: Path) -> Path:
    """Four sites, eight scans each: a per-scan error, age and a sex column."""
    rng = np.random.default_rng(3)
    n = 32
    return _csv(folder, "sites.csv", pd.DataFrame({
        "scan_id": [f"x{i}" for i in range(n)], "site": np.repeat(["S1", "S2", "S3", "S4"], 8),
        "abs_error": rng.gamma(2.0, 0.5, n), "age": rng.uniform(20, 80, n)}).assign(
        y=lambda t: 0.1 * t["age"] + rng.normal(0, 1, n) + t["site"].map({"S1": 0, "S2": 1, "S3": -1, "S4": 0.5})))


def _paired(folder: Path) -> Path:
    rng = np.random.default_rng(4)
    scans = [f"x{i}" for i in range(24)]
    a = rng.gamma(2.0, 0.5, 24)
    return _csv(folder, "paired.csv", pd.DataFrame({
        "scan_id": scans * 2, "site": list(np.repeat(["S1", "S2", "S3"], 8)) * 2,
        "model_key": ["v1"] * 24 + ["v2"] * 24, "abs_error": np.concatenate([a, a + rng.normal(0.1, 0.2, 24)])}))


def _scores(folder: Path) -> Path:
    rng = np.random.default_rng(5)
    truth = np.repeat([0, 1], 20)
    return _csv(folder, "scores.csv", pd.DataFrame({
        "disease": truth, "v1": truth + rng.normal(0, 1, 40), "v2": truth + rng.normal(0, 0.8, 40)}))


def _ratings(folder: Path) -> Path:
    """Shrout & Fleiss (1979): six targets, four judges; with a reference value and two sites."""
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    rows = [{"target": t, "judge": j, "rating": r, "truth": 6.0 + t * 0.3, "site": "S1" if j < 2 else "S2"}
            for t, row in enumerate(ratings) for j, r in enumerate(row)]
    return _csv(folder, "ratings.csv", pd.DataFrame(rows))


def _agreement(folder: Path) -> Path:
    rng = np.random.default_rng(6)
    a = rng.normal(450, 100, 17)
    return _csv(folder, "pefr.csv", pd.DataFrame({"wright": a, "mini": a + rng.normal(5, 20, 17)}))


def _protocol(folder: Path) -> Path:
    draft = folder / "t1.yaml"
    done = run_cli("qc", "protocol", "init", DICOM_T1, "--out", draft, "--name", "ge-t1w")
    assert done.returncode == 0, done.stderr
    return draft


def _qc_store(folder: Path) -> Path:
    from sitebench.qc.records import QCRecords, database_url

    QCRecords(database_url(folder))  # an empty store: no series checked yet
    return folder


def _audit_trail(folder: Path) -> Path:
    from sitebench.audit import AuditTrail

    trail = folder / "audit.jsonl"
    AuditTrail(trail).append(who="A. Physicist", what="protocol locked", why="qualification")
    return trail


def _report(folder: Path) -> Path:
    from sitebench.reports.lock import write_lock

    report = folder / "report"
    report.mkdir()
    (report / "report.html").write_text("<html><h1>validation</h1></html>")
    weights = folder / "model.pt"
    weights.write_bytes(b"weights")
    write_lock(report, {"report.html": report / "report.html"}, {"weights m": weights},
               {"name": "m", "version": 1}, {"seed": 0})
    return report


def _intake_yaml(folder: Path) -> Path:
    import yaml

    path = folder / "intake.yaml"
    path.write_text(yaml.safe_dump({"store": "store", "protocols": ".", "sites": {"S01": {}}}))
    return path


def _monitor_token(config: Path) -> str:
    from sitebench.qc.intake import load_intake_config, manage_users

    return manage_users(load_intake_config(config), "add", "mon", role="central_monitor", who="test")["token"]


Case = Callable[[Path, pytest.FixtureRequest], list]

#: The command (as typed, without ``--json``) for every command that has ``--json``.
CASES: dict[str, Case] = {
    "stats equivalence": lambda d, r: ["stats", "equivalence", _sites(d), "--value", "abs_error", "--margin", "1"],
    "stats paired": lambda d, r: ["stats", "paired", _paired(d), "--a", "v1", "--b", "v2", "--value", "abs_error",
                                  "--margin", "0.5"],
    "stats delong": lambda d, r: ["stats", "delong", _scores(d), "--truth", "disease", "--score", "v1",
                                  "--score2", "v2"],
    "stats mixed": lambda d, r: ["stats", "mixed", _sites(d), "--formula", "y ~ age", "--groups", "site"],
    "stats icc": lambda d, r: ["stats", "icc", _ratings(d), "--targets", "target", "--raters", "judge",
                               "--ratings", "rating"],
    "stats bland-altman": lambda d, r: ["stats", "bland-altman", _agreement(d), "--a", "wright", "--b", "mini"],
    "stats metrology": lambda d, r: ["stats", "metrology", _ratings(d), "--subject", "target", "--value", "rating",
                                     "--reference", "truth", "--site", "site"],
    "audit verify": lambda d, r: ["audit", "verify", _audit_trail(d)],
    "report verify": lambda d, r: ["report", "verify", _report(d)],
    "models versions": lambda d, r: ["models", "versions", "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}"],
    "qc status": lambda d, r: ["qc", "status", "--store", _qc_store(d)],
    "simulate sweep": lambda d, r: ["simulate", "sweep", "--parameter", "coverage_loss", "--levels", "0,10",
                                    "--subjects", "3", "--models", "classical", "--bootstrap", "200",
                                    "--out", d / "sweep", "--no-progress", "--no-plot"],
    "qc queries": lambda d, r: (lambda config: ["qc", "queries", "list", "--config", config, "--token",
                                                _monitor_token(config)])(_intake_yaml(d)),
    "qc users": lambda d, r: ["qc", "users", "add", "mon", "--role", "central_monitor", "--config", _intake_yaml(d)],
    "qc iqm": lambda d, r: (lambda trial, row: ["qc", "iqm", trial.out_dir / row.image_path, "--labels",
                                                trial.out_dir / row.label_path])(
        r.getfixturevalue("small_trial"), r.getfixturevalue("small_trial").manifest.iloc[0]),
    "qc inspect": lambda d, r: ["qc", "inspect", DICOM_T1],
    "qc check": lambda d, r: ["qc", "check", DICOM_T1, "--protocol", _protocol(d)],
    "qc protocol lock": lambda d, r: ["qc", "protocol", "lock", _protocol(d), "--who", "A. Physicist", "--why",
                                      "qualification", "--lock-dir", d / "locked"],
}
NEEDS_DICOM = {"qc inspect", "qc check", "qc protocol lock"}
#: The documented top-level shape of each document (the README's CLI notes say the same).
LISTS = {"stats icc", "models versions", "qc status", "qc inspect", "qc check"}


def _json_commands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    found = set()
    for action in parser._actions:
        if "--json" in getattr(action, "option_strings", ()):
            found.add(prefix.strip())
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found |= _json_commands(child, f"{prefix} {name}")
    return found


def test_every_json_command_is_here():
    assert _json_commands(build_parser()) == set(CASES)


@pytest.mark.parametrize("command", [pytest.param(c, marks=needs_dicom) if c in NEEDS_DICOM else c
                                     for c in sorted(CASES)])
def test_json_is_one_document(command, tmp_path, request):
    result = run_cli(*CASES[command](tmp_path, request), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)  # one document, not one per line, nothing printed beside it
    assert isinstance(document, list if command in LISTS else dict)


def test_stats_icc_json_is_the_list_of_forms(tmp_path):
    """Issue 4's shape, kept stable: a list of {form, icc, ci_low, ci_high, F, df1, df2, p}, six forms."""
    result = run_cli("stats", "icc", _ratings(tmp_path), "--targets", "target", "--raters", "judge",
                     "--ratings", "rating", "--json")
    assert result.returncode == 0, result.stderr
    forms = json.loads(result.stdout)
    assert [f["form"] for f in forms] == ["ICC(1,1)", "ICC(A,1)", "ICC(C,1)", "ICC(1,k)", "ICC(A,k)", "ICC(C,k)"]
    assert all(set(f) == {"form", "icc", "ci_low", "ci_high", "F", "df1", "df2", "p"} for f in forms)
    assert forms[2]["icc"] == pytest.approx(0.71, abs=0.006)  # ICC(C,1) = Shrout & Fleiss ICC(3,1)


def test_tracking_uri_falls_back_to_the_environment(monkeypatch, capsys):
    """One --tracking-uri option: MLFLOW_TRACKING_URI when not given; required where there is no default."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["models", "versions"])
    assert "--tracking-uri" in capsys.readouterr().err
    assert build_parser().parse_args(["demo"]).tracking_uri is None  # SQLite under the output folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    for command in (["models", "versions"], ["models", "promote", "m", "1", "--alias", "a"], ["demo"],
                    ["benchmark", "run", "spec.yaml"], ["models", "register", "classical", "--name", "m"]):
        assert build_parser().parse_args(command).tracking_uri == "sqlite:///elsewhere.db", command
    assert build_parser().parse_args(["models", "versions", "--tracking-uri", "x"]).tracking_uri == "x"


def test_analyses_return_the_one_result_protocol(tmp_path):
    """Every stats analysis gives summary(), to_frame() and to_dict() (what print_result relies on)."""
    from sitebench.results import Result
    from sitebench.stratification.agreement import bland_altman, icc
    from sitebench.stratification.equivalence import site_equivalence
    from sitebench.stratification.lmm import fit_lmm

    ratings, pefr, sites = (pd.read_csv(f(tmp_path)) for f in (_ratings, _agreement, _sites))
    results = [icc(ratings, "target", "judge", "rating"), bland_altman(pefr, "wright", "mini"),
               site_equivalence(sites, "abs_error", "site", 1.0), fit_lmm(sites, "y ~ age", "site")]
    for result in results:
        assert isinstance(result, Result), type(result).__name__
        assert isinstance(result.to_frame(), pd.DataFrame) and result.summary()
        json.dumps(result.to_dict())


def test_one_group_parser_is_the_whole_parser_for_its_commands():
    """``main`` builds only the named group's parser (a command imports its own module alone): the
    commands it knows, and their options, are the full parser's."""
    import subprocess
    import sys

    from sitebench.cli import GROUPS

    whole = build_parser()
    for name in GROUPS:
        alone = build_parser(name)
        assert _json_commands(alone) == {c for c in _json_commands(whole) if c.split()[0] == name}
    for command in CASES:
        words = command.split()
        assert (build_parser(words[0])._subparsers._group_actions[0].choices[words[0]].format_help()
                == whole._subparsers._group_actions[0].choices[words[0]].format_help())
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom sitebench.cli import main\ntry:\n    main(['qc', '--help'])\n"
         "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.startswith('sitebench.cli.')))"],
        capture_output=True, text=True, check=True).stdout
    assert "sitebench.cli.qc" in loaded and "sitebench.cli.stats" not in loaded, loaded
