"""The ponder study's report: every arm's perplexity against its inference FLOPs, AdaPonderLM
against PonderLM and against the fixed pruning schedules per seed, where the passes go, measured
speedups, and the paper's findings beside ours, each judged by the one rule of protocol.py; PNG
plots beside it."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from adadepth.studies.plots import plt, save_figure
from adadepth.studies.protocol import figures, joint, stated, verdict
from adadepth.studies.stats import Arms, by_arm, mean_std, per_seed
from adadepth.train.checkpoint import write_text_atomic

# "Comparable perplexity": within 1% (0.01 nats), our reading of the paper's wording.
COMPARABLE_NATS = 0.01


def arm_table(arms: Arms) -> list[str]:
    head = ["arm", "seeds", "val loss", "perplexity", "avg passes", "FLOPs vs backbone",
            "FLOPs vs PonderLM", "train wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fixed = per_seed(arms, "PonderLM")
    for name, rs in arms.items():
        vs_fixed = [r["flops_vs_backbone"] / fixed[r["seed"]]["flops_vs_backbone"]
                    for r in rs if r["seed"] in fixed]
        cells = [name, str(len(rs)), mean_std([r["val_loss"] for r in rs]),
                 mean_std([math.exp(r["val_loss"]) for r in rs]),
                 mean_std([r["avg_passes"] for r in rs]),
                 mean_std([r["flops_vs_backbone"] for r in rs]), mean_std(vs_fixed),
                 mean_std([r["wall_s"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def versus_ponderlm(arms: Arms) -> tuple[list[str], dict[str, Any]]:
    """AdaPonderLM's compute saving over PonderLM and its loss difference, per seed."""
    ada, fixed = per_seed(arms, "AdaPonderLM"), per_seed(arms, "PonderLM")
    lines = ["| seed | PonderLM val loss | AdaPonderLM val loss | difference | AdaPonderLM "
             "passes | FLOPs saved vs PonderLM |", "|---|---|---|---|---|---|"]
    savings, diffs = [], []
    for s in sorted(ada.keys() & fixed.keys()):
        saving = 1 - ada[s]["flops_vs_backbone"] / fixed[s]["flops_vs_backbone"]
        diff = ada[s]["val_loss"] - fixed[s]["val_loss"]
        savings.append(saving)
        diffs.append(diff)
        lines.append(f"| {s} | {fixed[s]['val_loss']:.4f} | {ada[s]['val_loss']:.4f} | "
                     f"{diff:+.4f} | {ada[s]['avg_passes']:.3f} | {saving:.1%} |")
    return lines, {"savings": savings, "diffs": diffs}


def iso_flops(arms: Arms) -> tuple[list[str], dict[str, list[float]]]:
    """AdaPonderLM against the uniform and geometric schedules aimed at its passes, per seed."""
    ada = per_seed(arms, "AdaPonderLM")
    lines = ["| seed | AdaPonderLM: passes, val loss | uniform: passes, val loss | geometric: "
             "passes, val loss | AdaPonderLM lower loss than |", "|---|---|---|---|---|"]
    # Per schedule, its val loss − AdaPonderLM's on each seed (> 0: AdaPonderLM lower).
    ahead: dict[str, list[float]] = {"uniform": [], "geometric": []}
    for s in sorted(ada):
        cells, beat = [f"{ada[s]['avg_passes']:.3f}, {ada[s]['val_loss']:.4f}"], []
        for kind in ("uniform", "geometric"):
            other = per_seed(arms, kind).get(s)
            if other is None:
                cells.append("n/a")
                continue
            ahead[kind].append(other["val_loss"] - ada[s]["val_loss"])
            beat += [kind] if ahead[kind][-1] > 0 else []
            cells.append(f"{other['avg_passes']:.3f}, {other['val_loss']:.4f}")
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {', '.join(beat) or 'neither'} |")
    return lines, ahead


