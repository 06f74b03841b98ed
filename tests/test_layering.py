"""The rooms of DESIGN.md import one way only; this test keeps the promise true.

Every import of every module is read with ``ast`` (top-level and inside functions;
``import x``, ``from x import y`` and relative imports) and checked against one rule
table. A second test proves the checker can fail: it feeds it a synthetic package with a
deliberately wrong import and asserts the message names the file, the line and the rule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "sitebench"

#: Who may import whom. Keys are rooms (the first part below ``sitebench``); values are the rooms
#: they may import besides themselves and the basement. Anything not listed is forbidden.
#: Shared helpers every room may import; they import only each other. "" is ``sitebench/__init__``.
BASEMENT = {"", "errors", "provenance", "config", "results", "durable", "lazy"}
RULES: dict[str, set[str]] = {
    # ground floor: imports nothing else of ours
    "datasets": set(),
    "models": set(),
    "audit": set(),
    # middle floor: the ground only, never each other
    "qc": {"datasets", "models", "audit"},
    "benchmarks": {"datasets", "models", "audit"},
    "stratification": {"datasets", "models", "audit"},
    # top: reads results, hashes files (and re-runs only through benchmarks)
    "reports": {"datasets", "models", "audit", "qc", "benchmarks", "stratification"},
    # the operations dashboard: pages over the gate's records and the reports; mounted by the cli
    "dashboard": {"datasets", "models", "audit", "qc", "reports"},
    # promotion joins the registry and the validation report
    "promotion": {"datasets", "models", "audit", "reports"},
    # a simulated trial through the gate: the simulator's DICOM sent to qc, its verdicts into a manifest
    "trial_gate": {"datasets", "audit", "qc"},
    # wiring: touches every room, but not the command line
    "pipeline": {"datasets", "models", "audit", "qc", "benchmarks", "stratification", "reports", "promotion",
                 "trial_gate", "sweep"},
    # the acquisition sweep: simulator + benchmark runner + statistics (+ the gate's IQMs), not the command line
    "sweep": {"datasets", "models", "audit", "qc", "benchmarks", "stratification", "reports", "promotion"},
    # on top of everything; nothing imports it
    "cli": {"datasets", "models", "audit", "qc", "benchmarks", "stratification", "reports", "promotion",
            "pipeline", "trial_gate", "sweep", "dashboard"},
}
#: Inside reports, the verification core is layered too: each may import only those before it.
REPORTS_CORE = ("lock", "integrity", "signing", "recompute", "verify")

#: Known, named exceptions, each with its reason and the condition that removes it.
#: ``{("file", "imported module"): "why, and what removes it"}``; keep it short.
TEMPORARY: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the package root
    line: int
    source: str  # importing module, dotted
    target: str  # imported module, dotted (sitebench.* only)


@dataclass(frozen=True)
class Violation:
    imp: Import
    rule: str

    def __str__(self) -> str:
        return f"{self.imp.file}:{self.imp.line}: {self.imp.source} imports {self.imp.target}: {self.rule}"


def module_name(root: Path, path: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def read_imports(root: Path, package: str = "sitebench") -> list[Import]:
    """Every import of ``package`` modules in every file under ``root``, at any depth of the code."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(root, f, package) for f in files}
    found = []
    for path in files:
        source = module_name(root, path, package)
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # walks into functions, classes and conditionals too
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = source.split(".") if is_package else source.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # ``from sitebench import promotion`` imports the submodule sitebench.promotion
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            for target in dict.fromkeys(targets):
                if target == package or target.startswith(package + "."):
                    found.append(Import(str(path.relative_to(root)), node.lineno, source, target))
    return found


def room(module: str) -> str:
    """The room of a dotted module: ``sitebench.reports.lock`` -> ``reports``; the package itself -> ``''``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def check(imports: list[Import], temporary: dict[tuple[str, str], str] | None = None) -> list[Violation]:
    """Every import that breaks the rule table, the cli rule or the reports-core cycle rule."""
    temporary = TEMPORARY if temporary is None else temporary
    problems = []
    for imp in imports:
        source, target = room(imp.source), room(imp.target)
        if (imp.file, imp.target) in temporary or source == target or target in BASEMENT:
            continue
        if target == "cli":
            problems.append(Violation(imp, "nothing imports cli (it is on top)"))
        elif source in BASEMENT:
            problems.append(Violation(imp, f"basement module '{source or '__init__'}' imports no room"))
        elif source not in RULES:
            problems.append(Violation(imp, f"room '{source}' has no rule in RULES; add one"))
        elif target not in RULES[source]:
            allowed = ", ".join(sorted(RULES[source]))
            problems.append(Violation(imp, f"'{source}' may import only {allowed}" if allowed
                                      else f"'{source}' is on the ground floor: it imports nothing else of ours"))
    return problems + reports_cycles(imports, temporary)


def reports_cycles(imports: list[Import], temporary: dict[tuple[str, str], str] | None = None) -> list[Violation]:
    """The reports core's order broken, or any import cycle in the reports package (function-level included)."""
    temporary = TEMPORARY if temporary is None else temporary
    problems = []
    order = {f"sitebench.reports.{m}": i for i, m in enumerate(REPORTS_CORE)}
    for imp in imports:
        if imp.source in order and imp.target in order and order[imp.target] >= order[imp.source] \
                and imp.source != imp.target:
            name, earlier = imp.source.rsplit(".", 1)[1], ", ".join(REPORTS_CORE[:order[imp.source]])
            problems.append(Violation(imp, f"reports core: {name} may import only {earlier}" if earlier
                                      else f"reports core: {name} imports nothing else of the reports package"))
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if room(imp.source) == room(imp.target) == "reports" and imp.source != imp.target \
                and imp.target != "sitebench.reports" and (imp.file, imp.target) not in temporary:
            edges.setdefault(imp.source, {}).setdefault(imp.target, imp)

    def path(start: str, goal: str) -> list[str] | None:
        """Shortest import path from start to goal (breadth first)."""
        previous: dict[str, str | None] = {start: None}
        todo = [start]
        while todo:
            node = todo.pop(0)
            if node == goal:
                chain = [node]
                while previous[chain[-1]] is not None:
                    chain.append(previous[chain[-1]])  # type: ignore[arg-type]
                return chain[::-1]
            for nxt in sorted(edges.get(node, {})):
                if nxt not in previous:
                    previous[nxt] = node
                    todo.append(nxt)
        return None

    seen: set[frozenset[str]] = set()
    for source in sorted(edges):
        for target, imp in sorted(edges[source].items()):
            back = path(target, source)
            if back and frozenset(back) not in seen:
                seen.add(frozenset(back))
                cycle = " -> ".join(m.rsplit(".", 1)[1] for m in [source, *back])
                problems.append(Violation(imp, f"import cycle in the reports package: {cycle}"))
    return problems


