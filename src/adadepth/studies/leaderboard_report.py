"""The leaderboard's report: speed at (nearly) the dense model's quality first, then each method's
measured frontier with its trained point, where its FLOPs go, the fixed-FLOPs cells, a plain
reading, and where the compute goes in one validation passage."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from adadepth.depthmap import DepthText, png
from adadepth.studies.leaderboard_papers import (
    adaptation,
    frontier_points,
    papers_table,
    speed_of,
    speed_within,
)
from adadepth.studies.plots import plt, save_figure
from adadepth.studies.protocol import RULE, Point, at_quality, verdict
from adadepth.train.checkpoint import write_text_atomic

SPEEDS = ("decode_b1", "decode_b8", "prefill")
SPEED_NAMES = {"decode_b1": "decode b1", "decode_b8": "decode b8", "prefill": "prefill b8"}
TOLERANCES = (0.01, 0.02, 0.05)  # "no more than +1 / +2 / +5 % validation loss over dense"


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}%"


def by_entry(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each entry's evaluated runs (one per seed)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in results["runs"]:
        out[run["entry"]].append(run)
    return dict(out)


def trained_point(run: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in run["points"] if p.get("trained"))


def mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


# -- speed at equal quality ---------------------------------------------------------------------
def headline(runs: list[dict[str, Any]], dense: float, phase: str,
             tolerance: float) -> str:
    """The speed reached within the tolerance, read per seed from the measured frontier and
    averaged; how it was read (m: a measured point, i: interpolated between two)."""
    readings = [at_quality(frontier_points(run, phase), dense, tolerance) for run in runs]
    reached = [r for r in readings if r.speed is not None]
    if not reached:
        return "not reached"
    how = "".join(sorted({"m" if r.how == "measured" else "i" for r in reached}))
    seeds = "" if len(reached) == len(readings) else f", {len(reached)}/{len(readings)} seeds"
    return f"{statistics.fmean(r.speed for r in reached):.2f}x ({how}{seeds})"


def headline_table(results: dict[str, Any], entries: dict[str, list[dict[str, Any]]]) -> list[str]:
    dense = results["dense"]["val_loss"]
    head = ["method", "trained setting", "loss vs dense there"]
    head += [f"{SPEED_NAMES[p]} at ≤ {100 * t:+g}%" for t in TOLERANCES for p in SPEEDS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in entries.items():
        if runs[0]["group"] == "floor":
            continue
        trained = [trained_point(r) for r in runs]
        setting = mean_of([p["setting"] for p in trained])
        knob = runs[0]["knob"]
        cells = [name, "—" if setting is None else f"{knob}={setting:.3g}",
                 pct(mean_of([p["val_loss"] / dense - 1 for p in trained]))]
        cells += [headline(runs, dense, p, t) for t in TOLERANCES for p in SPEEDS]
        out.append("| " + " | ".join(cells) + " |")
    return out


# -- frontiers ----------------------------------------------------------------------------------
def has_agreement(entries: dict[str, list[dict[str, Any]]]) -> bool:
    return any("agreement" in p for runs in entries.values() for r in runs for p in r["points"])


def frontier_rows(results: dict[str, Any], name: str, runs: list[dict[str, Any]],
                  agreement: bool = False) -> list[str]:
    dense = results["dense"]["val_loss"]
    settings: dict[float | None, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        for p in run["points"]:
            key = "trained" if p.get("trained") else round(p["setting"], 6)
            settings[key].append(p)
    rows = []
    for key, points in sorted(settings.items(), key=lambda kv: mean_of(
            [p["setting"] for p in kv[1]]) or 0.0):
        setting = mean_of([p["setting"] for p in points])
        marks = "**trained**" if key == "trained" else (
            "" if all(p["in_trained_range"] for p in points) else "outside trained range")
        speeds = " / ".join(fmt(mean_of([speed_of(p, s) for p in points])) for s in SPEEDS)
        ideal = mean_of([p.get("speed", {}).get("decode_b1", {}).get("measured_over_ideal")
                         for p in points])
        loss = mean_of([p["val_loss"] for p in points])
        agrees = (f" {fmt(mean_of([p.get('agreement') for p in points]))} |" if agreement
                  else "")
        rows.append(f"| {name} | {fmt(setting)} | {marks} | {fmt(loss, 4)} | "
                    f"{pct(None if loss is None else loss / dense - 1)} |{agrees} "
                    f"{fmt(mean_of([p['flops_fraction'] for p in points]))} | "
                    f"{fmt(mean_of([p.get('flops_fraction_stack') for p in points]))} | "
                    f"{speeds} | {fmt(ideal)} |")
    return rows


def frontier_table(results: dict[str, Any],
                   entries: dict[str, list[dict[str, Any]]]) -> list[str]:
    agreement = has_agreement(entries)
    out = ["| method | setting | | val loss | vs dense | "
           + ("greedy agreement with dense | " if agreement else "")
           + "FLOPs / dense (model) | FLOPs / dense (layer stack) | measured speedup: decode "
           "b1 / b8 / prefill | measured / ideal (decode b1) |",
           "|" + "---|" * (10 if agreement else 9)]
    for name, runs in entries.items():
        out += frontier_rows(results, name, runs, agreement)
    return out


# -- what adapting cost, and quality out of domain ----------------------------------------------
def budget_lines(entries: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each method's adaptation budget (mean over seeds): tokens trained on, seconds of
    training, seconds of measuring, searching and calibrating; none where no run recorded it."""
    rows = []
    for name, runs in entries.items():
        budgets = [r["budget"] for r in runs if r.get("budget")]
        if not budgets:
            continue
        tokens = mean_of([b["training_tokens"] for b in budgets])
        rows.append(f"| {name} | {fmt(mean_of([r.get('steps') for r in runs]), 4)} | "
                    f"{'0 (training-free)' if not tokens else f'{tokens:,.0f}'} | "
                    f"{fmt(mean_of([b['training_s'] for b in budgets]))} | "
                    f"{fmt(mean_of([b['calibration_s'] for b in budgets]))} |")
    if not rows:
        return []
    return ["## What adapting each method cost", "",
            "Measured by `adadepth fit` in the study (mean over seeds): the tokens each method "
            "trained on, the wall seconds of that training, and the wall seconds spent "
            "measuring, searching and calibrating before and after it (influences, drafter "
            "searches, thresholds). Evaluation and timing are not included.", "",
            "| method | steps | training tokens | training s | calibration / search s |",
            "|---|---|---|---|---|", *rows, ""]


