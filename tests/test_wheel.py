"""kdbench installs from a wheel (not editable): the installed package finds the methods and suites it ships,
runs from any folder, and puts no top-level ``methods`` package into site-packages."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the working tree (tracked and untracked-but-not-ignored files, no records)."""
    tree = tmp_path_factory.mktemp("tree")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if not name.startswith("results/") and (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((ROOT / name).read_bytes())
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(tree)], check=True, capture_output=True)
    return next(out.glob("kdbench-*.whl"))


def test_the_wheel_ships_methods_and_suites_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("methods/")], "a top-level methods package would shadow users' own"
    assert {n.split("/")[0] for n in names} == {"kdbench", wheel.name.split("-py3")[0] + ".dist-info"}
    for folder, pattern in (("methods", "*.py"), ("benchmarks/suites", "*.yaml"), ("benchmarks/reference", "*.yaml"),
                            ("benchmarks/tuning", "*.json")):
        shipped = "kdbench/shipped/" + folder.split("/")[-1]
        for path in (ROOT / folder).glob(pattern):
            assert f"{shipped}/{path.name}" in names, f"{folder}/{path.name} is not in the wheel"


def test_an_installed_wheel_lists_and_runs_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    # The installed copy comes first on the path; the folder it runs in is not the repository.
    env = os.environ | {"PYTHONPATH": str(site), "KDBENCH_HOME": str(tmp_path / "home")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def kdbench(*args):
        return subprocess.run([sys.executable, "-m", "kdbench", *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True)

    where = subprocess.run([sys.executable, "-c", "import kdbench.paths as p; print(p.__file__, p.CHECKOUT)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(site) and where[1] == "None"

    listed = kdbench("list", "methods")
    assert listed.returncode == 0, listed.stderr
    assert {p.stem for p in (ROOT / "methods").glob("[!_]*.py")} <= set(listed.stdout.split())
    assert "cpu" in kdbench("list", "suites").stdout

    args = ("run", "--suite", "cpu", "--track", "digits", "--pair", "cnn2d_w32:cnn2d_w4", "--method", "baseline",
            "--seeds", "0")
    run = kdbench(*args, "--results-dir", "r")
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((elsewhere / "r/cpu/digits/cnn2d_w32--cnn2d_w4/baseline/seed0.json").read_text())
    assert record["status"] == "finished" and record["git_commit"] is None and record["env"]["kdbench"]
    # the same run from the source tree, on this machine (the committed record holds only on the machine kind that
    # made it): the wheel trains what the checkout trains
    source = subprocess.run([sys.executable, "-m", "kdbench", *args, "--results-dir", str(tmp_path / "source")],
                            cwd=ROOT, env=os.environ | {"KDBENCH_HOME": str(tmp_path / "source-home")},
                            capture_output=True, text=True)
    assert source.returncode == 0, source.stderr[-2000:]
    checkout = json.loads((tmp_path / "source/cpu/digits/cnn2d_w32--cnn2d_w4/baseline/seed0.json").read_text())
    assert record["metrics"]["test_top1"] == checkout["metrics"]["test_top1"]
    assert record["predictions"] == checkout["predictions"] and record["config_sha256"] == checkout["config_sha256"]

    writes = kdbench("new-method", "my_kd")
    assert writes.returncode == 2 and "pass --dir" in writes.stderr and not list(site.rglob("my_kd.py"))
