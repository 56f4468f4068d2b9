"""How much faster the CPU tier's training step gets when several seeds of one pair train as one vectorised model.

The cpu suite's MNIST-1D pair (cnn1d_w32 → cnn1d_w8, vanilla KD with the suite's settings, batch 100, fused
AdamW, one thread as every run) trains SEEDS students, each on its own batch:

- ``per_run``: today's path, one student after the other (teacher forward, student forward and backward, step);
- ``grouped``: the SEEDS students stacked with ``torch.func.stack_module_state`` and run as one model under
  ``torch.vmap`` (which turns each convolution into one grouped convolution), one fused AdamW over the stacked
  parameters (element-wise, so the same update as SEEDS separate optimizers), the teacher run per seed;
- ``grouped_teacher_batched``: the same, with the teacher run once on the SEEDS batches concatenated;
- ``grouped_layout``: the SEEDS students side by side on the channel axis without vmap (``GroupedLayout``);
- ``grouped_layout_compiled``: the same, its forward and loss under ``torch.compile``;
- ``compiled``: today's per-run path with each student's forward and loss under ``torch.compile``.

Each round times one step of every student in each path, paths in alternating order; the report gives the median
of the per-round ratios (per-run time over the path's time) with its 95 % interval. The check before timing: the
grouped students' gradients of a first step equal the per-run students' to float32 rounding (not bit for bit: a
grouped convolution sums in another order), and after a few more steps their weights are within a twentieth of the
learning rate of each other (AdamW divides by the root of the squared gradients, so a rounding-level difference in a
gradient near its ε moves a weight by a visible fraction of one step: at most a thousandth of the learning rate on
AVX-512 CPUs, 1.4 % of it on an AVX2-only AMD EPYC, whose kernels round differently; a student given another seed's
first convolution is 0.87 off, against the 0.0023 allowed).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
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


class GroupedLayout:
    """The SEEDS students as one model without vmap: the seeds side by side on the channel axis, (B, SEEDS · C, L),
    each block one grouped convolution (groups = SEEDS) and one batch norm over all SEEDS · width channels, the
    heads one batched matmul; one fused optimizer over the joined parameters (element-wise: the same update);
    ``compiled``: the forward and loss under ``torch.compile``."""

    def __init__(self, spec, teacher, compiled: bool = False):
        self.c, self.teacher = spec.method_config, teacher
        models = students()
        self.blocks = nn.Sequential(*(self._joined([m.blocks[i] for m in models])
                                      for i in range(len(models[0].blocks))))
        self.head_weight = nn.Parameter(torch.stack([m.head.weight.detach() for m in models]).transpose(1, 2).clone())
        self.head_bias = nn.Parameter(torch.stack([m.head.bias.detach() for m in models]).unsqueeze(1).clone())
        self.params = [*self.blocks.parameters(), self.head_weight, self.head_bias]
        self.optimizer = make_optimizer(self.params, spec.train)
        self.loss = torch.compile(self._loss) if compiled else self._loss

    @staticmethod
    def _joined(blocks) -> nn.Sequential:
        """SEEDS conv → BN → ReLU blocks as one: weights and batch-norm state concatenated seed after seed."""
        conv, bn = blocks[0][0], blocks[0][1]
        joined_conv = nn.Conv1d(SEEDS * conv.in_channels, SEEDS * conv.out_channels, conv.kernel_size,
                                stride=conv.stride, padding=conv.padding, groups=SEEDS, bias=False)
        joined_bn = nn.BatchNorm1d(SEEDS * bn.num_features, eps=bn.eps, momentum=bn.momentum)
        with torch.no_grad():
            joined_conv.weight.copy_(torch.cat([b[0].weight for b in blocks]))
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(joined_bn, name).copy_(torch.cat([getattr(b[1], name) for b in blocks]))
        return nn.Sequential(joined_conv, joined_bn, nn.ReLU(inplace=True)).train()

    def _loss(self, xs, z_t, ys):
        batch = xs.shape[1]
        h = self.blocks(xs.transpose(0, 1).reshape(batch, -1, IN_SHAPE[1]))  # (B, SEEDS · C_in, L)
        h = h.view(batch, SEEDS, -1).transpose(0, 1)  # (SEEDS, B, width · L'): each seed's flattened last block
        z = torch.baddbmm(self.head_bias, h, self.head_weight)
        # the seeds' losses summed: SEEDS × the loss of all their samples together (equal batch sizes)
        return SEEDS * kd_loss(z.flatten(0, 1), z_t.flatten(0, 1), ys.flatten(), self.c)

    def step(self, xs, ys):
        with torch.no_grad():
            z_t = torch.stack([self.teacher(x) for x in xs])
        loss = self.loss(xs, z_t, ys)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _per_seed(self, tensors) -> list[dict]:
        blocks, (weight, bias) = tensors[:-2], tensors[-2:]
        out = []
        for g in range(SEEDS):
            seed = {}
            for i in range(len(blocks) // 3):
                conv, bn_weight, bn_bias = blocks[3 * i: 3 * i + 3]
                for name, joined in ((f"blocks.{i}.0.weight", conv), (f"blocks.{i}.1.weight", bn_weight),
                                     (f"blocks.{i}.1.bias", bn_bias)):
                    seed[name] = joined.view(SEEDS, -1, *joined.shape[1:])[g]
            seed["head.weight"], seed["head.bias"] = weight[g].t(), bias[g, 0]
            out.append(seed)
        return out

    def weights(self):
        return self._per_seed([p.detach() for p in self.params])

    def grads(self):
        return self._per_seed([p.grad for p in self.params])


@pytest.mark.parametrize("grouped_path", ["grouped", "grouped_layout", "grouped_layout_compiled"])
def test_grouped_students_train_the_same_weights(setting, grouped_path):
    spec, teacher, xs, ys = setting
    paths = {"per_run": PerRun(spec, teacher),
             "grouped": Grouped(spec, teacher, batched_teacher=False) if grouped_path == "grouped"
             else GroupedLayout(spec, teacher, compiled=grouped_path == "grouped_layout_compiled")}
    for step in range(CHECK_STEPS):
        for path in paths.values():
            path.step(xs, ys)
        if step == 0:  # the same weights went in: the gradients agree to rounding
            for per_run, grouped in zip(paths["per_run"].grads(), paths["grouped"].grads()):
                for name, value in per_run.items():
                    torch.testing.assert_close(grouped[name], value, rtol=1e-4, atol=1e-6)
    for per_run, grouped in zip(paths["per_run"].weights(), paths["grouped"].weights()):
        for name, value in per_run.items():
            torch.testing.assert_close(grouped[name], value, rtol=0, atol=0.05 * spec.train.lr)


def test_grouped_step(benchmark, setting):
    spec, teacher, xs, ys = setting
    paths = {"per_run": PerRun(spec, teacher), "grouped": Grouped(spec, teacher, batched_teacher=False),
             "grouped_teacher_batched": Grouped(spec, teacher, batched_teacher=True),
             "grouped_layout": GroupedLayout(spec, teacher),
             "grouped_layout_compiled": GroupedLayout(spec, teacher, compiled=True),
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
