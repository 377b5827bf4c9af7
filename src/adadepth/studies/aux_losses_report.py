"""The aux-loss study's report: tables per arm, the share of the loss gap each arm recovers,
per-seed head-to-heads, the paper's findings beside ours at every scale we know of with a plain
verdict each, and PNG plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from adadepth.studies import equal_flops
from adadepth.studies.findings import policy_table, recovery_table, scales_table
from adadepth.studies.plots import plt, save_figure
from adadepth.studies.protocol import judged, stated
from adadepth.studies.stats import (
    Arms,
    by_arm,
    count,
    ema,
    head_to_head,
    in_order,
    mean_std,
    paired,
)
from adadepth.train.checkpoint import write_text_atomic

FLOPS_PROXY = (
    "**How the FLOPs proxy is counted.** Analytic training FLOPs per token of one controller "
    "step, divided by those of training the dense backbone itself (its forward plus a full "
    "backward, 3x the forward). A controller step counts the routed forward (the full FFN only "
    "for the tokens routed full, the cheap FFN for the others, the gates); the backward pass it "
    "really needs: through the frozen backbone weights once (activation gradients only, 1x their "
    "forward: no weight gradient is needed), nothing below the lowest controlled layer, and twice "
    "the forward for the trainable controller (gates, cheap FFNs, G3's predictor); and, with "
    "util/rank, the oracle's counterfactual forwards (two per labelled layer, from that layer "
    "up, without gradient). The paper does not spell out its count, so set its ratios beside "
    "ours for their direction more than their level.")


def arm_table(arms: Arms) -> list[str]:
    thresholds = next(iter(arms.values()))[0]["threshold_hits"].keys()
    head = ["arm", "seeds", "avg LM", "best LM", "endpoint LM", "val LM (causal)",
            *[f"hit {t}" for t in thresholds], "grad norm", "FLOPs proxy", "full frac (causal)",
            "inference FLOPs (causal)", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in arms.items():
        hits = []
        for t in thresholds:
            steps = [r["threshold_hits"][t] for r in rs]
            reached = [s for s in steps if s is not None]
            hits.append(f"{mean_std(reached)} ({len(reached)}/{len(rs)})" if reached
                        else f"never (0/{len(rs)})")
        frac = [statistics.mean(r["full_fraction_causal"]) for r in rs]
        cells = [name, str(len(rs)), mean_std([r["avg_lm"] for r in rs]),
                 mean_std([r["best_lm"] for r in rs]), mean_std([r["endpoint_lm"] for r in rs]),
                 mean_std([r["val_lm_causal"] for r in rs]), *hits,
                 mean_std([r["grad_norm_mean"] for r in rs]),
                 mean_std([r["flops_proxy"] for r in rs]), mean_std(frac),
                 mean_std([r.get("flops_ratio_inference") for r in rs]),
                 mean_std([r["wall_s"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plots(arms: Arms, out: Path, alpha: float = 0.1) -> list[str]:
    import numpy as np

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, rs in arms.items():
        for ax, key in zip(axes, ("lm_curve", "grad_norm_curve"), strict=True):
            curves = np.array([ema(r[key], alpha) for r in rs])
            x = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            (line,) = ax.plot(x, mean, label=name, lw=1.2)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
    axes[0].set(title="LM loss (EMA), mean ± std over seeds", xlabel="step", ylabel="nats/token")
    axes[1].set(title="controller gradient norm (EMA)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    files.append(save_figure(fig, out / "loss_curves.png"))

    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(arms)
    layers = arms[names[0]][0]["controlled_layers"]
    width = 0.8 / (2 * len(layers))
    for j, layer in enumerate(layers):
        for k, key in enumerate(("full_fraction_train", "full_fraction_causal")):
            values = [statistics.mean(r[key][j] for r in arms[n]) for n in names]
            ax.bar(np.arange(len(names)) + (2 * j + k) * width, values, width,
                   label=f"L{layer} {'top-k' if k == 0 else 'causal'}")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, fontsize=8)
    ax.set(title="realised full fraction per controlled layer", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    files.append(save_figure(fig, out / "full_fraction.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    values = [statistics.mean(r["flops_proxy"] for r in arms[n]) for n in names]
    ax.bar(names, values, color="tab:gray")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="full-only training")
    ax.axhline(1.53, color="tab:red", lw=0.8, ls=":", label="paper, util/rank (1.53x)")
    ax.axhline(1.07, color="tab:blue", lw=0.8, ls=":", label="paper, none (1.07x)")
    ax.set(title="training FLOPs proxy relative to full-only training")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.legend(fontsize=7)
    files.append(save_figure(fig, out / "flops_proxy.png"))

    if all(r.get("flops_ratio_inference") is not None for rs in arms.values() for r in rs):
        files.append(quality_vs_flops(arms, out / "quality_vs_inference_flops.png"))
    return files


def quality_vs_flops(arms: Arms, path: Path) -> str:
    """Validation loss (causal) against realised inference FLOPs, means over seeds: random
    routing's measured points joined (what the equal-FLOPs comparison reads), learned arms."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    family = sorted((statistics.mean(r["flops_ratio_inference"] for r in rs),
                     statistics.mean(r["val_lm_causal"] for r in rs), name)
                    for name, rs in arms.items()
                    if equal_flops.gate_of(rs) in equal_flops.RANDOM_FAMILY)
    ax.plot([p[0] for p in family], [p[1] for p in family], "k.-", lw=0.8,
            label="random routing (all-cheap … all-full)")
    for n, name in enumerate(equal_flops.learned(arms)):
        rs = arms[name]
        ax.scatter([statistics.mean(r["flops_ratio_inference"] for r in rs)],
                   [statistics.mean(r["val_lm_causal"] for r in rs)], color=f"C{n % 10}",
                   marker="o" if rs[0].get("group") == "main" else "^", s=30, label=name)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="realised inference FLOPs / dense (causal)",
           ylabel="validation loss, causal (nats/token)",
           title="quality against inference FLOPs (means over seeds)")
    return save_figure(fig, path, legend=ax)


