"""Every method under `depth/` is registered and serves the whole tool from its one entry."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import adadepth.depth as depth
from adadepth.depth import Method, method_names, method_spec, spec_for_kind


def method_classes() -> list[type[Method]]:
    """Every concrete Method subclass defined in a module of the package."""
    found = []
    for info in pkgutil.iter_modules(depth.__path__):
        module = importlib.import_module(f"{depth.__name__}.{info.name}")
        found += [c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, Method) and c.__module__ == module.__name__ and c.name]
    return found


def test_every_method_class_is_registered_under_its_name() -> None:
    """A method module is imported with the package (nothing to list), and a class whose
    registration was forgotten fails here rather than being unreachable from the CLI."""
    classes = method_classes()
    assert len(classes) >= 8
    registered = set(method_names())
    missing = [c.__name__ for c in classes if c.name not in registered]
    assert not missing, f"Method classes with no MethodSpec: {missing}"
    for name in registered:
        spec = method_spec(name)
        assert spec.name == name and spec_for_kind(spec.kind).kind == spec.kind


def test_options_have_one_name() -> None:
    """A method keeps its options as `self.options` (never rcfg, mcfg, ...)."""
    import re
    from pathlib import Path

    src = Path(depth.__file__).parent
    old = [f"{p.name}: {m}" for p in src.glob("*.py")
           for m in re.findall(r"self\.[a-z]cfg\b", p.read_text())]
    assert not old, old
