"""Modules that only find folders or talk to MLflow load no torch (so `kdbench ui` and `kdbench sync` start fast)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["kdbench.paths", "kdbench.tracking"])
def test_module_loads_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", f"importing {module} loads torch"
