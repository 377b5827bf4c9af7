"""Hugging Face `transformers` models in and out of adadepth.

- `adapters`: any supported causal LM (Llama/SmolLM2, GPT-2, GPT-NeoX/Pythia, Gemma 3) behind
  adadepth's layer-stack interface, so every adaptive-depth method applies to it;
- `backbones`: model directories, hub ids and known names (`smollm2-135m` installs offline),
  converted once into a cache folder (`adadepth.runs.load_transformers` loads one with its
  tokenizer, as a backbone for any method);
- `pretrained`: `from_pretrained` / `save_pretrained` of adaptive models built on them;
- `harness`: the lm-evaluation-harness model `adadepth`.

Importing this package is light; transformers loads with the first call that needs it.
"""

from __future__ import annotations

from typing import Any

from adadepth.hf.backbones import (
    KNOWN,
    backbone_cli,
    ensure_backbone,
    is_known,
    load_model,
)

__all__ = ["KNOWN", "HFAdapter", "backbone_cli", "ensure_backbone", "from_pretrained", "is_known",
           "load_model", "save_pretrained"]


def from_pretrained(source: Any, method: str = "routing", device: str = "cpu", **config: Any):
    from adadepth.hf.pretrained import from_pretrained as load

    return load(source, method=method, device=device, **config)


def save_pretrained(model: Any, directory: Any, store_backbone: bool | None = None):
    from adadepth.hf.pretrained import save_pretrained as save

    return save(model, directory, store_backbone=store_backbone)


def __getattr__(name: str) -> Any:
    if name == "HFAdapter":
        from adadepth.hf.adapters import HFAdapter

        return HFAdapter
    raise AttributeError(f"module 'adadepth.hf' has no attribute {name!r}")
