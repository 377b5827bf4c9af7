"""The adaptive-depth methods, one module each, and the registry they plug into.

Importing this package registers every method (`method_spec(name)`, `spec_for_kind(kind)`), so
code that serves all methods (run folders, `from_pretrained`, `bench`) never names one.
"""

from __future__ import annotations

# Importing a method's module registers it (ensemble also registers ensemble+lora, lora, full).
from adadepth.depth import (  # noqa: F401
    calm,
    ensemble,
    layerskip,
    mod,
    ponder,
    routing,
    selfspec,
    static_skip,
)
from adadepth.depth.method import Method, MethodSpec
from adadepth.depth.registry import lookup, names
from adadepth.errors import UserError


def method_spec(name: str) -> MethodSpec:
    return lookup("method", name)


def method_names() -> list[str]:
    return names("method")


def spec_for_kind(kind: str) -> MethodSpec:
    """The method whose run folders say `kind` in their config.json."""
    for name in method_names():
        spec = method_spec(name)
        if spec.kind == kind:
            return spec
    raise UserError(f"unknown model kind {kind!r}")


__all__ = ["Method", "MethodSpec", "method_names", "method_spec", "spec_for_kind"]
