"""The ensemble study's report: every arm at its trainable-parameter count, the late layers before
and after, the routing weights, the cost, and the paper's claims beside ours with a verdict."""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any

from adadepth.studies.plots import plt, save_figure
from adadepth.studies.protocol import figures, judged, stated, verdict
from adadepth.studies.stats import (
    Arms,
    by_arm,
    count,
    head_to_head,
    in_order,
    mean_std,
    paired,
    per_seed,
)
from adadepth.train.checkpoint import write_text_atomic

ENSEMBLES = ("ensemble", "ensemble+lora")


def arm_table(arms: Arms, before: dict[str, Any]) -> list[str]:
    head = ["arm", "seeds", "trainable params", "val loss (before → after)", "Δ loss",
            "accuracy (before → after)", "inference FLOPs / base", "training FLOPs",
            "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| base (no tuning) | – | 0 | {before['val_loss']:.4f} | – | "
             f"{before['val_accuracy']:.4f} | 1 | – | – |"]
    for name, rs in arms.items():
        losses = [r["val_loss"] for r in rs]
        cells = [name, str(len(rs)), f"{rs[0]['trainable_parameters']:,}",
                 f"{before['val_loss']:.4f} → {mean_std(losses)}",
                 mean_std([v - before["val_loss"] for v in losses]),
                 f"{before['val_accuracy']:.4f} → {mean_std([r['val_accuracy'] for r in rs])}",
                 f"{rs[0]['flops_ratio']:.4f}",
                 f"{rs[0]['training_flops'] / max(1, rs[0]['steps']) / 1e9:.3g} G/step"
                 if rs[0].get("training_flops") else "–",
                 mean_std([r["wall_s"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def layer_table(arms: Arms, before: dict[str, Any]) -> list[str]:
    """Per late layer: its own loss and accuracy before (final norm) and after tuning."""
    layers = before["late_layers"]
    head = ["late layer", "loss before (logit lens)", *[f"loss after, {a}" for a in ENSEMBLES
                                                         if a in arms],
            "accuracy before", *[f"accuracy after, {a}" for a in ENSEMBLES if a in arms]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, layer in enumerate(layers):
        label = f"{layer}" + (" (final)" if j == len(layers) - 1 else "")
        cells = [label, f"{before['late_layer_loss'][j]:.4f}"]
        cells += [mean_std([r["late_layer_loss"][j] for r in arms[a]])
                  for a in ENSEMBLES if a in arms]
        cells.append(f"{before['late_layer_accuracy'][j]:.4f}")
        cells += [mean_std([r["late_layer_accuracy"][j] for r in arms[a]])
                  for a in ENSEMBLES if a in arms]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def complementarity(arms: Arms, before: dict[str, Any]) -> list[str]:
    lines = ["| | final layer's accuracy | best late layer per token (oracle) | gain | "
             "the ensemble's accuracy |", "|---|---|---|---|---|",
             f"| before tuning | {before['late_layer_accuracy'][-1]:.4f} | "
             f"{before['best_layer_per_token_accuracy']:.4f} | "
             f"{before['best_layer_per_token_accuracy'] - before['late_layer_accuracy'][-1]:+.4f}"
             " | – |"]
    for a in ENSEMBLES:
        if a in arms:
            rs = arms[a]
            gain = [r["best_layer_per_token_accuracy"] - r["final_layer_accuracy"] for r in rs]
            lines.append(f"| {a} | {mean_std([r['final_layer_accuracy'] for r in rs])} | "
                         f"{mean_std([r['best_layer_per_token_accuracy'] for r in rs])} | "
                         f"{mean_std(gain)} | {mean_std([r['val_accuracy'] for r in rs])} |")
    return lines


def routing_table(arms: Arms) -> list[str]:
    lines = []
    for a in ENSEMBLES:
        if a not in arms:
            continue
        rs = arms[a]
        layers = rs[0]["late_layers"]
        lines += [f"{a}: routing weight per late layer, over validation tokens (mean over seeds)",
                  "", "| late layer | mean | std over tokens | p10 | p50 | p90 |",
                  "|---|---|---|---|---|---|"]
        for j, layer in enumerate(layers):
            cells = [f"{mean([r[f'routing_weight_{k}'][j] for r in rs]):.3f}"
                     for k in ("mean", "std", "p10", "p50", "p90")]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def worst_gap(losses: list[float]) -> float:
    """How far above the final layer's loss the worst other late layer's is (a fraction)."""
    return max(losses[:-1], default=losses[-1]) / losses[-1] - 1


def paper_comparison(arms: Arms, before: dict[str, Any]) -> list[str]:
    """Each published claim beside what we find: the per-seed quantity the rule reads (> 0
    supports the claim) and its verdict (protocol.verdict)."""
    out = ["| the paper's claim (arXiv 2410.13077, abstract) | ours | per seed (> 0 supports the "
           "claim) | verdict |", "|---|---|---|---|"]
    if "ensemble" in arms:
        rs = arms["ensemble"]
        gaps = [worst_gap(r["late_layer_loss"]) for r in rs]
        close = [0.05 - g for g in gaps]
        out.append(f"| tuning late layers gives losses comparable to the final layer's | worst "
                   f"other late layer's loss {mean_std([100 * g for g in gaps])} % above the "
                   f"final layer's (before tuning, logit lens: "
                   f"{100 * worst_gap(before['late_layer_loss']):.1f} %); within 5 % in "
                   f"{sum(c >= 0 for c in close)}/{len(rs)} seeds | 5 % − the worst late "
                   f"layer's excess: {figures(close, '.3f')} | {verdict(close)} |")
        gain = [r["best_layer_per_token_accuracy"] - r["final_layer_accuracy"] for r in rs]
        big = [g - 0.01 for g in gain]
        out.append(f"| with complementary test-time behaviour | the best late layer per token "
                   f"is right {mean_std([100 * g for g in gain])} points more often than the "
                   f"final layer | that gain − 1 point: {figures(big, '.4f')} | "
                   f"{verdict(big)} |")
    h = head_to_head(arms, "ensemble+lora", "lora", "val_loss")
    if h is not None:
        acc = head_to_head(arms, "ensemble+lora", "lora", "val_accuracy", lower=False)
        diffs = in_order(paired(arms, "ensemble+lora", "lora", "val_loss"))
        out.append(f"| added to a tuning method (LoRA) it improves it | ensemble+lora below "
                   f"LoRA's validation loss in {count(h)}, above its accuracy in {count(acc)} "
                   f"| LoRA's val loss − ensemble+lora's: {figures(diffs, unit=' nats')} | "
                   f"{verdict(diffs)} |")
    if "ensemble" in arms and "lora" in arms:
        base = before["val_loss"]
        lora = per_seed(arms, "lora")
        share = {e["seed"]: (base - e["val_loss"]) / max(base - lora[e["seed"]]["val_loss"],
                                                         1e-9)
                 for e in arms["ensemble"] if e["seed"] in lora}
        ratio = arms["lora"][0]["trainable_parameters"] / max(
            1, arms["ensemble"][0]["trainable_parameters"])
        similar = [v - 0.8 for v in in_order(share)]
        out.append(f"| in place of a larger trainable module (LoRA) it reaches similar quality "
                   f"with far fewer parameters | {ratio:.0f}x fewer parameters; recovers "
                   f"{mean_std([100 * v for v in share.values()])} % of LoRA's loss reduction | "
                   f"the share recovered − 80 %: {figures(similar, '.3f')} | "
                   f"{verdict(similar)} |")
    out.append("| it modestly improves reasoning performance | not measured: a language-"
               "modelling study, no reasoning benchmark | – | not tested |")
    return out


def plots(arms: Arms, before: dict[str, Any], out: Path) -> list[str]:
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for n, (name, rs) in enumerate(arms.items()):
        params = [max(r["trainable_parameters"], 1) for r in rs]
        ax.scatter(params, [r["val_loss"] for r in rs], color=f"C{n}", alpha=0.5, s=18)
        ax.scatter([mean(params)], [mean([r["val_loss"] for r in rs])], color=f"C{n}",
                   marker="D", s=50, label=name)
    ax.axhline(before["val_loss"], color="grey", ls="--", lw=1, label="base, before tuning")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="validation loss (nats/token)",
           title="validation loss after tuning against trainable parameters")
    ax.legend(fontsize=8)
    files = [save_figure(fig, out / "loss_vs_parameters.png")]

    present = [a for a in ENSEMBLES if a in arms]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 4), squeeze=False)
        for ax, a in zip(axes[0], present, strict=True):
            rs = arms[a]
            layers = rs[0]["late_layers"]
            x = np.arange(len(layers))
            avg = {k: np.mean([r[f"routing_weight_{k}"] for r in rs], axis=0)
                   for k in ("mean", "std", "p10", "p50", "p90")}
            ax.bar(x, avg["mean"], color="tab:blue", alpha=0.7, label="mean over tokens")
            ax.errorbar(x, avg["p50"], yerr=[avg["p50"] - avg["p10"], avg["p90"] - avg["p50"]],
                        fmt="o", color="k", capsize=4, label="median, 10-90 % of tokens")
            ax.set_xticks(x, [str(layer) for layer in layers])
            ax.set(title=f"{a}: routing weights", xlabel="late layer", ylim=(0, 1))
            ax.legend(fontsize=7)
        files.append(save_figure(fig, out / "routing_weights.png"))

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        layers = before["late_layers"]
        ax.plot(layers, before["late_layer_loss"], "o--", color="grey",
                label="before tuning (final norm on every layer)")
        for n, a in enumerate(present):
            losses = np.mean([r["late_layer_loss"] for r in arms[a]], axis=0)
            ax.plot(layers, losses, "o-", color=f"C{n}", label=f"after, {a} (its own norms)")
        ax.set(xlabel="layer", ylabel="validation loss of the layer alone",
               title="each late layer's own loss", xticks=layers)
        ax.legend(fontsize=8)
        files.append(save_figure(fig, out / "late_layers.png"))
    return files


def write(study: dict[str, Any], out: Path) -> None:
    arms = by_arm(study["runs"])
    before = study["before"]
    recipe = study["recipe"]
    figures = plots(arms, before, out)
    own = study["backbone"].get("val_loss_own_corpus")
    lines = [
        "# Late layers as an ensemble: tuning study",
        "",
        f"Preset `{study['preset']}`, {study['seeds']} seed(s), {study['steps']} tuning steps per "
        f"run (batch {recipe['batch_size']} x {recipe['block_size']} tokens), backbone "
        f"`{study['backbone']['path']}`"
        + (f" (pretrained on `{recipe['corpus']}`: validation loss {own:.4f} there)"
           if own is not None else "")
        + f", tuned on `{recipe['tune_corpus']}`. Learning rates per arm: "
        + ", ".join(f"{a} {lr:g}" for a, lr in recipe["lr"].items())
        + ". Validation figures are over the first "
        f"{recipe['eval_batches'] * recipe['batch_size']} windows of the tuning corpus's "
        "validation split, the same for every arm and for the base; accuracy is next-token "
        "(argmax) accuracy; wall s is the training loop's time on the machine that ran it. "
        "Every figure comes from `results.json`.",
        "",
        stated("per-seed differences between arms of the same seed (or, where a claim rests on "
               "something else, the per-seed quantity it names)"),
        "",
        "## Arms (mean ± std over seeds)",
        "",
        *arm_table(arms, before),
        "",
        "## Head to head (per seed)",
        "",
        "Each line: the seeds where the first arm's validation loss is lower, then the second "
        "arm's minus the first's per seed (> 0: the first is lower) and the rule's verdict.",
        "",
    ]
    for a, b, key, text in [("ensemble+lora", "lora", "val_loss", "ensemble+lora below lora"),
                            ("ensemble", "lora", "val_loss", "ensemble below lora"),
                            ("ensemble+lora-nodistill", "lora", "val_loss",
                             "ensemble+lora without distillation below lora"),
                            ("ensemble+lora-nodistill", "ensemble+lora", "val_loss",
                             "ensemble+lora without distillation below with it"),
                            ("lora", "full", "val_loss", "lora below full"),
                            ("ensemble", "full", "val_loss", "ensemble below full")]:
        h = head_to_head(arms, a, b, key)
        if h is not None:
            diffs = in_order(paired(arms, a, b, key))
            lines.append(f"- {text} (validation loss): {count(h)}; "
                         f"{judged(diffs, unit=' nats')}")
    lines += ["", "## The late layers, each alone", "", *layer_table(arms, before), "",
              "## Complementarity of the late layers", "", *complementarity(arms, before), "",
              "## Routing weights", "", *routing_table(arms),
              "## Cost", "",
              "Inference FLOPs per token relative to the base model (analytic, from what runs: "
              "`adadepth bench` measures the time). With `combine: logits` the head runs once "
              "at inference on the routing-weighted sum of the normalised late states; training "
              "runs it once per late layer (the distillation term needs every layer's "
              "distribution). Mixing log-probabilities would run it once per late layer at "
              "inference too: see benchmarks/README.md for the measured overhead of each.", "",
              "## The paper's claims beside ours", "", *paper_comparison(arms, before), "",
              "## Plots", ""]
    lines += [f"![{f}]({f})" for f in figures]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
