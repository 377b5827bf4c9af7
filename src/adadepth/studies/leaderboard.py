"""The leaderboard: every adaptive-depth method on one backbone, one corpus, one tokenizer, at
matched FLOPs, on quality and on measured speed.

Every method is trained (or calibrated) on the same pretrained backbone by its own command, from
one entry in `ENTRIES` — adding a method is adding an entry. Each run is then set, through its
cost knob, to reach each FLOPs budget (a fraction of the dense backbone's inference FLOPs per
token) *as realised* on held-out text fed as generation feeds it (`eval.decode_eval`), measured
there for validation loss, and timed by the one bench against the dense model. Entries that do
not trade quality for FLOPs (the late-layer ensemble adds compute; speculative decoding keeps the
full model's output) get one row at their own setting. Every finished run and every evaluated
setting is kept on disk, so a re-run resumes and a finished leaderboard re-renders unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adadepth.errors import UserError
from adadepth.studies import leaderboard_report, shape
from adadepth.studies.backbone import backbone_dir
from adadepth.studies.leaderboard_eval import (
    BUDGETED,
    FLOOR,
    OWN,
    dense_row,
    evaluate_entry,
)
from adadepth.studies.recipes import RECIPES as BACKBONES
from adadepth.studies.runner import cached, job_defaults, progress
from adadepth.studies.shape import Arm, Recipe, Study, merge, recipe_of, run_of
from adadepth.train.loop import resolve_device


def routing(name: str, gate: str, aux: list[str], about: str, group: str = BUDGETED) -> Arm:
    return Arm(name, "fit", {"method": "routing", "routing": {"gate": gate, "aux": aux}}, group,
               about)


# Each entry is trained on the shared backbone by `adadepth fit` with its config, as the YAML
# of that command would hold it. Its group says how it is
# set: searched to each FLOPs budget (BUDGETED), or one row at its own setting (OWN: it does not
# trade quality for FLOPs).
ENTRIES: list[Arm] = [
    routing("routing-g1", "g1", ["util", "rank"],
            "conditional depth routing, MLP gate, the paper's util + rank recipe"),
    routing("routing-g3", "g3", ["util", "rank", "jepa"],
            "conditional depth routing, JEPA-guided gate, util + rank + jepa"),
    routing("random-routing", "random", [],
            "routing with random decisions at the same budget (its cheap paths train)"),
    Arm("mod", "fit", {"method": "mod", "mod": {"capacity": 0.5}}, BUDGETED,
        "Mixture-of-Depths: every other block runs on the top-C tokens (trained at C "
        "0.5, backbone and routers jointly), causal predictor"),
    Arm("static-skip", "fit", {"method": "static-skip"}, BUDGETED,
        "static layer skipping: the layers of least influence dropped for every token"),
    Arm("calm", "fit", {"method": "calm"}, BUDGETED,
        "CALM early exit: per-layer weighted loss, softmax confidence, states copied "
        "upward; the knob is the confidence threshold"),
    Arm("layerskip-exit", "fit", {"method": "layerskip",
                                  "layerskip": {"decoding": "early_exit"}}, BUDGETED,
        "LayerSkip trained with layer dropout and early-exit loss, decoding from the "
        "first E blocks (the knob is E)"),
    Arm("layerskip-spec", "fit", {"method": "layerskip"}, OWN,
        "LayerSkip's self-speculative decoding: the full model's output, drafted by "
        "the first quarter of the blocks (speed only; FLOPs at or above dense)"),
    Arm("ponder", "fit", {"method": "ponder",
                          "ponder": {"tau": 0.05, "ce_steps": 40, "k_warmup_steps": 60,
                                     "gates_only_steps": 30},
                          "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 30}}, OWN,
        "AdaPonderLM: 4 passes of the backbone, learned gates, token-wise halting at "
        "tau 0.05 (adds compute: more than dense FLOPs by design)"),
    Arm("ensemble", "fit", {"method": "ensemble",
                            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 25},
                            "train": {"steps": 250}}, OWN,
        "the last layers as an ensemble (tuning; adds head compute)"),
]
# The floor of the loss gap: every controlled layer on its (trained) cheap path.
FLOOR_ENTRY = routing("all-cheap", "all-cheap", [],
                      "every controlled layer cheap: the floor of the loss gap", FLOOR)
# What an entry's speedups are measured against, where it is not the dense backbone.
SPEED_REFERENCES = {
    "ponder": "PonderLM, the same weights running all 4 passes (the bench's dense reference "
              "for a looped model); against the one-pass backbone it is slower"}


@dataclass(frozen=True)
class Preset(Recipe):
    """Sizes of one leaderboard: the backbone (the aux-loss study's), method training, and the
    held-out text and timing sizes."""

    backbone: str  # a preset of the aux-loss study's backbone recipes
    steps: int  # training steps per method
    batch_size: int
    windows: int  # held-out windows for the knob search and the evaluation (prefill times 8)
    window_len: int
    decode_tokens: int
    reps: int
    budgets: tuple[float, ...] = (0.5, 0.75)
    overrides: list[str] = field(default_factory=list)


PRESETS = {
    "tiny": Preset("tiny", steps=160, batch_size=12, windows=16, window_len=128,
                   decode_tokens=64, reps=2),
    "small": Preset("small", steps=400, batch_size=16, windows=32, window_len=256,
                    decode_tokens=128, reps=3),
    "paper": Preset("paper", steps=20000, batch_size=16, windows=64, window_len=512,
                    decode_tokens=256, reps=3),
}


def entries_named(names: list[str] | None) -> list[Arm]:
    known = {e.name: e for e in ENTRIES}
    if names is None:
        return list(ENTRIES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} in --methods; known: {', '.join(known)}")
    return [known[n] for n in names]


def check_budgets(budgets: list[float]) -> None:
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise UserError(f"budgets must lie in (0, 1], got {bad[0]:g}")


def base_config(entry: Arm, backbone: Path, preset: Preset, device: str) -> dict[str, Any]:
    """The defaults of the entry's job with the leaderboard's backbone and training sizes (the
    defaults in full, so that the preset's overrides set keys in them)."""
    steps = entry.config.get("train", {}).get("steps", preset.steps)
    train = {"steps": steps, "batch_size": preset.batch_size, "device": device,
             "eval_interval": 10**9, "log_interval": 10, "ckpt_interval": max(20, steps // 4)}
    return merge(job_defaults(entry.job, entry.config.get("method")),
                 {"backbone": str(backbone), "train": train})


def overrides_for(entry: Arm, overrides: list[str]) -> list[str]:
    """The preset's overrides that concern this entry: shared sections (train, optim, data)
    and its own method's options, not another method's."""
    from adadepth.depth import method_names

    own = entry.config["method"]
    other = set(method_names()) - {own}
    return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] not in other]


class Leaderboard(Study):
    name = "leaderboard"
    takes = frozenset({"methods", "budgets"})

    def __init__(self, options: shape.StudyOptions) -> None:
        super().__init__(options)
        self.recipe: Preset = recipe_of(PRESETS, options.preset, self.name)
        self.budgets = list(options.budgets or self.recipe.budgets)
        check_budgets(self.budgets)
        self.entries = entries_named(list(options.methods) if options.methods else None)
        self.device = resolve_device(options.device)
        self.backbone = Path()

    def record(self) -> dict[str, Any]:
        # The backbone is the aux-loss study's recipe's: a change there is another study too.
        return {**super().record(),
                "backbone_recipe": BACKBONES[self.recipe.backbone].record()}

    def prepare(self, out: Path) -> None:
        (out / "evals").mkdir(parents=True, exist_ok=True)
        name = self.recipe.backbone
        self.backbone = backbone_dir(out, BACKBONES[name], name, str(self.device),
                                     self.options.show_progress)

    def plan(self, out: Path, done: shape.Done) -> list[shape.Run]:
        from adadepth.config import apply_overrides

        runs = []
        for seed in range(self.options.seeds):
            for entry in [*self.entries, FLOOR_ENTRY]:
                run = run_of(entry, seed, out / "runs", base_config(
                    entry, self.backbone, self.recipe, str(self.device)))
                apply_overrides(run.config, overrides_for(entry, self.recipe.overrides))
                runs.append(run)
        return runs

    def results(self, out: Path, finished: shape.Finished) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for run, metrics in progress(finished, "leaderboard (evaluations)",
                                     self.options.show_progress):
            figures = {k: metrics.get(k) for k in ("training_flops", "wall_s",
                                                   "trainable_parameters", "steps")}
            for row in evaluate_entry(run.arm, run.folder, self.recipe, self.budgets,
                                      self.device, out / "evals"):
                rows.append({**row, "seed": run.seed, "run": run.name, **figures})
        dense = cached(out / "evals" / "dense.json",
                       lambda: dense_row(self.backbone, self.recipe, self.device))
        bb = BACKBONES[self.recipe.backbone]
        backbone_eval = json.loads((self.backbone / "eval.json").read_text())
        return {"preset": self.options.preset, "seeds": self.options.seeds,
                "budgets": self.budgets,
                "backbone": {"preset": self.recipe.backbone, "steps": bb.backbone_steps,
                             "corpus": bb.corpus, "tokenizer": bb.tokenizer,
                             "val_loss": backbone_eval.get("val_loss")},
                "entries": {e.name: e.about for e in [*self.entries, FLOOR_ENTRY]},
                "speed_references": {e.name: SPEED_REFERENCES[e.name] for e in self.entries
                                     if e.name in SPEED_REFERENCES},
                "dense": dense, "rows": rows}

    def report(self, results: dict[str, Any], out: Path) -> None:
        leaderboard_report.write(results, out)

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        return {"rows": len(results["rows"])}
