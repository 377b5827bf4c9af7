"""The paper's findings judged on our runs, one column per scale; the share of the loss gap each
arm recovers; the on-policy oracle against the paper's off-policy one.

Every function here reads runs grouped by arm (`Arms`: arm name -> runs sorted by seed) and
returns figures or markdown lines; nothing is read from disk.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from adadepth.studies.scales import SCALES
from adadepth.studies.stats import Arms, Row, arm_mean, count, head_to_head, mean_std, share

BASELINE_ENDS = ("all-cheap", "all-full")  # the two ends of the loss gap


def early_lm(run: Row, fraction: float = 0.25) -> float:
    """Mean LM loss over the first `fraction` of the steps: early-to-mid optimisation."""
    curve = run["lm_curve"]
    n = max(1, int(len(curve) * fraction))
    return sum(curve[:n]) / n


# -- recovery ----------------------------------------------------------------------------------
def recovery(arms: Arms) -> dict[str, dict[int, float]]:
    """Per arm and seed, the share of the all-cheap -> all-full validation gap the arm recovers:
    (L_all-cheap - L_arm) / (L_all-cheap - L_all-full), on `val_lm_causal` of the same seed.

    1 = as good as running every token full, 0 = no better than running every token cheap. A
    seed whose gap is not positive has no share (the ratio would mean nothing).
    """
    ends = [{r["seed"]: r["val_lm_causal"] for r in arms.get(a, [])} for a in BASELINE_ENDS]
    cheap, full = ends
    shares: dict[str, dict[int, float]] = {}
    for name, rs in arms.items():
        if name in BASELINE_ENDS:
            continue
        per_seed = {r["seed"]: (cheap[r["seed"]] - r["val_lm_causal"])
                    / (cheap[r["seed"]] - full[r["seed"]])
                    for r in rs if r["seed"] in cheap and r["seed"] in full
                    and cheap[r["seed"]] > full[r["seed"]]}
        if per_seed:
            shares[name] = per_seed
    return shares


def gap(arms: Arms) -> dict[int, float]:
    """Per seed, L_all-cheap - L_all-full on validation under causal routing (nats)."""
    full = {r["seed"]: r["val_lm_causal"] for r in arms.get("all-full", [])}
    return {r["seed"]: r["val_lm_causal"] - full[r["seed"]] for r in arms.get("all-cheap", [])
            if r["seed"] in full}


def recovery_table(arms: Arms) -> list[str]:
    shares, gaps = recovery(arms), gap(arms)
    if not shares:
        return ["(needs the all-cheap and all-full baselines with a positive gap)"]
    seeds = sorted(gaps)
    gap_cells = [f"{gaps[s]:.4f}" for s in seeds]
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---|" * (len(seeds) + 1),
             f"| *gap all-cheap − all-full (nats)* | {' | '.join(gap_cells)} | "
             f"{mean_std(list(gaps.values()), '.4f', '.4f')} |"]
    for name, per_seed in shares.items():
        cells = [f"{100 * per_seed[s]:.1f} %" if s in per_seed else "n/a" for s in seeds]
        share = mean_std(list(per_seed.values()), ".1f", ".1f", scale=100, unit=" %")
        lines.append(f"| {name} | {' | '.join(cells)} | {share} |")
    return lines


# -- on-policy against off-policy oracle -------------------------------------------------------
def policy_table(arms: Arms) -> list[str]:
    """Per gate and seed: the paper's off-policy oracle (the plain arm) against ours, on-policy."""
    shares = recovery(arms)
    lines = ["| gate | seed | val LM (causal), off-policy | on-policy | gap recovered, off-policy "
             "| on-policy | avg LM, off-policy | on-policy |", "|---|---|---|---|---|---|---|---|"]
    summary = []
    for gate in ("G1", "G3"):
        on_arm = f"{gate}-onpolicy"
        if gate not in arms or on_arm not in arms:
            continue
        on_runs = {r["seed"]: r for r in arms[on_arm]}
        for off in arms[gate]:
            on = on_runs.get(off["seed"])
            if on is None:
                continue
            rec = [shares.get(a, {}).get(off["seed"]) for a in (gate, on_arm)]
            rec_cells = [f"{100 * v:.1f} %" if v is not None else "n/a" for v in rec]
            lines.append(f"| {gate} | {off['seed']} | {off['val_lm_causal']:.4f} | "
                         f"{on['val_lm_causal']:.4f} | {rec_cells[0]} | {rec_cells[1]} | "
                         f"{off['avg_lm']:.4f} | {on['avg_lm']:.4f} |")
        val = head_to_head(arms, on_arm, gate, "val_lm_causal")
        avg = head_to_head(arms, on_arm, gate, "avg_lm")
        summary.append(f"- {gate}: on-policy lower validation loss (causal) in {count(val)}, "
                       f"lower average training LM in {count(avg)}")
    if not summary:
        return []
    return [*lines, "", *summary]


