"""The statistics every study's report uses: runs grouped by arm, mean ± std over seeds,
per-seed head-to-heads and smoothed curves. Nothing here reads from disk."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

Row = dict[str, Any]  # one run in results.json: its metrics with its arm and seed
Arms = dict[str, list[Row]]  # arm name -> its runs, sorted by seed


def by_arm(runs: list[Row], **where: Any) -> Arms:
    """Runs grouped by arm in order of first appearance, each arm's sorted by seed; `where`
    keeps only runs with those values (track="cpt")."""
    arms: dict[str, list[Row]] = defaultdict(list)
    for r in runs:
        if all(r.get(k) == v for k, v in where.items()):
            arms[r["arm"]].append(r)
    for rs in arms.values():
        rs.sort(key=lambda r: r["seed"])
    return dict(arms)


def per_seed(arms: Arms, arm: str) -> dict[int, Row]:
    return {r["seed"]: r for r in arms.get(arm, [])}


def mean(values: list[float | None]) -> float | None:
    """The mean of the values measured (None: not measured); None if none was."""
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def mean_std(values: list[float | None], digits: str = ".4g", std_digits: str = ".2g",
             scale: float = 1.0, unit: str = "") -> str:
    """'mean ± std' over the seeds' values (None: not measured), each times `scale`; one value
    alone, or 'n/a'. The formats are Python format specs."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{scale * values[0]:{digits}}{unit}"
    return (f"{scale * statistics.mean(values):{digits}} ± "
            f"{scale * statistics.stdev(values):{std_digits}}{unit}")


def arm_mean(arms: Arms, arm: str, key: str) -> float | None:
    return mean([r[key] for r in arms.get(arm, []) if r.get(key) is not None])


def paired(arms: Arms, a: str, b: str, key: str, lower: bool = True) -> dict[int, float]:
    """Per seed where both ran, how much arm a beats arm b on key (b - a where lower is better,
    a - b where higher is): > 0 where a is better, the orientation `protocol.verdict` reads."""
    theirs = {r["seed"]: r[key] for r in arms.get(b, [])}
    return {r["seed"]: (theirs[r["seed"]] - r[key]) * (1 if lower else -1)
            for r in arms.get(a, []) if r["seed"] in theirs}


def in_order(per_seed: dict[int, float]) -> list[float]:
    """Per-seed values in seed order (what protocol.verdict and protocol.figures read)."""
    return [per_seed[s] for s in sorted(per_seed)]


def head_to_head(arms: Arms, a: str, b: str, key: str, lower: bool = True
                 ) -> tuple[int, int] | None:
    """Seeds where arm a beats arm b on key (paired by seed), of those where both ran."""
    if a not in arms or b not in arms:
        return None
    diffs = paired(arms, a, b, key, lower)
    return sum(d > 0 for d in diffs.values()), len(diffs)


def count(h: tuple[int, int] | None) -> str:
    return "n/a" if h is None else f"{h[0]}/{h[1]} seeds"


def read_along(points: list[tuple[float, float]], x: float, tolerance: float
               ) -> tuple[float, str] | None:
    """y at x along measured (x, y) points: the nearest point's y where it lies within
    `tolerance` of x ("measured"); else linearly interpolated between the two consecutive points
    (by x) that bracket x ("interpolated"); None outside the points (never extrapolated)."""
    if not points:
        return None
    nearest = min(points, key=lambda p: abs(p[0] - x))
    if abs(nearest[0] - x) <= tolerance:
        return nearest[1], "measured"
    ordered = sorted(points)
    for (x0, y0), (x1, y1) in zip(ordered, ordered[1:], strict=False):
        if x0 < x < x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0), "interpolated"
    return None


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average of a curve (for plots), starting at its first value."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out
