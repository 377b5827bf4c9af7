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


def test_the_flops_breakdown_sums_to_what_ran() -> None:
    """Every method's components (compute removed < 0, added > 0, against the dense backbone)
    add up to the FLOPs it realised; on routing's forced pattern (one layer full, one cheap) the
    components are the closed forms."""
    import pytest
    import torch

    from adadepth import flops as fl
    from adadepth.config import ModelConfig, validate
    from adadepth.depth.dispatch import Call
    from adadepth.model import Transformer

    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=64)
    options = {"routing": {"gate": "g1", "aux": [], "cheap": "low_rank"},
               "mod": {"threshold": "half"}, "calm": {"threshold": 0.5}, "mor": {}}
    for name in method_names():
        if name in ("lora", "ensemble+lora"):  # peft's layers: covered by test_ensemble
            continue
        torch.manual_seed(0)
        spec = method_spec(name)
        model = spec.build(Transformer(cfg), validate(spec.config, options.get(name, {}))).eval()
        forced = {"routing": Call(forced={1: True, 2: False})}.get(name, Call(force=False))
        if name in ("calm", "layerskip", "static-skip", "ponder", "ensemble", "full"):
            forced = Call()
        runner, m = model.measured(forced)
        with torch.no_grad():
            runner(torch.randint(0, 40, (2, 12)))
        parts, total = m.breakdown(6.5), m.flops_per_token(6.5)
        dense = model.dense_flops_per_token(6.5)
        assert parts and dense + sum(parts.values()) == pytest.approx(total, rel=1e-9), name
        if name == "routing":
            ffn = fl.ffn(cfg)
            assert parts["full FFNs skipped"] == pytest.approx(-ffn)
            assert parts["cheap paths"] == pytest.approx(fl.module_flops(model.routers[1].cheap))
            assert parts["gates"] == 0.0  # forced layers run no gate