def backbone_words(results: dict[str, Any]) -> str:
    """The backbone by what it is: how it was made and how good it is."""
    bb = results["backbone"]
    if "name" not in bb:  # results written before backbones were named
        return f"not recorded (validation loss {bb.get('val_loss')})"
    if not bb.get("pretrained_by_study"):
        return f"`{bb['name']}` ({bb['description']})"
    tokens = "char-level" if bb["tokenizer"] == "char" else f"{bb['tokenizer']}-tokenized"
    loss = f"{bb['val_loss']:.4f}" if isinstance(bb.get("val_loss"), float) else "n/a"
    return (f"{bb['name']} pretrained by this study ({bb['n_layers']} layers, width "
            f"{bb['d_model']}; {bb['steps']} steps of {bb['batch_size']} x {bb['block_size']} "
            f"tokens on {tokens} `{bb['corpus']}`; validation loss {loss} nats/token)")


def oracle_words(recipe: dict[str, Any]) -> str:
    """How many controlled layers the util/rank oracle labels per step: it drives their cost."""
    options = recipe.get("routing", {})
    n = options.get("oracle_layers", 0)  # studies before the sized default labelled all
    if n is None:
        words = ("util/rank label as many controlled layers per step as keep the FLOPs proxy "
                 f"within {options.get('oracle_proxy', 1.5):g}x, drawn at random")
    else:
        words = ("util/rank label every controlled layer at every step" if not n else
                 f"util/rank label {n} controlled layer{'s' if n > 1 else ''} per step, drawn "
                 "at random")
    others = [f"`routing.{k}={v}`" for k, v in options.items() if k != "oracle_layers"]
    others += [f"`train.{k}={v}`" for k, v in recipe.get("train", {}).items()]
    return words + (f"; every run also sets {', '.join(others)}" if others else "")


