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

from adadepth.studies.protocol import CONTRADICTED, NOISE, REPRODUCED, figures, joint, verdict
from adadepth.studies.protocol import judged as judged_words
from adadepth.studies.scales import SCALES
from adadepth.studies.stats import (
    Arms,
    Row,
    arm_mean,
    count,
    head_to_head,
    in_order,
    mean_std,
    paired,
)

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
        said = [judged_words(in_order(paired(arms, on_arm, gate, key)), unit=" nats")
                for key in ("val_lm_causal", "avg_lm")]
        summary.append(f"- {gate}: on-policy lower validation loss (causal) in {count(val)}, "
                       f"off-policy's − on-policy's per seed {said[0]}; lower average training "
                       f"LM in {count(avg)}, {said[1]}")
    if not summary:
        return []
    return [*lines, "", *summary]


# -- the paper's findings, per scale -----------------------------------------------------------
@dataclass(frozen=True)
class Judged:
    """One finding on one scale's runs."""

    ours: str  # our figures, per seed, and what was compared
    verdict: str  # the rule's (protocol.verdict, or protocol.joint of its parts)
    distance: float  # how far from the published figure (0 = on it), for the trend column


@dataclass(frozen=True)
class Finding:
    claim: str
    published: str
    judge: Callable[[Arms], Judged | None]  # None: the arms it needs did not run
    ablation: bool = False  # judged on arms that only `--ablations` runs


# The trend of a finding judged on paired differences alone: from contradicted to within noise
# to reproduced is toward the paper.
DISTANCE = {REPRODUCED: 0.0, NOISE: 1.0, CONTRADICTED: 2.0}


def seed_means(arms: Arms, names: tuple[str, ...], key: str) -> dict[int, float]:
    """Per seed where every arm ran, the mean of their `key`."""
    runs = [{r["seed"]: r[key] for r in arms.get(a, [])} for a in names]
    seeds = set.intersection(*(set(r) for r in runs))
    return {s: statistics.mean(r[s] for r in runs) for s in sorted(seeds)}


def _flops(arms: Arms) -> Judged | None:
    std = seed_means(arms, ("G1", "G3"), "flops_proxy")
    none = seed_means(arms, ("G1-A3", "G3-A3"), "flops_proxy")
    if not std or not none:
        return None
    s, n = statistics.mean(std.values()), statistics.mean(none.values())
    distance = max(abs(s - 1.53) / 1.53, abs(n - 1.07) / 1.07)
    # Per seed: how far inside 15 % of the paper's figure the farther of the two lies.
    within = {k: 0.15 - max(abs(std[k] - 1.53) / 1.53, abs(none[k] - 1.07) / 1.07)
              for k in std.keys() & none.keys()}
    return Judged(f"{s:.2f}x, {n:.2f}x (aux recipe {s / n:.2f}x the plain one; paper "
                  f"{1.53 / 1.07:.2f}x); within 15 % of both, per seed 0.15 − the farther "
                  f"relative distance: {figures(in_order(within), '.2f')}",
                  verdict(in_order(within)), distance)


def _grad_norm(arms: Arms) -> Judged | None:
    g1, g3 = arm_mean(arms, "G1", "grad_norm_mean"), arm_mean(arms, "G3", "grad_norm_mean")
    if not g1 or not g3:
        return None
    ratio = g1 / g3
    # Judged against half the paper's factor: G1's norm / G3's at least 5, per seed.
    theirs = {r["seed"]: r["grad_norm_mean"] for r in arms["G3"]}
    per_seed = {r["seed"]: r["grad_norm_mean"] / theirs[r["seed"]] - 5 for r in arms["G1"]
                if theirs.get(r["seed"])}
    lower = head_to_head(arms, "G3", "G1", "grad_norm_mean")
    return Judged(f"{ratio:.2f}x lower (lower in {count(lower)}); at least 5x, per seed "
                  f"G1's / G3's − 5: {figures(in_order(per_seed), '.2f')}",
                  verdict(in_order(per_seed)), abs(math.log(ratio / 10.3)))


def _g3_early(arms: Arms) -> Judged | None:
    avg = head_to_head(arms, "G3", "G1", "avg_lm")
    if avg is None:
        return None
    diffs = in_order(paired(arms, "G3", "G1", "avg_lm"))
    v = verdict(diffs)
    return Judged(f"{count(avg)}; G1's − G3's, per seed: {figures(diffs, unit=' nats')}", v,
                  DISTANCE[v])


