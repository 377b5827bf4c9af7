"""The leaderboard: every adaptive-depth method on one backbone, one corpus, one tokenizer,
measured where it was trained and along its knob, on quality and on measured speed.

Every method is trained (or calibrated) on the same pretrained backbone by `adadepth fit`, from
one entry in `ENTRIES` — adding a method is adding an entry. Each run is then measured at its
trained setting and along its knob from its cheapest setting to its dense-equivalent one (its
frontier, `leaderboard_eval`): validation loss and realised FLOPs on held-out text fed as
generation feeds it, and speed timed against the dense backbone in one process. The report reads
from each frontier the speed a method reaches without losing more than 1, 2 or 5 % of the dense
model's quality (`protocol.at_quality`). Entries that do not trade quality for compute (the
late-layer ensemble adds some; speculative decoding keeps the full model's output) get their
own setting only. Every finished run and every measured point is kept on disk, so a re-run
resumes and a finished leaderboard re-renders unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adadepth.errors import UserError
from adadepth.studies import leaderboard_report, shape
from adadepth.studies.backbone import backbone_dir
from adadepth.studies.leaderboard_eval import FLOOR, FRONTIER, OWN, dense_row, evaluate_entry
from adadepth.studies.recipes import RECIPES as BACKBONES
from adadepth.studies.runner import cached, job_defaults, progress
from adadepth.studies.shape import Arm, Recipe, Study, merge, recipe_of, run_of
from adadepth.train.loop import resolve_device


def routing(name: str, gate: str, aux: list[str], about: str, group: str = FRONTIER,
            **options: Any) -> Arm:
    return Arm(name, "fit", {"method": "routing",
                             "routing": {"gate": gate, "aux": aux, **options}}, group, about)


# Self-speculative decoding keeps the full model's output: both lists time it at its own setting.
SELF_SPEC = [
    Arm("self-spec-skip", "fit", {"method": "self-spec", "self-spec": {"drafter": "skip"}},
        OWN, "self-speculative decoding, lossless: drafted by the model less a searched set "
        "of layers (nothing trains), verified by the full model over one KV cache"),
    Arm("self-spec-exit", "fit", {"method": "self-spec", "self-spec": {"drafter": "exit"}},
        OWN, "self-speculative decoding, lossless: drafted by the first layers and an adapter "
        "distilled to the full model (Kangaroo), verified by the full model"),
]


# Each entry is trained on the shared backbone by `adadepth fit` with its config, as the YAML
# of that command would hold it. Its group says how it is measured: along its knob (FRONTIER),
# or at its own setting only (OWN: it does not trade quality for compute).
ENTRIES: list[Arm] = [
    routing("routing-g1", "g1", ["util", "rank"],
            "conditional depth routing, MLP gate, the paper's util + rank recipe"),
    routing("routing-g3", "g3", ["util", "rank", "jepa"],
            "conditional depth routing, JEPA-guided gate, util + rank + jepa"),
    routing("routing-g1-cheap-all", "g1", ["util", "rank"],
            "G1 as above, its cheap paths also trained to imitate the full FFN on every token "
            "(routing.cheap_training=all), so they serve budgets other than the trained one",
            cheap_training="all"),
    routing("random-routing", "random", [],
            "routing with random decisions at the same budget (its cheap paths train)"),
    Arm("mod", "fit", {"method": "mod", "mod": {"capacity": 0.5}}, FRONTIER,
        "Mixture-of-Depths: every other block runs on the top-C tokens (trained at C "
        "0.5, backbone and routers jointly), causal predictor"),
    Arm("mor", "fit", {"method": "mor", "mor": {"block": "stepwise", "recursions": 2,
                                               "update": "residual", "router_func": "none",
                                               "alpha": 1.0}}, FRONTIER,
        "Mixture-of-Recursions: the paper's Middle-Cycle at the backbone's depth, "
        "expert-choice routing trained jointly, the router deciding causally with calibrated "
        "thresholds; the knob is the mean recursions (depth_fraction)"),
    Arm("router-tuning", "fit", {"method": "router-tuning", "router-tuning": {"capacity": 0.5}},
        FRONTIER, "Router-Tuning (MindSkip): routers trained alone on the frozen backbone let "
        "tokens skip the attention of the deeper half of the layers (trained at capacity 0.5), "
        "calibrated causal thresholds; the knob is the capacity"),
    Arm("static-skip", "fit", {"method": "static-skip"}, FRONTIER,
        "static layer skipping: the layers of least influence dropped for every token"),
    Arm("calm", "fit", {"method": "calm"}, FRONTIER,
        "CALM early exit: per-layer weighted loss, softmax confidence, states copied "
        "upward; the knob is the confidence threshold"),
    Arm("layerskip-exit", "fit", {"method": "layerskip",
                                  "layerskip": {"decoding": "early_exit"}}, FRONTIER,
        "LayerSkip trained with layer dropout and early-exit loss, decoding from the "
        "first E blocks (the knob is E)"),
    Arm("layerskip-spec", "fit", {"method": "layerskip"}, OWN,
        "LayerSkip's self-speculative decoding: the full model's output, drafted by "
        "the first quarter of the blocks (speed only; FLOPs at or above dense)"),
    *SELF_SPEC,
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
# The entries of a pretrained model that a CPU adapts within a small budget (the `smollm2`
# preset): nothing pretrains, nothing retrains the backbone from scratch; training-free entries
# set train.steps 0 (the method over the backbone as it is, only calibrated). Their sizes
# (steps, batch, calibration windows) are the preset's `entry_overrides`.
PRETRAINED_ENTRIES: list[Arm] = [
    Arm("static-skip", "fit", {"method": "static-skip"}, FRONTIER,
        "static layer skipping (training-free): the layers of least influence on held-out "
        "text dropped for every token; the knob is the budget over the layer stack"),
    Arm("early-exit", "fit", {"method": "layerskip", "layerskip": {"decoding": "early_exit"},
                              "train": {"steps": 0}}, FRONTIER,
        "early exit with no training: the first E layers through the shared final norm and "
        "head (LayerSkip's early-exit decoding over the backbone as it is; the knob is E)"),
    Arm("layerskip-exit", "fit", {"method": "layerskip",
                                  "layerskip": {"decoding": "early_exit"}}, FRONTIER,
        "early exit after a short LayerSkip fine-tune of the whole model (layer dropout and "
        "early-exit loss, rotational curriculum), decoding from the first E layers"),
    Arm("calm", "fit", {"method": "calm", "train": {"steps": 0}}, FRONTIER,
        "CALM, training-free: softmax confidence read from the shared head after every layer "
        "(exit norms are copies of the final norm, untrained), states copied upward; the "
        "threshold set by CALM's consistency calibration (Learn-then-Test on greedy "
        "continuations: agreement 0.9 with probability 0.95); the knob is the threshold"),
    *SELF_SPEC,
    Arm("router-tuning", "fit", {"method": "router-tuning", "router-tuning": {"capacity": 0.5}},
        FRONTIER, "Router-Tuning (MindSkip): routers trained alone on the frozen backbone let "
        "tokens skip the attention of the deeper half of the layers (trained at capacity 0.5), "
        "calibrated causal thresholds; the knob is the capacity"),
    routing("routing-g1", "g1", ["util", "rank"],
            "conditional depth routing, controller-only (gates and cheap paths train, the "
            "backbone is frozen): MLP gate, util + rank, the default pruned cheap path and "
            "oracle labelling sized to 1.5x a dense step"),
    Arm("ensemble", "fit", {"method": "ensemble",
                            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5}}, OWN,
        "the last layers as an ensemble (tuning the late norms and router; adds head "
        "compute)"),
]
ENTRY_LISTS = {"trained": "ENTRIES", "pretrained": "PRETRAINED_ENTRIES"}
# Not an entry of the pretrained list: AdaPonderLM's continued pretraining is out of reach of a
# CPU at 135M parameters (docs/gpu.md gives its command and estimated GPU hours).
# The floor of the loss gap: every controlled layer on its (trained) cheap path.
FLOOR_ENTRY = routing("all-cheap", "all-cheap", [],
                      "every controlled layer cheap: the floor of the loss gap", FLOOR)
# Every speed is measured against the dense backbone; where a method's own reference differs,
# the report says what that reference would be.
SPEED_REFERENCES = {
    "ponder": "its own dense reference would be PonderLM (the same weights running all 4 "
              "passes); against the one-pass backbone, as here, it is slower by design",
    "mor": "its own dense reference would run every recursion; against the backbone, as here"}


PRETRAINED_FIELDS = ("entries", "floor", "corpus", "out_of_domain", "agreement",
                     "entry_overrides")


@dataclass(frozen=True)
class Preset(Recipe):
    """Sizes of one leaderboard: the backbone (the aux-loss study's, or a packaged pretrained
    one), method training, and the held-out text and timing sizes."""

    backbone: str  # a preset of the aux-loss study's backbone recipes, or a packaged backbone
    steps: int  # training steps per method
    batch_size: int
    windows: int  # held-out windows for the knob search and the evaluation (prefill times 8)
    window_len: int
    decode_tokens: int
    reps: int
    budgets: tuple[float, ...] = (0.5, 0.75)  # fixed-FLOPs cells: the nearest measured point
    frontier: int = 5  # settings along each knob, besides the trained one
    overrides: list[str] = field(default_factory=list)
    # Beyond the trained-backbone presets (each at its default there, and then left out of the
    # recorded recipe, so that a study folder written before they existed still resumes):
    entries: str = "trained"  # which list of entries (ENTRY_LISTS)
    floor: bool = True  # routing's all-cheap floor as a run
    corpus: str | None = None  # tuning and held-out text; None: the backbone's own data
    out_of_domain: tuple[str, ...] = ()  # corpora scored at each trained setting, a column each
    agreement: bool = False  # greedy next-token agreement with the dense model, per point
    entry_overrides: dict[str, list[str]] = field(default_factory=dict)  # by entry name

    def record(self) -> dict[str, Any]:
        held = super().record()
        for f in dataclasses.fields(self):
            if f.name in PRETRAINED_FIELDS and getattr(self, f.name) == (
                    f.default if f.default_factory is dataclasses.MISSING
                    else f.default_factory()):
                held.pop(f.name)
        return held

    @property
    def packaged(self) -> bool:
        """Whether the backbone is a packaged pretrained model, used as it is."""
        return self.backbone not in BACKBONES


PRESETS = {
    "tiny": Preset("tiny", steps=160, batch_size=12, windows=16, window_len=128,
                   decode_tokens=64, reps=2),
    "small": Preset("small", steps=400, batch_size=16, windows=32, window_len=256,
                    decode_tokens=128, reps=3),
    "paper": Preset("paper", steps=20000, batch_size=16, windows=64, window_len=512,
                    decode_tokens=256, reps=3),
    # SmolLM2-135M as it ships (no pretraining), adapted per entry within a CPU budget; quality
    # on held-out smol-mix (in-domain, docs/corpora.md), Shakespeare out of domain. Sized in
    # docs/gpu.md ("The SmolLM2 leaderboard on a CPU") to finish within 2 hours on 2 cores.
    "smollm2": Preset(
        "smollm2-135m", steps=40, batch_size=4, windows=16, window_len=128, decode_tokens=32,
        reps=2, entries="pretrained", floor=False, corpus="smol-mix",
        out_of_domain=("tiny-shakespeare",), agreement=True,
        overrides=["train.eval_batches=2", "train.log_interval=5"],
        entry_overrides={
            "static-skip": ["static-skip.calibration_windows=16"],
            "calm": ["calm.calibration_windows=16", "calm.calibration_tokens=16"],
            "layerskip-exit": ["train.steps=40"],
            "self-spec-skip": ["self-spec.search_windows=4", "self-spec.search_len=64",
                               "self-spec.timed_prompts=1", "self-spec.timed_tokens=16",
                               "self-spec.finalists=2"],
            "self-spec-exit": ["train.steps=40", "self-spec.search_windows=4",
                               "self-spec.search_len=64", "self-spec.timed_prompts=1",
                               "self-spec.timed_tokens=16", "self-spec.finalists=2"],
            # The two methods that train only small modules on the frozen backbone get the
            # time the 2 hours leave (1.4 and 2.8 s a step measured here); LayerSkip's
            # fine-tune trains the whole model (8.5 s a step) and stays short.
            "router-tuning": ["train.steps=200"],
            "routing-g1": ["train.steps=200", "routing.calibration_windows=16"],
            "ensemble": ["train.steps=40"],
        }),
}


def entries_of(preset: Preset) -> list[Arm]:
    """The preset's list of entries (read when asked: tests replace them)."""
    return list(globals()[ENTRY_LISTS[preset.entries]])