def test_every_import_goes_one_way():
    imports = read_imports(PACKAGE_ROOT)
    assert len(imports) > 100, "the checker read too few imports; is the source tree where it should be?"
    problems = check(imports)
    print(f"\n{len(imports)} imports of sitebench modules in {len({i.file for i in imports})} files checked; "
          f"{len(problems)} break the layering; temporary exceptions: {len(TEMPORARY)}")
    for (file, target), why in TEMPORARY.items():
        print(f"  temporary: {file} -> {target}: {why}")
    assert not problems, "layering broken:\n" + "\n".join(map(str, problems))


def test_nothing_imports_cli_and_the_reports_core_has_no_cycle():
    imports = read_imports(PACKAGE_ROOT)
    assert not [i for i in imports if room(i.target) == "cli" and room(i.source) != "cli"]
    assert not reports_cycles(imports)
    lock = [i for i in imports if i.source == "sitebench.reports.lock" and room(i.target) == "reports"]
    assert not lock, f"lock.py must import nothing else of the reports package: {lock}"


def test_each_temporary_exception_is_still_there():
    """An exception nobody needs any more is removed from TEMPORARY, so it cannot hide a new import."""
    imports = {(i.file, i.target) for i in read_imports(PACKAGE_ROOT)}
    for key in TEMPORARY:
        assert key in imports, f"TEMPORARY lists {key}, which no longer exists: remove it"


WRONG_TREE = {
    "__init__.py": "",
    "errors.py": "class SitebenchError(Exception):\n    pass\n",
    "models/__init__.py": "",
    "models/registry.py": ("from sitebench.errors import SitebenchError\n\n\n"
                           "def promote():\n    from sitebench.reports.lock import read_lock  # the old mistake\n"
                           "    return read_lock\n"),
    "benchmarks/__init__.py": "",
    "benchmarks/runner.py": "from ..stratification import evaluation\n",
    "stratification/__init__.py": "",
    "stratification/evaluation.py": "import sitebench.datasets\n",
    "datasets/__init__.py": "",
    "reports/__init__.py": "",
    "reports/lock.py": "def verify():\n    from . import signing\n",
    "reports/signing.py": "from sitebench.reports import lock\n",
    "pipeline.py": "from sitebench import cli\n",
    "cli.py": "import sitebench.pipeline\n",
}


def test_the_checker_fails_on_a_wrong_import(tmp_path):
    root = tmp_path / "sitebench"
    for name, text in WRONG_TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    problems = [str(p) for p in check(read_imports(root), temporary={})]
    print("\n" + "\n".join(problems))
    assert ("models/registry.py:5: sitebench.models.registry imports sitebench.reports.lock: "
            "'models' is on the ground floor: it imports nothing else of ours") in problems
    assert ("benchmarks/runner.py:1: sitebench.benchmarks.runner imports sitebench.stratification.evaluation: "
            "'benchmarks' may import only audit, datasets, models") in problems
    assert "pipeline.py:1: sitebench.pipeline imports sitebench.cli: nothing imports cli (it is on top)" in problems
    assert ("reports/lock.py:2: sitebench.reports.lock imports sitebench.reports.signing: reports core: lock "
            "imports nothing else of the reports package") in problems
    assert ("reports/lock.py:2: sitebench.reports.lock imports sitebench.reports.signing: import cycle in the "
            "reports package: lock -> signing -> lock") in problems
    assert len(problems) == 5, problems


@pytest.mark.parametrize("room_name", sorted(RULES))
def test_the_rule_table_never_lets_a_lower_room_import_a_higher_one(room_name):
    order = {"datasets": 0, "models": 0, "audit": 0, "qc": 1, "benchmarks": 1, "stratification": 1, "reports": 2,
             "promotion": 3, "trial_gate": 3, "dashboard": 3, "sweep": 3.5, "pipeline": 4, "cli": 5}
    assert all(order[target] < order[room_name] for target in RULES[room_name])
