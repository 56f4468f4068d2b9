"""One run trained with DDP on two CPU processes (gloo) ends where one process ends at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdbench.config import TrainConfig
from kdbench.distributed import Ranks
from kdbench.taps import FeatureTaps, probe_shapes
from kdbench.method import METHODS
from kdbench.teachers import TeacherOutputs
from kdbench.tracks import Split, TrackData
from kdbench.train import fit

WORLD_SIZE = 2
FEATURES, CLASSES = 12, 3
# Each process computes the mean over its half of the global batch and DDP averages the two gradients: the same
# number as one process's mean up to float32 summation order. After eight AdamW steps the weights differ by
# ≤ 3e-8 (measured); a wrong shard or an unsynchronized module moves them by 1e-3 or more.
WEIGHT_ATOL = 1e-6
# method → (its config, teacher outputs from the cache, random augmentation): the ways a step can differ
CASES = {
    "vanilla_kd": ({}, True, False),
    "fitnets": ({"stages": [0]}, False, True),  # its own trainable regressor
    "adversarial": ({}, False, True),  # a discriminator trained by a second optimizer, its own DDP
}


class MLP(nn.Module):
    """No batch norm: under DDP its statistics stay per process, so only BN-free models match one process."""

    stages = ("body",)

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU())
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def _data(augment: bool) -> TrackData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, FEATURES, generator=g)
    y = x[:, :CLASSES].argmax(1)
    noise = (lambda batch, gen: batch + 0.1 * torch.randn(batch.shape, generator=gen)) if augment else None
    held_out = Split(x[64:], y[64:])
    return TrackData(Split(x[:64], y[:64], augment=noise), held_out, held_out, CLASSES, (FEATURES,))


def _train(name: str, ranks: Ranks | None, compile: str = "none") -> dict:
    """Two epochs of 4 steps at global batch 16: the final weights of student and method, the history, and the
    batch sizes the loss saw."""
    config, cached, augment = CASES[name]
    data = _data(augment)
    torch.manual_seed(1)
    teacher = MLP(32).eval()
    torch.manual_seed(0)
    student = MLP(8)
    cls = METHODS.get(name)
    cfg = cls.Config(**config)
    (s_taps, t_taps), x = cls.taps(cfg), data.train.x
    method = cls(cfg, probe_shapes(student, s_taps, x), probe_shapes(teacher, t_taps, x))
    seen = []  # batch sizes the loss is computed on: each process's shard
    loss = method.loss
    method.loss = lambda *args: seen.append(len(args[2])) or loss(*args)
    outputs = None
    if cached:
        tapper = FeatureTaps(teacher, t_taps)
        with torch.no_grad():
            outputs = TeacherOutputs(tapper(x), "test")
        tapper.remove()
    history = fit(student, method, teacher, data, TrainConfig(epochs=2, batch_size=16, lr=0.01, compile=compile),
                  seed=0, teacher_outputs=outputs, ranks=ranks)
    weights = {f"student.{k}": v for k, v in student.state_dict().items()}
    return weights | {f"method.{k}": v for k, v in method.state_dict().items()} | {"history": history, "seen": seen}


def _rank(rank: int, init_file: str, out: str, compile: str = "none") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        ranks = Ranks(rank, WORLD_SIZE, rank, "gloo")
        torch.save({name: _train(name, ranks, compile) for name in CASES}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD_SIZE)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", CASES)
def test_ddp_matches_one_process_at_the_same_global_batch(ddp_results, name):
    single = _train(name, None)
    rank0, rank1 = (results[name] for results in ddp_results)
    assert rank0.keys() == single.keys()
    assert set(single["seen"]) == {16} and set(rank0["seen"]) == set(rank1["seen"]) == {8}  # each trains on half
    for ddp_row, row in zip(rank0["history"], single["history"], strict=True):  # the logged losses are global
        assert ddp_row.keys() == row.keys()
        assert all(ddp_row[k] == pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in row.items())
    for key in single.keys() - {"seen", "history"}:
        assert torch.equal(rank0[key], rank1[key]), f"{key}: the replicas drifted apart"
        assert torch.allclose(rank0[key], single[key], rtol=0, atol=WEIGHT_ATOL), \
            f"{key}: max |DDP - one process| = {(rank0[key] - single[key]).abs().max():.2e}"


@pytest.mark.slow
def test_ddp_with_compile_matches_one_eager_process(tmp_path):
    """torch.compile of the steps after DDP's wrapping (TrainConfig.compile) keeps the shards, the gradient averaging
    and the adversary's own DDP: within WEIGHT_ATOL of one eager process (measured: ≤ 3e-8)."""
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path), "default"), nprocs=WORLD_SIZE)
    compiled = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for name in CASES:
        single = _train(name, None)
        for key in single.keys() - {"seen", "history"}:
            assert torch.allclose(compiled[name][key], single[key], rtol=0, atol=WEIGHT_ATOL), f"{name} {key}"


