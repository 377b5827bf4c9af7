"""The aux-loss study's report: tables per arm, per-seed head-to-heads, the paper's figures
beside ours with a plain verdict each, and PNG plots."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from adadepth.jobs.route import smoothed  # noqa: E402
from adadepth.train.checkpoint import write_text_atomic  # noqa: E402

Run = dict[str, Any]


def by_arm(runs: list[Run]) -> dict[str, list[Run]]:
    arms: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        arms[r["arm"]].append(r)
    for rs in arms.values():
        rs.sort(key=lambda r: r["seed"])
    return dict(arms)


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def head_to_head(arms: dict[str, list[Run]], a: str, b: str, key: str,
                 lower: bool = True) -> tuple[int, int] | None:
    """Seeds where arm a beats arm b on key (paired by seed)."""
    if a not in arms or b not in arms:
        return None
    pairs = [(x[key], y[key]) for x, y in zip(arms[a], arms[b], strict=False)
             if x["seed"] == y["seed"]]
    wins = sum((x < y) if lower else (x > y) for x, y in pairs)
    return wins, len(pairs)


def early_lm(run: Run, fraction: float = 0.25) -> float:
    curve = run["lm_curve"]
    n = max(1, int(len(curve) * fraction))
    return sum(curve[:n]) / n


def arm_table(arms: dict[str, list[Run]]) -> list[str]:
    thresholds = next(iter(arms.values()))[0]["threshold_hits"].keys()
    head = ["arm", "seeds", "avg LM", "best LM", "endpoint LM", "val LM (causal)",
            *[f"hit {t}" for t in thresholds], "grad norm", "FLOPs proxy", "full frac (causal)",
            "wall s"]
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
                 mean_std([r["wall_s"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def count(h: tuple[int, int] | None) -> str:
    return "n/a" if h is None else f"{h[0]}/{h[1]} seeds"


def all_of(h: tuple[int, int] | None) -> bool:
    return h is not None and h[1] > 0 and h[0] == h[1]


def arm_mean(arms: dict[str, list[Run]], arm: str, key: str) -> float | None:
    values = [r[key] for r in arms.get(arm, []) if r.get(key) is not None]
    return statistics.mean(values) if values else None


def paper_comparison(arms: dict[str, list[Run]]) -> list[str]:
    """Each published finding beside ours, with a plain verdict."""
    out = ["| published finding | paper | ours | reproduced? |", "|---|---|---|---|"]
    std = [arm_mean(arms, a, "flops_proxy") for a in ("G1", "G3")]
    a3 = [arm_mean(arms, a, "flops_proxy") for a in ("G1-A3", "G3-A3")]
    if None not in std and None not in a3:
        s, n = statistics.mean(std), statistics.mean(a3)
        ok = abs(s - 1.53) / 1.53 <= 0.15 and abs(n - 1.07) / 1.07 <= 0.15
        out.append(f"| training FLOPs proxy vs full-only: util/rank, none | 1.53x, 1.07x | "
                   f"{s:.2f}x, {n:.2f}x | {'yes' if ok else 'no'} (within 15%: "
                   f"{'both' if ok else 'not both'}); the aux recipe costs {s / n:.2f}x the "
                   f"plain one (paper {1.53 / 1.07:.2f}x) |")
    g1, g3 = arm_mean(arms, "G1", "grad_norm_mean"), arm_mean(arms, "G3", "grad_norm_mean")
    if g1 and g3:
        ratio = g1 / g3
        verdict = "yes" if ratio >= 5 else ("partly (lower, not ~10x)" if ratio > 1 else "no")
        out.append(f"| G3 gradient norm lower than G1 (util/rank) | ~10.3x lower | "
                   f"{ratio:.2f}x lower | {verdict} |")
    for gate in ("G1", "G3"):
        best = head_to_head(arms, f"{gate}-A3", gate, "best_lm")
        avg = head_to_head(arms, f"{gate}-A3", gate, "avg_lm")
        if best and avg:
            ok = all_of(best) and all_of(avg)
            out.append(f"| A3 (no util/rank) improves best and avg LM for {gate} | 3/3 seeds | "
                       f"best {count(best)}, avg {count(avg)} | {'yes' if ok else 'no'} |")
    early_std = _early_wins(arms, "G3", "G1")
    early_a3 = _early_wins(arms, "G3-A3", "G1-A3")
    if early_std and early_a3:
        had = early_std[0] > early_std[1] / 2
        removed = early_a3[0] <= early_a3[1] / 2
        verdict = "yes" if had and removed else (
            "no: G3 had no early advantage to remove" if not had else "no: it persists under A3")
        out.append(f"| A3 removes G3's early advantage (first 25% of steps, mean LM) | yes | "
                   f"G3 ahead of G1: {count(early_std)} (util/rank), {count(early_a3)} (A3) | "
                   f"{verdict} |")
    a1 = arm_mean(arms, "G3-A1", "prediction_variance")
    g3v = arm_mean(arms, "G3", "prediction_variance")
    if a1 is not None and g3v is not None:
        out.append(f"| without L_JEPA the G3 predictor collapses (A1) | collapse | prediction "
                   f"variance {a1:.3g} without vs {g3v:.3g} with | "
                   f"{'yes' if a1 < 0.5 * g3v else 'no'} (yes = below half) |")
    sweep = [arm_mean(arms, a, "avg_lm") for a in ("G3-A4-l0.25", "G3", "G3-A4-l2")]
    if None not in sweep:
        spread = max(sweep) - min(sweep)
        noise = statistics.mean(statistics.stdev([r["avg_lm"] for r in arms[a]])
                                if len(arms[a]) > 1 else 0.0
                                for a in ("G3-A4-l0.25", "G3", "G3-A4-l2"))
        out.append(f"| insensitive to lambda_JEPA in {{0.25, 1, 2}} (A4) | insensitive | avg LM "
                   f"spread {spread:.4f} vs seed std {noise:.4f} | "
                   f"{'yes' if spread <= 2 * noise + 1e-9 else 'no'} (yes = within 2 seed std) |")
    return out


def _early_wins(arms: dict[str, list[Run]], a: str, b: str) -> tuple[int, int] | None:
    if a not in arms or b not in arms:
        return None
    pairs = list(zip(arms[a], arms[b], strict=False))
    return sum(early_lm(x) < early_lm(y) for x, y in pairs), len(pairs)


def save_figure(fig: Any, out: Path, name: str, files: list[str]) -> None:
    """Write a figure as out/name (PNG), close it, and list it in `files`."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    files.append(name)


