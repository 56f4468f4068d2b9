"""The pull-request CI (GitHub Actions) cannot run here: its workflow is checked against GitHub's workflow
schema (check-jsonschema's vendored copy, offline) and against .ci/run's test command."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CHECK = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.name for w in WORKFLOWS])
def test_workflow_is_valid(workflow):
    done = subprocess.run([*CHECK, str(workflow)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_invalid_workflow_is_refused(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text((ROOT / ".github/workflows/tests.yml").read_text().replace("runs-on:", "run-on:"))
    assert subprocess.run([*CHECK, str(broken)], capture_output=True, text=True).returncode != 0


def test_pull_requests_run_what_ci_runs():
    assert "nox -s tests" in (ROOT / ".ci" / "run").read_text()
    workflow = (ROOT / ".github/workflows/tests.yml").read_text()
    assert "pull_request" in workflow and "run: nox -s tests" in workflow and "cache: pip" in workflow
    assert "download.pytorch.org/whl/cpu" in workflow  # CPU-only torch wheels


def test_pull_request_template_carries_the_contributing_checklist():
    template = (ROOT / ".github" / "pull_request_template.md").read_text()
    for step in ("kdbench new-method", "Deviations:", "test_method_contract.py", "--update-golden",
                 "validation_sweep.py", "kdbench leaderboard", "kdbench methods-page", "nox -s tests"):
        assert step in template, step