# -- the paper's findings, per scale -----------------------------------------------------------
@dataclass(frozen=True)
class Judged:
    """One finding on one scale's runs."""

    ours: str  # our figure, in words
    verdict: str  # reproduced? yes / no / partly, with why
    distance: float  # how far from the published figure (0 = on it), for the trend column


@dataclass(frozen=True)
class Finding:
    claim: str
    published: str
    judge: Callable[[Arms], Judged | None]  # None: the arms it needs did not run
    ablation: bool = False  # judged on arms that only `--ablations` runs


def _flops(arms: Arms) -> Judged | None:
    std = [arm_mean(arms, a, "flops_proxy") for a in ("G1", "G3")]
    none = [arm_mean(arms, a, "flops_proxy") for a in ("G1-A3", "G3-A3")]
    if None in std or None in none:
        return None
    s, n = statistics.mean(std), statistics.mean(none)  # type: ignore[arg-type]
    distance = max(abs(s - 1.53) / 1.53, abs(n - 1.07) / 1.07)
    return Judged(f"{s:.2f}x, {n:.2f}x (aux recipe {s / n:.2f}x the plain one; paper "
                  f"{1.53 / 1.07:.2f}x)", "yes" if distance <= 0.15 else "no (not both within "
                  "15 %)", distance)


def _grad_norm(arms: Arms) -> Judged | None:
    g1, g3 = arm_mean(arms, "G1", "grad_norm_mean"), arm_mean(arms, "G3", "grad_norm_mean")
    if not g1 or not g3:
        return None
    ratio = g1 / g3
    verdict = "yes" if ratio >= 5 else ("partly (lower, not ~10x)" if ratio > 1 else "no")
    return Judged(f"{ratio:.2f}x lower", verdict, abs(math.log(ratio / 10.3)))


def _g3_early(arms: Arms) -> Judged | None:
    avg = head_to_head(arms, "G3", "G1", "avg_lm")
    if avg is None:
        return None
    verdict = "yes" if avg[0] == avg[1] else ("partly" if avg[0] > avg[1] / 2 else "no")
    return Judged(count(avg), verdict, 1 - share(avg))


def _a3_improves(gate: str) -> Callable[[Arms], Judged | None]:
    def judge(arms: Arms) -> Judged | None:
        best = head_to_head(arms, f"{gate}-A3", gate, "best_lm")
        avg = head_to_head(arms, f"{gate}-A3", gate, "avg_lm")
        if best is None or avg is None:
            return None
        both = best[0] == best[1] and avg[0] == avg[1]
        some = best[0] + avg[0] > 0
        return Judged(f"best {count(best)}, avg {count(avg)}",
                      "yes" if both else ("partly" if some else "no"),
                      1 - (share(best) + share(avg)) / 2)
    return judge


def _a3_removes_early_advantage(arms: Arms) -> Judged | None:
    std, a3 = _early_wins(arms, "G3", "G1"), _early_wins(arms, "G3-A3", "G1-A3")
    if std is None or a3 is None:
        return None
    had, removed = std[0] > std[1] / 2, a3[0] <= a3[1] / 2
    verdict = "yes" if had and removed else (
        "no: G3 had no early advantage to remove" if not had else "no: it persists under A3")
    return Judged(f"G3 ahead of G1: {count(std)} (util/rank), {count(a3)} (A3)", verdict,
                  ((1 - share(std)) + share(a3)) / 2)


