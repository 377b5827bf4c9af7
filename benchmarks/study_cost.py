"""What an aux-loss study costs, from a few probe steps of each of its runs.

    python benchmarks/study_cost.py --preset small --ablations [--probe-steps 12] [--threads 1]
        [--batch-size 16] [--block-size 128] [--backbone-steps 2000] [--controller-steps 400]
        [routing.oracle_layers=1 train.eval_batches=10 ...]

Pretrains a probe backbone and trains each distinct controller run of the study (arms that
differ only in lambda_jepa cost the same) for a few steps. The training loop's step clock is
read as process CPU time: with one thread on a shared machine, that is what a step would take
alone on one core, whatever the other jobs do. A step costs the median over the probe's steps
(the first two, warm-up, left out); a run's fixed cost (loading, the reference loss,
calibration, validation) is the rest of its CPU time. The prediction is CPU seconds for the
whole study (backbone + seeds x runs); a second thread on a quiet 2-core machine shortens it
by what that thread buys at the preset's width. Writes nothing outside --out (default: a
temporary folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from adadepth.config import PretrainConfig, apply_overrides, preset
from adadepth.jobs.pretrain import pretrain
from adadepth.studies.aux_losses import arms_of, base_config
from adadepth.studies.recipes import Recipe, recipe_for
from adadepth.studies.runner import launch
from adadepth.studies.shape import Arm, run_of
from adadepth.train import loop


class StepClock:
    """Makes the training loop time its steps in process CPU seconds, and keeps them."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.figures = loop.step_figures

    def __enter__(self) -> StepClock:
        loop.time = types.SimpleNamespace(perf_counter=time.process_time)  # type: ignore[attr-defined]
        loop.step_figures = self.record
        return self

    def __exit__(self, *exc: object) -> None:
        loop.time = time  # type: ignore[attr-defined]
        loop.step_figures = self.figures

    def record(self, par, loss, metrics, flops, dt, *rest):
        self.steps.append(dt)
        return self.figures(par, loss, metrics, flops, dt, *rest)


def cost(job: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds per step, fixed CPU seconds) of a training job."""
    with StepClock() as clock:
        start = time.process_time()
        job()
        total = time.process_time() - start
    per_step = statistics.median(clock.steps[2:] or clock.steps)
    return per_step, max(0.0, total - sum(clock.steps))


def pretrain_job(recipe: Recipe, preset_name: str, steps: int, out: Path) -> Callable[[], object]:
    cfg = PretrainConfig(preset=preset_name, model=preset(preset_name),
                         data={"corpus": recipe.corpus, "tokenizer": recipe.tokenizer,
                               "block_size": recipe.block_size},
                         train={"steps": steps, "batch_size": recipe.batch_size, "device": "cpu",
                                "eval_interval": 10**9, "ckpt_interval": 10**9})
    return lambda: pretrain(cfg, out, show_progress=False)


def cost_key(arm: Arm) -> str:
    """What a run's cost depends on: everything but lambda_jepa (a weight, not work)."""
    routing = {k: v for k, v in arm.config["routing"].items() if k != "lambda_jepa"}
    return json.dumps(routing, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--probe-steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="where the probe runs go (default: a temporary folder)")
    for name in ("batch_size", "block_size", "backbone_steps", "controller_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("overrides", nargs="*", help="routing.key=value or train.key=value for "
                        "every controller run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = recipe_for(args.preset)
    sizes = {k: getattr(args, k) for k in ("batch_size", "block_size", "backbone_steps",
                                            "controller_steps") if getattr(args, k)}
    options = apply_overrides({"routing": dict(recipe.routing), "train": dict(recipe.train)},
                              args.overrides)
    recipe = dataclasses.replace(recipe, **sizes, **options)
    print(f"recipe: {recipe}")
    out = Path(args.out or tempfile.mkdtemp(prefix="study-cost-"))
    n = args.probe_steps

    step, fixed = cost(pretrain_job(recipe, args.preset, n, out / "bb"))
    total = fixed + step * recipe.backbone_steps
    print(f"{'backbone':<14} {step:8.3f} s/step {fixed:6.1f} s fixed  "
          f"x{recipe.backbone_steps:5d} steps -> {total:7.0f} s")
    seen: dict[str, tuple[float, float]] = {}
    for arm in arms_of(args.ablations):
        if cost_key(arm) not in seen:
            probe = dataclasses.replace(recipe, controller_steps=n)
            run = run_of(arm, 0, out, base_config(probe, out / "bb", "cpu"))
            seen[cost_key(arm)] = cost(lambda run=run: launch(run.arm.job, run.config,
                                                              run.folder))
        step, fixed = seen[cost_key(arm)]
        run = fixed + step * recipe.controller_steps
        total += args.seeds * run
        print(f"{arm.name:<14} {step:8.3f} s/step {fixed:6.1f} s fixed  "
              f"x{recipe.controller_steps:5d} steps -> {run:7.0f} s per run, x{args.seeds} seeds")
    print(f"predicted study: {total:.0f} CPU s = {total / 60:.1f} min with {args.threads} "
          f"thread(s); probes in {out}")


if __name__ == "__main__":
    main()
