"""Published results (``benchmarks/reference/published.yaml``) that the leaderboard prints beside ours.

An entry applies to the rows of one suite (whose protocol it follows), track and pair; each names its source.
"""

from __future__ import annotations

from pathlib import Path

import pydantic
import yaml

from kdbench.config import STRICT
from kdbench.errors import KdbenchError
from kdbench.method import format_validation_error
from kdbench.paths import shipped

PUBLISHED = shipped("reference") / "published.yaml"


class Entry(pydantic.BaseModel):
    model_config = STRICT
    suite: str
    track: str
    teacher: str
    student: str
    source: str
    top1: dict[str, float]  # row ("teacher", "baseline" or a method) -> top-1 %


class Published(pydantic.BaseModel):
    model_config = STRICT
    sources: dict[str, str]
    results: tuple[Entry, ...]

    def lookup(self, suite: str, track: str, teacher: str, student: str) -> dict[str, tuple[float, str]]:
        """row -> (published top-1, source key) for one leaderboard table."""
        return {row: (value, e.source) for e in self.results if (e.suite, e.track, e.teacher, e.student)
                == (suite, track, teacher, student) for row, value in e.top1.items()}


def load_published(path: Path = PUBLISHED) -> Published:
    try:
        published = Published.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise KdbenchError(f"cannot read {path}: {exc}") from None
    except pydantic.ValidationError as exc:
        raise KdbenchError(f"{path}: {format_validation_error(exc)}") from None
    unknown = sorted({e.source for e in published.results} - set(published.sources))
    if unknown:
        raise KdbenchError(f"{path}: source {unknown[0]!r} is used but not listed under sources")
    return published
