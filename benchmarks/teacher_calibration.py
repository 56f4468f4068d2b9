"""How much a cpu-suite teacher has to give: accuracy, confidence, calibration and soft-target entropy on its
training and validation splits (never the test split).

    python benchmarks/teacher_calibration.py --track mnist1d --seed 0
    python benchmarks/teacher_calibration.py --track digits --seed 7    # the teacher of fold 7's training part

The teacher is the suite's, trained and cached as every run trains it (``$KDBENCH_HOME``).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from kdbench.runner import Placement, track_data
from kdbench.suite import expand, load_suite
from kdbench.teachers import load_or_train_teacher

BINS = 15  # expected calibration error over equal-width confidence bins (Guo et al., ICML 2017)


def calibration(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> dict:
    probs = logits.softmax(1)
    confidence, pred = probs.max(1)
    edges = torch.linspace(0, 1, BINS + 1)
    ece = sum(float(m.float().mean()) * abs(float((pred[m] == target[m]).float().mean()) - float(confidence[m].mean()))
              for lo, hi in zip(edges[:-1], edges[1:]) if (m := (confidence > lo) & (confidence <= hi)).any())
    soft = F.log_softmax(logits / temperature, 1)
    return {"top-1 %": 100 * float((pred == target).float().mean()), "mean max-softmax %": 100 * float(confidence.mean()),
            "NLL": float(F.cross_entropy(logits, target)), "ECE %": 100 * ece,
            f"entropy at T={temperature:g} (nats, max {math.log(logits.shape[1]):.2f})": float(-(soft.exp() * soft).sum(1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--track", default="mnist1d")
    parser.add_argument("--seed", type=int, default=0, help="the run seed whose data (fold) the teacher trained on")
    args = parser.parse_args()
    spec = expand(load_suite(args.suite), methods=["vanilla_kd"], tracks=[args.track], seeds=(args.seed,))[0]
    data = track_data(spec, Placement()).for_seed(args.seed)
    teacher, _ = load_or_train_teacher(spec.track, data, spec.teacher, spec.teacher_train, spec.teacher_seed)
    with torch.inference_mode():
        for name in ("train", "val"):
            split = getattr(data, name)
            stats = calibration(teacher(split.sample(len(split))), split.y, spec.method_config["temperature"])
            print(f"{args.track} seed {args.seed} {spec.teacher} on {name}: "
                  + ", ".join(f"{k} {v:.3f}" if "NLL" in k or "entropy" in k else f"{k} {v:.2f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
