"""The method interface (docs/architecture.md: the method contract), its registry, and discovery of the files
in ``methods/``.

A method is a small ``nn.Module`` holding only its *own* extra trainable modules (a regressor, a
discriminator, auxiliary heads). Student and teacher are not its submodules, so ``method.parameters()``
is exactly the extra set: trained with the student, counted apart, never saved with the student.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import pydantic
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import Field
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.paths import shipped
from kdbench.registry import Registry

Shapes = dict[str, tuple[int, ...]]
Taps = dict[str, torch.Tensor]

DEFAULT_METHODS_DIR = shipped("methods")
_MODULE_PREFIX = "kdbench_methods."


class MethodConfig(pydantic.BaseModel):
    """Base of every method's hyperparameters: unknown keys are rejected, values are validated."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class LogitMethodConfig(MethodConfig):
    """Base of the configs of logit methods that offer logit standardization (Sun, Ren, Li, Wang & Cao, "Logit
    Standardization in Knowledge Distillation", CVPR 2024; ``kdbench.losses.standardized``): each sample's logits,
    student's and teacher's, are z-scored before the temperature softmax, so the effective temperature is the
    base temperature times each sample's own logit standard deviation. Off, the field is left out of the resolved
    config (configs from before the option keep their hash)."""

    logit_standardization: bool = Field(
        default=False, description="z-score each sample's logits before the softmax (Sun et al. 2024)")

    @pydantic.model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if not self.logit_standardization:
            data.pop("logit_standardization", None)
        return data


