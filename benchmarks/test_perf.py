"""Performance benchmarks (pytest-benchmark): run with ``nox -s perf`` (or ``pytest benchmarks``).

Each comparison is measured in one run on one machine and reported as a ratio by ``benchmarks/perf_report.py``:
- kdbench's training loop against a minimal hand-written PyTorch loop doing the same math (vanilla KD on the
  MNIST-1D pair of the cpu suite, same batch, same models, one epoch with its validation pass);
- the same loop with cached against uncached teacher outputs (the trained weights must be identical);
- the spread of the latency measurement: 10 repeated measurements of the pair's teacher and student, timed
  side by side as every run times them (and, for contrast, one after the other);
- eager latency timed in the same rounds as ONNX Runtime sessions (as deployed runs time them) against eager
  timed alone, with the sessions' threads not spinning (kdbench's) and spinning (ONNX Runtime's default).
Nothing here asserts a time; the assertions check that the compared paths compute the same thing.
"""

from __future__ import annotations

import dataclasses

import time

import pytest
import torch
import torch.nn.functional as F

from kdbench import deploy
from kdbench.taps import FeatureTaps
from kdbench.metrics import (CHECK_INPUTS, _eager_call, _session_call, calibration_for, forward_times, predict,
                             time_calls, top1)
from kdbench.method import METHODS
from kdbench.models import create_model
from kdbench.runner import Placement, deterministic, track_data
from kdbench.sources import build_methods
from kdbench.suite import expand, load_suite
from kdbench.teachers import cached_teacher_outputs, load_or_train_teacher
from kdbench.tracks import Split, TrackData
from kdbench.models.bert import MAX_LENGTH, PRETRAINED
from kdbench.train import fit, make_optimizer, make_scheduler

ROUNDS = 5
PAIRED_ROUNDS = 30
BERT_STEPS, BERT_ROUNDS = 40, 6
WEIGHT_TOLERANCE_GPU = 1e-4  # cuBLAS may sum in another order with other batch layouts; measured gaps: 1.8e-6


@pytest.fixture(scope="module")
def setup():
    """The cpu suite's MNIST-1D cnn1d_w32 → cnn1d_w8 vanilla_kd run, one epoch, with its trained (cached)
    teacher, on the training split without its augmentation: the loops and the teacher cache are compared on
    fixed inputs (with augmentation the suite's runs take the uncached path)."""
    (spec,) = expand(load_suite("cpu"), methods=["vanilla_kd"], tracks=["mnist1d"], pairs=["cnn1d_w32:cnn1d_w8"],
                     seeds=(0,))
    deterministic("cpu")  # as every run
    data = track_data(spec, Placement())
    # the suite's teacher, trained (if not cached yet) on the suite's data: with augmentation, which the cache key
    # assumes; only then is the augmentation dropped for the comparisons
    teacher, key = load_or_train_teacher(spec.track, data, spec.teacher, spec.teacher_train, spec.teacher_seed)
    data = dataclasses.replace(data, train=dataclasses.replace(data.train, augment=None))
    cfg = spec.train.model_copy(update={"epochs": 1})
    torch.set_num_threads(cfg.threads or spec.measure.threads)  # the hand-written loop trains as kdbench's does
    return spec, data, teacher, key, cfg


def _fresh(spec, data, teacher):
    torch.manual_seed(spec.seed)
    student = create_model(spec.student, data.num_classes, data.in_shape)
    (method,) = build_methods([spec], data, student, teacher)
    return student, method


def _kdbench_epoch(setup, cached: bool):
    spec, data, teacher, key, cfg = setup
    outputs = cached_teacher_outputs(teacher, METHODS.get("vanilla_kd").taps(None)[1], data.train, key)[0]
    state = {}

    def prepare():
        state["student"], state["method"] = _fresh(spec, data, teacher)
        return (), {}

    def run():
        fit(state["student"], state["method"], teacher, data, cfg, spec.seed,
            teacher_outputs=outputs if cached else None)

    return state, prepare, run


def test_kdbench_loop(benchmark, setup):
    _, prepare, run = _kdbench_epoch(setup, cached=False)
    benchmark.group = "training loop (vanilla KD, MNIST-1D, 1 epoch)"
    benchmark.pedantic(run, setup=prepare, rounds=ROUNDS)


