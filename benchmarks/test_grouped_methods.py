"""What training the seeds of one pair as one vmapped model would give each method, with its real code.

``test_grouped_step.py`` measures the grouped paths on vanilla KD written out (``kl_div`` has no vmap batching rule).
This one takes every registered method (variants ``<name>+<tag>`` run the same code and are left out) as kdbench
builds it, on the cpu suite's MNIST-1D middle pair (cnn1d_w32 → cnn1d_w8, batch 100, one thread, the method's
default config except takd's assistant and crd's nce_k, as in ``test_loss_speed.py``; stand-in teachers with random
weights: the time, not the accuracy, is measured), and compares for SEEDS students one training step of

- ``per_run``: today's path, one student after the other: the teacher's taps, the student's forward through its taps,
  the method's loss, backward, one fused AdamW step over the student's and the method's student-side parameters;
- ``grouped``: the SEEDS students and their methods stacked (``torch.func.stack_module_state``) and their step run as
  one under ``torch.vmap`` (each convolution becomes one grouped convolution), one fused AdamW over the stacked
  parameters (element-wise: the same update as SEEDS optimizers); the teacher run per seed, as in the runs.

A method whose step cannot run under vmap (an op without a batching rule that raises, in-place writes to state
shared by the seeds) is reported with the error's first sentence; ops that vmap runs one sample at a time (no batching
rule: a slower fallback) are listed. Before timing, the grouped students' first-step gradients are checked against
the per-run ones to float32 rounding. ``extra_info`` records each round's seconds per path; the report gives the
median per-round ratio with its 95 % interval. Nothing here asserts a time.
"""

from __future__ import annotations

import copy
import re
import time
import warnings

import pytest
import torch
from torch.func import functional_call, stack_module_state

from kdbench.losses import summed
from kdbench.method import METHODS
from kdbench.models import create_model
from kdbench.sources import construct, stand_in_source
from kdbench.suite import expand, load_suite
from kdbench.taps import INDEX, FeatureTaps, probe_shapes
from kdbench.train import _StudentStep, make_optimizer

from test_loss_speed import BATCH, CONFIG, NAMES, PROGRESS, STUDENT, TEACHER, TRAIN_SIZE

SEEDS, ROUNDS, WARMUP_STEPS = 15, 10, 2
FALLBACK = re.compile(r"batching rule for (\S+?)\.? ")  # vmap's warning when it loops over an op's samples


pytestmark = pytest.mark.usefixtures("one_thread")  # benchmarks/conftest.py


class Runs:
    """SEEDS students of one method, each with its own method modules, and the data of one step for each."""

    def __init__(self, name: str):
        cls = METHODS.get(name)
        config = cls.Config(**CONFIG.get(name, {}))
        s_taps, t_taps = cls.taps(config)
        (spec,) = expand(load_suite("cpu"), methods=["baseline"], tracks=["mnist1d"], pairs=[f"{TEACHER}:{STUDENT}"],
                         seeds=(0,))
        self.train = spec.train  # the cpu suite's training config of the pair: fused AdamW, its learning rate
        torch.manual_seed(0)
        teacher = stand_in_source(cls, config, create_model(TEACHER),
                                  lambda arch: create_model(arch or TEACHER)).eval().requires_grad_(False)
        self.xs, self.ys = torch.randn(SEEDS, BATCH, 1, 40), torch.randint(0, 10, (SEEDS, BATCH))
        self.index = torch.stack([torch.randperm(TRAIN_SIZE)[:BATCH] for _ in range(SEEDS)])
        self.wants_index = INDEX in s_taps
        shapes = probe_shapes(teacher, t_taps, self.xs[0], TRAIN_SIZE)
        self.steps = []
        for seed in range(SEEDS):
            torch.manual_seed(seed)
            student = create_model(STUDENT)
            method = construct(cls, config, probe_shapes(student, s_taps, self.xs[0], TRAIN_SIZE), shapes,
                               lambda: create_model(STUDENT))
            self.steps.append(_StudentStep(FeatureTaps(student, s_taps), method).train())
        self.teacher = FeatureTaps(teacher, t_taps) if cls.needs_teacher else None

    def teacher_out(self, g: int) -> dict | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(self.xs[g], self.index[g])

    def trained(self, step: _StudentStep) -> list[torch.nn.Parameter]:
        """What the runs' optimizer trains: the student and the method's student-side parameters."""
        return [*step.student.parameters(), *step.method.student_side_parameters()]


