"""`from_pretrained` / `save_pretrained` for adaptive-depth models built on a transformers LM.

A saved model is a directory: `adadepth_model.json` (the method, its config, and the backbone:
a reference to where it came from, or `backbone/` stored beside it with transformers'
`save_pretrained`) and `controller.safetensors` (what the method added). The backbone's SHA-256
is recorded and checked on load, so a backbone that changed since is refused, never silently
used. A backbone that training changed (the `joint` regime) or that came from memory is stored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from adadepth.config import validate
from adadepth.depth import Method, method_names, method_spec
from adadepth.errors import UserError
from adadepth.hf.adapters import HFAdapter
from adadepth.hf.backbones import load_model

SAVED = "adadepth_model.json"
CONTROLLER = "controller.safetensors"
STORED = "backbone"
FORMAT = 2
DENSE = ("dense", "none")


def _build(adapter: HFAdapter, method: str, config: dict[str, Any]) -> nn.Module:
    """The method registered under `method` over the adapter (or the adapter itself, dense)."""
    if method in DENSE:
        if config:
            raise UserError(f"method dense takes no options, got {', '.join(config)}")
        return adapter
    if method not in method_names():
        raise UserError(f"unknown method {method!r}; known: {', '.join(method_names())}, dense")
    spec = method_spec(method)
    return spec.build(adapter, validate(spec.config, config))


def from_pretrained(source: Any, method: str = "routing", device: str = "cpu",
                    **config: Any) -> nn.Module:
    """An adaptive-depth model from a transformers model (directory, known backbone name, hub
    id, or a loaded model) with the backbone's weights, or a directory `save_pretrained` wrote.

    `config` holds the method's options, e.g. `budget=0.5, gate="g3"` for routing; every
    method registered in `adadepth.depth` is available by name.
    """
    from transformers import PreTrainedModel

    if isinstance(source, HFAdapter):
        adapter = source
    elif isinstance(source, PreTrainedModel):
        adapter = HFAdapter(source)
    elif (Path(str(source)).expanduser() / SAVED).is_file():
        if config:
            raise UserError(f"{source} is a saved adaptive model: its options come from the "
                            "directory, pass none")
        return load_saved(Path(str(source)).expanduser(), device)
    else:
        adapter = load_model(str(source), device)
    return _build(adapter, method, config).to(device)


def _unwrap(model: nn.Module) -> tuple[HFAdapter, str, dict[str, Any]]:
    if isinstance(model, HFAdapter):
        return model, "dense", {}
    if isinstance(model, Method) and isinstance(model.backbone, HFAdapter):
        return model.backbone, model.name, model.method_config()
    raise UserError("save_pretrained takes a model built on a transformers backbone "
                    "(from adadepth.from_pretrained)")


def save_pretrained(model: nn.Module, directory: str | Path,
                    store_backbone: bool | None = None) -> Path:
    """Write `model` to `directory`; the backbone is referenced unless it must or asked to be
    stored. An existing directory is replaced only if it holds a model saved here before."""
    adapter, method, config = _unwrap(model)
    out = Path(directory).expanduser()
    if out.exists() and not (out / SAVED).is_file() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a saved adadepth model; choose another folder")
    changed = isinstance(model, Method) and model.backbone_trained()
    # A reference into the folder being replaced would point at nothing.
    inside = adapter.source is not None and Path(adapter.source).resolve().is_relative_to(
        out.resolve())
    must = changed or adapter.source is None or inside
    store = must if store_backbone is None else store_backbone
    if must and not store:
        raise UserError("this backbone has no directory to refer to (or training changed it): "
                        "save with store_backbone=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        if isinstance(model, Method):  # the backbone's own weights go to backbone/ if at all
            own = ("backbone.", *model.save_files(tmp))  # e.g. LoRA adapters in peft's format
            state = {k: v for k, v in model.method_state().items() if not k.startswith(own)}
            save_file(state, str(tmp / CONTROLLER))
        # The backbone as loaded, without what the method installed in it (LoRA layers).
        with model.original_backbone() if isinstance(model, Method) else nullcontext():
            meta = {"format": FORMAT, "method": method, "config": config,
                    "model_type": adapter.cfg.model_type,
                    "backbone": {"ref": None if store else adapter.source, "stored": store,
                                 "sha256": adapter.checksum()}}
            if store:
                with adapter.original_ffns():
                    adapter.hf.save_pretrained(str(tmp / STORED))
                if adapter.tokenizer is not None:
                    adapter.tokenizer.save_pretrained(str(tmp / STORED))
        (tmp / SAVED).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_saved(directory: Path, device: str = "cpu") -> nn.Module:
    try:
        meta = json.loads((directory / SAVED).read_text())
        backbone = meta["backbone"]
        method = meta["method"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{directory / SAVED} is not a model description adadepth wrote") from err
    source = str(directory / STORED) if backbone.get("stored") else backbone.get("ref")
    if not source:
        raise UserError(f"{directory} names no backbone")
    adapter = load_model(source, device)
    if adapter.checksum() != backbone.get("sha256"):
        raise UserError(f"the backbone at {source} is not the one {directory} was saved with "
                        "(its weights' SHA-256 differs)")
    if not backbone.get("stored"):
        adapter.source = backbone.get("ref")
    model = _build(adapter, method, meta.get("config") or {})
    weights = directory / CONTROLLER
    if isinstance(model, Method):
        if not weights.is_file():
            raise UserError(f"{directory} lacks {CONTROLLER}")
        model.load_files(directory)
        model.load_method_state(load_file(str(weights)))
    return model.to(device).eval()