def out_of_domain_lines(results: dict[str, Any],
                        entries: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The loss on each out-of-domain corpus at each method's trained setting."""
    dense = results["dense"].get("out_of_domain")
    if not dense:
        return []
    corpora = list(dense)
    out = ["## Out of domain, at the trained setting", "",
           "The same held-out measurement on text far from the backbone's training mix "
           f"({', '.join(f'`{c}`' for c in corpora)}): loss, and against the dense model's "
           f"({', '.join(f'{dense[c]:.4f}' for c in corpora)}).", "",
           "| method | " + " | ".join(f"{c}: loss, vs dense" for c in corpora) + " |",
           "|---|" + "---|" * len(corpora)]
    for name, runs in entries.items():
        cells = []
        for c in corpora:
            loss = mean_of([trained_point(r).get("out_of_domain", {}).get(c) for r in runs])
            cells.append(f"{fmt(loss, 4)}, {pct(None if loss is None else loss / dense[c] - 1)}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*out, ""]


# -- where the FLOPs go -------------------------------------------------------------------------
def flops_table(entries: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """At the trained setting: compute removed and added against the dense model, per
    component (fractions of the dense model's FLOPs per token); and the methods whose added
    compute exceeds what they remove."""
    out = ["| method | removed | added | net | components |", "|---|---|---|---|---|"]
    costly = []
    for name, runs in entries.items():
        parts: dict[str, list[float]] = defaultdict(list)
        for run in runs:
            for k, v in (trained_point(run).get("breakdown") or {}).items():
                parts[k].append(v)
        means = {k: statistics.fmean(v) for k, v in parts.items()}
        removed = sum(v for v in means.values() if v < 0)
        added = sum(v for v in means.values() if v > 0)
        comps = "; ".join(f"{k} {v:+.3f}" for k, v in means.items() if abs(v) > 5e-4) or "—"
        out.append(f"| {name} | {removed:+.3f} | {added:+.3f} | {removed + added:+.3f} | "
                   f"{comps} |")
        if added > -removed and added > 0:
            costly.append(name)
    return out, costly


# -- fixed FLOPs budgets ------------------------------------------------------------------------
def budget_table(results: dict[str, Any],
                 entries: dict[str, list[dict[str, Any]]]) -> list[str]:
    dense = results["dense"]["val_loss"]
    budgets = results["budgets"]
    out = ["| method | " + " | ".join(f"FLOPs {b:g}: nearest point (distance), vs dense, "
                                      "decode b1" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
    for name, runs in entries.items():
        if runs[0]["group"] != "frontier":
            continue
        cells = []
        for b in budgets:
            points = [p for r in runs for p in r["points"]]
            near = min(points, key=lambda p: abs(p["flops_fraction"] - b))
            cells.append(f"{fmt(near['setting'])} ({near['flops_fraction'] - b:+.3f}), "
                         f"{pct(near['val_loss'] / dense - 1)}, "
                         f"{fmt(speed_of(near, 'decode_b1'))}x")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


# -- the reading --------------------------------------------------------------------------------
def reading(results: dict[str, Any], entries: dict[str, list[dict[str, Any]]],
            costly: list[str]) -> list[str]:
    dense = results["dense"]["val_loss"]
    out = []
    for tolerance in TOLERANCES:
        best = None
        for name, runs in entries.items():
            if runs[0]["group"] == "floor" or name in results.get("speed_references", {}):
                continue
            for phase in ("decode_b1", "decode_b8"):
                value = speed_within(runs, dense, phase, tolerance)
                if value is not None and (best is None or value > best[0]):
                    best = (value, name, phase)
        if best is None:
            out.append(f"- Within {100 * tolerance:+g}% of the dense model's loss no method's "
                       "measured frontier reaches: none offers a speedup there.")
        elif best[0] < 1:
            out.append(f"- Within {100 * tolerance:+g}% of the dense model's loss, no method "
                       f"decodes faster than the dense model: the best is {best[1]} at "
                       f"{best[0]:.2f}x ({SPEED_NAMES[best[2]]}).")
        else:
            out.append(f"- Within {100 * tolerance:+g}% of the dense model's loss, the highest "
                       f"measured decode speedup is **{best[0]:.2f}x** ({best[1]}, "
                       f"{SPEED_NAMES[best[2]]}; cost to adapt: "
                       f"{adaptation(entries[best[1]])}"
                       f"{anchors(entries[best[1]], dense, best[2], tolerance)}).")
    if costly:
        out.append(f"- At its trained setting, the compute added exceeds the compute removed "
                   f"for: {', '.join(costly)} (see the FLOPs table): they cost more than the "
                   "dense model.")
    outside = sorted({n for n, runs in entries.items() for r in runs for p in r["points"]
                      if not p["in_trained_range"]})
    if outside:
        out.append(f"- Points outside the setting a method was trained for (marked in the "
                   f"frontier table) are measured too, for {', '.join(outside)}: a method's "
                   "quality there says how well it transfers, not what it was trained to do.")
    pair = [n for n in ("routing-g1", "routing-g1-cheap-all") if n in entries]
    if len(pair) == 2:
        out += cheap_paths(entries, dense)
    return out


def anchors(runs: list[dict[str, Any]], dense: float, phase: str, tolerance: float) -> str:
    """What a reading leans on: the frontier's point within the bound, with what it measured
    by itself (seed by seed) where the reading is interpolated; a point that changes no
    compute (the method at its dense end) measures only timing noise, and is said to."""
    leaned: dict[tuple[str, float, bool], list[Point]] = defaultdict(list)
    for run in runs:
        by_setting = {p["setting"]: p for p in run["points"] if p["setting"] is not None}
        read = at_quality(frontier_points(run, phase), dense, tolerance)
        for a in read.points:
            if a.loss <= dense * (1 + tolerance):
                changed = any(by_setting[a.setting].get("breakdown", {}).values())
                leaned[read.how, a.setting, changed].append(a)
    cells = []
    for (how, setting, changed), points in leaned.items():
        noise = "" if changed else ", which changes no compute: timing noise"
        if how == "interpolated":
            loss = ", ".join(sorted({f"{100 * (a.loss / dense - 1):+.1f}%" for a in points}))
            speeds = ", ".join(f"{a.speed:.2f}x" for a in points)
            cells.append(f"interpolated from setting {setting:g} at {loss} loss, measured "
                         f"{speeds}{noise}")
        elif noise:
            cells.append(f"measured at setting {setting:g}{noise}")
    return f"; {'; '.join(cells)}" if cells else ""


def cheap_paths(entries: dict[str, list[dict[str, Any]]], dense: float) -> list[str]:
    """Routing's cheap paths trained on their routed tokens (the paper) or on every token:
    the loss at each measured budget, seed by seed under the verdict rule."""
    routed, everywhere = entries["routing-g1"], entries["routing-g1-cheap-all"]
    lines = []
    settings = sorted({p["setting"] for r in routed for p in r["points"]})
    for s in settings:
        diffs = []
        for a, b in zip(routed, everywhere, strict=False):
            pa = next((p for p in a["points"] if p["setting"] == s), None)
            pb = next((p for p in b["points"] if p["setting"] == s), None)
            if pa and pb:
                diffs.append(pa["val_loss"] - pb["val_loss"])  # > 0: training on all is better
        if diffs:
            lines.append(f"budget {s:g}: {statistics.fmean(diffs):+.4f} nats "
                         f"({verdict(diffs)})")
    return ["- Routing's cheap paths trained on every token (`cheap_training=all`) against "
            "the paper's (routed tokens only), loss of the latter minus the former by budget: "
            + "; ".join(lines) + ". The leaderboard keeps the paper's recipe as `routing-g1`."]


# -- figures ------------------------------------------------------------------------------------
def plots(results: dict[str, Any], entries: dict[str, list[dict[str, Any]]],
          out: Path) -> list[str]:
    dense = results["dense"]["val_loss"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    losses = [0.0]  # the plotted losses over dense, in %
    for n, (name, runs) in enumerate(entries.items()):
        if runs[0]["group"] == "floor":
            continue
        colour = plt.get_cmap("tab20")(n % 20)
        points = sorted((p for p in runs[0]["points"] if p["setting"] is not None),
                        key=lambda p: p["setting"])
        for ax, phase in zip(axes, ("decode_b1", "decode_b8"), strict=True):
            xy = [(speed_of(p, phase), 100 * (p["val_loss"] / dense - 1), p) for p in points
                  if speed_of(p, phase) is not None]
            if not xy:
                continue
            ax.plot([x for x, _, _ in xy], [y for _, y, _ in xy], "-o", color=colour, ms=3,
                    label=name, lw=1)
            losses += [y for _, y, _ in xy]
            for x, y, p in xy:
                if p.get("trained"):
                    ax.plot([x], [y], "*", color=colour, ms=13, mec="k")
    for ax, phase in zip(axes, ("decode batch 1", "decode batch 8"), strict=True):
        ax.axvline(1.0, color="grey", lw=0.8)
        for t in TOLERANCES:
            ax.axhline(100 * t, color="grey", ls=":", lw=0.8)
        # Linear within a few percent of dense (the bounds that matter), logarithmic beyond:
        # one untrained exit at +500 % would otherwise flatten every other frontier.
        ax.set_yscale("symlog", linthresh=5, linscale=3)
        low, high = min(-1.0, 1.3 * min(losses)), max(6.0, 1.3 * max(losses))
        ax.set_ylim(low, high)
        ticks = [t for t in (-50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100, 200, 500,
                             1000, 2000) if low <= t <= high]
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.set(xlabel=f"measured speedup over the dense backbone, {phase}",
               ylabel="validation loss over dense (%, log beyond ±5)",
               title=f"each method's frontier (star: its trained setting), {phase}")
    axes[0].legend(fontsize=7)
    files = [save_figure(fig, out / "quality_vs_speed.png")]
    passages = []
    for name, runs in entries.items():
        point = trained_point(runs[0])
        if point.get("passage_fraction") and runs[0].get("passage"):
            values = point["passage_fraction"]
            passages.append(DepthText(f"{name} (trained setting)",
                                      runs[0]["passage"][:len(values)], values,
                                      "fraction of the dense layer stack's compute", 1.0))
    if passages:
        png(passages, out / "where_compute_goes.png",
            "the same validation passage at each method's trained setting: each token coloured "
            "by its share of the dense layer stack's compute (one scale: blue none, red all "
            "or more)")
        files.append("where_compute_goes.png")
    return files


def write(results: dict[str, Any], out: Path) -> None:
    entries = by_entry(results)
    flops_lines, costly = flops_table(entries)
    figures = plots(results, entries, out)
    bb = results["backbone"]
    dense = results["dense"]["val_loss"]
    if bb.get("packaged"):
        backbone = (f"the pretrained `{bb['preset']}` as it ships (no pretraining, its own "
                    f"tokenizer); its loss on the held-out `{results.get('corpus')}` windows "
                    f"below is {dense:.4f}. Each method is adapted to it by `adadepth fit` "
                    "within a CPU budget (training-free where said; the cost is tabled), then ")
    else:
        backbone = (f"the `{bb['preset']}` preset pretrained for {bb['steps']} steps on "
                    f"`{bb['corpus']}` with the `{bb['tokenizer']}` tokenizer; its loss on the "
                    f"held-out windows below is {dense:.4f}. Each method is trained on it by "
                    "`adadepth fit`, then ")
    agreement = ("Greedy agreement is the fraction of held-out positions where the method's "
                 "most likely next token is the dense model's, on the same windows fed the "
                 "same way. " if has_agreement(entries) else "")
    text = [
        "# Leaderboard: speed at (nearly) the dense model's quality",
        "",
        f"Preset `{results['preset']}`, {results['seeds']} seed(s). One backbone for every "
        f"method: {backbone}"
        "measured at the setting it was trained at and along its knob from its cheapest "
        f"setting to its dense-equivalent one ({results['frontier_settings']} settings besides "
        "the trained one): validation loss and realised FLOPs on held-out text fed token by "
        "token through the KV cache, as generation feeds it, and speed timed against the dense "
        "backbone in one process, interleaved (medians over rounds). The speed at a quality "
        "bound is read from each method's measured points: a point within the bound (m), or "
        "interpolated between two points along the knob that bracket it (i); never "
        "extrapolated. FLOPs count what ran, gates, predictors, extra head reads and drafts "
        f"included (docs/methods.md). {agreement}With several seeds, {RULE}.",
        "",
        "## Measured speedup at no more than +1 %, +2 % and +5 % validation loss",
        "",
        *headline_table(results, entries),
        "",
        "![quality vs speed](quality_vs_speed.png)",
        "",
        "## Reading",
        "",
        *reading(results, entries, costly),
        "",
        "## Beside the papers' figures",
        "",
        "Each paper's headline figure, on its own models, tasks and hardware, after its own "
        "adaptation; beside it, what the same method reached here within +1 % of the dense "
        "model's loss, and what adapting it cost here.",
        "",
        *papers_table(results, entries, TOLERANCES[0]),
        "",
        "## Each method's frontier",
        "",
        *frontier_table(results, entries),
        "",
        *(f"- {name}: {what}." for name, what in results.get("speed_references", {}).items()),
        "",
        *budget_lines(entries),
        *out_of_domain_lines(results, entries),
        "## Where the FLOPs go, at the trained setting",
        "",
        "Against the dense model's FLOPs per token: what the method removed (< 0) and what it "
        "added (> 0), by component.",
        "",
        *flops_lines,
        "",
        "## Fixed FLOPs budgets: the nearest measured point",
        "",
        *budget_table(results, entries),
        "",
        "## Methods",
        "",
        *[f"- **{name}**: {about}" for name, about in results["about"].items()],
        "",
        "## Where the compute goes",
        "",
        *[f"![{f}]({f})" for f in figures if f != "quality_vs_speed.png"],
    ]
    write_text_atomic(out / "report.md", "\n".join(text) + "\n")
