"""Name -> class registries: the plug points of the one Block (DESIGN.md).

A new variant is a new registered class (``@MIXERS.register("mamba")``), never a boolean on an old
one. Recipes name variants by these strings; an unknown name fails with the list of known ones.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Registry:
    """A named table of classes, e.g. ``MIXERS["attention"]``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise KeyError(f"{self.kind} {name!r} is already registered by {self._classes[name]}")
            self._classes[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return add

    def get(self, name: str, key: str | None = None) -> type:
        if name not in self._classes:
            known = ", ".join(sorted(self._classes))
            where = f"{key}: " if key else ""
            raise ValueError(f"{where}unknown {self.kind} {name!r} (known: {known})")
        return self._classes[name]

    def build(self, name: str, *args: Any, key: str | None = None, options: dict | None = None) -> Any:
        """Instantiate ``name`` with positional ``args`` and the recipe ``options``.

        Options are checked against the constructor's signature first, so a typo in a recipe fails
        with the offending key instead of a TypeError deep inside a constructor.
        """
        cls = self.get(name, key)
        options = dict(options or {})
        # parameters after self and the positional args are the ones a recipe may set
        params = dict(list(inspect.signature(cls.__init__).parameters.items())[1 + len(args):])
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            accepted = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or p.default is not p.empty}
            for opt in options:
                if opt not in accepted:
                    where = f"{key}." if key else ""
                    raise ValueError(
                        f"{where}{opt}: unknown option for {self.kind} {name!r} "
                        f"(accepted: {', '.join(sorted(accepted)) or 'none'})"
                    )
        return cls(*args, **options)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes


MIXERS = Registry("mixer")
FFNS = Registry("ffn")
NORMS = Registry("norm")