def write(results: dict[str, Any], out: Path, other_scales: dict[str, dict[str, Any]]) -> None:
    """report.md and the plots in `out`; `other_scales` are other presets' results by preset."""
    arms = by_arm(results["runs"])
    figures = plots(arms, out)
    costs = results.get("costs") or equal_flops.preset_costs(results)
    learned = [a for a in ("G1", "G3", "G1-A3", "G3-A3") if a in arms]
    recipe = results.get("recipe", {})
    corpus = recipe.get("corpus", "the backbone's corpus")
    lines = [
        "# Aux-loss study: conditional depth routing",
        "",
        f"Preset `{results['preset']}`, {results['seeds']} seeds, {results['steps']} controller "
        f"steps per run of {recipe.get('batch_size', '?')} x {recipe.get('block_size', '?')} "
        f"tokens from `{corpus}`; {oracle_words(recipe)}. Backbone: {backbone_words(results)}. "
        "Every figure below "
        "comes from the runs in `results.json`; LM losses are training-batch losses in "
        "nats/token (same batches for every arm of a seed); `val LM (causal)` is the validation "
        "loss under causal routing (per-layer thresholds calibrated on held-out text, then "
        "steered token by token to keep each row on budget: `routing.threshold_control=online`). "
        "Threshold hits: first step where the EMA-smoothed LM loss falls below the frozen "
        "backbone's dense loss plus the margin (mean step over the seeds that reached it, and "
        "how many did).",
        "",
        stated("per-seed differences between arms trained on the same batches (or, where a "
               "finding rests on something else, the per-seed quantity it names)"),
        "",
        FLOPS_PROXY,
        "",
        "## Arms (mean ± std over seeds)",
        "",
        *arm_table(arms),
        "",
        "## Share of the loss gap recovered",
        "",
        "(L_all-cheap − L_arm) / (L_all-cheap − L_all-full), validation loss under causal "
        "routing, each seed against the baselines of the same seed: 100 % = as good as running "
        "every token full, 0 % = no better than running every token cheap.",
        "",
        *recovery_table(arms),
        "",
        "## Recovery at equal full fraction and at equal inference FLOPs",
        "",
        *equal_flops.cost_words(arms, costs),
        "",
        "Each learned arm against random routing, per seed, on validation loss under causal "
        "routing: at the same full fraction (the random arm of its budget), and at the same "
        "realised inference FLOPs `inference FLOPs (causal)`. Random routing at a learned arm's "
        "FLOPs is its run at the budget that matches them where the study trained one "
        "(`random@ARM`, new studies: random routing's FLOPs are linear in its budget, its gates "
        "costing nothing); otherwise its loss is read along its measured points (all-cheap as "
        f"budget 0, random at each budget it ran, all-full as budget 1), a point within "
        f"{equal_flops.TOLERANCE:g} of the dense FLOPs counting as *measured*, else linearly "
        "*interpolated* between the two that bracket the FLOPs, and never extrapolated: where "
        "the arm costs more than the dense model, no budget of random routing matches it. "
        "`random's budget`: the budget whose FLOPs match the arm's (mean over seeds).",
        "",
        *equal_flops.equal_cost_table(arms),
        "",
        *equal_flops.saves_nothing(arms),
        "## Head to head (per seed)",
        "",
        "Each line: the seeds where the first arm is lower, then the second arm's figure minus "
        "the first's per seed (> 0: the first is lower) and the rule's verdict on them.",
        "",
    ]
    pairs = [("G3", "G1", "avg_lm", "G3 lower average LM than G1"),
             ("G3", "G1", "best_lm", "G3 lower best LM than G1"),
             ("G3-A3", "G1-A3", "avg_lm", "G3-A3 lower average LM than G1-A3"),
             ("G1-A3", "G1", "avg_lm", "G1-A3 lower average LM than G1"),
             ("G3-A3", "G3", "avg_lm", "G3-A3 lower average LM than G3")]
    pairs += [(a, "random", "avg_lm", f"{a} lower average LM than random") for a in learned]
    pairs += [(a, "all-cheap", "avg_lm", f"{a} lower average LM than all-cheap")
              for a in learned]
    for a, b, key, text in pairs:
        h = head_to_head(arms, a, b, key)
        if h is not None:
            diffs = in_order(paired(arms, a, b, key))
            lines.append(f"- {text}: {count(h)}; {judged(diffs, unit=' nats')}")
    policy = policy_table(arms)
    if policy:
        lines += ["", "## On-policy against off-policy oracle (per seed)", "",
                  "The paper's oracle labels a layer with every later layer running full "
                  "(off-policy, the plain G1 and G3 arms); ours runs the later layers under the "
                  "gates' current decisions (on-policy, the fix the paper points to).", "",
                  *policy]
    by_scale = {name: by_arm(r["runs"]) for name, r in other_scales.items()}
    by_scale[results["preset"]] = arms
    sources = [f"`{name}` from `{r['source']}`" for name, r in sorted(other_scales.items())
               if r.get("source")]
    lines += ["", "## The paper's findings beside ours, across scales", "",
              "Each cell: our figure, the per-seed quantity the rule reads (what it compares is "
              "named), and its verdict. The other scales' "
              "columns come from their own studies" + (f" ({'; '.join(sources)})" if sources
                                                       else "") + "; `not run`: no study of "
              "that scale was known when this report was written (`adadepth study aux-losses "
              "--report-only --compare RESULTS.json` rewrites it).", "",
              *scales_table(by_scale), "", "## Plots", ""]
    lines += [f"![{f}]({f})" for f in figures]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
