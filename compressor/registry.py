"""Registries of named technique classes (group terms, tasks), filled by class decorators."""

from __future__ import annotations

from collections.abc import Callable


def registrar(
    registry: dict[str, type], kind: str, doc: str = ""
) -> Callable[[str], Callable[[type], type]]:
    """A ``@register("name")`` class decorator that adds the class to ``registry`` under
    ``name`` (and sets ``cls.name``); a name taken twice is a ``ValueError`` naming ``kind``."""

    def register(name: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in registry:
                raise ValueError(f"{kind} {name!r} is already registered")
            cls.name = name
            registry[name] = cls
            return cls

        return add

    register.__doc__ = doc
    return register