# Batch norm statistics stay per process (SyncBatchNorm needs a GPU): cnn1d_w4 normalizes each half-batch of
# 100 by itself instead of the batch of 200, so the tiny run lands near, not on, one process's result. Measured
# on AMD EPYC: first-epoch training loss 2.0355 vs 2.0301 (0.3 %), test top-1 34.79 % vs 35.58 %. The second
# epoch's loss, where the one-cycle schedule drops it fast, amplifies the difference by a factor that depends on
# the CPU's float kernels (0.465 vs 0.443 there, 0.583 vs 0.588 on Intel Xeon), so only the first is compared.
TOP1_TOLERANCE = 2.0  # percentage points
FIRST_LOSS_RTOL = 0.01


def _record(results) -> tuple:
    (path,) = results.rglob("seed*.json")
    return path, json.loads(path.read_text())


def test_torchrun_trains_one_run_like_one_process(tiny_suite, tmp_path, capsys):
    import mlflow

    from kdbench.cli import main

    run = ["run", "--suite", str(tiny_suite), "--method", "vanilla_kd", "--seeds", "0", "--results-dir"]
    store = f"sqlite:///{tmp_path / 'ddp.db'}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
              "-m", "kdbench", *run, str(tmp_path / "ddp")]
    done = subprocess.run(launch, env=os.environ | {"MLFLOW_TRACKING_URI": store}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DDP on 2 processes, global batch 200" in done.stderr
    assert main([*run, str(tmp_path / "single")]) == 0
    (path, ddp), (_, single) = _record(tmp_path / "ddp"), _record(tmp_path / "single")
    assert ddp["config"]["distributed"] == {"world_size": 2, "global_batch": 200, "per_rank_batch": 100,
                                            "sync_batchnorm": False}
    assert ddp["ddp_backend"] == "gloo" and "distributed" not in single["config"]
    assert ddp["config"] == single["config"] | {"distributed": ddp["config"]["distributed"]}
    assert abs(ddp["metrics"]["test_top1"] - single["metrics"]["test_top1"]) <= TOP1_TOLERANCE
    assert ddp["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=FIRST_LOSS_RTOL)
    mlflow.set_tracking_uri(store)
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1  # rank 0 alone logged
    capsys.readouterr()
    assert main(["verify", str(path)]) == 2  # one process cannot re-run it
    assert capsys.readouterr().err.endswith("re-run it with torchrun --nproc_per_node 2 -m kdbench run\n")


def test_a_global_batch_that_does_not_split_fails_in_one_line(tiny_suite, tmp_path, monkeypatch, capsys):
    from kdbench.cli import main

    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node 3 sets it; 200 does not split in 3
    assert main(["run", "--suite", str(tiny_suite), "--results-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("kdbench: error: batch_size 200 (the global batch) does not split across 3 "
                                       "processes; use a multiple of 3 or another --nproc_per_node\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--suite", str(tiny_suite), "--workers", "2", "--results-dir", str(tmp_path)]) == 2
    assert "drop --workers and --executor" in capsys.readouterr().err
