"""Entry points: ``nox -s tests`` (what CI runs), ``nox -s bench`` (reproduce the committed results),
``nox -s extend`` (add records to results/), ``nox -s perf``.

Every session runs in one environment, ``.nox/kdbench`` (kdbench installed editable with its test extras): torch
is large, so it is built once, the first time any session runs, and shared after. pip prints its progress while
it builds; ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu`` takes the CPU-only torch wheels (README).
"""

import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]

ENV = Path(__file__).resolve().parent / ".nox" / "kdbench"
BIN = ENV / "bin"  # POSIX (kdbench's timing lock uses fcntl)


def _shared_env(session: nox.Session) -> None:
    """Create the shared environment if it is missing and bring kdbench in it up to date with the working tree."""
    if not (BIN / "python").exists():
        session.log(f"first run: building {ENV} (torch and its libraries: several minutes, pip shows progress)")
        session.run(sys.executable, "-m", "venv", str(ENV))
    session.run(str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-e", ".[test]")
    session.env["VIRTUAL_ENV"] = str(ENV)
    session.env["PATH"] = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])


def _run(session: nox.Session, program: str, *args: str, **kwargs) -> None:
    session.run(str(BIN / program), *args, **kwargs)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The test suite (fast; `-- -m slow` for the slow tests), then the leaderboard and methods-page checks."""
    _shared_env(session)
    _run(session, "pytest", *session.posargs)
    _run(session, "kdbench", "leaderboard", "--check")
    _run(session, "kdbench", "methods-page", "--check")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Re-train the default CPU suite into a scratch folder from a cold teacher cache and compare every record with
    the committed one in results/: a verdict per leaderboard row, then "N/M records reproduced bit-exactly"; fails
    unless all are (args go to `kdbench reproduce`, e.g. `-- --scratch DIR` keeps what it trains)."""
    _shared_env(session)
    _run(session, "kdbench", "reproduce", "--suite", "cpu", *session.posargs)


@nox.session(venv_backend="none")
def extend(session: nox.Session) -> None:
    """For adding records: run the default CPU suite into results/ (runs with a finished record of the same config
    are skipped; `-- --force` redoes them), then regenerate leaderboard.md (args go to `kdbench run`)."""
    _shared_env(session)
    _run(session, "kdbench", "run", "--suite", "cpu", *session.posargs)
    _run(session, "kdbench", "leaderboard")


@nox.session(venv_backend="none")
def perf(session: nox.Session) -> None:
    """The pytest-benchmark benchmarks in benchmarks/: JSON and a markdown report of ratios in benchmarks/perf/."""
    _shared_env(session)
    _run(session, "pytest", "benchmarks", "-p", "no:cacheprovider", "--benchmark-json", "benchmarks/perf/perf.json",
         "--benchmark-columns", "median,iqr,rounds", *session.posargs)
    with open("benchmarks/perf/perf.md", "w") as out:
        _run(session, "python", "benchmarks/perf_report.py", "benchmarks/perf/perf.json", stdout=out)
