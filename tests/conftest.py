"""Shared fixtures: an isolated kdbench home and MLflow store, and a tiny suite that trains in seconds."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import pytest

TINY_SUITE = """\
name: tiny
tier: cpu
seeds: [0, 1]
methods:
  baseline: {}
  vanilla_kd: {}
measure: {threads: 1, throughput_batch: 16, min_run_time: 0.01}
tracks:
  mnist1d:
    pairs:
      - {teacher: cnn1d_w8, student: cnn1d_w4}
    teacher_train: {epochs: 2, batch_size: 200, lr: 0.01}
    train: {epochs: 2, batch_size: 200, lr: 0.01}
"""


CLEAN_COMMIT = "0" * 40

# Teacher/student pairs of the CRD benchmark's CIFAR-100 zoo (kdbench.models.cifar).
CRD_PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"), ("vgg13", "vgg8")]


def zoo_step(name, teacher_name, student_name, labels, *, train_size, progress, index=None, config=None,
             freeze_teacher=True):
    """One loss evaluation of method ``name`` on a CRD-zoo pair, as the trainer does it (no backward pass).

    Seeds 0, creates the teacher (eval mode; frozen unless ``freeze_teacher=False``) and the student, draws images
    x (len(labels), 3, 32, 32), builds the method from the probed tap shapes (``train_size`` for the ``index`` tap),
    takes the teacher's taps under no_grad and calls ``method.loss(student taps, teacher taps, y, progress)``.
    ``index``: the samples' positions in the training split (default 0 … B-1); ``config``: overrides of the
    method's defaults (default: ``cls.Config()``). Returns every intermediate object in a namespace."""
    import torch

    from kdbench.method import METHODS, validate_config
    from kdbench.models import create_model
    from kdbench.taps import FeatureTaps, probe_shapes

    torch.manual_seed(0)
    teacher, student = create_model(teacher_name).eval(), create_model(student_name)
    if freeze_teacher:
        teacher.requires_grad_(False)
    x, y = torch.randn(len(labels), 3, 32, 32), torch.tensor(labels)
    index = torch.arange(len(labels)) if index is None else torch.tensor(index)
    cls = METHODS.get(name)
    config = cls.Config() if config is None else validate_config(cls, config)
    s_taps, t_taps = cls.taps(config)
    s_shapes, t_shapes = probe_shapes(student, s_taps, x, train_size), probe_shapes(teacher, t_taps, x, train_size)
    method = cls(config, s_shapes, t_shapes)
    with torch.no_grad():
        t_out = FeatureTaps(teacher, t_taps)(x, index)
    s_out = FeatureTaps(student, s_taps)(x, index)
    terms = method.loss(s_out, t_out, y, progress)
    return SimpleNamespace(teacher=teacher, student=student, method=method, config=config, x=x, y=y, index=index,
                           s_taps=s_taps, t_taps=t_taps, s_shapes=s_shapes, t_shapes=t_shapes, s_out=s_out,
                           t_out=t_out, terms=terms)


def method_module(name):
    """The module of registered method ``name``'s file, for tests of its private helpers."""
    import sys

    from kdbench.method import METHODS

    return sys.modules[METHODS.get(name).__module__]


def embedding_method(name, s_dim, t_dim, **overrides):
    """Method ``name`` built on a 3-class ``logits`` tap and an ``embedding`` tap of s_dim / t_dim features."""
    from kdbench.method import METHODS, validate_config

    cls = METHODS.get(name)
    shapes = lambda d: {"logits": (3,), "embedding": (d,)}  # noqa: E731
    return cls(validate_config(cls, overrides), shapes(s_dim), shapes(t_dim))


def embedding_step(method, f_s, f_t, logits=None, y=None):
    """The loss terms of an ``embedding_method`` on embeddings f_s, f_t (logits and labels zero unless given)."""
    import torch

    b = f_s.shape[0]
    logits = torch.zeros(b, 3, dtype=f_s.dtype) if logits is None else logits
    y = torch.zeros(b, dtype=torch.long) if y is None else y
    return method.loss({"logits": logits, "embedding": f_s}, {"logits": logits, "embedding": f_t}, y, 0.0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and spares a shared 2-core machine from oversubscription (a module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def session_home(tmp_path_factory):
    return tmp_path_factory.mktemp("kdbench-home")


@pytest.fixture(autouse=True)
def isolated_home(session_home, monkeypatch):
    """Teacher cache and MLflow store in a temporary folder shared by the session (created once)."""
    monkeypatch.setenv("KDBENCH_HOME", str(session_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{session_home / 'mlflow.db'}")
    return session_home


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, session_home):
    """The tiny suite run once per test module (2 methods × 2 seeds) with its own MLflow store; its folder. Its
    records say they come from a clean checkout, whatever the state of the working tree running the tests."""
    return run_suite_once(tmp_path_factory.mktemp("tiny-run"), TINY_SUITE, session_home, suite_file="tiny.yaml")


def run_suite_once(root, suite_text: str, session_home, *args: str, suite_file: str = "suite.yaml"):
    """``kdbench run`` of a suite written into ``root`` (records under root/results, its own MLflow store), with
    records that say they come from a clean checkout, whatever the state of the working tree; ``root``."""
    from kdbench.cli import main

    suite = root / suite_file
    suite.write_text(suite_text)
    mp = pytest.MonkeyPatch()
    mp.setenv("KDBENCH_HOME", str(session_home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for module in ("kdbench.records", "kdbench.timing"):  # as if made from a clean checkout (tests/test_git_state.py)
        mp.setattr(f"{module}.git_state", lambda: (CLEAN_COMMIT, False))
    try:
        assert main(["run", "--suite", str(suite), "--results-dir", str(root / "results"), *args]) == 0
    finally:
        mp.undo()
    return root


@pytest.fixture
def tiny_suite(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY_SUITE))
    return path


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.json from the current code")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
