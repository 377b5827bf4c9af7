"""adadepth: language models whose depth adapts per token.

`import adadepth` stays light; `adadepth.from_pretrained` / `adadepth.save_pretrained` load the
Hugging Face side (adadepth.hf) on first use.
"""

from typing import Any

_LAZY = {"from_pretrained": "adadepth.hf", "save_pretrained": "adadepth.hf"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adadepth' has no attribute {name!r}")
