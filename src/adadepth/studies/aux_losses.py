"""The aux-loss study: "Revisiting Auxiliary Losses for Conditional Depth Routing" (2026).

Pretrains (or reuses) a backbone for the preset, then trains routing controllers on it: G1 and
G3 under the standard recipe (util + rank, plus jepa for G3) and under A3 (no util, no rank),
the baselines random / all-full / all-cheap at the same budget, and with `--ablations` A1 (G3
without jepa), A4 (lambda_jepa sweep), the 25% budget and the on-policy oracle. Once a learned
arm and all-cheap of a seed are done, random routing is also trained at the budget whose
realised inference FLOPs equal the learned arm's (`random@ARM`, equal_flops.py): a learned gate
costs FLOPs of its own, random gates none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adadepth.studies import aux_losses_report, equal_flops, scales, shape
from adadepth.studies.backbone import backbone_dir
from adadepth.studies.recipes import Recipe, recipe_for
from adadepth.studies.shape import Arm, Study, run_of


def arm(name: str, gate: str, aux: tuple[str, ...], group: str = "main", budget: float = 0.5,
        oracle: str = "off_policy", lambda_jepa: float = 1.0) -> Arm:
    """A routing arm; every arm sets budget, oracle and lambda_jepa itself (the recorded
    config says them whatever the routing defaults become)."""
    return Arm(name, "fit", {"method": "routing",
                             "routing": {"gate": gate, "aux": list(aux), "budget": budget,
                                         "oracle": oracle, "lambda_jepa": lambda_jepa}}, group)


MAIN = [
    arm("G1", "g1", ("util", "rank")),
    arm("G3", "g3", ("util", "rank", "jepa")),
    arm("G1-A3", "g1", ()),
    arm("G3-A3", "g3", ("jepa",)),
]
BASELINES = [
    arm("random", "random", (), "baseline"),
    arm("all-full", "all-full", (), "baseline"),
    arm("all-cheap", "all-cheap", (), "baseline"),
]
ABLATIONS = [
    arm("G3-A1", "g3", ("util", "rank"), "ablation"),
    arm("G3-A4-l0.25", "g3", ("util", "rank", "jepa"), "ablation", lambda_jepa=0.25),
    arm("G3-A4-l2", "g3", ("util", "rank", "jepa"), "ablation", lambda_jepa=2.0),
    arm("G1-b0.25", "g1", ("util", "rank"), "ablation", budget=0.25),
    arm("G3-b0.25", "g3", ("util", "rank", "jepa"), "ablation", budget=0.25),
    arm("random-b0.25", "random", (), "ablation", budget=0.25),
    arm("G1-onpolicy", "g1", ("util", "rank"), "ablation", oracle="on_policy"),
    arm("G3-onpolicy", "g3", ("util", "rank", "jepa"), "ablation", oracle="on_policy"),
]


def arms_of(ablations: bool) -> list[Arm]:
    return MAIN + BASELINES + (ABLATIONS if ablations else [])


# The learned arms random routing is matched to in inference FLOPs: the four main ones and the
# 25 % budget. The A1 / A4 / on-policy ablations change neither the gate nor the budget, so
# their FLOPs are those of G1 or G3, and the report reads random routing there from these.
MATCHED = ("G1", "G3", "G1-A3", "G3-A3", "G1-b0.25", "G3-b0.25")


def matched_arms(seed_done: dict[str, shape.Metrics], names: list[str]) -> list[Arm]:
    """Random routing at the budget whose realised inference FLOPs equal each finished learned
    arm's of MATCHED (by name, of one seed, with all-cheap's), where such a budget exists."""
    cheap = seed_done.get("all-cheap")
    if cheap is None:
        return []
    out = []
    for name in (n for n in MATCHED if n in names and n in seed_done):
        budget = equal_flops.matched_budget(seed_done[name]["flops_ratio_inference"],
                                            cheap["flops_ratio_inference"])
        if budget is not None:
            # Four decimals: the FLOPs then match to within 1e-4 of the all-cheap saving.
            out.append(arm(f"random@{name}", "random", (), "matched", budget=round(budget, 4)))
    return out


def base_config(recipe: Recipe, backbone: Path, device: str) -> dict[str, Any]:
    """The `fit` config every arm of the recipe shares."""
    steps = recipe.controller_steps
    data: dict[str, Any] = {"corpus": recipe.corpus, "block_size": recipe.block_size}
    if recipe.max_docs is not None:
        data["max_docs"] = recipe.max_docs
    return {"backbone": str(backbone), "routing": dict(recipe.routing), "data": data,
            "train": {"steps": steps, "batch_size": recipe.batch_size, "device": device,
                      "eval_interval": 10**9, "ckpt_interval": max(20, steps // 4),
                      "log_interval": 10, **recipe.train}}


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


def routing_costs(finished: shape.Finished) -> dict[str, Any] | None:
    """The FLOPs of one controlled layer's FFN, cheap path and each learned gate, read from
    the first finished run of each learned gate as it was trained (equal_flops.layer_costs)."""
    from adadepth.runs import load_run

    first: dict[str, Path] = {}
    for run, metrics in finished:
        if metrics.get("gate") not in (*equal_flops.RANDOM_FAMILY, None):
            first.setdefault(metrics["gate"], run.folder)
    if not first:
        return None
    return equal_flops.costs_of({g: load_run(f).model for g, f in first.items()},
                                "read from the trained runs")


class AuxLosses(Study):
    name = "aux-losses"
    takes = frozenset({"steps", "ablations", "corpus", "compare"})

    def __init__(self, options: shape.StudyOptions) -> None:
        super().__init__(options)
        self.recipe: Recipe = recipe_for(options.preset, options.corpus, options.steps)
        self.backbone = Path()
        self.other_scales: dict[str, dict[str, Any]] = {}  # by preset, for the report

    def check(self) -> None:
        from adadepth.data import load_corpus

        self.other_scales = scales.other_scales(self.options.preset, self.options.compare)
        load_corpus(self.recipe.corpus, max_docs=self.recipe.max_docs)

    def prepare(self, out: Path) -> None:
        o = self.options
        self.backbone = backbone_dir(out, self.recipe, o.preset, o.device, o.show_progress)

    def plan(self, out: Path, done: shape.Done) -> list[shape.Run]:
        base = base_config(self.recipe, self.backbone, self.options.device)
        arms = arms_of(self.options.ablations)
        runs = [run_of(a, seed, out / "runs", base) for seed in range(self.seeds)
                for a in arms]
        # Random routing matched to each learned arm's FLOPs waits for that arm (its realised
        # FLOPs) and for all-cheap of the same seed.
        for seed in range(self.seeds):
            seed_done = {r.arm.name: done[r.folder] for r in runs
                         if r.seed == seed and r.folder in done}
            runs += [run_of(a, seed, out / "runs", base)
                     for a in matched_arms(seed_done, [a.name for a in arms])]
        return runs

    def results(self, out: Path, finished: shape.Finished) -> dict[str, Any]:
        o = self.options
        return {"preset": o.preset, "seeds": self.seeds, "steps": self.recipe.controller_steps,
                "ablations": o.ablations, "recipe": self.record(),
                "backbone": backbone_summary(self.recipe, o.preset, self.backbone),
                "costs": routing_costs(finished),
                "runs": [{**m, "arm": r.arm.name, "group": r.arm.group} for r, m in finished]}

    def read(self, out: Path) -> dict[str, Any]:
        results = scales.read_results(out)
        self.other_scales = scales.other_scales(results["preset"], self.options.compare)
        return results

    def report(self, results: dict[str, Any], out: Path) -> None:
        aux_losses_report.write(results, out, self.other_scales)
