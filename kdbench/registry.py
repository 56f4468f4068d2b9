"""One generic name → object registry, used for methods, models, tracks and suites."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdbench.errors import KdbenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; duplicate names raise, unknown names suggest the closest ones.

    ``discover`` is called once, lazily, before the first lookup: it lets a registry fill itself
    from files (the methods) without any module importing them by name.
    """

    def __init__(self, kind: str, discover: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._discover = discover
        self._discovered = discover is None

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise KdbenchError(f"{self.kind} {name!r} is registered twice; rename one of them")
            self._entries[name] = obj
            return obj

        return add

    def _ensure_discovered(self) -> None:
        if not self._discovered:
            self._discovered = True
            self._discover()

    def get(self, name: str) -> T:
        self._ensure_discovered()
        try:
            return self._entries[name]
        except KeyError:
            raise KdbenchError(unknown_name_message(self.kind, name, self._entries)) from None

    def names(self) -> list[str]:
        self._ensure_discovered()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._ensure_discovered()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def unknown_name_message(kind: str, name: str, known) -> str:
    """'unknown method 'vanila_kd'; did you mean: vanilla_kd? (known: ...)'."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (known: {', '.join(known) or 'none'})"
