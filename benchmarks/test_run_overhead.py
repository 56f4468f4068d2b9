"""What a benchmark run costs besides training (``nox -s perf``): the ONNX export that its int8 accuracy needs.

A full ``torch.onnx.export`` traces the model, decomposes it, translates it and optimises the graph, about 0.8 s
for a CPU-tier student: as much as training a digits student. ``kdbench.deploy.export(..., architecture=key)``
traces each architecture once per process and gives each later model its own weights in a copy of the graph
before the same optimisation. Both are timed on students of the cpu suite, in paired rounds (order alternating),
after a check that they give the same outputs; ``extra_info`` records each round's seconds per export. Nothing here
asserts a time.
"""

from __future__ import annotations

import time

import pytest
import torch

from kdbench import deploy
from kdbench.models import MODELS, create_model

ROUNDS = 15
STUDENTS = ["cnn1d_w8", "cnn2d_w16"]  # the MNIST-1D and digits students of the suite's middle pairs


def _student(name: str, seed: int) -> torch.nn.Module:
    """A student of ``name`` with weights and batch-norm statistics of its own (as after training)."""
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.rand_like(tensor))
    return model.eval()


@pytest.mark.parametrize("name", STUDENTS)
def test_export_traced_once_per_architecture(benchmark, name):
    x = torch.randn(8, *MODELS.get(name).in_shape)
    first, student = _student(name, 0), _student(name, 1)
    deploy._TRACED.clear()
    deploy.export(first, x, architecture=name)  # the process's first student of this architecture traces it
    full, reused = deploy.export(student, x), deploy.export(student, x, architecture=name)
    assert torch.equal(deploy.run(deploy.session(full, 1), x), deploy.run(deploy.session(reused, 1), x))
    exports = {"full": lambda: deploy.export(student, x), "traced_once": lambda: deploy.export(student, x, name)}
    seconds: dict[str, list[float]] = {path: [] for path in exports}

    def one_round():
        order = list(exports) if len(seconds["full"]) % 2 == 0 else list(reversed(exports))
        for path in order:
            start = time.perf_counter()
            exports[path]()
            seconds[path].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=ROUNDS)
    benchmark.extra_info["export_seconds"] = {"model": name, **seconds}
