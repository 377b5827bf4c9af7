"""The aux-loss study: "Revisiting Auxiliary Losses for Conditional Depth Routing" (DESIGN.md §1).

Pretrains (or reuses) a backbone for the preset, then trains routing controllers on it: G1 and
G3 under the standard recipe (util + rank, plus jepa for G3) and under A3 (no util, no rank),
the baselines random / all-full / all-cheap at the same budget, and with `--ablations` A1 (G3
without jepa), A4 (lambda_jepa sweep), the 25% budget and the on-policy oracle. Every run is a
folder of its own with its metrics.json, so a re-run skips what is finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adadepth.config import ModelConfig, PretrainConfig, preset
from adadepth.errors import UserError
from adadepth.jobs.pretrain import pretrain
from adadepth.jobs.route import RouteConfig, route
from adadepth.studies import report
from adadepth.studies.plan import run_plan
from adadepth.train import checkpoint as ck


@dataclass(frozen=True)
class Arm:
    name: str
    gate: str
    aux: tuple[str, ...]
    budget: float = 0.5
    oracle: str = "off_policy"
    lambda_jepa: float = 1.0
    group: str = "main"  # main | baseline | ablation


MAIN = [
    Arm("G1", "g1", ("util", "rank")),
    Arm("G3", "g3", ("util", "rank", "jepa")),
    Arm("G1-A3", "g1", ()),
    Arm("G3-A3", "g3", ("jepa",)),
]
BASELINES = [
    Arm("random", "random", (), group="baseline"),
    Arm("all-full", "all-full", (), group="baseline"),
    Arm("all-cheap", "all-cheap", (), group="baseline"),
]
ABLATIONS = [
    Arm("G3-A1", "g3", ("util", "rank"), group="ablation"),
    Arm("G3-A4-l0.25", "g3", ("util", "rank", "jepa"), lambda_jepa=0.25, group="ablation"),
    Arm("G3-A4-l2", "g3", ("util", "rank", "jepa"), lambda_jepa=2.0, group="ablation"),
    Arm("G1-b0.25", "g1", ("util", "rank"), budget=0.25, group="ablation"),
    Arm("G3-b0.25", "g3", ("util", "rank", "jepa"), budget=0.25, group="ablation"),
    Arm("random-b0.25", "random", (), budget=0.25, group="ablation"),
    Arm("G1-onpolicy", "g1", ("util", "rank"), oracle="on_policy", group="ablation"),
    Arm("G3-onpolicy", "g3", ("util", "rank", "jepa"), oracle="on_policy", group="ablation"),
]


@dataclass
class Recipe:
    """Sizes per preset: the backbone's pretraining and the controllers' training."""

    corpus: str
    tokenizer: str
    block_size: int
    batch_size: int
    backbone_steps: int
    controller_steps: int
    backbone: str | None = None  # a packaged pretrained backbone instead of pretraining
    overrides: dict[str, Any] = field(default_factory=dict)


RECIPES = {
    # Sized so that the whole study (backbone included) runs in under 10 minutes on 2 cores.
    # 160 controller steps, not fewer: at 80 the LM-only gate (A3) had barely begun to leave
    # random routing, and its average LM was within seed noise of random's.
    "tiny": Recipe("tiny-shakespeare", "char", 64, 12, backbone_steps=600, controller_steps=160),
    "small": Recipe("tiny-shakespeare", "char", 128, 16, backbone_steps=2000,
                    controller_steps=400),
    # The published size (a GPU job): 157.5M backbone, 20k controller steps in the paper.
    "paper": Recipe("tiny-shakespeare", "gpt2", 512, 16, backbone_steps=20000,
                    controller_steps=20000, backbone="smollm2-135m"),
}


def backbone_dir(out: Path, recipe: Recipe, preset_name: str, device: str,
                 show_progress: bool, model: ModelConfig | None = None) -> Path:
    """Pretrain the study's backbone once (resumable), of the preset's shape unless `model` is
    given; a packaged one is converted instead."""
    if recipe.backbone is not None:
        from adadepth.hf import ensure_backbone

        return ensure_backbone(recipe.backbone)
    path = out / "backbone"
    if not (path / "eval.json").is_file():
        cfg = PretrainConfig(preset=preset_name, model=model or preset(preset_name),
                             data={"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                                   "block_size": recipe.block_size},
                             train={"steps": recipe.backbone_steps, "device": device,
                                    "batch_size": recipe.batch_size, "eval_interval": 10**9,
                                    "ckpt_interval": max(50, recipe.backbone_steps // 5)})
        result = pretrain(cfg, path, resume=True, show_progress=show_progress)
        ck.write_json_atomic(path / "eval.json", {"val_loss": result.val_loss})
    return path


def run_config(arm: Arm, seed: int, backbone: Path, recipe: Recipe, steps: int,
               device: str) -> RouteConfig:
    return RouteConfig(
        backbone=str(backbone),
        routing={"gate": arm.gate, "aux": list(arm.aux), "budget": arm.budget,
                 "oracle": arm.oracle, "lambda_jepa": arm.lambda_jepa},
        train={"steps": steps, "seed": seed, "batch_size": recipe.batch_size, "device": device,
               "eval_interval": 10**9, "ckpt_interval": max(20, steps // 4),
               "log_interval": 10},
    )


def run_study(preset_name: str, seeds: int, out: Path, ablations: bool = False,
              steps: int | None = None, device: str = "auto",
              show_progress: bool = True) -> dict[str, Any]:
    if preset_name not in RECIPES:
        raise UserError(f"unknown preset {preset_name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[preset_name]
    steps = steps or recipe.controller_steps
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bb = backbone_dir(out, recipe, preset_name, device, show_progress)
    arms = MAIN + BASELINES + (ABLATIONS if ablations else [])
    plan = [(arm, seed) for seed in range(seeds) for arm in arms]

    def launch(arm: Arm, seed: int, run_dir: Path) -> dict[str, Any]:
        cfg = run_config(arm, seed, bb, recipe, steps, device)
        return route(cfg, run_dir, resume=True, show_progress=False)

    done = run_plan(plan, out, lambda arm: arm.name, launch, "aux-loss study", show_progress)
    runs = [{**metrics, "arm": arm.name, "group": arm.group} for arm, metrics in done]
    backbone_eval = json.loads((bb / "eval.json").read_text()) if (bb / "eval.json").is_file() \
        else {}
    results = {"preset": preset_name, "seeds": seeds, "steps": steps, "backbone": {
        "path": str(bb), "val_loss": backbone_eval.get("val_loss")}, "runs": runs}
    ck.write_json_atomic(out / "results.json", results)
    report.write(results, out)
    return results