class TeacherMember(pydantic.BaseModel):
    """One teacher of an ensemble: an architecture (default: the pair's teacher) trained with the track's teacher
    seed plus ``seed_offset``, and cached like any teacher (offset 0 of the pair's teacher is the pair's teacher)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    architecture: str | None = Field(default=None, description="a zoo model; None: the pair's teacher")
    seed_offset: int = Field(default=0, ge=0, description="added to the track's teacher seed")


class Method(nn.Module):
    """Base class. Subclasses set ``Config`` and implement ``loss``.

    Optional hooks: ``needs_teacher = False`` (no teacher forward at all), an ``adversary`` submodule
    with ``adversary_loss`` (trained by its own optimizer, alternating with the student step), and
    ``on_step_end`` for methods with state. Beyond one frozen teacher and one student (kdbench.sources):
    ``peer_count`` (online methods: networks trained beside the student), ``assistants`` (progressive methods:
    models distilled in turn between teacher and student) and ``teacher_members`` (multi-teacher methods: an
    ensemble as the teacher). A method never calls backward or step, never seeds, never moves devices, never
    reads files.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    variant_of: ClassVar[str | None] = None  # a variant (register_method's ``variants``): the method it is of
    variant_defaults: ClassVar[dict[str, Any]] = {}
    needs_teacher: ClassVar[bool] = True
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # ``kdbench tune``: the Config fields searched and their ranges (Optuna distributions, e.g.
    # ``FloatDistribution(1.0, 8.0, log=True)``), each holding the field's default (the paper's); the suite's
    # training hyperparameters are searched beside them, the same for every method
    search_space: ClassVar[dict[str, BaseDistribution]] = {}

    def __init__(self, config: MethodConfig, student_shapes: Shapes, teacher_shapes: Shapes):
        super().__init__()
        self.config = config

    @classmethod
    def peer_count(cls, config: MethodConfig) -> int:
        """Online methods: how many networks of the student's architecture this method trains beside the student
        (DML's peers). The runner builds them with fresh weights, drawn after the student's, and passes them to
        the constructor as the keyword ``peers``; kept as the method's submodules, they are trained with the
        student, counted as *extra* and never saved with it. They usually run on the ``input`` tap."""
        return 0

    @classmethod
    def assistants(cls, config: MethodConfig) -> tuple[str, ...]:
        """Progressive methods: architectures distilled in turn between the teacher and the student (TAKD's
        teacher assistant), teacher side first. Each is trained by this method with this config from the model
        before it, on the run's data and schedule with the track's teacher seed, and cached like a teacher (so
        once for all seeds); the student then learns from the last. Their accuracy and cost go in the record."""
        return ()

    @classmethod
    def teacher_members(cls, config: MethodConfig) -> tuple[TeacherMember, ...]:
        """Multi-teacher methods: the teachers of an ensemble that replaces the pair's teacher as what the method
        distils from (kdbench.sources.TeacherEnsemble: ``logits`` the ensemble's, ``member:<i>`` each teacher's).
        Empty (the default): the pair's teacher alone."""
        return ()

    @classmethod
    def taps(cls, config: MethodConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(student taps, teacher taps) this method reads; ``logits`` is always captured."""
        return ("logits",), ("logits",)

    def loss(self, student: Taps, teacher: Taps | None, target: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms; the trainer sums them. ``progress`` runs from 0 to 1."""
        raise NotImplementedError

    def adversary_loss(self, student: Taps, teacher: Taps | None, target: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def adversary_optimizer(self, params) -> torch.optim.Optimizer:
        """The adversary's own optimizer; the trainer owns and steps it."""
        raise NotImplementedError(f"{self.name} has an adversary but defines no adversary_optimizer")

    def on_step_end(self, progress: float) -> None:
        """Called after every student step (EMA updates, memory banks)."""

    def student_side_parameters(self) -> list[nn.Parameter]:
        """Extra parameters trained with the student: all of them but the adversary's."""
        adversary = getattr(self, "adversary", None)
        excluded = {id(p) for p in adversary.parameters()} if adversary is not None else set()
        return [p for p in self.parameters() if id(p) not in excluded]


class SupervisedOnly(Method):
    """Cross-entropy on the hard labels, no teacher: L = CE(z_s, y). Also how teachers are trained."""

    needs_teacher = False

    @classmethod
    def taps(cls, config):
        return ("logits",), ()

    def loss(self, student, teacher, target, progress):
        return {"ce": F.cross_entropy(student["logits"], target)}


def _discover_methods() -> None:
    dirs = [DEFAULT_METHODS_DIR]
    dirs += [Path(p) for p in os.environ.get("KDBENCH_METHODS_PATH", "").split(os.pathsep) if p]
    for directory in dirs:
        for path in sorted(Path(directory).glob("*.py")):
            if not path.name.startswith("_"):
                _load_method_file(path)


def _load_method_file(path: Path) -> None:
    module_name = _MODULE_PREFIX + path.stem
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except KdbenchError:
        raise
    except Exception as exc:
        del sys.modules[module_name]
        raise KdbenchError(f"method file {path} failed to import: {type(exc).__name__}: {exc}") from exc


METHODS: Registry[type[Method]] = Registry("method", discover=_discover_methods)


def register_method(name: str, variants: dict[str, dict[str, Any]] | None = None):
    """Class decorator: registers a Method subclass under ``name`` (which must equal its file name).

    ``variants`` registers the same method again under ``<name>+<tag>`` with other defaults, e.g.
    ``{"vanilla_kd+ls": {"logit_standardization": True, "temperature": 2.0}}``: a leaderboard row of its own,
    beside the plain method, run by every suite like any method."""

    def add(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise KdbenchError(f"@register_method({name!r}) decorates {getattr(cls, '__name__', cls)!r}, which is not "
                               "a subclass of kdbench.method.Method")
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, MethodConfig)):
            raise KdbenchError(f"method {name!r}: its Config must subclass kdbench.method.MethodConfig")
        if cls.loss is Method.loss:
            raise KdbenchError(f"method {name!r} defines no loss(student, teacher, target, progress)")
        _check_search_space(name, cls)
        stem = cls.__module__.removeprefix(_MODULE_PREFIX)
        if cls.__module__.startswith(_MODULE_PREFIX) and stem != name:
            raise KdbenchError(f"method {name!r} is defined in {stem}.py; a method's file must be named {name}.py")
        cls.name = name
        METHODS.register(name)(cls)
        for variant, defaults in (variants or {}).items():
            METHODS.register(variant)(_variant(cls, variant, defaults))
        return cls

    return add


def _check_search_space(name: str, cls: type[Method]) -> None:
    """Each searched field is a Config field whose default lies in its range (variants' defaults checked too)."""
    for field, space in cls.search_space.items():
        if field not in cls.Config.model_fields:
            raise KdbenchError(f"method {name!r}: search_space names {field!r}, which its Config does not have")
        if not isinstance(space, (FloatDistribution, IntDistribution, CategoricalDistribution)):
            raise KdbenchError(f"method {name!r}: search_space[{field!r}] must be an optuna FloatDistribution, "
                               f"IntDistribution or CategoricalDistribution, not {type(space).__name__}")
        if not in_space(space, cls.Config.model_fields[field].default):
            raise KdbenchError(f"method {name!r}: the default of {field!r} "
                               f"({cls.Config.model_fields[field].default!r}) lies outside its search space {space}")


def in_space(space: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is one of the values ``space`` can take."""
    if isinstance(space, CategoricalDistribution):
        return value in space.choices
    return isinstance(value, (int, float)) and space.low <= value <= space.high


def _variant(cls: type[Method], name: str, defaults: dict[str, Any]) -> type[Method]:
    """A subclass of ``cls`` registered as ``name`` whose Config has other defaults (validated like any value)."""
    if not name.startswith(cls.name + "+") or not name[len(cls.name) + 1:].isidentifier():
        raise KdbenchError(f"variant {name!r} of {cls.name!r} must be named {cls.name}+<tag>, the tag an identifier")
    unknown = set(defaults) - set(cls.Config.model_fields)
    if unknown:
        raise KdbenchError(f"variant {name!r}: {cls.name}'s Config has no field {sorted(unknown)[0]!r}")
    validate_config(cls, defaults)
    outside = [k for k, v in defaults.items() if k in cls.search_space and not in_space(cls.search_space[k], v)]
    if outside:
        raise KdbenchError(f"variant {name!r}: its {outside[0]} ({defaults[outside[0]]!r}) lies outside {cls.name}'s "
                           f"search space {cls.search_space[outside[0]]}")
    fields = {}
    for key, value in defaults.items():
        info = copy.copy(cls.Config.model_fields[key])
        info.default = value
        fields[key] = (info.annotation, info)
    config = pydantic.create_model(f"{cls.Config.__name__}_{name.split('+')[1]}", __base__=cls.Config, **fields)
    summary = f"{cls.name} with {', '.join(f'{k} = {v}' for k, v in defaults.items())}."
    return type(f"{cls.__name__}_{name.split('+')[1]}", (cls,), {
        "Config": config, "name": name, "variant_of": cls.name, "variant_defaults": dict(defaults),
        "__doc__": summary, "__module__": cls.__module__})


def validate_config(method_cls: type[Method], overrides: dict[str, Any]) -> MethodConfig:
    """The method's config with ``overrides`` applied; a bad value → one line naming the field."""
    try:
        return method_cls.Config(**overrides)
    except pydantic.ValidationError as exc:
        raise KdbenchError(f"method {method_cls.name}: {format_validation_error(exc)}") from None


def format_validation_error(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "value"
        given = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
        parts.append(f"{field}: {err['msg']}{given}")
    return "; ".join(parts)
