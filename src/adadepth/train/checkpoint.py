"""Checkpoints that survive a kill at any moment.

A run folder holds `config.json`/`config.yaml` and versioned checkpoint folders `ckpt-<step>/`
(weights as safetensors, optimizer and RNG state as a torch file). Each checkpoint is written
into a temporary folder and renamed into place, then the `LATEST` pointer file is replaced
atomically: a kill leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adadepth.errors import UserError
from adadepth.model.state import unique_state  # noqa: F401  (re-exported for the jobs)

LATEST = "LATEST"
WEIGHTS = "model.safetensors"
STATE = "train_state.pt"


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
                    train_state: dict[str, Any] | None = None, keep: int = 1) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tmp-ckpt-"))
    save_file(weights, str(tmp / WEIGHTS), metadata={"step": str(step)})
    if train_state is not None:
        torch.save(train_state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(run_dir / LATEST, final.name + "\n")
    # Temporary folders left by a run killed mid-write are garbage once a checkpoint is in place.
    stale = sorted(run_dir.glob("ckpt-*"))[:-keep] + list(run_dir.glob(".tmp-ckpt-*"))
    for old in stale:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / LATEST
    if pointer.is_file():
        path = run_dir / pointer.read_text().strip()
        if (path / WEIGHTS).is_file():
            return path
    # A kill between renaming a checkpoint into place and writing LATEST leaves no pointer, but
    # ckpt-* folders only ever appear complete (by rename), so the newest one is good.
    done = sorted(p for p in run_dir.glob("ckpt-*") if (p / WEIGHTS).is_file())
    return done[-1] if done else None


def require_checkpoint(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise UserError(f"checkpoint folder {run_dir} does not exist")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise UserError(f"{run_dir} holds no finished checkpoint")
    return path


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint; a damaged file is a user error, not a crash."""
    try:
        return load_file(str(ckpt / WEIGHTS))
    except Exception as e:  # safetensors raises its own error type, OSError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{ckpt / WEIGHTS} is damaged or unreadable: {first}") from e


def load_weights(module: nn.Module, ckpt: Path, strict: bool = True) -> None:
    tensors = read_weights(ckpt)
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise UserError(f"{ckpt} was written for a different model shape: "
                        f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}"
                        ) from e
    # Tied weights are stored once; their twin is reported missing but is already set.
    missing = [k for k in missing if not _is_tied(module, k)]
    if strict and (missing or unexpected):
        raise UserError(f"{ckpt} does not fit this model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")


def _is_tied(module: nn.Module, key: str) -> bool:
    state = module.state_dict()
    ptr = state[key].data_ptr()
    return any(k != key and v.data_ptr() == ptr for k, v in state.items())


def load_train_state(ckpt: Path) -> dict[str, Any] | None:
    path = ckpt / STATE
    return torch.load(path, weights_only=False) if path.is_file() else None
