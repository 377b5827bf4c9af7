"""The ponder study: AdaPonderLM against PonderLM, the backbone and fixed pruning schedules at
matched FLOPs ("AdaPonderLM: Gated Pondering Language Models with Token-Wise Adaptive Depth").

Per seed, every arm is trained by `adadepth ponder` with the same data, steps and optimiser:
the backbone (one pass), PonderLM (K passes, no halting), AdaPonderLM at the paper's lambda and
k and at the other (lambda, k) points of the recipe's sweep (the Pareto curve), the ablation
with one shared gate MLP, and the two fixed pruning schedules (uniform, geometric) aimed at the
average passes AdaPonderLM realised on that seed. Then, per seed, every token of held-out text
gets its passes under AdaPonderLM beside its NLL under the backbone (rank correlation), and one
AdaPonderLM run is benched against fixed-K pondering on the same weights.

Each analysis is a JSON file, so a re-run skips what is finished. On a CPU the runs go two at a
time in worker processes of one thread each (their timings assume it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adadepth.studies import ponder_report, shape
from adadepth.studies.backbone import backbone_val_loss, pretrained
from adadepth.studies.ponder_analysis import bench_run, token_analysis
from adadepth.studies.runner import cached
from adadepth.studies.shape import Arm, Recipe, Study, recipe_of, run_of


def arms_for(sweep: list[tuple[float, float]]) -> list[Arm]:
    """Every arm but the schedules (they need AdaPonderLM's realised passes first)."""
    def arm(name: str, group: str, **options: Any) -> Arm:
        return Arm(name, config={"ponder": options}, group=group)

    arms = [arm("backbone", "baseline", passes=1, halting="none"),
            arm("PonderLM", "baseline", halting="none"),
            arm("AdaPonderLM", "ada", halting="learned")]
    arms += [arm(f"Ada-l{lam:g}-k{k:g}", "sweep", halting="learned", lam=lam, k=k)
             for lam, k in sweep]
    arms.append(arm("Ada-shared-gate", "ablation", halting="learned", gate="shared"))
    return arms


SCHEDULES = ("uniform", "geometric")


@dataclass(frozen=True)
class Track:
    """One way of getting the looped model: from scratch (a model shape), or continued
    pretraining of a pretrained backbone (a known one, or one of the model shape that the study
    pretrains first for `pretrain_steps`, shared by every arm and seed)."""

    name: str
    backbone: str | None = None  # a known backbone (smollm2-135m) or a run folder
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    steps: int = 300
    pretrain_steps: int = 0


@dataclass(frozen=True)
class PonderRecipe(Recipe):
    corpus: str
    tokenizer: str
    block_size: int
    batch_size: int
    tracks: tuple[Track, ...]
    ponder: dict[str, Any]  # options every arm shares (on top of the method's defaults)
    sweep: tuple[tuple[float, float], ...]  # (lambda, k) beside the paper's (0.1, 0.1)
    optim: dict[str, Any]
    eval_batches: int = 8
    max_docs: int | None = None  # documents streamed from a hub corpus
    bench: dict[str, Any] = field(default_factory=dict)  # BenchSpec sizes
    bench_taus: tuple[float, ...] = (0.1, 0.3, 0.5)  # besides the trained tau


TINY_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 176, "max_seq_len": 512}
RECIPES = {
    # Sized for the whole study (a small backbone pretrained once, then 3 seeds of 8 arms) within
    # 15 minutes on 2 CPU cores. Every arm continues from the same pretrained backbone: trained
    # from scratch for 300 steps, the looped models sat on the char-level plateau for a number of
    # steps that varied with the seed, and that noise swamped every comparison. Short training
    # never pushes the lowest gates down to the paper's tau of 1e-4 (after 300 steps the bottom-k
    # mean sits near 1e-2), so this recipe halts at tau = 0.05 (docs/methods/ponder.md); the
    # bench sweeps tau.
    "tiny": PonderRecipe(
        "tiny-shakespeare", "char", 64, 16,
        (Track("cpt", preset="tiny", model=TINY_MODEL, pretrain_steps=600, steps=300),),
        ponder={"tau": 0.05, "ce_steps": 50, "k_warmup_steps": 100, "gates_only_steps": 50},
        sweep=((0.1, 0.2), (0.3, 0.3)),
        optim={"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 30},
        bench={"prefill_batch": 8, "prefill_len": 128, "decode_tokens": 48, "reps": 3}),
    "small": PonderRecipe(
        "tiny-shakespeare", "char", 128, 16,
        (Track("cpt", preset="tiny", pretrain_steps=2000, steps=1000),),
        ponder={"tau": 0.02, "ce_steps": 200, "k_warmup_steps": 300, "gates_only_steps": 100},
        sweep=((0.1, 0.2), (0.3, 0.3)),
        optim={"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100},
        bench={"prefill_batch": 8, "prefill_len": 256, "decode_tokens": 128, "reps": 3}),
    # The GPU recipe: a Pythia-70M-shaped model from scratch (width 512, 6 layers, 8 heads; the
    # SwiGLU FFN sized to Pythia's MLP parameters) and continued pretraining of SmolLM2-135M,
    # at the paper's tau, lambda and k, on about 500M tokens of fineweb-edu (streamed once).
    "paper": PonderRecipe(
        "HuggingFaceFW/fineweb-edu:sample-10BT", "gpt2", 1024, 32,
        (Track("scratch", preset="paper", steps=20000,
               model={"d_model": 512, "n_layers": 6, "n_heads": 8, "d_ff": 1376,
                      "max_seq_len": 2048, "tie_embeddings": False}),
         Track("cpt", backbone="smollm2-135m", steps=5000)),
        ponder={"scale_embeds": False, "ce_steps": 2000, "k_warmup_steps": 2000,
                "gates_only_steps": 500},
        sweep=((0.1, 0.2), (0.3, 0.3)),
        optim={"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 500, "beta2": 0.95,
               "weight_decay": 0.01},
        eval_batches=50, max_docs=500_000,
        bench={"prefill_batch": 8, "prefill_len": 512, "decode_tokens": 256, "reps": 3},
        bench_taus=(0.01, 0.1, 0.3)),
}


def base_config(recipe: PonderRecipe, track: Track, backbone: str | None, device: str,
                threads: int) -> dict[str, Any]:
    """The nested config `adadepth ponder` would read from YAML for every run of a track."""
    steps = track.steps
    config: dict[str, Any] = {
        "method": "ponder", "ponder": dict(recipe.ponder),
        "data": {"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                 "block_size": recipe.block_size, "max_docs": recipe.max_docs},
        "optim": recipe.optim,
        "train": {"steps": steps, "batch_size": recipe.batch_size,
                  "device": device, "threads": threads, "eval_interval": steps,
                  "eval_batches": recipe.eval_batches, "log_interval": 10,
                  "ckpt_interval": max(50, steps // 4)}}
    if backbone is not None:
        config["backbone"] = backbone
    else:
        config.update(preset=track.preset, model=track.model)
    return config


def track_backbone(recipe: PonderRecipe, track: Track, out: Path, device: str, threads: int,
                   show_progress: bool) -> str | None:
    """The track's backbone: a known one as named, or one the study pretrains once."""
    if track.backbone is not None or not track.pretrain_steps:
        return track.backbone
    from adadepth.config import preset

    steps = track.pretrain_steps
    return str(pretrained(out / "backbone" / track.name, {
        "preset": track.preset, "model": {**preset(track.preset).model_dump(), **track.model},
        "data": {"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                 "block_size": recipe.block_size, "max_docs": recipe.max_docs},
        "optim": recipe.optim,
        "train": {"steps": steps, "batch_size": recipe.batch_size, "device": device,
                  "threads": threads, "eval_interval": steps,
                  "eval_batches": recipe.eval_batches, "ckpt_interval": steps}},
        show_progress))


def on_gpu(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


class Ponder(Study):
    name = "ponder"
    takes = frozenset({"steps"})

    def __init__(self, options: shape.StudyOptions) -> None:
        super().__init__(options)
        recipe = recipe_of(RECIPES, options.preset, self.name)
        if options.steps:
            recipe = dataclasses.replace(recipe, tracks=tuple(
                dataclasses.replace(t, steps=options.steps) for t in recipe.tracks))
        self.recipe: PonderRecipe = recipe
        # On a CPU the runs go two at a time, one thread each; on a GPU one at a time.
        self.gpu = on_gpu(options.device)
        self.threads = 0 if self.gpu else 1
        self.backbones: dict[str, str | None] = {}

    def workers(self) -> int:
        return 1 if self.gpu else max(1, min(2, os.cpu_count() or 1))

    def prepare(self, out: Path) -> None:
        o = self.options
        self.backbones = {t.name: track_backbone(self.recipe, t, out, o.device, self.threads,
                                                 o.show_progress) for t in self.recipe.tracks}

    def plan(self, out: Path, done: shape.Done) -> list[shape.Run]:
        recipe, seeds = self.recipe, range(self.seeds)
        runs = []
        for track in recipe.tracks:
            folder = out / "runs" / track.name
            base = base_config(recipe, track, self.backbones[track.name], self.options.device,
                               self.threads)
            first = [run_of(a, s, folder, base) for s in seeds
                     for a in arms_for(list(recipe.sweep))]
            runs += first
            if any(r.folder not in done for r in first):
                continue  # the schedules aim at AdaPonderLM's passes: they wait for its runs
            for s in seeds:
                ada = done[folder / f"AdaPonderLM-seed{s}"]
                target = min(float(ada["avg_passes"]), float(recipe.ponder.get("passes", 4)))
                runs += [run_of(Arm(kind, config={"ponder": {
                    "halting": kind, "schedule_passes": target}}, group="schedule"), s, folder,
                    base) for kind in SCHEDULES]
        return runs

    def results(self, out: Path, finished: shape.Finished) -> dict[str, Any]:
        recipe, seeds = self.recipe, range(self.seeds)
        analyses, benches = {}, {}
        for track in recipe.tracks:
            folder = out / "runs" / track.name
            for s in seeds:
                analyses[f"{track.name}-seed{s}"] = cached(
                    out / "analysis" / f"{track.name}-seed{s}.json",
                    lambda s=s, folder=folder: token_analysis(
                        folder / f"AdaPonderLM-seed{s}", folder / f"backbone-seed{s}",
                        recipe.eval_batches, recipe.batch_size, recipe.block_size))
            bench_dir = out / "bench" / track.name
            if not (bench_dir / "bench.json").is_file():  # bench_run writes it, and its plot
                bench_run(folder / "AdaPonderLM-seed0", recipe, bench_dir)
            benches[track.name] = json.loads((bench_dir / "bench.json").read_text())
        return {"preset": self.options.preset, "seeds": self.seeds,
                "tracks": [{"name": t.name, "backbone": t.backbone, "preset": t.preset,
                            "model": t.model, "steps": t.steps,
                            "pretrain_steps": t.pretrain_steps,
                            "start_val_loss": backbone_val_loss(out / "backbone" / t.name)}
                           for t in recipe.tracks],
                "recipe": {"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                           "block_size": recipe.block_size, "batch_size": recipe.batch_size,
                           "ponder": recipe.ponder, "sweep": recipe.sweep,
                           "optim": recipe.optim},
                "runs": [{**m, "arm": r.arm.name, "seed": r.seed, "group": r.arm.group,
                          "track": r.folder.parent.name} for r, m in finished],
                "analysis": analyses, "bench": benches}

    def report(self, results: dict[str, Any], out: Path) -> None:
        ponder_report.write(results, out)
