"""GPU check and epoch timings: the CIFAR-100 smoke suite, two epochs of the CRD protocol's resnet32x4 → resnet8x4
pair in each opt-in speed mode (bf16 autocast, channels-last, torch.compile with and without CUDA graphs) against
fp32 eager, then one epoch per pair (and per method on that pair). On full-size data on CUDA (1,000 training
images on CPU): random pixels written in the native format, since the timing, not the accuracy, is measured.
Writes ``summary.json`` (with the commit it ran from) to ``$OUT`` (default /tmp/gpu_out) after every step;
``SMOKE_RUNS`` (24) and ``ONE_EPOCH_RUNS`` (all) shorten the first and last parts. On a lent GPU machine with
minutes to spare, the speed modes come first and each step is saved as it ends, so a short window still brings
them back: ``OUT=$OUT SMOKE_RUNS=2 ONE_EPOCH_RUNS=2 timeout 480 python benchmarks/gpu_epoch_times.py cuda``.

    python benchmarks/gpu_epoch_times.py [cuda|cpu]
"""
import dataclasses
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdbench.records import environment, git_state
from kdbench.runner import Placement, prepare, preflight, run_one, validation_curve
from kdbench.suite import expand, load_suite

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
n_train, n_test = (50000, 10000) if device == "cuda" else (1000, 200)
out = Path(os.environ.get("OUT", "/tmp/gpu_out"))
out.mkdir(parents=True, exist_ok=True)
root = Path("/tmp/kd_data")
folder = root / "cifar-100-python"
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for name, n in (("train", n_train), ("test", n_test)):
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [int(v) for v in np.arange(n) % 100]}
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
os.environ["KDBENCH_HOME"] = "/tmp/kd_home"
commit, dirty = git_state()
summary = {"device": torch.cuda.get_device_name(0) if device == "cuda" else environment(1)["cpu"],
           "torch": torch.__version__, "git_commit": commit, "git_dirty": dirty}
place = Placement(root, device=device)

smoke = expand(load_suite("cifar100-smoke"))[: int(os.environ.get("SMOKE_RUNS", "24"))]
preflight(smoke, place)
start = time.perf_counter()
summary["smoke"] = []
for spec in smoke:
    rec = run_one(spec, out / "smoke", place, mirror=None)
    summary["smoke"].append([spec.label(), rec["status"], rec["env"]["gpu"], rec["metrics"] and rec["metrics"]["test_top1"]])
summary["smoke_seconds"] = time.perf_counter() - start
print("smoke done", summary["smoke_seconds"], flush=True)

full = expand(load_suite("cifar100"), seeds=(0,))
# the opt-in speed modes against the same code's fp32 eager path, two epochs each (the first includes
# torch.compile's compilation; the second is the steady epoch time), on the CRD protocol's main pair
(base,) = [s for s in full if s.method == "vanilla_kd" and s.pair == "resnet32x4:resnet8x4"]
summary["speed_modes"] = []
teacher_train = base.teacher_train.model_copy(update={"epochs": 1})
prepare(dataclasses.replace(base, teacher_train=teacher_train), place)  # the teacher trained and cached before timing
for mode in ({}, {"channels_last": True}, {"precision": "bf16"}, {"precision": "bf16", "channels_last": True},
             {"compile": "default"}, {"compile": "reduce-overhead"},
             {"compile": "reduce-overhead", "precision": "bf16", "channels_last": True}):
    spec = dataclasses.replace(base, suite="gpu-check", train=base.train.model_copy(update={"epochs": 2, **mode}),
                               teacher_train=teacher_train)
    ends = [time.perf_counter()]

    def epoch_ended(row):
        if device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    history = validation_curve(spec, place, on_epoch=epoch_ended)
    summary["speed_modes"].append({"mode": mode or "fp32 eager", "epoch_seconds": [b - a for a, b in zip(ends, ends[1:])],
                                   "val_top1": [row["val_top1"] for row in history]})
    print(json.dumps(summary["speed_modes"][-1]), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
epoch_runs = [s for s in full if s.method == "vanilla_kd"] + [s for s in full if s.student == "resnet8x4" and s.method != "vanilla_kd"]
summary["one_epoch"] = []
for spec in epoch_runs:
    one = spec.train.model_copy(update={"epochs": 1})
    spec = dataclasses.replace(spec, suite="gpu-check", train=one, teacher_train=one)
    t0 = time.perf_counter()
    rec = run_one(spec, out / "epoch", place, mirror=None)
    m = rec["metrics"] or {}
    row = {"run": spec.label(), "status": rec["status"], "wall_s": time.perf_counter() - t0,
           "train_seconds": m.get("train_seconds")}  # latencies: per pair, by `kdbench run` (timing.json)
    summary["one_epoch"].append(row)
    print(json.dumps(row), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if os.environ.get("ONE_EPOCH_RUNS") and len(summary["one_epoch"]) >= int(os.environ["ONE_EPOCH_RUNS"]):
        break
print("done", flush=True)