class PerRun:
    def __init__(self, runs: Runs):
        self.runs = runs
        self.optimizers = [make_optimizer(runs.trained(s), runs.train) for s in runs.steps]

    def loss(self, g: int) -> torch.Tensor:
        r = self.runs
        index = r.index[g] if r.wants_index else None
        return summed(r.steps[g](r.xs[g], r.teacher_out(g), r.ys[g], PROGRESS, index)[1].values())

    def step(self):
        for g, optimizer in enumerate(self.optimizers):
            loss = self.loss(g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


class Grouped:
    def __init__(self, runs: Runs):
        self.runs = runs
        steps = [copy.deepcopy(s) for s in runs.steps]
        self.params, self.buffers = stack_module_state(steps)
        trained = {id(p) for p in runs.trained(steps[0])}
        names = [n for n, p in steps[0].named_parameters() if id(p) in trained]
        self.optimizer = make_optimizer([self.params[n] for n in names], runs.train)
        base = copy.deepcopy(steps[0]).to("meta")

        def one(params, buffers, x, t_out, y, index):
            _, terms = functional_call(base, (params, buffers), (x, t_out, y, PROGRESS, index))
            return summed(terms.values())

        with_teacher, with_index = runs.teacher is not None, runs.wants_index
        self.losses = torch.vmap(one, in_dims=(0, 0, 0, 0 if with_teacher else None, 0, 0 if with_index else None))

    def loss(self) -> torch.Tensor:
        r = self.runs
        t_out = None
        if r.teacher is not None:
            outs = [r.teacher_out(g) for g in range(SEEDS)]
            t_out = {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        return self.losses(self.params, self.buffers, r.xs, t_out, r.ys, r.index if r.wants_index else None).sum()

    def step(self):
        loss = self.loss()  # the seeds share no parameter: each gets its own loss's gradient
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def grads(self, g: int) -> dict:
        return {n: p.grad[g] for n, p in self.params.items() if p.grad is not None}


def _first_sentence(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(exc).__name__}: {first}"


@pytest.mark.parametrize("name", NAMES)
def test_grouped_method_step(benchmark, name):
    runs = Runs(name)
    per_run = PerRun(runs)
    info = {"method": name, "seeds": SEEDS}
    benchmark.group = f"training step of {SEEDS} seeds per method, per-run vs vmapped"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            grouped = Grouped(runs)
            grouped.loss().backward()  # the same weights went in: the same gradients, to rounding
        except Exception as exc:  # noqa: BLE001 - any op vmap cannot run is this method's finding
            info["error"] = _first_sentence(exc)
    info["fallbacks"] = sorted({m.group(1) for w in caught if (m := FALLBACK.search(str(w.message)))})
    if "error" not in info:
        for g in range(SEEDS):
            per_run.loss(g).backward()
            expected = {n: p.grad for n, p in runs.steps[g].named_parameters() if p.grad is not None}
            got = grouped.grads(g)
            assert expected.keys() <= got.keys(), f"{name}: vmapped step missed gradients of {expected.keys() - got.keys()}"
            scale = max(value.abs().max().item() for value in expected.values())  # rounding of the seed's whole step
            for n, value in expected.items():
                torch.testing.assert_close(got[n], value, rtol=1e-4, atol=1e-5 * scale,
                                           msg=lambda m: f"{name}, seed {g}, {n}: {m}")
        for step in runs.steps:
            step.zero_grad(set_to_none=True)
        paths = {"per_run": per_run, "grouped": grouped}
        times = {p: [] for p in paths}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallbacks, listed above

            def rounds():
                for path in paths.values():
                    for _ in range(WARMUP_STEPS):
                        path.step()
                for r in range(ROUNDS):
                    for key in list(paths)[:: 1 if r % 2 == 0 else -1]:
                        start = time.perf_counter()
                        paths[key].step()
                        times[key].append(time.perf_counter() - start)

            benchmark.pedantic(rounds, rounds=1)
        info["step_seconds"] = times
    else:
        benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info["grouped_method"] = info
