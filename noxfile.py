"""Entry points: ``nox -s tests`` (what CI runs), ``nox -s bench`` (reproduce the committed results),
``nox -s extend`` (add records to results/), ``nox -s perf``."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True  # torch is large: build each venv once


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (fast; `-- -m slow` for the slow tests), then the leaderboard and methods-page checks."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)
    session.run("kdbench", "leaderboard", "--check")
    session.run("kdbench", "methods-page", "--check")


@nox.session
def bench(session: nox.Session) -> None:
    """Re-train the default CPU suite into a scratch folder from a cold teacher cache and compare every record with
    the committed one in results/: a verdict per leaderboard row, then "N/M records reproduced bit-exactly"; fails
    unless all are (args go to `kdbench reproduce`, e.g. `-- --scratch DIR` keeps what it trains)."""
    session.install("-e", ".")
    session.run("kdbench", "reproduce", "--suite", "cpu", *session.posargs)


@nox.session
def extend(session: nox.Session) -> None:
    """For adding records: run the default CPU suite into results/ (runs with a finished record of the same config
    are skipped; `-- --force` redoes them), then regenerate leaderboard.md (args go to `kdbench run`)."""
    session.install("-e", ".")
    session.run("kdbench", "run", "--suite", "cpu", *session.posargs)
    session.run("kdbench", "leaderboard")


@nox.session
def perf(session: nox.Session) -> None:
    """The pytest-benchmark benchmarks in benchmarks/: JSON and a markdown report of ratios in benchmarks/perf/."""
    session.install("-e", ".[test]")
    session.run("pytest", "benchmarks", "-p", "no:cacheprovider", "--benchmark-json", "benchmarks/perf/perf.json",
                "--benchmark-columns", "median,iqr,rounds", *session.posargs)
    with open("benchmarks/perf/perf.md", "w") as out:
        session.run("python", "benchmarks/perf_report.py", "benchmarks/perf/perf.json", stdout=out)
