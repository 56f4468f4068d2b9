"""A record's git_dirty: anything but the generated outputs differing from HEAD, untracked files included."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kdbench import records
from kdbench.cli import main
from kdbench.records import git_state, would_dirty_checkout


def _git(root, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                           *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never the repository around tmp_path
    root = tmp_path / "repo"
    for name, text in {"kdbench/code.py": "x = 1\n", "results/cpu/seed0.json": "{}\n", "leaderboard.md": "# lb\n",
                       "methods/README.md": "# methods\n", "methods/vanilla_kd.py": "y = 2\n",
                       ".gitignore": "*.log\n.kdbench/\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    return root


def test_clean_checkout(repo):
    assert git_state(repo) == (_git(repo, "rev-parse", "HEAD"), False)


def test_modified_code_is_dirty(repo):
    (repo / "kdbench" / "code.py").write_text("x = 2\n")
    assert git_state(repo)[1] is True


def test_modified_method_file_is_dirty(repo):
    (repo / "methods" / "vanilla_kd.py").write_text("y = 3\n")
    assert git_state(repo)[1] is True


def test_generated_outputs_are_not_dirty(repo):
    (repo / "results" / "cpu" / "seed0.json").write_text('{"a": 1}\n')
    (repo / "results" / "cpu" / "seed1.json").write_text("{}\n")  # a new record: untracked, still generated
    (repo / "results" / "new-suite").mkdir()
    (repo / "results" / "new-suite" / "seed0.json").write_text("{}\n")
    (repo / "leaderboard.md").write_text("# lb, regenerated\n")
    (repo / "methods" / "README.md").write_text("# methods, regenerated\n")
    assert git_state(repo)[1] is False


def test_untracked_files_are_dirty_unless_ignored(repo):
    (repo / "run.log").write_text("ignored\n")
    (repo / ".kdbench").mkdir()
    (repo / ".kdbench" / "mlflow.db").write_text("ignored\n")
    assert git_state(repo)[1] is False
    (repo / "kdbench" / "new_module.py").write_text("z = 3\n")
    assert git_state(repo)[1] is True


def test_untracked_folder_is_dirty(repo):
    (repo / "extra").mkdir()
    (repo / "extra" / "helper.py").write_text("z = 3\n")
    assert git_state(repo)[1] is True


def test_outside_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state(tmp_path) == (None, None)


def test_default_root_is_the_package_checkout():
    import kdbench

    root = Path(kdbench.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("kdbench is not running from a git checkout")
    assert git_state()[0] == _git(root, "rev-parse", "HEAD")


def test_a_results_dir_that_would_dirty_the_checkout_is_found(repo, tmp_path, monkeypatch):
    monkeypatch.setattr(records, "CHECKOUT", repo)
    assert would_dirty_checkout(repo / "results-new") and would_dirty_checkout(repo / "kdbench" / "out")
    assert not would_dirty_checkout(repo / "results" / "mine")  # generated outputs
    assert not would_dirty_checkout(repo / ".kdbench" / "r")  # ignored
    assert not would_dirty_checkout(tmp_path / "elsewhere")


def test_run_refuses_such_a_results_dir_before_training(repo, tiny_suite, monkeypatch, capsys):
    monkeypatch.setattr(records, "CHECKOUT", repo)
    assert main(["run", "--suite", str(tiny_suite), "--results-dir", str(repo / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is inside the checkout but outside results/" in err
    assert not (repo / "out").exists()
