"""The leaderboard's entries beside their papers' own headline figures.

The papers measured other models, tasks and hardware, and most adapted far longer than a CPU
study can: the table sets their figure beside ours so that the gap is read, not assumed away.
Figures are quoted from the papers' abstracts (docs/methods/ cites each paper). The per-seed
reading at a quality bound that the table and the report's reading share lives here too.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from adadepth.studies.protocol import Point, at_quality


@dataclass(frozen=True)
class Published:
    paper: str
    setting: str  # the paper's models and how it adapted them
    figure: str  # its headline figure, in its own terms


LAYERSKIP = "LayerSkip (Elhoushi et al., 2024)"
ROUTING = Published(
    "Revisiting Auxiliary Losses for Conditional Depth Routing (2026)",
    "a 157.5M-parameter backbone, controllers trained on it",
    "training-side figures (FLOPs proxy 1.53x full-only training with util/rank); "
    "no decode speedup reported")
PUBLISHED: dict[str, Published] = {
    "static-skip": Published(
        "ShortGPT (Men et al., 2024)", "LLaMA-2 and other 7-13B models, no retraining",
        "about a quarter of the layers removed by block influence while keeping most benchmark "
        "performance; figures are quality at a layer count, not speed"),
    "early-exit": Published(
        f"{LAYERSKIP}, its baseline", "Llama models as released",
        "exits from a model not trained for them lose most of its quality at early layers: "
        "the reason LayerSkip trains for them"),
    "layerskip-exit": Published(
        LAYERSKIP, "Llama models, continual pretraining or fine-tuning with layer dropout and "
        "early-exit loss, on GPUs",
        "early exits keep far more quality than the untrained model's; its speedups are for "
        "self-speculation (next row)"),
    "layerskip-spec": Published(
        LAYERSKIP, "as above", "self-speculative decoding up to 2.16x (CNN/DM summarisation), "
        "1.82x (coding), 2.0x (TOPv2 parsing), lossless"),
    "calm": Published(
        "CALM (Schuster et al., 2022)", "T5 encoder-decoder fine-tuned with its weighted "
        "per-layer loss (CNN/DM, WMT, SQuAD)",
        "up to 3x speedup with calibrated consistency with the full model"),
    "self-spec-skip": Published(
        "Draft & Verify (Zhang et al., 2024); SWIFT (Xia et al., 2025)",
        "LLaMA-2 and its fine-tunes, training-free skip sets",
        "up to 1.99x (Draft & Verify) and 1.3-1.6x (SWIFT), lossless"),
    "self-spec-exit": Published(
        "Kangaroo (Liu et al., 2024)", "Vicuna-7B, a 67M-parameter adapter trained on its "
        "shallow layers", "up to 1.68x on Spec-Bench (one sequence), lossless"),
    "router-tuning": Published(
        "Router-Tuning (He et al., 2024)", "7-8B models, routers alone trained on a small "
        "instruction set", "21 % speedup at a 0.2 % performance drop"),
    "routing-g1": ROUTING,
    "routing-g3": ROUTING,
    "routing-g1-cheap-all": ROUTING,
    "mod": Published(
        "Mixture-of-Depths (Raposo et al., 2024)", "trained from scratch",
        "matches the dense baseline at equal training FLOPs, upwards of 50 % faster to step "
        "when sampling"),
    "mor": Published(
        "Mixture-of-Recursions (Bae et al., 2025)", "trained from scratch, 135M to 1.7B",
        "lower perplexity and higher throughput than vanilla and recursive baselines at equal "
        "training FLOPs"),
    "ponder": Published(
        "AdaPonderLM (Song et al., 2026)", "Pythia 70M-410M pretrained, up to 2.8B by "
        "continued pretraining", "about 10 % less inference compute at comparable perplexity"),
    "ensemble": Published(
        "MoDE (Luo and Specia, 2024)", "late layers tuned as an ensemble, on top of LoRA",
        "no speed claim (it adds compute): modest quality gains at a small parameter overhead"),
}


def speed_of(point: dict[str, Any], phase: str) -> float | None:
    return point.get("speed", {}).get(phase, {}).get("measured_speedup")


def frontier_points(run: dict[str, Any], phase: str) -> list[Point]:
    """A run's measured points along its knob that were timed in this phase."""
    return [Point(p["setting"], p["val_loss"], s) for p in run["points"]
            if p["setting"] is not None and (s := speed_of(p, phase)) is not None]


def speed_within(runs: list[dict[str, Any]], dense: float, phase: str,
                 tolerance: float) -> float | None:
    """The mean over seeds of the speed a method's measured points reach within the
    tolerance; None unless every seed reaches it."""
    speeds = [at_quality(frontier_points(run, phase), dense, tolerance).speed for run in runs]
    if not speeds or any(s is None for s in speeds):
        return None
    return statistics.fmean(speeds)


def adaptation(runs: list[dict[str, Any]]) -> str:
    """What adapting the method cost in the study (mean over seeds)."""
    budgets = [r["budget"] for r in runs if r.get("budget")]
    if not budgets:
        return f"{statistics.fmean(r.get('steps') or 0 for r in runs):.0f} steps"
    tokens = statistics.fmean(b["training_tokens"] for b in budgets)
    seconds = statistics.fmean(b["training_s"] + b["calibration_s"] for b in budgets)
    if not tokens:
        return f"no training, {seconds:.0f} s of calibration or search"
    return f"{tokens:,.0f} training tokens, {seconds:.0f} s in all"


def papers_table(results: dict[str, Any], entries: dict[str, list[dict[str, Any]]],
                 tolerance: float) -> list[str]:
    dense = results["dense"]["val_loss"]
    bound = f"{100 * tolerance:+g}%"
    out = [f"| method | paper | its setting | its figure | here: decode b1 / b8 at ≤ {bound} "
           "| here: cost to adapt |", "|---|---|---|---|---|---|"]
    for name, runs in entries.items():
        paper = PUBLISHED.get(name)
        if paper is None or runs[0]["group"] == "floor":
            continue
        speeds = " / ".join(
            "not reached" if (s := speed_within(runs, dense, phase, tolerance)) is None
            else f"{s:.2f}x" for phase in ("decode_b1", "decode_b8"))
        out.append(f"| {name} | {paper.paper} | {paper.setting} | {paper.figure} | {speeds} | "
                   f"{adaptation(runs)} |")
    return out