def _handwritten_epoch(setup):
    """The same math as kdbench's vanilla_kd step, written out: no taps, no term dicts, no checks."""
    spec, data, teacher, _, cfg = setup
    c = spec.method_config
    temperature, ce_weight, kd_weight = c["temperature"], c["ce_weight"], c["kd_weight"]
    state = {}

    def prepare():
        torch.manual_seed(spec.seed)
        state["student"] = create_model(spec.student, data.num_classes, data.in_shape)
        return (), {}

    def run():
        student = state["student"]
        order = torch.Generator().manual_seed(spec.seed)
        steps = len(data.train) // cfg.batch_size
        optimizer = make_optimizer(student.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg, steps)
        student.train()
        perm = torch.randperm(len(data.train), generator=order)
        for i in range(steps):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, y = data.train.x[idx], data.train.y[idx]
            with torch.no_grad():
                t_logits = teacher(x)
            logits = student(x)
            kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(t_logits / temperature, 1),
                          reduction="batchmean", log_target=True) * temperature**2
            loss = ce_weight * F.cross_entropy(logits, y) + kd_weight * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        top1(predict(student, data.val), data.val.y)

    return state, prepare, run


def test_handwritten_loop(benchmark, setup):
    _, prepare, run = _handwritten_epoch(setup)
    benchmark.group = "training loop (vanilla KD, MNIST-1D, 1 epoch)"
    benchmark.pedantic(run, setup=prepare, rounds=ROUNDS)


def test_kdbench_loop_cached_teacher(benchmark, setup):
    _, prepare, run = _kdbench_epoch(setup, cached=True)
    benchmark.group = "training loop (vanilla KD, MNIST-1D, 1 epoch)"
    benchmark.pedantic(run, setup=prepare, rounds=ROUNDS)


def test_the_three_loops_train_the_same_weights(setup):
    """Same math, bit for bit: hand-written, kdbench, kdbench with cached teacher outputs (one epoch of each,
    trained here, whatever else ran)."""
    weights = {}
    for name, (state, prepare, run) in {"uncached": _kdbench_epoch(setup, cached=False),
                                        "handwritten": _handwritten_epoch(setup),
                                        "cached": _kdbench_epoch(setup, cached=True)}.items():
        prepare()
        run()
        weights[name] = state["student"].state_dict()
    for name in ("handwritten", "cached"):
        assert all(torch.equal(weights[name][k], v) for k, v in weights["uncached"].items()), name


def test_paired_rounds(benchmark, setup):
    """The three loops again, one epoch each per round, in a rotating order: the machine's speed drifts over
    seconds, and loops timed side by side in one round see the same drift, so the report also gives the
    median over rounds of each round's ratio (the pytest-benchmark time is that of a whole round)."""
    loops = {"kdbench": _kdbench_epoch(setup, cached=False), "handwritten": _handwritten_epoch(setup),
             "cached": _kdbench_epoch(setup, cached=True)}
    times = {name: [] for name in loops}
    rounds = iter(range(PAIRED_ROUNDS))

    def one_round():
        names = list(loops)
        k = next(rounds) % len(names)
        for name in names[k:] + names[:k]:
            _, prepare, run = loops[name]
            prepare()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    benchmark.group = "paired rounds: hand-written, kdbench, kdbench cached (1 epoch each)"
    benchmark.pedantic(one_round, rounds=PAIRED_ROUNDS)
    benchmark.extra_info["epoch_seconds"] = times


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a BERT-base step takes seconds on a CPU")
def test_cached_teacher_sst2_pair_on_gpu(benchmark, tmp_path):
    """Cached against uncached teacher outputs where the GPU tier uses the cache (no augmentation there): the
    sst2 suite's pair and vanilla_kd settings, one epoch each in rounds of alternating order. A randomly
    initialised BERT-base is saved as the pretrained folder (bert_base_6l takes its even layers, as in the suite)
    and the data are random token sequences of 128: the time, not the accuracy, is measured."""
    from transformers import BertConfig, BertForSequenceClassification

    spec = expand(load_suite("sst2"), methods=["vanilla_kd"], seeds=(0,))[0]
    deterministic("cuda")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(num_labels=2)).save_pretrained(tmp_path / "pretrained" / PRETRAINED)
    tokens = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        ids = torch.randint(1000, 30000, (n, 2, MAX_LENGTH), generator=tokens)
        ids[:, 1] = 1  # the attention mask: every position a token (padding costs the same time)
        return Split(ids, torch.randint(0, 2, (n,), generator=tokens))

    data = TrackData(split(BERT_STEPS * spec.train.batch_size), split(64), split(64), 2, (2, MAX_LENGTH))
    teacher = create_model(spec.teacher, 2, data.in_shape, tmp_path).cuda()
    outputs = cached_teacher_outputs(teacher, METHODS.get("vanilla_kd").taps(None)[1], data.train, "sst2-bench")[0]
    cfg = spec.train.model_copy(update={"epochs": 1})
    times, weights = {"uncached": [], "cached": []}, {}
    rounds = iter(range(BERT_ROUNDS))

    def one_round():
        names = list(times)[:: 1 if next(rounds) % 2 == 0 else -1]
        for name in names:
            torch.manual_seed(spec.seed)
            student = create_model(spec.student, 2, data.in_shape, tmp_path).cuda()
            (method,) = build_methods([spec], data, student, teacher)
            torch.cuda.synchronize()
            start = time.perf_counter()
            fit(student, method, teacher, data, cfg, spec.seed, teacher_outputs=outputs if name == "cached" else None)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            weights[name] = torch.cat([p.detach().flatten() for p in student.parameters()])

    benchmark.group = "cached teacher outputs on the sst2 pair (GPU, 1 epoch each)"
    benchmark.pedantic(one_round, rounds=BERT_ROUNDS)
    gap = (weights["cached"] - weights["uncached"]).abs().max().item()
    benchmark.extra_info.update(epoch_seconds=times, steps=BERT_STEPS, device_name=torch.cuda.get_device_name(),
                                max_weight_difference=gap)
    assert gap < WEIGHT_TOLERANCE_GPU, f"cached and uncached teacher outputs trained weights {gap:.2e} apart"


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # every device this machine has


