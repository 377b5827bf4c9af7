"""One small registry through which methods, gates, cheap paths, exit and halting rules plug in.

    @register("gate", "g1")
    class MLPGate(Gate): ...

    build("gate", "g1", d_model=..., ...)      # a factory, called with the options
    lookup("method", "routing")                 # an entry as registered (a MethodSpec)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adadepth.errors import UserError

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def add(factory: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(kind, {})[name] = factory
        return factory
    return add


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY.get(kind, {}))


def lookup(kind: str, name: str) -> Callable[..., Any]:
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise UserError(f"unknown {kind} {name!r}; known: {', '.join(names(kind))}")
    return table[name]


def build(kind: str, name: str, **kwargs: Any) -> Any:
    return lookup(kind, name)(**kwargs)
