"""A study's backbone: pretrained once in the study folder (resumable), or a packaged one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from adadepth.config import ModelConfig, preset
from adadepth.train.checkpoint import write_json_atomic


class BackboneRecipe(Protocol):
    """The parts of a recipe that say how its backbone is made."""

    corpus: str
    tokenizer: str | None
    block_size: int
    batch_size: int
    backbone_steps: int
    backbone: str | None  # a packaged pretrained backbone instead of pretraining one


def pretrained(path: Path, config: dict[str, Any], show_progress: bool) -> Path:
    """Pretrain into `path` from `config` (as `adadepth pretrain`'s YAML would hold it), once:
    eval.json, written last, marks it finished."""
    from adadepth.config import PretrainConfig, validate
    from adadepth.jobs.pretrain import pretrain

    if not (path / "eval.json").is_file():
        result = pretrain(validate(PretrainConfig, config), path, resume=True,
                          show_progress=show_progress)
        write_json_atomic(path / "eval.json", {"val_loss": result.val_loss})
    return path


def backbone_dir(out: Path, recipe: BackboneRecipe, preset_name: str, device: str,
                 show_progress: bool, model: ModelConfig | None = None) -> Path:
    """The recipe's backbone: out/backbone, pretrained of the preset's shape unless `model` is
    given; a packaged one is converted instead."""
    if recipe.backbone is not None:
        from adadepth.hf import ensure_backbone

        return ensure_backbone(recipe.backbone)
    data: dict[str, Any] = {"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                            "block_size": recipe.block_size}
    if getattr(recipe, "max_docs", None) is not None:  # the ensemble's recipes have none
        data["max_docs"] = recipe.max_docs  # type: ignore[attr-defined]
    steps = recipe.backbone_steps
    return pretrained(out / "backbone", {
        "preset": preset_name, "model": (model or preset(preset_name)).model_dump(),
        "data": data, "train": {"steps": steps, "device": device,
                                "batch_size": recipe.batch_size, "eval_interval": 10**9,
                                "ckpt_interval": max(50, steps // 5)}}, show_progress)


def backbone_val_loss(path: Path) -> float | None:
    """The validation loss of a backbone pretrained by a study (None: not one of those)."""
    file = path / "eval.json"
    return json.loads(file.read_text())["val_loss"] if file.is_file() else None