def entries_named(names: list[str] | None, preset: Preset | None = None) -> list[Arm]:
    entries = entries_of(preset) if preset is not None else list(ENTRIES)
    known = {e.name: e for e in entries}
    if names is None:
        return entries
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
    config: dict[str, Any] = {"backbone": str(backbone), "train": train}
    if preset.corpus is not None:  # a packaged backbone brings no data of its own
        config["data"] = {"corpus": preset.corpus, "block_size": preset.window_len}
    return merge(job_defaults(entry.job, entry.config.get("method")), config)


def overrides_for(entry: Arm, overrides: list[str]) -> list[str]:
    """The preset's overrides that concern this entry: shared sections (train, optim, data)
    and its own method's options, not another method's."""
    from adadepth.depth import method_names

    own = entry.config["method"]
    other = set(method_names()) - {own}
    return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] not in other]


def budget_of(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What adapting the method cost (from its metrics.json): tokens trained on and the wall
    seconds of training, and of measuring, searching and calibrating around it (None: a run
    made before fit recorded them)."""
    if "training_tokens" not in metrics:
        return None
    return {"training_tokens": metrics["training_tokens"], "training_s": metrics.get("wall_s"),
            "calibration_s": metrics.get("setup_s", 0.0) + metrics.get("calibration_s", 0.0)}


class Leaderboard(Study):
    name = "leaderboard"
    takes = frozenset({"methods", "budgets"})
    preset_seeds = {"smollm2": 1}  # sized for one seed within 2 hours on 2 cores

    def __init__(self, options: shape.StudyOptions) -> None:
        super().__init__(options)
        self.recipe: Preset = recipe_of(PRESETS, options.preset, self.name)
        self.budgets = list(options.budgets or self.recipe.budgets)
        check_budgets(self.budgets)
        self.entries = entries_named(list(options.methods) if options.methods else None,
                                     self.recipe)
        self.device = resolve_device(options.device)
        self.backbone = Path()

    def record(self) -> dict[str, Any]:
        # The backbone is the aux-loss study's recipe's: a change there is another study too.
        if self.recipe.packaged:
            return {**super().record(), "backbone_recipe": {"packaged": self.recipe.backbone}}
        return {**super().record(),
                "backbone_recipe": BACKBONES[self.recipe.backbone].record()}

    def prepare(self, out: Path) -> None:
        (out / "evals").mkdir(parents=True, exist_ok=True)
        name = self.recipe.backbone
        if self.recipe.packaged:  # used as it ships: the study never trains a backbone
            from adadepth.hf import ensure_backbone

            self.backbone = ensure_backbone(name)
            return
        self.backbone = backbone_dir(out, BACKBONES[name], name, str(self.device),
                                     self.options.show_progress)

    def plan(self, out: Path, done: shape.Done) -> list[shape.Run]:
        from adadepth.config import apply_overrides

        runs = []
        for seed in range(self.seeds):
            for entry in [*self.entries, *([FLOOR_ENTRY] if self.recipe.floor else [])]:
                run = run_of(entry, seed, out / "runs", base_config(
                    entry, self.backbone, self.recipe, str(self.device)))
                apply_overrides(run.config, overrides_for(entry, self.recipe.overrides))
                apply_overrides(run.config, self.recipe.entry_overrides.get(entry.name, []))
                runs.append(run)
        return runs

    def results(self, out: Path, finished: shape.Finished) -> dict[str, Any]:
        from adadepth.runs import load_run

        reference = load_run(self.backbone, str(self.device)).model  # what speed is against
        # the dense row first: with agreement, every point is compared with its greedy tokens
        dense = cached(out / "evals" / "dense.json",
                       lambda: dense_row(self.backbone, self.recipe, self.device))
        entries: list[dict[str, Any]] = []
        for run, metrics in progress(finished, "leaderboard (evaluations)",
                                     self.options.show_progress):
            measured = evaluate_entry(run.arm, run.folder, self.recipe, self.device,
                                      out / "evals", reference, dense)
            entries.append({**measured, "group": run.arm.group, "seed": run.seed,
                            "run": run.name, **{k: metrics.get(k) for k in (
                                "training_flops", "wall_s", "trainable_parameters", "steps")},
                            "budget": budget_of(metrics)})
        dense = {k: v for k, v in dense.items() if k != "predictions"}
        return {"preset": self.options.preset, "seeds": self.seeds,
                "budgets": self.budgets, "frontier_settings": self.recipe.frontier,
                "backbone": self.backbone_record(),
                "about": {e.name: e.about for e in [*self.entries, FLOOR_ENTRY]
                          if e is not FLOOR_ENTRY or self.recipe.floor},
                "speed_references": {e.name: SPEED_REFERENCES[e.name] for e in self.entries
                                     if e.name in SPEED_REFERENCES},
                **({"corpus": self.recipe.corpus} if self.recipe.corpus else {}),
                "dense": dense, "runs": entries}

    def backbone_record(self) -> dict[str, Any]:
        """What the report says of the backbone: the recipe it was pretrained by, or the
        packaged model used as it ships."""
        if self.recipe.packaged:
            return {"preset": self.recipe.backbone, "packaged": True, "steps": 0,
                    "corpus": None, "tokenizer": "its own", "val_loss": None}
        bb = BACKBONES[self.recipe.backbone]
        backbone_eval = json.loads((self.backbone / "eval.json").read_text())
        return {"preset": self.recipe.backbone, "steps": bb.backbone_steps,
                "corpus": bb.corpus, "tokenizer": bb.tokenizer,
                "val_loss": backbone_eval.get("val_loss")}

    def report(self, results: dict[str, Any], out: Path) -> None:
        leaderboard_report.write(results, out)

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        return {"runs": len(results["runs"])}
