"""The student trained alone on the hard labels: the reference every method is compared with.

Formula: L = CE(z_s, y), the cross-entropy of the student's logits z_s with the labels y.
No teacher is used (``needs_teacher = False``), and the schedule is the suite's, exactly as for
every distillation method, so the leaderboard's Δ isolates what the teacher adds.

Deviations: none.
"""

from kdbench.method import SupervisedOnly, register_method


@register_method("baseline")
class Baseline(SupervisedOnly):
    """Student alone, cross-entropy on hard labels (no teacher)."""

    version = 1
