"""The contract every registered method passes; a new file in methods/ gets these tests for free.

Golden loss values live in tests/golden/method_losses.json and are rewritten only by
``pytest --update-golden`` (never on a normal run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdbench.taps import FeatureTaps, probe_shapes
from kdbench.method import METHODS
from kdbench.models import count_params, create_model
from kdbench.sources import construct, stand_in_source

GOLDEN = Path(__file__).parent / "golden" / "method_losses.json"
TEACHER, STUDENT = "cnn1d_w8", "cnn1d_w4"
TRAIN_SIZE = 64
# settings a method cannot do without, which suites give per pair (takd: its assistant's architecture)
REQUIRED = {"takd": {"assistant": "cnn1d_w8"}}
REQUIRED_2D = {"takd": {"assistant": "cnn2d_w8"}}


def one_step(name: str, seed: int = 0, progress: float = 0.5):
    """Fixed tensors, fixed init: build the method and compute one student step's loss terms, by default half-way
    through training (past any warm-up: a method whose terms ramp up from 0 would pin nothing at the start)."""
    torch.manual_seed(seed)
    teacher, student = create_model(TEACHER), create_model(STUDENT)
    x, y = torch.randn(8, 1, 40), torch.arange(8) % 10
    cls = METHODS.get(name)
    config = cls.Config(**REQUIRED.get(name, {}))
    s_taps, t_taps = cls.taps(config)
    teacher = stand_in_source(cls, config, teacher, lambda arch: create_model(arch or TEACHER))
    method = construct(cls, config, probe_shapes(student, s_taps, x, TRAIN_SIZE),
                       probe_shapes(teacher, t_taps, x, TRAIN_SIZE), lambda: create_model(STUDENT))
    teacher.eval().requires_grad_(False)
    index = torch.arange(8) * 3  # the batch's positions in a training split of TRAIN_SIZE samples
    s_out = FeatureTaps(student, s_taps)(x, index)
    t_out = FeatureTaps(teacher, t_taps)(x, index) if cls.needs_teacher else None
    terms = method.loss(s_out, t_out, y, progress)
    return teacher, student, method, s_out, t_out, y, terms


@pytest.fixture(params=METHODS.names())
def name(request):
    return request.param


def test_loss_is_a_dict_of_finite_scalars(name):
    *_, terms = one_step(name)
    assert terms and all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())


def test_gradients_reach_student_and_extras_but_not_teacher(name):
    teacher, student, method, s_out, t_out, y, terms = one_step(name)
    sum(terms.values()).backward()
    for p_name, p in student.named_parameters():
        assert p.grad is not None and torch.any(p.grad != 0), f"no gradient reaches student {p_name}"
    for p in method.student_side_parameters():
        assert p.grad is not None, "a method parameter gets no gradient from the student loss"
    assert all(p.grad is None for p in teacher.parameters())
    adversary = getattr(method, "adversary", None)
    if adversary is not None:
        detached = lambda d: None if d is None else {k: v.detach() for k, v in d.items()}  # noqa: E731
        sum(method.adversary_loss(detached(s_out), detached(t_out), y).values()).backward()
        assert all(p.grad is not None for p in adversary.parameters())
        method.adversary_optimizer(adversary.parameters())  # it must build one


def test_extras_are_not_part_of_the_student(name):
    torch.manual_seed(0)
    reference = create_model(STUDENT)
    _, student, method, *_ = one_step(name)
    assert student.state_dict().keys() == reference.state_dict().keys()
    assert count_params(student) == count_params(reference)
    assert not any(p is q for p in method.parameters() for q in student.parameters())


def test_same_seed_same_loss(name):
    first, second = one_step(name)[-1], one_step(name)[-1]
    assert {k: v.item() for k, v in first.items()} == {k: v.item() for k, v in second.items()}


def test_golden_loss_values(name, update_golden):
    terms = {k: round(v.item(), 6) for k, v in one_step(name)[-1].items()}
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if update_golden:
        golden[name] = terms
        GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
    assert name in golden, f"no golden values for {name}: run `pytest --update-golden` once and commit the file"
    assert terms == pytest.approx(golden[name], rel=1e-4, abs=1e-6)


def test_every_method_documents_itself(name):
    import sys

    cls = METHODS.get(name)
    doc = sys.modules[cls.__module__].__doc__ or ""
    assert "Deviations:" in doc, f"{name}: the module docstring must list deviations"
    assert isinstance(cls.version, int) and cls.version >= 1


@pytest.mark.parametrize("method", [m for m in METHODS.names()])
def test_one_step_on_2d_feature_maps(method):
    """Every method also runs on the 2-D pair of the digits track (spatial attention, 2-D hints)."""
    torch.manual_seed(0)
    teacher, student = create_model("cnn2d_w8"), create_model("cnn2d_w4")
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    cls = METHODS.get(method)
    config = cls.Config(**REQUIRED_2D.get(method, {}))
    s_taps, t_taps = cls.taps(config)
    teacher = stand_in_source(cls, config, teacher, lambda arch: create_model(arch or "cnn2d_w8"))
    m = construct(cls, config, probe_shapes(student, s_taps, x, TRAIN_SIZE), probe_shapes(teacher, t_taps, x, TRAIN_SIZE),
                  lambda: create_model("cnn2d_w4"))
    index = torch.arange(8)
    t_out = FeatureTaps(teacher.eval(), t_taps)(x, index) if cls.needs_teacher else None
    terms = m.loss(FeatureTaps(student, s_taps)(x, index), t_out, y, 0.5)
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.any(p.grad != 0), f"no gradient reaches student {name} on 2-D maps"
