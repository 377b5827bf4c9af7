"""The ponder study: AdaPonderLM against PonderLM, the backbone and fixed pruning schedules at
matched FLOPs ("AdaPonderLM: Gated Pondering Language Models with Token-Wise Adaptive Depth").

Per seed, every arm is trained by `adadepth ponder` with the same data, steps and optimiser:
the backbone (one pass), PonderLM (K passes, no halting), AdaPonderLM at the paper's lambda and
k and at the other (lambda, k) points of the recipe's sweep (the Pareto curve), the ablation
with one shared gate MLP, and the two fixed pruning schedules (uniform, geometric) aimed at the
average passes AdaPonderLM realised on that seed. Then, per seed, every token of held-out text
gets its passes under AdaPonderLM beside its NLL under the backbone (rank correlation), and one
AdaPonderLM run is benched against fixed-K pondering on the same weights.

Each run is a folder with its metrics.json and each analysis a JSON file, so a re-run skips
what is finished. On a CPU the runs go two at a time in worker processes of one thread each.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adadepth.errors import UserError
from adadepth.train import checkpoint as ck


@dataclass(frozen=True)
class Arm:
    name: str
    options: dict[str, Any]
    group: str  # baseline | ada | sweep | ablation | schedule


def arms_for(sweep: list[tuple[float, float]]) -> list[Arm]:
    """Every arm but the schedules (they need AdaPonderLM's realised passes first)."""
    arms = [Arm("backbone", {"passes": 1, "halting": "none"}, "baseline"),
            Arm("PonderLM", {"halting": "none"}, "baseline"),
            Arm("AdaPonderLM", {"halting": "learned"}, "ada")]
    arms += [Arm(f"Ada-l{lam:g}-k{k:g}", {"halting": "learned", "lam": lam, "k": k}, "sweep")
             for lam, k in sweep]
    arms.append(Arm("Ada-shared-gate", {"halting": "learned", "gate": "shared"}, "ablation"))
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
class Recipe:
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
    "tiny": Recipe(
        "tiny-shakespeare", "char", 64, 16,
        (Track("cpt", preset="tiny", model=TINY_MODEL, pretrain_steps=600, steps=300),),
        ponder={"tau": 0.05, "ce_steps": 50, "k_warmup_steps": 100, "gates_only_steps": 50},
        sweep=((0.1, 0.2), (0.3, 0.3)),
        optim={"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 30},
        bench={"prefill_batch": 8, "prefill_len": 128, "decode_tokens": 48, "reps": 3}),
    "small": Recipe(
        "tiny-shakespeare", "char", 128, 16,
        (Track("cpt", preset="tiny", pretrain_steps=2000, steps=1000),),
        ponder={"tau": 0.02, "ce_steps": 200, "k_warmup_steps": 300, "gates_only_steps": 100},
        sweep=((0.1, 0.2), (0.3, 0.3)),
        optim={"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100},
        bench={"prefill_batch": 8, "prefill_len": 256, "decode_tokens": 128, "reps": 3}),
    # The GPU recipe: a Pythia-70M-shaped model from scratch (width 512, 6 layers, 8 heads; the
    # SwiGLU FFN sized to Pythia's MLP parameters) and continued pretraining of SmolLM2-135M,
    # at the paper's tau, lambda and k, on about 500M tokens of fineweb-edu (streamed once).
    "paper": Recipe(
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


# -- one run ------------------------------------------------------------------------------------
def run_config(recipe: Recipe, track: Track, backbone: str | None, options: dict[str, Any],
               seed: int, steps: int, device: str, threads: int) -> dict[str, Any]:
    """The nested config `adadepth ponder` would read from YAML for this run."""
    config: dict[str, Any] = {
        "method": "ponder", "ponder": {**recipe.ponder, **options},
        "data": {"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                 "block_size": recipe.block_size, "max_docs": recipe.max_docs},
        "optim": recipe.optim,
        "train": {"steps": steps, "seed": seed, "batch_size": recipe.batch_size,
                  "device": device, "threads": threads, "eval_interval": steps,
                  "eval_batches": recipe.eval_batches, "log_interval": 10,
                  "ckpt_interval": max(50, steps // 4)}}
    if backbone is not None:
        config["backbone"] = backbone
    else:
        config.update(preset=track.preset, model=track.model)
    return config


def pretrained_backbone(recipe: Recipe, track: Track, out: Path, device: str, threads: int,
                        show_progress: bool) -> str | None:
    """The track's backbone: a known one as named, or one the study pretrains once."""
    if track.backbone is not None or not track.pretrain_steps:
        return track.backbone
    from adadepth.config import PretrainConfig, preset, validate
    from adadepth.jobs.pretrain import pretrain

    path = out / "backbone" / track.name
    if not (path / "eval.json").is_file():
        cfg = validate(PretrainConfig, {
            "preset": track.preset, "model": {**preset(track.preset).model_dump(), **track.model},
            "data": {"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                     "block_size": recipe.block_size, "max_docs": recipe.max_docs},
            "optim": recipe.optim,
            "train": {"steps": track.pretrain_steps, "batch_size": recipe.batch_size,
                      "device": device, "threads": threads,
                      "eval_interval": track.pretrain_steps,
                      "eval_batches": recipe.eval_batches,
                      "ckpt_interval": track.pretrain_steps}})
        result = pretrain(cfg, path, resume=True, show_progress=show_progress)
        ck.write_json_atomic(path / "eval.json", {"val_loss": result.val_loss})
    return str(path)


def start_loss(out: Path, track: Track) -> float | None:
    """Validation loss of the backbone the study pretrained for a track (None: none)."""
    path = out / "backbone" / track.name / "eval.json"
    return json.loads(path.read_text())["val_loss"] if path.is_file() else None


def train_run(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Train one arm (resumable) and return its metrics; runs in a worker process too."""
    from adadepth.jobs.fit import fit, fit_config

    path = Path(run_dir)
    if not (path / "metrics.json").is_file():
        fit(fit_config(config), path, resume=(path / "config.json").is_file(),
            show_progress=False)
    return json.loads((path / "metrics.json").read_text())


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_all(jobs: list[tuple[dict[str, Any], Path]], workers: int, desc: str,
            show_progress: bool) -> list[dict[str, Any]]:
    """Train the jobs, `workers` at a time in separate processes (1: in this one)."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not show_progress, dynamic_ncols=True)
    todo = [(c, str(p)) for c, p in jobs if not (p / "metrics.json").is_file()]
    bar.update(len(jobs) - len(todo))
    if workers > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                 initializer=_worker_init) as pool:
            for future in [pool.submit(train_run, c, p) for c, p in todo]:
                future.result()
                bar.update(1)
    else:
        for config, path in todo:
            train_run(config, path)
            bar.update(1)
    bar.close()
    return [json.loads((p / "metrics.json").read_text()) for _, p in jobs]


# -- per-token analysis ---------------------------------------------------------------------------
def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); 0 when either is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def token_analysis(ada_dir: Path, backbone_dir: Path, batches: int, batch_size: int,
                   block: int, sample: int = 1500) -> dict[str, Any]:
    """Passes of every held-out token under AdaPonderLM beside its NLL under the backbone arm
    (and under AdaPonderLM itself): rank correlations, mean NLL per pass count, a sample."""
    from adadepth.data import load_corpus, prepare_tokens
    from adadepth.depth.dispatch import Call
    from adadepth.runs import load_run

    loaded = load_run(ada_dir)
    ada, backbone = loaded.model, load_run(backbone_dir).model
    meta = loaded.meta["data"]
    data = prepare_tokens(load_corpus(meta["corpus"], val_fraction=meta["val_fraction"],
                                      max_docs=meta.get("max_docs")), loaded.tokenizer)
    device = next(ada.parameters()).device
    passes, nll_bb, nll_ada = [], [], []
    for x, y in data.eval_batches("val", batch_size, block, batches):
        x, y = x.to(device), y.to(device)
        depth: list[torch.Tensor] = []
        nll_ada.append(ada(x, call=Call(depth=depth)).loss(y, "none")
                       .flatten().cpu())
        passes.append(depth[0].long().flatten())
        nll_bb.append(backbone(x).loss(y, "none").flatten().cpu())
    p = torch.cat(passes).numpy()
    b, a = torch.cat(nll_bb).numpy(), torch.cat(nll_ada).numpy()
    by_passes = {int(k): {"tokens": int((p == k).sum()), "backbone_nll": float(b[p == k].mean()),
                          "ada_nll": float(a[p == k].mean())} for k in np.unique(p)}
    pick = np.random.default_rng(0).permutation(len(p))[:sample]
    return {"tokens": len(p), "spearman_backbone_nll": spearman(p, b),
            "spearman_own_nll": spearman(p, a), "by_passes": by_passes,
            "sample": [[int(p[i]), float(b[i])] for i in pick]}


def bench_run(ada_dir: Path, recipe: Recipe, out: Path) -> dict[str, Any]:
    """AdaPonderLM at its trained tau and the recipe's other taus against fixed-K pondering on
    the same weights (bench.py): prefill and cached greedy decode at batch 1 and 8."""
    from adadepth.bench import BenchSpec, heldout_windows, run_bench, write_results
    from adadepth.data import load_corpus, prepare_tokens
    from adadepth.runs import load_run

    loaded = load_run(ada_dir)
    model = loaded.model
    meta = loaded.meta["data"]
    data = prepare_tokens(load_corpus(meta["corpus"], val_fraction=meta["val_fraction"],
                                      max_docs=meta.get("max_docs")), loaded.tokenizer)
    sizes = {"prefill_batch": 8, "prefill_len": 128, "decode_tokens": 64, "reps": 3,
             **recipe.bench}
    text, calib = heldout_windows(data, 8, sizes["prefill_len"], 2, sizes["prefill_len"])
    taus = sorted({model.tau, *recipe.bench_taus})
    result = run_bench(model, text, calib, BenchSpec(settings=taus, **sizes),
                       next(model.parameters()).device, log=lambda _: None)
    result["run"] = str(ada_dir)
    write_results(result, out, f"{ada_dir.name} (ponder) on {result['device']}")
    return result


# -- the study -------------------------------------------------------------------------------------
def on_gpu(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def run_study(preset_name: str, seeds: int, out: Path, steps: int | None = None,
              device: str = "auto", workers: int | None = None,
              show_progress: bool = True) -> dict[str, Any]:
    from adadepth.studies import ponder_report

    if preset_name not in RECIPES:
        raise UserError(f"the ponder study has no recipe for preset {preset_name!r}; "
                        f"known: {', '.join(RECIPES)}")
    recipe = RECIPES[preset_name]
    # On a CPU the runs go two at a time, one thread each; on a GPU one at a time.
    gpu = on_gpu(device)
    workers = workers or (1 if gpu else max(1, min(2, os.cpu_count() or 1)))
    threads = 0 if gpu else 1
    (out / "analysis").mkdir(parents=True, exist_ok=True)
    arms = arms_for(list(recipe.sweep))
    runs: list[dict[str, Any]] = []
    analyses: dict[str, Any] = {}
    benches: dict[str, Any] = {}
    for track in recipe.tracks:
        n = steps or track.steps
        folder = out / "runs" / track.name
        backbone = pretrained_backbone(recipe, track, out, device, threads, show_progress)

        def job(name: str, options: dict[str, Any], seed: int, track: Track = track,
                n: int = n, folder: Path = folder,
                backbone: str | None = backbone) -> tuple[dict, Path]:
            config = run_config(recipe, track, backbone, options, seed, n, device, threads)
            return config, folder / f"{name}-seed{seed}"

        first = [job(a.name, a.options, s) for s in range(seeds) for a in arms]
        metrics = run_all(first, workers, f"ponder study ({track.name})", show_progress)
        done = {(a.name, s): m for (a, s), m in zip(
            [(a, s) for s in range(seeds) for a in arms], metrics, strict=True)}
        second, keys = [], []
        for s in range(seeds):
            target = min(float(done["AdaPonderLM", s]["avg_passes"]),
                         float(recipe.ponder.get("passes", 4)))
            for kind in SCHEDULES:
                second.append(job(kind, {"halting": kind, "schedule_passes": target}, s))
                keys.append((kind, s))
        metrics = run_all(second, workers, f"ponder study ({track.name}, schedules)",
                          show_progress)
        done.update(zip(keys, metrics, strict=True))
        groups = {a.name: a.group for a in arms} | {k: "schedule" for k in SCHEDULES}
        runs += [{**m, "arm": name, "seed": s, "group": groups[name], "track": track.name}
                 for (name, s), m in done.items()]
        for s in range(seeds):
            path = out / "analysis" / f"{track.name}-seed{s}.json"
            if not path.is_file():
                ck.write_json_atomic(path, token_analysis(
                    folder / f"AdaPonderLM-seed{s}", folder / f"backbone-seed{s}",
                    recipe.eval_batches, recipe.batch_size, recipe.block_size))
            analyses[f"{track.name}-seed{s}"] = json.loads(path.read_text())
        bench_dir = out / "bench" / track.name
        if not (bench_dir / "bench.json").is_file():
            bench_run(folder / "AdaPonderLM-seed0", recipe, bench_dir)
        benches[track.name] = json.loads((bench_dir / "bench.json").read_text())
    results = {"preset": preset_name, "seeds": seeds,
               "tracks": [{"name": t.name, "backbone": t.backbone, "preset": t.preset,
                           "model": t.model, "steps": steps or t.steps,
                           "pretrain_steps": t.pretrain_steps,
                           "start_val_loss": start_loss(out, t)} for t in recipe.tracks],
               "recipe": {"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                          "block_size": recipe.block_size, "batch_size": recipe.batch_size,
                          "ponder": recipe.ponder, "sweep": recipe.sweep,
                          "optim": recipe.optim},
               "runs": runs, "analysis": analyses, "bench": benches}
    ck.write_json_atomic(out / "results.json", results)
    ponder_report.write(results, out)
    return results
