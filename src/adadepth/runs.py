"""What a run folder holds and how to load the model back from it.

`config.json` names the model kind ("dense", "routed", ...) and its shape; `tokenizer/` holds
the tokenizer; `LATEST` points at the newest `ckpt-*/` folder. Each kind registers a loader, so
`adadepth eval` and `adadepth generate` work on any of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from adadepth.config import ModelConfig, validate
from adadepth.data import Tokenizer, load_tokenizer
from adadepth.errors import UserError
from adadepth.model import Transformer
from adadepth.train import checkpoint as ck

CONFIG = "config.json"


@dataclass
class LoadedRun:
    model: nn.Module  # forward(idx, cache=None, start=0) -> Output, new_cache(batch, max_len)
    tokenizer: Tokenizer
    meta: dict[str, Any]


LOADERS: dict[str, Callable[[Path, dict[str, Any], str], nn.Module]] = {}


def register_loader(kind: str):
    def wrap(fn):
        LOADERS[kind] = fn
        return fn
    return wrap


def write_run_config(run_dir: Path, kind: str, model_cfg: ModelConfig, tokenizer: Tokenizer,
                     extra: dict[str, Any] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / "tokenizer")
    ck.write_json_atomic(run_dir / CONFIG, {"kind": kind, "model": model_cfg.model_dump(),
                                           **(extra or {})})


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise UserError(f"{run_dir} is not an adadepth run folder (no {CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON") from e


def check_compatible(run_dir: Path, kind: str, model_cfg: ModelConfig) -> None:
    meta = read_run_config(run_dir)
    if meta.get("kind") != kind or meta.get("model") != model_cfg.model_dump():
        raise UserError(f"{run_dir} holds a run of another configuration; "
                        "use a new --out folder or the same config to resume")


@register_loader("dense")
def load_dense(run_dir: Path, meta: dict[str, Any], device: str) -> nn.Module:
    try:  # a hand-edited or foreign config.json is bad input, not a crash
        cfg = validate(ModelConfig, meta.get("model") or {})
        cfg.check()
    except UserError as e:
        raise UserError(f"{run_dir / CONFIG}: {e}") from e
    model = Transformer(cfg)
    ck.load_weights(model, ck.require_checkpoint(run_dir))
    return model.to(device)


def load_run(run_dir: Path, device: str = "cpu") -> LoadedRun:
    import adadepth.route  # noqa: F401  (registers the "routed" loader)

    meta = read_run_config(run_dir)
    if "kind" not in meta and "model_type" in meta:  # a plain transformers model directory
        from adadepth.hf import load_backbone

        return load_backbone(run_dir, device)
    kind = meta.get("kind")
    if kind not in LOADERS:
        raise UserError(f"{run_dir}: unknown model kind {kind!r}")
    model = LOADERS[kind](run_dir, meta, device).eval()
    return LoadedRun(model=model, tokenizer=load_tokenizer(run_dir / "tokenizer"), meta=meta)