def _early_wins(arms: Arms, a: str, b: str) -> tuple[int, int] | None:
    if a not in arms or b not in arms:
        return None
    theirs = {r["seed"]: r for r in arms[b]}
    pairs = [(x, theirs[x["seed"]]) for x in arms[a] if x["seed"] in theirs]
    return sum(early_lm(x) < early_lm(y) for x, y in pairs), len(pairs)


def _a1_collapse(arms: Arms) -> Judged | None:
    a1 = arm_mean(arms, "G3-A1", "prediction_variance")
    g3 = arm_mean(arms, "G3", "prediction_variance")
    if a1 is None or not g3:
        return None
    ratio = a1 / g3
    return Judged(f"prediction variance {a1:.3g} without vs {g3:.3g} with",
                  "yes (below half)" if ratio < 0.5 else "no (not below half)", min(ratio, 1.0))


def _a4_insensitive(arms: Arms) -> Judged | None:
    names = ("G3-A4-l0.25", "G3", "G3-A4-l2")
    sweep = [arm_mean(arms, a, "avg_lm") for a in names]
    if None in sweep:
        return None
    spread = max(sweep) - min(sweep)  # type: ignore[type-var,operator]
    noise = statistics.mean(statistics.stdev([r["avg_lm"] for r in arms[a]])
                            if len(arms[a]) > 1 else 0.0 for a in names)
    within = spread <= 2 * noise + 1e-9
    return Judged(f"avg LM spread {spread:.4f} vs seed std {noise:.4f}",
                  "yes (within 2 seed std)" if within else "no (beyond 2 seed std)",
                  max(0.0, spread / (2 * noise) - 1) if noise > 0 else float(not within))


FINDINGS = [
    Finding("training FLOPs proxy vs full-only: util/rank, none", "1.53x, 1.07x", _flops),
    Finding("G3 lower average LM than G1 under util/rank", "3/3 seeds", _g3_early),
    Finding("G3 gradient norm lower than G1 (util/rank)", "~10.3x lower", _grad_norm),
    Finding("A3 (no util/rank) improves best and avg LM for G1", "3/3 seeds", _a3_improves("G1")),
    Finding("A3 (no util/rank) improves best and avg LM for G3", "3/3 seeds", _a3_improves("G3")),
    Finding("A3 removes G3's early advantage (first 25 % of steps, mean LM)", "yes",
            _a3_removes_early_advantage),
    Finding("without L_JEPA the G3 predictor collapses (A1)", "collapse", _a1_collapse,
            ablation=True),
    Finding("insensitive to lambda_JEPA in {0.25, 1, 2} (A4)", "insensitive", _a4_insensitive,
            ablation=True),
]


def scales_table(by_scale: dict[str, Arms]) -> list[str]:
    """Each published finding beside ours at every scale we know of ("not run" where we have no
    study), with whether it moves toward the paper from our smallest scale to our largest."""
    head = ["published finding", "paper (157.5M, fineweb-edu)",
            *[f"ours: `{s}`" for s in SCALES], "from our smallest scale to our largest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for finding in FINDINGS:
        cells, distances = [], []
        for scale in SCALES:
            if scale not in by_scale:
                cells.append("not run")
                continue
            judged = finding.judge(by_scale[scale])
            if judged is None:
                cells.append("ablations not run" if finding.ablation else "n/a")
                continue
            cells.append(f"{judged.ours}: **{judged.verdict}**")
            distances.append((scale, judged.distance))
        lines.append(f"| {finding.claim} | {finding.published} | " + " | ".join(cells)
                     + f" | {trend(distances)} |")
    return lines


def trend(distances: list[tuple[str, float]]) -> str:
    """Toward or away from the published figure, smallest scale to largest."""
    if len(distances) < 2:
        return "one scale only"
    (small, before), (large, after) = distances[0], distances[-1]
    if abs(after - before) <= 0.05 * max(before, after) + 1e-9:
        return f"about the same ({small} → {large})"
    return f"{'toward' if after < before else 'away from'} the paper ({small} → {large})"