def _a3_improves(gate: str) -> Callable[[Arms], Judged | None]:
    def judge(arms: Arms) -> Judged | None:
        a3 = f"{gate}-A3"
        best, avg = head_to_head(arms, a3, gate, "best_lm"), head_to_head(arms, a3, gate, "avg_lm")
        if best is None or avg is None:
            return None
        parts = [in_order(paired(arms, a3, gate, key)) for key in ("best_lm", "avg_lm")]
        v = joint([verdict(d) for d in parts])
        return Judged(f"best {count(best)}, avg {count(avg)}; {gate}'s − {a3}'s, per seed: best "
                      f"{figures(parts[0], unit=' nats')}, avg {figures(parts[1], unit=' nats')}",
                      v, DISTANCE[v])
    return judge


def _a3_removes_early_advantage(arms: Arms) -> Judged | None:
    std, a3 = _early_lead(arms, "G3", "G1"), _early_lead(arms, "G3-A3", "G1-A3")
    if not std or not a3:
        return None
    # Two parts: G3 leads early under util/rank, and its lead is smaller under A3.
    shrinks = {s: std[s] - a3[s] for s in std.keys() & a3.keys()}
    parts = [in_order(std), in_order(shrinks)]
    v = joint([verdict(d) for d in parts])
    ahead = [f"{sum(d > 0 for d in lead.values())}/{len(lead)} seeds" for lead in (std, a3)]
    return Judged(f"G3 ahead of G1: {ahead[0]} (util/rank), {ahead[1]} (A3); G3's early lead "
                  f"over G1 per seed: {figures(parts[0], unit=' nats')}; its shrinkage under A3: "
                  f"{figures(parts[1], unit=' nats')}", v, DISTANCE[v])


def _early_lead(arms: Arms, a: str, b: str) -> dict[int, float]:
    """Per seed, how much lower a's mean LM over the first quarter of the steps is than b's."""
    theirs = {r["seed"]: r for r in arms.get(b, [])}
    return {x["seed"]: early_lm(theirs[x["seed"]]) - early_lm(x) for x in arms.get(a, [])
            if x["seed"] in theirs}


def _a1_collapse(arms: Arms) -> Judged | None:
    a1 = arm_mean(arms, "G3-A1", "prediction_variance")
    g3 = arm_mean(arms, "G3", "prediction_variance")
    if a1 is None or not g3:
        return None
    ratio = a1 / g3
    # Collapse: the variance without L_JEPA below half of G3's, per seed.
    theirs = {r["seed"]: r["prediction_variance"] for r in arms["G3"]}
    below = {r["seed"]: 0.5 - r["prediction_variance"] / theirs[r["seed"]]
             for r in arms["G3-A1"] if theirs.get(r["seed"]) and
             r["prediction_variance"] is not None}
    return Judged(f"prediction variance {a1:.3g} without vs {g3:.3g} with; below half, per seed "
                  f"0.5 − without / with: {figures(in_order(below), '.2f')}",
                  verdict(in_order(below)), min(ratio, 1.0))


def _a4_insensitive(arms: Arms) -> Judged | None:
    names = ("G3-A4-l0.25", "G3", "G3-A4-l2")
    sweep = [arm_mean(arms, a, "avg_lm") for a in names]
    if None in sweep:
        return None
    spread = max(sweep) - min(sweep)  # type: ignore[type-var,operator]
    noise = statistics.mean(statistics.stdev([r["avg_lm"] for r in arms[a]])
                            if len(arms[a]) > 1 else 0.0 for a in names)
    # Per seed: the sweep's spread (same batches for every arm of a seed) against twice the
    # arms' std over seeds.
    runs = [{r["seed"]: r["avg_lm"] for r in arms[a]} for a in names]
    seeds = sorted(set.intersection(*(set(r) for r in runs)))
    inside = [2 * noise - (max(r[s] for r in runs) - min(r[s] for r in runs)) for s in seeds]
    within = spread <= 2 * noise + 1e-9
    return Judged(f"avg LM spread {spread:.4f} vs seed std {noise:.4f}; within 2 seed std, per "
                  f"seed 2 x std − the seed's spread: {figures(inside, unit=' nats')}",
                  verdict(inside),
                  max(0.0, spread / (2 * noise) - 1) if noise > 0 else float(not within))


FINDINGS = [
    Finding("training FLOPs proxy vs full-only: util/rank, none", "1.53x, 1.07x", _flops),
    Finding("G3 lower average LM than G1 under util/rank", "3/3 seeds", _g3_early),
    Finding("G3 gradient norm lower than G1 (util/rank)", "~10.3x lower", _grad_norm),
    Finding("A3 (no util/rank) improves best and avg LM for G1", "3/3 seeds", _a3_improves("G1")),
    Finding("A3 (no util/rank) improves best and avg LM for G3", "3/3 seeds", _a3_improves("G3")),
    Finding("A3 removes G3's early advantage (first 25 % of steps, mean LM)", "removed",
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
