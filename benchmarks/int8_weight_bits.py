"""What clipping int8 kernels do to a student's int8 accuracy on this machine: 8-bit against 7-bit weights.

x86 CPUs without VNNI multiply int8 pairs with VPMADDUBSW, whose 16-bit sums saturate; ONNX Runtime's guide
advises 7-bit weights (``reduce_range``) there, and kdbench.deploy takes them where ``int8_saturates`` finds the
kernels clip. This script trains one student of each CPU-tier track on seed 0 (plain cross-entropy, Adam at lr
1e-2, one thread: a trained student, not a leaderboard run), then quantizes it both ways with kdbench's recipe and
prints the test top-1 in fp32 and after each quantization. On a machine whose kernels do not clip both widths are
honest and 8 bits is the recipe; where they clip, the 8-bit column is the kernels' error, not the model's.

    python benchmarks/int8_weight_bits.py
"""

from __future__ import annotations

from unittest import mock

import torch
from tabulate import tabulate
from torch import nn

from kdbench import deploy
from kdbench.metrics import int8_accuracy, predict, top1
from kdbench.models import create_model
from kdbench.tracks import load_track

STUDENTS = [("digits", "cnn2d_w8", 15), ("digits", "cnn2d_w4", 15), ("mnist1d", "cnn1d_w8", 8),
            ("mnist1d", "cnn1d_w4", 8)]  # (track, architecture, epochs)
CALIBRATION = 256  # the cpu suite's int8_calibration


def trained(track: str, architecture: str, epochs: int):
    data = load_track(track).for_seed(0)
    torch.manual_seed(0)
    model = create_model(architecture)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for x, y in data.train.batches(64, order, train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval(), data


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for track, architecture, epochs in STUDENTS:
        model, data = trained(track, architecture, epochs)
        with torch.no_grad():
            fp32 = top1(predict(model, data.test), data.test.y)
        int8 = {}
        for bits in (8, 7):
            with mock.patch.object(deploy, "int8_saturates", lambda bits=bits: bits == 7):
                int8[bits] = int8_accuracy(model, data, CALIBRATION)[0]["int8_test_top1"]
        rows.append((track, architecture, len(data.test), f"{fp32:.2f}", f"{int8[8]:.2f}", f"{int8[7]:.2f}"))
    print(f"int8 kernels here clip 8-bit weights: {deploy.int8_saturates()} (kdbench takes "
          f"{deploy.versions()['int8_weight_bits']}-bit weights)")
    print(tabulate(rows, headers=["track", "student", "test n", "fp32 top-1", "int8, 8-bit weights",
                                  "int8, 7-bit weights"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
