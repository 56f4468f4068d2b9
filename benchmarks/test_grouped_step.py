"""How much faster the CPU tier's training step gets when several seeds of one pair train as one vectorised model.

The cpu suite's MNIST-1D pair (cnn1d_w32 → cnn1d_w8, vanilla KD with the suite's settings, batch 100, fused
AdamW, one thread as every run) trains SEEDS students, each on its own batch:

- ``per_run``: today's path, one student after the other (teacher forward, student forward and backward, step);
- ``grouped``: the SEEDS students stacked with ``torch.func.stack_module_state`` and run as one model under
  ``torch.vmap`` (which turns each convolution into one grouped convolution), one fused AdamW over the stacked
  parameters (element-wise, so the same update as SEEDS separate optimizers), the teacher run per seed;
- ``grouped_teacher_batched``: the same, with the teacher run once on the SEEDS batches concatenated;
- ``compiled``: today's per-run path with each student's forward and loss under ``torch.compile``.

Each round times one step of every student in each path, paths in alternating order; the report gives the median
of the per-round ratios (per-run time over the path's time) with its 95 % interval. The check before timing: the
grouped students' gradients of a first step equal the per-run students' to float32 rounding (not bit for bit: a
grouped convolution sums in another order), and after a few more steps their weights are within a thousandth of the
learning rate of each other (AdamW divides by the root of the squared gradients, so a rounding-level difference in a
gradient near its ε moves a weight by a visible fraction of one step).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from kdbench.models import create_model
from kdbench.suite import expand, load_suite
from kdbench.train import make_optimizer

SEEDS, ROUNDS, WARMUP_STEPS, CHECK_STEPS = 15, 20, 3, 3
TEACHER, STUDENT, IN_SHAPE, CLASSES = "cnn1d_w32", "cnn1d_w8", (1, 40), 10


@pytest.fixture(scope="module")
def setting():
    (spec,) = expand(load_suite("cpu"), methods=["vanilla_kd"], tracks=["mnist1d"], pairs=[f"{TEACHER}:{STUDENT}"],
                     seeds=(0,))
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.train.threads or 1)
    torch.manual_seed(0)
    teacher = create_model(TEACHER, CLASSES, IN_SHAPE).eval().requires_grad_(False)
    batch = spec.train.batch_size
    xs, ys = torch.randn(SEEDS, batch, *IN_SHAPE), torch.randint(0, CLASSES, (SEEDS, batch))
    yield spec, teacher, xs, ys
    torch.set_num_threads(threads)


def kd_loss(z_s, z_t, y, c):
    """The suite's vanilla KD: ce_weight · CE + kd_weight · T² · KL(p_t ‖ p_s)."""
    t = c["temperature"]
    log_p_t = F.log_softmax(z_t / t, -1)  # KL written out: torch.vmap has no batching rule for kl_div
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(z_s / t, -1))).sum(-1).mean()
    return c["ce_weight"] * F.cross_entropy(z_s, y) + c["kd_weight"] * t * t * kl


def students():
    out = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        out.append(create_model(STUDENT, CLASSES, IN_SHAPE).train())
    return out


class PerRun:
    """One model, one optimizer per seed, stepped one after the other."""

    def __init__(self, spec, teacher, compiled: bool = False):
        self.c, self.teacher = spec.method_config, teacher
        self.models = students()
        self.optimizers = [make_optimizer(m.parameters(), spec.train) for m in self.models]
        self.forward = [torch.compile(m) for m in self.models] if compiled else self.models

    def step(self, xs, ys):
        for model, opt, x, y in zip(self.forward, self.optimizers, xs, ys):
            with torch.no_grad():
                z_t = self.teacher(x)
            loss = kd_loss(model(x), z_t, y, self.c)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def weights(self):
        return [dict(m.named_parameters()) for m in self.models]

    def grads(self):
        return [{k: p.grad for k, p in m.named_parameters()} for m in self.models]


class Grouped:
    """The SEEDS students as one vmapped model over stacked parameters and buffers, one fused optimizer."""

    def __init__(self, spec, teacher, batched_teacher: bool):
        self.c, self.teacher, self.batched_teacher = spec.method_config, teacher, batched_teacher
        models = students()
        self.params, self.buffers = stack_module_state(models)  # parameters come back as leaves with grad
        self.base = copy.deepcopy(models[0]).to("meta")
        self.optimizer = make_optimizer(self.params.values(), spec.train)

        def one(params, buffers, x, z_t, y):
            return kd_loss(functional_call(self.base, (params, buffers), (x,)), z_t, y, self.c)

        self.losses = torch.vmap(one)

    def step(self, xs, ys):
        with torch.no_grad():
            if self.batched_teacher:
                z_t = self.teacher(xs.flatten(0, 1)).view(SEEDS, -1, CLASSES)
            else:
                z_t = torch.stack([self.teacher(x) for x in xs])
        loss = self.losses(self.params, self.buffers, xs, z_t, ys).sum()  # the seeds share no parameter
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def weights(self):
        return [{k: v[i] for k, v in self.params.items()} for i in range(SEEDS)]

    def grads(self):
        return [{k: v.grad[i] for k, v in self.params.items()} for i in range(SEEDS)]


def test_grouped_students_train_the_same_weights(setting):
    spec, teacher, xs, ys = setting
    paths = {"per_run": PerRun(spec, teacher), "grouped": Grouped(spec, teacher, batched_teacher=False)}
    for step in range(CHECK_STEPS):
        for path in paths.values():
            path.step(xs, ys)
        if step == 0:  # the same weights went in: the gradients agree to rounding
            for per_run, grouped in zip(paths["per_run"].grads(), paths["grouped"].grads()):
                for name, value in per_run.items():
                    torch.testing.assert_close(grouped[name], value, rtol=1e-4, atol=1e-6)
    for per_run, grouped in zip(paths["per_run"].weights(), paths["grouped"].weights()):
        for name, value in per_run.items():
            torch.testing.assert_close(grouped[name], value, rtol=0, atol=1e-3 * spec.train.lr)


def test_grouped_step(benchmark, setting):
    spec, teacher, xs, ys = setting
    paths = {"per_run": PerRun(spec, teacher), "grouped": Grouped(spec, teacher, batched_teacher=False),
             "grouped_teacher_batched": Grouped(spec, teacher, batched_teacher=True),
             "compiled": PerRun(spec, teacher, compiled=True)}
    for path in paths.values():
        for _ in range(WARMUP_STEPS):  # includes torch.compile's compilation
            path.step(xs, ys)
    times = {name: [] for name in paths}

    def rounds():
        for r in range(ROUNDS):
            for name in list(paths)[:: 1 if r % 2 == 0 else -1]:
                start = time.perf_counter()
                paths[name].step(xs, ys)
                times[name].append(time.perf_counter() - start)

    benchmark.group = f"training step of {SEEDS} seeds (vanilla KD, MNIST-1D {TEACHER} → {STUDENT})"
    benchmark.pedantic(rounds, rounds=1)
    benchmark.extra_info.update(
        grouped_step={"seeds": SEEDS, "rounds": ROUNDS,
                      "step_seconds": times})
