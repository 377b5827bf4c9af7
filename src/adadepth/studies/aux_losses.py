"""The aux-loss study: "Revisiting Auxiliary Losses for Conditional Depth Routing" (2026).

Pretrains (or reuses) a backbone for the preset, then trains routing controllers on it: G1 and
G3 under the standard recipe (util + rank, plus jepa for G3) and under A3 (no util, no rank),
the baselines random / all-full / all-cheap at the same budget, and with `--ablations` A1 (G3
without jepa), A4 (lambda_jepa sweep), the 25% budget and the on-policy oracle. Every run is a
folder of its own with its metrics.json, so a re-run skips what is finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adadepth.config import ModelConfig, PretrainConfig, preset
from adadepth.data import load_corpus
from adadepth.jobs.fit import FitConfig, fit, fit_config
from adadepth.jobs.pretrain import pretrain
from adadepth.studies import report
from adadepth.studies.plan import run_plan
from adadepth.studies.recipes import Recipe, check_recipe, recipe_for, write_recipe
from adadepth.studies.scales import read_results
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



def backbone_dir(out: Path, recipe: Any, preset_name: str, device: str,
                 show_progress: bool, model: ModelConfig | None = None) -> Path:
    """Pretrain the study's backbone once (resumable), of the preset's shape unless `model` is
    given; a packaged one is converted instead."""
    if recipe.backbone is not None:
        from adadepth.hf import ensure_backbone

        return ensure_backbone(recipe.backbone)
    path = out / "backbone"
    if not (path / "eval.json").is_file():
        data = {"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                "block_size": recipe.block_size}
        if getattr(recipe, "max_docs", None) is not None:  # other studies' recipes have none
            data["max_docs"] = recipe.max_docs
        cfg = PretrainConfig(preset=preset_name, model=model or preset(preset_name), data=data,
                             train={"steps": recipe.backbone_steps, "device": device,
                                    "batch_size": recipe.batch_size, "eval_interval": 10**9,
                                    "ckpt_interval": max(50, recipe.backbone_steps // 5)})
        result = pretrain(cfg, path, resume=True, show_progress=show_progress)
        ck.write_json_atomic(path / "eval.json", {"val_loss": result.val_loss})
    return path


def backbone_summary(recipe: Recipe, preset_name: str, path: Path) -> dict[str, Any]:
    """The backbone named by what it is (never by where it happened to lie)."""
    if recipe.backbone is not None:
        from adadepth.hf.backbones import KNOWN

        known = KNOWN.get(recipe.backbone.lower())
        return {"name": recipe.backbone, "pretrained_by_study": False,
                "description": known.description if known else recipe.backbone}
    meta = json.loads((path / "config.json").read_text())
    evaluated = json.loads((path / "eval.json").read_text())
    shape = meta.get("model", {})
    return {"name": f"the `{preset_name}` preset backbone", "pretrained_by_study": True,
            "steps": recipe.backbone_steps, "corpus": recipe.corpus,
            "tokenizer": recipe.tokenizer, "block_size": recipe.block_size,
            "batch_size": recipe.batch_size, "n_layers": shape.get("n_layers"),
            "d_model": shape.get("d_model"), "val_loss": evaluated.get("val_loss")}


def run_config(arm: Arm, seed: int, backbone: Path, recipe: Recipe, device: str) -> FitConfig:
    steps = recipe.controller_steps
    data: dict[str, Any] = {"corpus": recipe.corpus, "block_size": recipe.block_size}
    if recipe.max_docs is not None:
        data["max_docs"] = recipe.max_docs
    return fit_config({
        "method": "routing", "backbone": str(backbone),
        "routing": {**recipe.routing, "gate": arm.gate, "aux": list(arm.aux),
                    "budget": arm.budget, "oracle": arm.oracle, "lambda_jepa": arm.lambda_jepa},
        "data": data,
        "train": {"steps": steps, "seed": seed, "batch_size": recipe.batch_size,
                  "device": device, "eval_interval": 10**9, "ckpt_interval": max(20, steps // 4),
                  "log_interval": 10, **recipe.train},
    })


def arms_of(ablations: bool) -> list[Arm]:
    return MAIN + BASELINES + (ABLATIONS if ablations else [])


def run_study(preset_name: str, seeds: int, out: Path, ablations: bool = False,
              steps: int | None = None, device: str = "auto", show_progress: bool = True,
              corpus: str | None = None,
              other_scales: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run (or resume) the study in `out` and write results.json, report.md and the plots.

    `other_scales` maps a preset name to another study's results, for the report's
    across-scales table.
    """
    recipe = recipe_for(preset_name, corpus, steps)
    # Before any work: a folder of another recipe or an unreadable corpus is bad input.
    record = recipe.record(preset_name)
    check_recipe(out, record)
    load_corpus(recipe.corpus, max_docs=recipe.max_docs)
    write_recipe(out, record)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bb = backbone_dir(out, recipe, preset_name, device, show_progress)
    plan = [(arm, seed) for seed in range(seeds) for arm in arms_of(ablations)]

    def launch(arm: Arm, seed: int, run_dir: Path) -> dict[str, Any]:
        return fit(run_config(arm, seed, bb, recipe, device), run_dir, resume=True,
                   show_progress=False)

    done = run_plan(plan, out, lambda arm: arm.name, launch, "aux-loss study", show_progress)
    runs = [{**metrics, "arm": arm.name, "group": arm.group} for arm, metrics in done]
    results = {"preset": preset_name, "seeds": seeds, "steps": recipe.controller_steps,
               "ablations": ablations, "recipe": recipe.record(preset_name),
               "backbone": backbone_summary(recipe, preset_name, bb), "runs": runs}
    ck.write_json_atomic(out / "results.json", results)
    report.write(results, out, other_scales or {})
    return results


def rewrite_report(out: Path, other_scales: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write report.md and the plots again from out/results.json (no run is touched), e.g. once
    another scale's study has finished and the across-scales table can show it."""
    results = read_results(out)
    report.write(results, out, other_scales)
    return results
