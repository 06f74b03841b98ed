"""Start-up time of the ``sitebench`` command: ``--help`` and a small ``stats icc``.

Why: every CLI call pays the imports before it does any work, so a slow start-up is
paid on every scripted call. This runs the command of this checkout (``--src``,
default ``src/``) and, with ``--baseline SRC``, another checkout's code with the same
Python, in the same run, interleaved so machine load hits both alike. It prints the
median over ``--runs`` calls and the ratio baseline / current.

    git worktree add /tmp/startup-base 08714ab
    .venv/bin/python perf/bench_startup.py --baseline /tmp/startup-base/src --runs 7
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = "import sys; from sitebench.cli import main; sys.exit(main())"


def small_icc_table(path: Path) -> Path:
    """Ten targets rated by three scanners: enough for every ICC form, small enough to cost nothing."""
    lines = ["subject,scanner,volume"]
    for target in range(10):
        for rater in range(3):
            lines.append(f"s{target},r{rater},{600 + 10 * target + 1.5 * rater + ((target * 7 + rater * 3) % 5) * 0.3}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _env(src: Path) -> dict[str, str]:
    """This checkout first on the path; byte-code caching on, as in an installed package."""
    env = {**os.environ, "PYTHONPATH": str(src), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_call(src: Path, args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU time is what a busy, shared machine distorts least."""
    env = _env(src)
    cpu, start = _child_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCH, *args], env=env, cwd=tempfile.gettempdir(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed, cpu = time.perf_counter() - start, _child_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{src}: sitebench {' '.join(args)} failed:\n{done.stderr}")
    return elapsed, cpu


def check_source(src: Path) -> None:
    """Make sure PYTHONPATH really selects this checkout (the editable install must not win)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    where = subprocess.run([sys.executable, "-c", "import sitebench; print(sitebench.__file__)"], env=env,
                           cwd=tempfile.gettempdir(), capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"PYTHONPATH={src} imports sitebench from {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="source folder of the code to time")
    parser.add_argument("--baseline", type=Path, help="source folder of the code to compare against")
    parser.add_argument("--runs", type=int, default=7, help="calls per command and code (median reported)")
    options = parser.parse_args()
    sources = {"current": options.src}
    if options.baseline:
        sources["baseline"] = options.baseline
    for src in sources.values():
        check_source(src)
    with tempfile.TemporaryDirectory() as tmp:
        table = small_icc_table(Path(tmp) / "icc.csv")
        commands = {
            "--help": ["--help"],
            "stats icc": ["stats", "icc", str(table), "--targets", "subject", "--raters", "scanner",
                          "--ratings", "volume", "--json"],
        }
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for name, args in commands.items():
            for label, src in sources.items():
                time_call(src, args)  # warm the file cache and write the .pyc files
            for _ in range(options.runs):
                for label, src in sources.items():
                    times.setdefault((name, label), []).append(time_call(src, args))
    print(f"median of {options.runs} calls, {sys.executable}, load average {os.getloadavg()[0]:.2f}")
    for name in commands:
        for k, kind in enumerate(("wall", "CPU")):
            row = {label: statistics.median(t[k] for t in times[(name, label)]) for label in sources}
            text = "  ".join(f"{label} {seconds:.3f} s" for label, seconds in row.items())
            if "baseline" in row:
                text += f"  (baseline/current {row['baseline'] / row['current']:.2f}x)"
            print(f"sitebench {name:<10} {kind:<4} {text}")


if __name__ == "__main__":
    main()