def plots(arms: dict[str, list[Run]], out: Path, alpha: float = 0.1) -> list[str]:
    import numpy as np

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, rs in arms.items():
        for ax, key in zip(axes, ("lm_curve", "grad_norm_curve"), strict=True):
            curves = np.array([smoothed(r[key], alpha) for r in rs])
            x = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            (line,) = ax.plot(x, mean, label=name, lw=1.2)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
    axes[0].set(title="LM loss (EMA), mean ± std over seeds", xlabel="step", ylabel="nats/token")
    axes[1].set(title="controller gradient norm (EMA)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    save_figure(fig, out, "loss_curves.png", files)

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
    save_figure(fig, out, "full_fraction.png", files)

    fig, ax = plt.subplots(figsize=(9, 4))
    values = [statistics.mean(r["flops_proxy"] for r in arms[n]) for n in names]
    ax.bar(names, values, color="tab:gray")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="full-only training")
    ax.axhline(1.53, color="tab:red", lw=0.8, ls=":", label="paper, util/rank (1.53x)")
    ax.axhline(1.07, color="tab:blue", lw=0.8, ls=":", label="paper, none (1.07x)")
    ax.set(title="training FLOPs proxy relative to full-only training")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, out, "flops_proxy.png", files)
    return files


def write(results: dict[str, Any], out: Path) -> None:
    arms = by_arm(results["runs"])
    figures = plots(arms, out)
    learned = [a for a in ("G1", "G3", "G1-A3", "G3-A3") if a in arms]
    lines = [
        "# Aux-loss study: conditional depth routing",
        "",
        f"Preset `{results['preset']}`, {results['seeds']} seeds, {results['steps']} controller "
        f"steps per run, backbone `{results['backbone']['path']}` (validation loss "
        f"{results['backbone'].get('val_loss')}). Every figure below comes from the runs in "
        "`results.json`; LM losses are training-batch losses in nats/token (same batches for "
        "every arm of a seed), `val LM (causal)` is the validation loss under calibrated causal "
        "thresholds. Threshold hits: first step where the EMA-smoothed LM loss falls below the "
        "frozen backbone's dense loss plus the margin (mean step over the seeds that reached "
        "it, and how many did).",
        "",
        "## Arms (mean ± std over seeds)",
        "",
        *arm_table(arms),
        "",
        "## Head to head (per seed)",
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
            lines.append(f"- {text}: {count(h)}")
    lines += ["", "## The paper's findings beside ours", "", *paper_comparison(arms), "",
              "## Plots", ""]
    lines += [f"![{f}]({f})" for f in figures]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
