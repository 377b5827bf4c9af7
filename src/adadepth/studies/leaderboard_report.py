"""The leaderboard's report: the table, quality against FLOPs and against measured speed, a plain
reading of the table, and where the compute goes in one validation passage per method."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from adadepth.depthmap import DepthText, png
from adadepth.studies.plots import plt, save_figure
from adadepth.studies.stats import Row, mean
from adadepth.train.checkpoint import write_text_atomic

Key = tuple[str, float | None]
SPEEDS = ("prefill", "decode_b1", "decode_b8")
NOTICEABLE = 1.5  # the speedup a user would notice
TOLERANCE = 0.01  # "no more than 1% higher validation loss than dense"


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def grouped(rows: list[Row]) -> dict[Key, list[Row]]:
    """Rows of the same entry and budget, over seeds."""
    groups: dict[Key, list[Row]] = defaultdict(list)
    for row in rows:
        groups[row["entry"], row["budget"]].append(row)
    return dict(groups)


def summarise(rows: list[Row], dense_loss: float, floor: float | None) -> dict[str, Any]:
    """One line of the table: means over seeds of what the runs measured."""
    loss = mean([r["val_loss"] for r in rows])
    gap = None
    if floor is not None and loss is not None and floor != dense_loss:
        gap = (floor - loss) / (floor - dense_loss)
    out: dict[str, Any] = {
        "val_loss": loss, "gap_recovered": gap, "seeds": len(rows),
        "loss_vs_dense": None if loss is None else loss / dense_loss - 1,
        "flops_fraction": mean([r["flops_fraction"] for r in rows]),
        "reached": all(r.get("reached") is not False for r in rows),
        "setting": mean([r.get("setting") for r in rows]), "knob": rows[0].get("knob"),
        "training_flops": mean([r.get("training_flops") for r in rows]),
        "wall_s": mean([r.get("wall_s") for r in rows]),
        "trainable_parameters": mean([r.get("trainable_parameters") for r in rows])}
    for phase in SPEEDS:
        speeds = [r["speed"][phase] for r in rows if phase in r.get("speed", {})]
        for key in ("tokens_per_s_method", "tokens_per_s_dense", "measured_speedup",
                    "ideal_speedup", "measured_over_ideal"):
            out[f"{phase}_{key}"] = mean([s[key] for s in speeds])
    return out


def lines_of(results: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    groups = grouped(results["rows"])
    floor = mean([r["val_loss"] for r in groups.get(("all-cheap", None), [])])
    return {key: summarise(rows, results["dense"]["val_loss"], floor)
            for key, rows in groups.items()}


def table(results: dict[str, Any], lines: dict[Key, dict[str, Any]]) -> list[str]:
    head = ["method", "FLOPs budget", "setting", "FLOPs realised", "val loss", "vs dense",
            "gap recovered", "tok/s prefill b8", "tok/s decode b1", "tok/s decode b8",
            "measured speedup: prefill / decode b1 / b8", "measured / ideal (decode b1)",
            "training FLOPs", "training s", "trainable params"]
    dense = results["dense"]["val_loss"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
           f"| dense backbone | 1 | — | 1 | {dense:.4f} | — | 1 | dense in brackets below | | "
           "| 1 / 1 / 1 | — | (pretrained) | | 0 |"]
    references = results.get("speed_references", {})
    for (entry, budget), s in lines.items():
        realised = fmt(s["flops_fraction"]) + ("" if s["reached"] else " (budget not reached)")
        ref = "reference*" if entry in references else "dense"
        speeds = ["—" if s[f"{p}_tokens_per_s_method"] is None else
                  f"{s[f'{p}_tokens_per_s_method']:.4g} ({ref} {s[f'{p}_tokens_per_s_dense']:.4g})"
                  for p in SPEEDS]
        measured = " / ".join(fmt(s[f"{p}_measured_speedup"]) for p in SPEEDS)
        setting = "—" if s["setting"] is None else f"{s['knob']}={s['setting']:.3g}"
        cells = [entry, "own setting" if budget is None else f"{budget:g}", setting, realised,
                 fmt(s["val_loss"], 4), pct(s["loss_vs_dense"]), fmt(s["gap_recovered"]),
                 *speeds, measured, fmt(s["decode_b1_measured_over_ideal"]),
                 fmt(s["training_flops"]), fmt(s["wall_s"]), fmt(s["trainable_parameters"], 6)]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", *(f"\\* {entry}: speeds are measured against {what}." for entry, what in
                  references.items())]
    return out


def reading(results: dict[str, Any], lines: dict[Key, dict[str, Any]]) -> list[str]:
    """The table in plain words: the best measured decode speedup within 1% of dense loss."""
    references = results.get("speed_references", {})
    within = {key: s for key, s in lines.items()
              if s["loss_vs_dense"] is not None and s["loss_vs_dense"] <= TOLERANCE
              and s["decode_b1_measured_speedup"] is not None and key[0] not in references}
    out = []
    if within:
        key, best = max(within.items(), key=lambda kv: max(
            kv[1]["decode_b1_measured_speedup"], kv[1]["decode_b8_measured_speedup"] or 0))
        b1, b8 = best["decode_b1_measured_speedup"], best["decode_b8_measured_speedup"]
        top = max(b1, b8 or 0)
        where = (f"{key[0]}, budget {'own setting' if key[1] is None else f'{key[1]:g}'}: "
                 f"{b1:.2f}x at batch 1, {fmt(b8)}x at batch 8")
        if top < 1:
            out.append(f"- Within {100 * TOLERANCE:g}% of the dense model's validation loss, "
                       f"no method decodes faster than the dense model: the closest is "
                       f"**{top:.2f}x** ({where}), {NOTICEABLE - top:.2f} short of the "
                       f"{NOTICEABLE}x a user would notice.")
        else:
            out.append(f"- Within {100 * TOLERANCE:g}% of the dense model's validation loss, "
                       f"the highest measured decode speedup is **{top:.2f}x** ({where}), "
                       f"{'above' if top >= NOTICEABLE else 'short of'} the {NOTICEABLE}x a "
                       f"user would notice by {abs(NOTICEABLE - top):.2f}.")
    else:
        out.append(f"- No method stays within {100 * TOLERANCE:g}% of the dense model's "
                   "validation loss at any budget measured, so none offers a speedup at "
                   "no cost in quality here.")
    timed = {k: s for k, s in lines.items() if s["decode_b1_measured_speedup"] is not None
             and k[0] not in references}
    if timed:
        key, fast = max(timed.items(), key=lambda kv: max(
            kv[1]["decode_b1_measured_speedup"], kv[1]["decode_b8_measured_speedup"] or 0))
        top = max(fast["decode_b1_measured_speedup"], fast["decode_b8_measured_speedup"] or 0)
        out.append(f"- The fastest decoding at any loss: {key[0]} at budget "
                   f"{'own setting' if key[1] is None else f'{key[1]:g}'}, {top:.2f}x, at "
                   f"{pct(fast['loss_vs_dense'])} validation loss vs dense.")
    best_gap = max(((k, s) for k, s in lines.items() if s["gap_recovered"] is not None
                    and k[1] is not None), key=lambda kv: kv[1]["gap_recovered"], default=None)
    if best_gap:
        (entry, budget), s = best_gap
        out.append(f"- The most quality per FLOP: {entry} at budget {budget:g} recovers "
                   f"{s['gap_recovered']:.2f} of the loss gap between the all-cheap floor and "
                   f"the dense model ({pct(s['loss_vs_dense'])} loss vs dense).")
    misses = sorted({k[0] for k, s in lines.items() if not s["reached"]})
    if misses:
        out.append(f"- Budgets not reached (the closest setting is reported): "
                   f"{', '.join(misses)}. A method whose knob cannot lower FLOPs that far "
                   "(routing controls only the FFNs of its controlled layers) says so here.")
    gaps = [(k, s["decode_b1_measured_over_ideal"]) for k, s in lines.items()
            if s["decode_b1_measured_over_ideal"] is not None]
    if gaps:
        worst = min(gaps, key=lambda kv: kv[1])
        out.append(f"- Measured over ideal at batch-1 decode ranges from {worst[1]:.2f} "
                   f"({worst[0][0]}) to {max(g for _, g in gaps):.2f}: FLOPs saved are not "
                   "always time saved on this device.")
    return out


def plots(results: dict[str, Any], lines: dict[Key, dict[str, Any]], out: Path) -> list[str]:
    dense = results["dense"]["val_loss"]
    entries = sorted({k[0] for k in lines})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for n, entry in enumerate(entries):
        points = sorted(((s["flops_fraction"], s) for k, s in lines.items() if k[0] == entry),
                        key=lambda p: p[0])
        style = dict(color=plt.get_cmap("tab20")(n % 20), marker="o", label=entry)
        axes[0].plot([p[0] for p in points], [p[1]["val_loss"] for p in points], **style)
        if entry in results.get("speed_references", {}):  # not timed against the backbone
            style = {**style, "marker": "s", "mfc": "none", "label": f"{entry} (own reference)"}
        for ax, phase in zip(axes[1:], ("prefill", "decode_b1"), strict=True):
            xs = [(p[1][f"{phase}_measured_speedup"], p[1]["val_loss"]) for p in points
                  if p[1][f"{phase}_measured_speedup"] is not None]
            if xs:
                ax.plot([x for x, _ in xs], [y for _, y in xs], **style)
    axes[0].scatter([1.0], [dense], color="k", marker="*", s=120, label="dense", zorder=5)
    axes[0].set(xlabel="inference FLOPs per token / dense (realised)", ylabel="val loss (nats)",
                title="quality vs FLOPs")
    for ax, phase in zip(axes[1:], ("prefill batch 8", "decode batch 1"), strict=True):
        ax.scatter([1.0], [dense], color="k", marker="*", s=120, zorder=5)
        ax.axvline(NOTICEABLE, color="grey", ls=":", lw=0.8)
        ax.set(xlabel=f"measured speedup over dense, {phase}", ylabel="val loss (nats)",
               title=f"quality vs measured speed ({phase})")
    axes[0].legend(fontsize=7)
    if results.get("speed_references"):
        axes[2].legend(handles=[h for h in axes[2].get_lines() if "(own reference)" in
                                str(h.get_label())], fontsize=7)
    files = [save_figure(fig, out / "quality_vs_cost.png")]
    passages = []
    for (entry, budget), rows in grouped(results["rows"]).items():
        row = rows[0]
        if row.get("passage_depth") and row.get("passage") and budget in (None, min(
                results["budgets"])):
            text = row["passage"]
            label = f"{entry} ({'own setting' if budget is None else f'FLOPs budget {budget:g}'})"
            passages.append(DepthText(label, text["tokens"][:len(row["passage_depth"])],
                                      row["passage_depth"], text["unit"], text["most"]))
    if passages:
        png(passages, out / "where_compute_goes.png",
            "the same validation passage: each token coloured by the compute it received "
            "(blue least, red most)")
        files.append("where_compute_goes.png")
    return files


def write(results: dict[str, Any], out: Path) -> None:
    lines = lines_of(results)
    figures = plots(results, lines, out)
    bb = results["backbone"]
    text = [
        "# Leaderboard: adaptive depth at matched FLOPs",
        "",
        f"Preset `{results['preset']}`, {results['seeds']} seed(s). One backbone for every "
        f"method: the `{bb['preset']}` preset pretrained for {bb['steps']} steps on "
        f"`{bb['corpus']}` with the `{bb['tokenizer']}` tokenizer (validation loss "
        f"{fmt(bb.get('val_loss'), 4)}). Each method is trained on it by its own command, then "
        "set through its cost knob to each FLOPs budget *as realised* on held-out text fed "
        "token by token through the KV cache, as generation feeds it; the same text gives the "
        "validation loss. Speeds are measured by `adadepth bench` against the dense backbone in "
        "interleaved rounds (tokens/s of the method, dense in brackets; medians). The gap "
        "recovered is (L_all-cheap - L) / (L_all-cheap - L_dense), the all-cheap floor being "
        "routing with every controlled layer on its trained cheap path. Training FLOPs count "
        "what each method's training executed (docs/methods.md, cost accounting).",
        "",
        "## The table",
        "",
        *table(results, lines),
        "",
        "## Reading the table",
        "",
        *reading(results, lines),
        "",
        "## Methods",
        "",
        *[f"- **{name}**: {about}" for name, about in results["entries"].items()],
        "",
        "## Plots",
        "",
        *[f"![{f}]({f})" for f in figures],
    ]
    write_text_atomic(out / "report.md", "\n".join(text) + "\n")