@pytest.mark.parametrize("device", DEVICES)
def test_latency_repeatability(benchmark, setup, device):
    """10 repeated batch-1 latency measurements of the pair's teacher and student, timed side by side as every
    run times them; and, for contrast, 10 where each model has its own window, one after the other (how runs
    timed them before). The report gives the coefficient of variation of each latency and of their ratio."""
    spec, data, *_ = setup
    torch.manual_seed(0)
    models = {name: create_model(name, data.num_classes, data.in_shape).to(device) for name in (spec.teacher, spec.student)}
    sample = data.test.sample(1)
    m = spec.measure
    side_by_side, one_after_other = [], []

    def measure_both_ways():
        side_by_side.append([t for t, _ in forward_times(list(models.values()), sample, 1, m.threads, m.min_run_time)])
        one_after_other.append([forward_times([net], sample, 1, m.threads, m.min_run_time)[0][0] for net in models.values()])

    benchmark.group = "latency measurement (10 repeats)"
    benchmark.pedantic(measure_both_ways, rounds=10)
    benchmark.extra_info.update(models=list(models), latency_ms=side_by_side, one_after_other_ms=one_after_other,
                                device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu")


def test_timing_beside_onnx_runtime(benchmark, setup):
    """Batch-1 eager latency of the pair's teacher and student timed alone, and in the same rounds as their ONNX
    Runtime fp32 and int8 sessions (as every deployed run times them), once with sessions whose threads do not
    spin (kdbench's) and once with ONNX Runtime's default spinning; 5 repeats. A spinning session keeps a core
    busy after its calls, so the eager models timed next are timed on a busy machine."""
    spec, data, *_ = setup
    m = spec.measure
    torch.manual_seed(0)
    models = [create_model(name, data.num_classes, data.in_shape) for name in (spec.teacher, spec.student)]
    inputs = data.test.sample(CHECK_INPUTS)
    exported = [deploy.export_checked(model, inputs, m.threads)[0] for model in models]
    calibration = calibration_for(data, m)
    int8 = [deploy.quantize(e, calibration) for e in exported]
    eager = [_eager_call(model, inputs[:1], 1) for model in models]
    timed = {"alone": [], "beside sessions that do not spin": [], "beside spinning sessions": []}

    def beside(spin: bool) -> list:
        calls = []
        for call, fp32, q8 in zip(eager, exported, int8):
            calls += [call, *(_session_call(deploy.session(b, m.threads, spin=spin), inputs[:1], 1) for b in (fp32, q8))]
        return calls

    def measure():
        timed["alone"].append(time_calls(eager, m.threads, m.min_run_time))
        for key, spin in (("beside sessions that do not spin", False), ("beside spinning sessions", True)):
            timed[key].append(time_calls(beside(spin), m.threads, m.min_run_time)[::3])  # the eager calls

    benchmark.group = "eager latency beside ONNX Runtime (5 repeats)"
    benchmark.pedantic(measure, rounds=5)
    benchmark.extra_info.update(models=[spec.teacher, spec.student], eager_beside_ort_ms=timed)


def test_taps_add_no_work(setup):
    """FeatureTaps returns the model's own logits (the kdbench path computes what the hand-written one does)."""
    _, data, teacher, *_ = setup
    x = data.train.x[:8]
    with torch.no_grad():
        assert torch.equal(FeatureTaps(teacher, ())(x)["logits"], teacher(x))