def nll_tables(analysis: dict[str, Any], track: str) -> tuple[list[str], list[float]]:
    seeds = sorted(k for k in analysis if k.startswith(f"{track}-seed"))
    rhos = [analysis[k]["spearman_backbone_nll"] for k in seeds]
    lines = ["| seed | tokens | Spearman(passes, backbone NLL) | Spearman(passes, own NLL) | "
             "mean backbone NLL by passes (tokens) |", "|---|---|---|---|---|"]
    for k in seeds:
        a = analysis[k]
        by = "; ".join(f"{p}: {v['backbone_nll']:.3f} ({v['tokens']})"
                       for p, v in sorted(a["by_passes"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {k.split('seed')[-1]} | {a['tokens']} | {a['spearman_backbone_nll']:.3f}"
                     f" | {a['spearman_own_nll']:.3f} | {by} |")
    return lines, rhos


def bench_table(bench: dict[str, Any]) -> list[str]:
    lines = [f"Device: {bench['device']}, {bench['reps']} timed rounds (medians), decode "
             f"{bench['decode_tokens']} new tokens after a {bench['decode_prompt']}-token prompt; "
             "reference: fixed-K pondering on the same weights (every gate open).", "",
             "| phase | batch | tau | avg passes | ideal speedup | measured speedup | "
             "measured / ideal |", "|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
        lines.append(f"| {r['phase']} | {r['batch']} | {r['setting']:g} | "
                     f"{r['realised']['avg_passes']:.3f} | {r['ideal_speedup']:.2f} | "
                     f"{r['measured_speedup']:.2f} | {r['measured_over_ideal']:.2f} |")
    return lines


def findings(arms: Arms, vs: dict[str, Any], ahead: dict[str, list[float]],
             rhos: list[float]) -> list[str]:
    """Each published finding beside ours: the per-seed quantities the rule reads (oriented so
    that > 0 supports the finding) and its verdict (protocol.verdict; protocol.joint over a
    finding's parts)."""
    out = ["| published finding | paper | ours (per seed; > 0 supports the finding) | verdict |",
           "|---|---|---|---|"]
    savings, diffs = vs["savings"], vs["diffs"]
    if savings:
        # Two parts: at least 5 % fewer FLOPs, and a loss at most COMPARABLE_NATS above.
        saved = [s - 0.05 for s in savings]
        comparable = [COMPARABLE_NATS - d for d in diffs]
        both = joint([verdict(saved), verdict(comparable)])
        out.append(
            f"| AdaPonderLM needs less inference compute than PonderLM at comparable perplexity "
            f"| about 10% fewer FLOPs | {statistics.mean(savings):.1%} fewer FLOPs (per seed "
            f"{', '.join(f'{s:.1%}' for s in savings)}), loss "
            f"{statistics.mean(diffs):+.4f} nats; FLOPs saved − 5 %: "
            f"{figures(saved, '.3f')}; +{COMPARABLE_NATS} nats − its loss above PonderLM's: "
            f"{figures(comparable, unit=' nats')} | {both} |")
    if rhos:
        out.append(
            f"| the learned gates spend more passes on high-NLL (hard) tokens | positive "
            f"relation | Spearman(passes, backbone NLL): {figures(rhos, '.3f')} | "
            f"{verdict(rhos)} |")
    for kind in ("uniform", "geometric"):
        if ahead[kind]:
            out.append(f"| at equal FLOPs the learned halting beats {kind} pruning | "
                       f"consistently | lower val loss in {sum(w > 0 for w in ahead[kind])}/"
                       f"{len(ahead[kind])} seeds; {kind}'s val loss − AdaPonderLM's: "
                       f"{figures(ahead[kind], unit=' nats')} | {verdict(ahead[kind])} |")
    per_pass, shared = per_seed(arms, "AdaPonderLM"), per_seed(arms, "Ada-shared-gate")
    seeds = sorted(per_pass.keys() & shared.keys())
    if seeds:
        worse = [shared[s]["val_loss"] - per_pass[s]["val_loss"] for s in seeds]
        spread = [statistics.pstdev([arm[s]["avg_passes"] for s in seeds])
                  for arm in (per_pass, shared)]
        # Instability across seeds, per seed: how far the shared gate's average passes lie
        # from their mean over seeds, minus how far the per-pass gates' lie from theirs.
        centre = [statistics.mean(arm[s]["avg_passes"] for s in seeds)
                  for arm in (per_pass, shared)]
        wider = [abs(shared[s]["avg_passes"] - centre[1])
                 - abs(per_pass[s]["avg_passes"] - centre[0]) for s in seeds]
        out.append(
            f"| one shared gate MLP is unstable; iteration-specific gates are needed | unstable "
            f"| shared gate: higher val loss in {sum(w > 0 for w in worse)}/{len(seeds)} seeds, "
            f"its val loss − the per-pass gates': {figures(worse, unit=' nats')} "
            f"({verdict(worse)}); spread of avg passes over seeds {spread[1]:.3f} (per-pass "
            f"gates {spread[0]:.3f}), the shared gate's distance from its mean over seeds − "
            f"the per-pass gates': {figures(wider, '.3f', ' passes')} ({verdict(wider)}) | "
            f"{joint([verdict(worse), verdict(wider)])} |")
    bb, fixed = per_seed(arms, "backbone"), per_seed(arms, "PonderLM")
    seeds = sorted(bb.keys() & fixed.keys())
    if seeds:
        lower = [bb[s]["val_loss"] - fixed[s]["val_loss"] for s in seeds]
        out.append(f"| (PonderLM) pondering lowers the loss of the same backbone | lower "
                   f"perplexity | PonderLM lower val loss in {sum(d > 0 for d in lower)}/"
                   f"{len(seeds)} seeds, at "
                   f"{statistics.mean(fixed[s]['flops_vs_backbone'] for s in seeds):.2f}x the "
                   f"backbone's FLOPs; the backbone's val loss − PonderLM's: "
                   f"{figures(lower, unit=' nats')} | {verdict(lower)} |")
    return out


# -- plots ---------------------------------------------------------------------------------------
def pareto_plot(arms: Arms, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"baseline": "s", "ada": "o", "sweep": "o", "ablation": "^", "schedule": "D"}
    ada_points = []
    for n, (name, rs) in enumerate(arms.items()):
        x = [r["flops_vs_backbone"] for r in rs]
        y = [math.exp(r["val_loss"]) for r in rs]
        ax.scatter(x, y, marker=markers.get(rs[0]["group"], "o"), color=f"C{n % 10}",
                   label=name, s=28)
        if rs[0]["group"] in ("ada", "sweep"):
            ada_points.append((statistics.mean(x), statistics.mean(y)))
    ada_points.sort()
    frontier, best = [], math.inf
    for x, y in ada_points:
        if y < best:
            frontier.append((x, y))
            best = y
    if len(frontier) > 1:
        ax.plot(*zip(*frontier, strict=True), "k--", lw=0.8, label="AdaPonderLM frontier (means)")
    ax.set(xlabel="inference FLOPs per token / backbone's", ylabel="validation perplexity",
           title=title)
    save_figure(fig, path, dpi=120, legend=ax)


def passes_plots(arms: Arms, analysis: dict[str, Any], track: str,
                 out: Path) -> list[str]:
    files = [f"passes_{track}.png", f"passes_vs_nll_{track}.png"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [n for n, rs in arms.items() if rs[0]["group"] != "baseline"]
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        hist = [sum(r["passes_histogram"][p] for r in arms[name]) for p in range(
            len(arms[name][0]["passes_histogram"]))]
        total = max(1, sum(hist))
        ax.bar([p + 1 + (j - len(names) / 2) * width for p in range(len(hist))],
               [h / total for h in hist], width, label=name)
    ax.set(xlabel="passes run", ylabel="fraction of held-out tokens",
           title="passes per token (all seeds)")
    save_figure(fig, out / files[0], dpi=120, legend=ax)

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, key in enumerate(sorted(k for k in analysis if k.startswith(f"{track}-seed"))):
        a = analysis[key]
        items = sorted(a["by_passes"].items(), key=lambda kv: int(kv[0]))
        ax.plot([int(p) for p, _ in items], [v["backbone_nll"] for _, v in items], "o-",
                color=f"C{n}", label=f"seed {key.split('seed')[-1]} (rho "
                f"{a['spearman_backbone_nll']:+.2f})")
        sample = a["sample"]
        ax.scatter([p + 0.08 * (n - 1) for p, _ in sample], [v for _, v in sample], s=3,
                   alpha=0.15, color=f"C{n}")
    ax.set(xlabel="passes under AdaPonderLM", ylabel="NLL under the backbone (nats)",
           title="harder tokens (by the backbone) get more passes?")
    save_figure(fig, out / files[1], dpi=120, legend=ax)
    return files


def write(results: dict[str, Any], out: Path) -> None:
    recipe = results["recipe"]
    lines = [
        "# Ponder study: AdaPonderLM",
        "",
        f"Preset `{results['preset']}`, {results['seeds']} seeds. Every arm is `adadepth ponder` "
        f"on {recipe['corpus']} ({recipe['tokenizer']} tokenizer, blocks of "
        f"{recipe['block_size']}, batch {recipe['batch_size']}) with the same steps and "
        f"optimiser ({recipe['optim']}); shared ponder options {recipe['ponder']}. Validation "
        "loss is nats/token over the same held-out batches for every arm, each model halting "
        "as it was trained to. FLOPs are analytic forward FLOPs per token of what ran "
        "(layers, LM head at every pass, pondering embeddings, gates), relative to one pass of "
        "the backbone. The uniform and geometric schedules are aimed at the average passes "
        "AdaPonderLM (lambda 0.1, k 0.1) realised on the same seed. `results.json` holds every "
        "figure.",
        "",
        stated("per-seed differences between arms of the same seed (or, where a finding rests "
               "on something else, the per-seed quantity it names)"),
        "",
    ]
    for track in results["tracks"]:
        name = track["name"]
        arms = by_arm(results["runs"], track=name)
        if not arms:
            continue
        shape = f"preset `{track['preset']}` with {track['model']}"
        how = (f"continued pretraining of `{track['backbone']}`" if track["backbone"] else
               f"continued pretraining of a backbone ({shape}) pretrained here for "
               f"{track['pretrain_steps']} steps (validation loss "
               f"{track['start_val_loss']:.4f})" if track.get("pretrain_steps") else
               f"from scratch, {shape}")
        vs_lines, vs = versus_ponderlm(arms)
        iso_lines, ahead = iso_flops(arms)
        nll_lines, rhos = nll_tables(results["analysis"], name)
        pareto = f"pareto_{name}.png"
        pareto_plot(arms, out / pareto, f"{name}: perplexity against inference FLOPs")
        figures = [pareto, *passes_plots(arms, results["analysis"], name, out)]
        lines += [f"## Track `{name}`: {how}, {track['steps']} steps", "",
                  "### Arms (mean ± std over seeds)", "", *arm_table(arms), "",
                  "### AdaPonderLM against PonderLM (per seed)", "", *vs_lines, "",
                  "### AdaPonderLM against fixed pruning at matched FLOPs (per seed)", "",
                  *iso_lines, "",
                  "### Where the passes go: passes against each token's NLL under the backbone",
                  "", *nll_lines, ""]
        bench = results["bench"].get(name)
        if bench:
            lines += ["### Measured speedups (`adadepth bench`, AdaPonderLM seed 0)", "",
                      *bench_table(bench), "", f"![bench](bench/{name}/bench.png)", ""]
        lines += ["### The paper's findings beside ours", "",
                  *findings(arms, vs, ahead, rhos), "", "### Plots", ""]
        lines += [f"![{f}]({f})" for f in figures]
        lines.append("")
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
