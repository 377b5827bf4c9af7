"""The adaptive-depth methods, one module each, and the registry they plug into.

Importing this package imports every module in it, and a method's module registers it there
(`method_spec(name)`, `spec_for_kind(kind)`): a new method is a new module, with nothing else to
list, and code that serves all methods (run folders, `from_pretrained`, `bench`) never names one.
"""

from __future__ import annotations

import importlib
import pkgutil

from adadepth.depth.method import Method, MethodSpec
from adadepth.depth.registry import lookup, names
from adadepth.errors import UserError

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


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
