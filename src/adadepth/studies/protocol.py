"""The rules every study report reads its findings by: when a finding counts as reproduced, and
what a method's measured frontier says at a given quality.

- `verdict`: a claim "A beats B" over seeds is *reproduced* only when every seed agrees in sign
  and the mean difference is at least twice its standard error; *contradicted* when every seed
  agrees the other way by as much; otherwise *within noise* (one seed can never be more).
  `joint`: a finding of several parts, each judged so. `stated`: the rule as every study
  report states it, once, near its top; `judged`: a verdict with the per-seed figures it
  rests on.
- `at_quality`: the speed a method reaches without losing more than a given fraction of the
  dense model's quality, read from its measured points: a point within the tolerance counts as
  measured; between two points along the knob that bracket the tolerance, linearly
  interpolated; nothing else (no extrapolation: "not reached").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

REPRODUCED, CONTRADICTED, NOISE = "reproduced", "contradicted", "within noise"
RULE = ("a finding is *reproduced* only when every seed agrees in sign and the mean difference "
        "is at least twice its standard error (std / sqrt(seeds)); *contradicted* when every "
        "seed agrees the other way by as much; otherwise *within noise*")
JOINT = ("a finding of several parts is reproduced only when every part is, and contradicted "
         "when any part is")


def verdict(differences: Sequence[float | None]) -> str:
    """The verdict on per-seed differences oriented so that > 0 supports the claim."""
    values = [d for d in differences if d is not None and not math.isnan(d)]
    if len(values) < 2:
        return NOISE
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values))
    if all(v > 0 for v in values) and mean >= 2 * se:
        return REPRODUCED
    if all(v < 0 for v in values) and -mean >= 2 * se:
        return CONTRADICTED
    return NOISE


def joint(verdicts: Sequence[str]) -> str:
    """The verdict on a finding of several parts (each its own `verdict`): reproduced only when
    every part is, contradicted when any part is (the finding claims them all)."""
    if any(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    return REPRODUCED if verdicts and all(v == REPRODUCED for v in verdicts) else NOISE


def stated(what: str = "the per-seed differences") -> str:
    """The rule, as a study report states it once near its top; `what`: what it compares."""
    return (f"**How findings are judged.** Every verdict below applies one rule to {what}, "
            f"each oriented so that a positive difference supports the claim: {RULE}; {JOINT}. "
            "Per-seed head-to-heads are shown beside each verdict; a count of seeds alone is "
            "never a verdict.")


def figures(differences: Sequence[float | None], digits: str = ".4f", unit: str = "") -> str:
    """'+a, +b, +c UNIT (mean +m ± se SE)': the per-seed differences a verdict reads, in seed
    order; `digits` formats them."""
    values = [d for d in differences if d is not None and not math.isnan(d)]
    if not values:
        return "no seed"
    m = margin(values)
    spread = f" (mean {m[0]:+{digits}} ± {m[1]:{digits}} SE)" if m else " (one seed)"
    return ", ".join(f"{v:+{digits}}" for v in values) + unit + spread


def judged(differences: Sequence[float | None], digits: str = ".4f", unit: str = "") -> str:
    """The per-seed differences (> 0 supports the claim) and the rule's verdict on them."""
    return f"{figures(differences, digits, unit)}: **{verdict(differences)}**"


def margin(differences: Sequence[float | None]) -> tuple[float, float] | None:
    """(mean, standard error) of the per-seed differences, None below two seeds."""
    values = [d for d in differences if d is not None and not math.isnan(d)]
    if len(values) < 2:
        return None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Point:
    """One measured setting of a method: its knob value, its validation loss, and a measured
    speed (a speedup over the dense model, or tokens/s)."""

    setting: float
    loss: float
    speed: float


@dataclass(frozen=True)
class Reading:
    """The speed at a quality bound: how it was read (`measured`: a point within the bound;
    `interpolated`: between two bracketing points; `not reached`), and from which points."""

    speed: float | None
    how: str
    points: tuple[Point, ...] = ()


def at_quality(points: Sequence[Point], dense_loss: float, tolerance: float) -> Reading:
    """The highest speed among the measured points whose loss is at most dense_loss *
    (1 + tolerance), and the interpolated speed where the frontier crosses that loss between
    two consecutive points along the knob (one within, one beyond); "not reached" when no
    point is within the bound."""
    bound = dense_loss * (1 + tolerance)
    ordered = sorted(points, key=lambda p: p.setting)
    best = Reading(None, "not reached")
    for p in ordered:
        if p.loss <= bound and (best.speed is None or p.speed > best.speed):
            best = Reading(p.speed, "measured", (p,))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if (a.loss <= bound) == (b.loss <= bound) or a.loss == b.loss:
            continue  # no crossing between them
        t = (bound - a.loss) / (b.loss - a.loss)
        speed = a.speed + t * (b.speed - a.speed)
        if best.speed is None or speed > best.speed:
            best = Reading(speed, "interpolated", (a, b))
    return best
