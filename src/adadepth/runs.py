"""What a run folder holds and how to load the model back from it, for every method.

`config.json` says what the folder is: `kind` ("dense" for a pretrained backbone, else the kind
a method registered), `model` (the backbone's shape), and for a method `method` (its registry
name), `method_config` (its options) and `backbone` (where its backbone came from: a run folder,
a transformers directory or a known name, with a fingerprint of its weights; absent when the
method was trained from scratch and its checkpoint holds the backbone too). `tokenizer/` holds
the tokenizer; `LATEST` points at the newest `ckpt-*/` folder, whose weights are the dense
model's, or what the method added (`Method.method_state`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adadepth.config import ModelConfig, validate
from adadepth.data import Tokenizer, load_tokenizer
from adadepth.depth import Method, method_spec, spec_for_kind
from adadepth.errors import UserError
from adadepth.model import Transformer
from adadepth.train import checkpoint as ck

CONFIG = "config.json"


@dataclass
class LoadedRun:
    model: nn.Module  # forward(idx, cache=None, start=0) -> Output, new_cache(batch, max_len)
    tokenizer: Tokenizer
    meta: dict[str, Any]


def write_run_config(run_dir: Path, kind: str, model_cfg: Any, tokenizer: Tokenizer,
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


# What must agree for --resume to continue a run rather than refuse it.
RESUME_KEYS = ("kind", "model", "method", "method_config", "backbone", "backbone_checksum")


def check_compatible(run_dir: Path, expected: dict[str, Any]) -> None:
    """Refuse to resume a run folder written with another recipe, naming what differs."""
    meta = read_run_config(run_dir)
    for key in RESUME_KEYS:
        if key in expected and meta.get(key) != expected[key]:
            detail = ""
            if isinstance(expected[key], dict) and isinstance(meta.get(key), dict):
                changed = sorted(k for k in expected[key].keys() | meta[key].keys()
                                 if expected[key].get(k) != meta[key].get(k))
                detail = f" ({', '.join(changed[:4])})"
            raise UserError(f"{run_dir} holds a run of another configuration: its {key} "
                            f"differs{detail}; use a new --out folder or the same config to "
                            "resume")


def fingerprint(backbone: nn.Module) -> str | float:
    """A fingerprint of a backbone's weights, to notice them change under a method's run:
    the SHA-256 of a transformers model, the sum of absolute weights of ours."""
    checksum = getattr(backbone, "checksum", None)
    if callable(checksum):
        return checksum()
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum().item() for p in backbone.parameters()))


def same_fingerprint(a: str | float, b: str | float) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def load_dense(run_dir: Path, meta: dict[str, Any], device: str) -> Transformer:
    model = Transformer(model_config(run_dir, meta))
    ck.load_weights(model, ck.require_checkpoint(run_dir))
    return model.to(device)


def model_config(run_dir: Path, meta: dict[str, Any]) -> ModelConfig:
    try:  # a hand-edited or foreign config.json is bad input, not a crash
        cfg = validate(ModelConfig, meta.get("model") or {})
        cfg.check()
    except UserError as e:
        raise UserError(f"{run_dir / CONFIG}: {e}") from e
    return cfg


def load_model(spec: str | Path, device: str = "cpu") -> LoadedRun:
    """Any model the commands read, named the one way they all take: an adadepth run folder
    (dense or any method's), a transformers model directory, or a known backbone name
    (smollm2-135m, converted once)."""
    from adadepth import hf

    spec = str(spec)
    if hf.is_known(spec):
        return load_transformers(spec, device)
    return load_run(Path(spec), device)


def load_backbone(spec: str | Path, device: str = "cpu") -> LoadedRun:
    """A backbone for a method: a dense model of any of `load_model`'s kinds."""
    loaded = load_model(spec, device)
    if loaded.meta.get("kind") not in ("dense", "hf"):
        raise UserError(f"backbone {spec} is a {loaded.meta.get('kind')!r} run, not a dense model")
    return loaded


def load_method(run_dir: Path, meta: dict[str, Any], device: str) -> Method:
    spec = spec_for_kind(meta["kind"])
    if "method" in meta and meta["method"] != spec.name:
        spec = method_spec(meta["method"])
    if meta.get("backbone") is not None:
        backbone = load_backbone(meta["backbone"], device).model
        recorded = meta.get("backbone_checksum")
        if recorded is not None and not same_fingerprint(fingerprint(backbone), recorded):
            raise UserError(f"the backbone at {meta['backbone']} changed since {run_dir} was "
                            "trained")
    else:  # trained from scratch: the checkpoint holds the backbone's weights too
        backbone = Transformer(model_config(run_dir, meta)).to(device)
    model = spec.build(backbone, validate(spec.config, meta.get("method_config") or {}))
    model.load_method_state(ck.read_weights(ck.require_checkpoint(run_dir)))
    return model.to(device)


def load_transformers(spec: str | Path, device: str = "cpu") -> LoadedRun:
    """A transformers backbone as a loaded run: the adapter, its own tokenizer, default data."""
    from adadepth.data.tokenizers import HFTokenizer
    from adadepth.hf.backbones import DEFAULT_DATA, load_model, load_tokenizer_files, resolve

    spec = str(spec)
    where, ref = resolve(spec)
    adapter = load_model(where, device)
    adapter.source = ref
    hf_tok = load_tokenizer_files(where)
    tokenizer = HFTokenizer(hf_tok, where)
    adapter.tokenizer = hf_tok
    if tokenizer.vocab_size > adapter.cfg.vocab_size:
        raise UserError(f"the tokenizer of {spec} has {tokenizer.vocab_size} tokens, more than "
                        f"the model's vocabulary of {adapter.cfg.vocab_size}")
    meta = {"kind": "hf", "model_type": adapter.cfg.model_type, "ref": ref,
            "model": adapter.cfg.model_dump(), "data": {**DEFAULT_DATA, "tokenizer": where}}
    return LoadedRun(model=adapter, tokenizer=tokenizer, meta=meta)


def load_run(run_dir: Path, device: str = "cpu") -> LoadedRun:
    meta = read_run_config(run_dir)
    if "kind" not in meta and "model_type" in meta:  # a plain transformers model directory
        return load_transformers(run_dir, device)
    kind = meta.get("kind")
    if kind == "dense":
        model: nn.Module = load_dense(run_dir, meta, device)
    else:
        model = load_method(run_dir, meta, device)
    return LoadedRun(model=model.eval(), tokenizer=load_tokenizer(run_dir / "tokenizer"),
                     meta=meta)
