"""Lower layers never import higher ones: every import in the package, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "adadepth"

# Lowest first; a module may import its own layer and those below it. docs/methods.md and the
# README's module table describe the same order.
LAYERS = [
    ["adadepth.errors", "adadepth.config"],
    ["adadepth.flops"],
    ["adadepth.model"],
    ["adadepth.data"],
    ["adadepth.depth", "adadepth.generate"],
    ["adadepth.train"],
    ["adadepth.hf.adapters", "adadepth.hf.backbones"],
    ["adadepth.runs", "adadepth.hf.pretrained", "adadepth.hf"],
    ["adadepth.jobs", "adadepth.eval", "adadepth.bench", "adadepth.hf.harness",
     "adadepth.depthmap"],
    ["adadepth.studies"],
    ["adadepth.cli", "adadepth.__main__", "adadepth"],
]


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of a dotted module name."""
    best, level = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, level = len(name), i
    assert level is not None, module
    return level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {resolve(f"{node.module}.{a.name}") for a in node.names}
    return {m for m in found if m == "adadepth" or m.startswith("adadepth.")}


def resolve(name: str) -> str:
    """`from adadepth.depth import routing` names a module; `... import Method` a member."""
    candidate = SRC.parent / Path(*name.split("."))
    if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
        return name
    return name.rsplit(".", 1)[0]


def test_every_module_has_a_layer() -> None:
    """A new top-level module must be placed in LAYERS, not fall under the package itself."""
    top = [module_name(p) for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")]
    unplaced = [m for m in top if layer_of(m) == layer_of("adadepth") and m != "adadepth.cli"]
    assert not unplaced, unplaced


def test_no_module_imports_a_higher_layer() -> None:
    violations = []
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        for target in imports(path):
            if layer_of(target) > layer_of(me):
                violations.append(f"{me} imports {target}")
    assert not violations, "\n".join(violations)
