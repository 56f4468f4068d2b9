"""Modules that only find folders or talk to MLflow load no torch (so `kdbench ui` and `kdbench sync` start fast)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["kdbench.paths", "kdbench.tracking"])
def test_module_loads_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", f"importing {module} loads torch"


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def test_the_import_contracts_hold():
    """pyproject.toml's import-linter contracts: one-way layers, and no model importing a track."""
    done = subprocess.run(LINT, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "0 broken" in done.stdout


def test_a_broken_contract_fails(tmp_path):
    """The same checker on a contract the code breaks (the runner imports the training loop) exits non-zero."""
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_package = "kdbench"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "upside down"\ntype = "layers"\nlayers = ["kdbench.train", "kdbench.runner"]\n')
    done = subprocess.run([*LINT, "--config", str(config)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "1 broken" in done.stdout
