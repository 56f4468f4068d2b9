"""``kdbench new-method NAME``: the one-file method template, registered and importable but unfinished."""

from __future__ import annotations

import inspect
import keyword
from pathlib import Path
from string import Template

from kdbench.errors import KdbenchError
from kdbench.method import METHODS

TEMPLATE = Template('''\
"""TODO: the method in a few words — Authors, "Paper title", Venue Year (arXiv:XXXX.XXXXX).

Reference implementation: TODO owner/repository, ``path/to/file.py`` (``TheClassOrFunction``); or say that no
code is public and what this file follows instead.

Formula, with student logits z_s, teacher logits z_t, labels y (name every symbol you use):

    L = TODO

Defaults (source): TODO each hyperparameter of ${class_name}Config with where its value comes from (the paper's
section or table, or the reference code's flag), e.g. weight = 1 (paper §3; reference ``--weight 1``).

Deviations:
- TODO each way this file differs from the paper or the reference code, and why (or "none").
"""

from optuna.distributions import FloatDistribution
from pydantic import Field

from kdbench.method import Method, MethodConfig, register_method


class ${class_name}Config(MethodConfig):
    weight: float = Field(default=1.0, ge=0, description="TODO: what it weighs (source of the default)")


@register_method("${name}")
class ${class_name}(Method):
    """TODO: one line for `kdbench list methods` — Authors Year: what the student learns from."""

    version = 1  # bump when what loss() computes changes
    Config = ${class_name}Config
    # what `kdbench tune` searches (TODO: the range you would try, holding the default); the suite's training
    # hyperparameters are searched beside it, the same for every method
    search_space = {"weight": FloatDistribution(0.1, 10.0, log=True)}
    # Optional: needs_teacher = False (no teacher at all); trainable modules built in __init__ from the tap
    # shapes (this method's own parameters, e.g. a regressor: methods/fitnets.py); an ``adversary`` module with
    # adversary_loss and adversary_optimizer (methods/adversarial.py); on_step_end(progress) for state; peers
    # trained beside the student (peer_count: methods/dml.py), assistants distilled in between (assistants:
    # methods/takd.py) or an ensemble of teachers (teacher_members: methods/multi_teacher.py).

    @classmethod
    def taps(cls, config):
        """(student taps, teacher taps): logits, stage:<i>, module:<dotted.path>, embedding, index, input,
        hidden:<i>, attn:<i>, member:<i> (kdbench/taps.py)."""
        return ("logits",), ("logits",)

    def loss(self, student, teacher, target, progress):
        raise NotImplementedError(
            "${name}.loss is not written yet: return a dict of named, already weighted scalar terms, e.g. "
            "{'ce': ..., 'kd': self.config.weight * ...}, computed from the tap dicts student and teacher "
            "(teacher is None when needs_teacher = False), the labels target and progress (0 → 1 over training)"
        )
''')


def write_method_file(name: str, directory: Path) -> Path:
    """Write ``directory/name.py`` from the template; refuses a bad name, an existing file or a registered name."""
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        raise KdbenchError(f"method name {name!r}: use a Python identifier that is not a keyword and does not start "
                           "with '_' (e.g. my_kd)")
    path = Path(directory) / f"{name}.py"
    if not path.parent.is_dir():
        raise KdbenchError(f"--dir {directory} is not a folder")
    if path.exists():
        raise KdbenchError(f"{path} already exists; choose another name or edit that file")
    if name in METHODS:
        raise KdbenchError(f"method {name!r} is already registered (in {inspect.getfile(METHODS.get(name))}); "
                           "choose another name")
    class_name = "".join(part[:1].upper() + part[1:] for part in name.split("_"))
    path.write_text(TEMPLATE.substitute(name=name, class_name=class_name))
    return path
