"""Distil your own teacher into your own student with kdbench's Python API (CPU, well under a minute).

Both models are plain ``nn.Sequential`` MLPs on scikit-learn's bundled 8×8 digits: the teacher is trained with a
few lines of plain torch, then ``kdbench.distill`` trains the student with vanilla KD, and with FitNets hints
between modules named by their dotted paths. Each run is logged to MLflow (``kdbench ui`` shows it).

    python examples/distill_digits.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import kdbench


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def train_plainly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 20) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, stratify=y, random_state=0)
    x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

    teacher = train_plainly(mlp(256), x_train, y_train)
    print(f"teacher: {kdbench.evaluate(teacher, (x_test, y_test)):.1f} % test top-1")

    student, report = kdbench.distill(teacher, mlp(16), (x_train, y_train), method="vanilla_kd", epochs=15,
                                      lr=1e-2, test_data=(x_test, y_test))
    print("vanilla_kd:", report.summary())
    cost = kdbench.measure(student, x_test[:1])
    print(f"student: {cost['params']} parameters, {cost['flops']} FLOPs per sample, "
          f"{cost['latency_b1_ms'] * 1e3:.0f} µs at batch 1")

    # FitNets reads stage:-2 of each model: name the stages by module path (here the ReLU outputs)
    student, report = kdbench.distill(teacher, mlp(16), (x_train, y_train), method="fitnets", epochs=15,
                                      lr=1e-2, test_data=(x_test, y_test), student_stages=["1", "3"],
                                      teacher_stages=["1", "3"], hint_weight=1.0)
    print(f"fitnets (regressor: {report.extra_params} extra parameters, not part of the student):", report.summary())


if __name__ == "__main__":
    main()
