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


def head_to_head(arms: Arms, a: str, b: str, key: str, lower: bool = True
                 ) -> tuple[int, int] | None:
    """Seeds where arm a beats arm b on key (paired by seed)."""
    if a not in arms or b not in arms:
        return None
    theirs = {r["seed"]: r[key] for r in arms[b]}
    pairs = [(r[key], theirs[r["seed"]]) for r in arms[a] if r["seed"] in theirs]
    return sum((x < y) if lower else (x > y) for x, y in pairs), len(pairs)


def count(h: tuple[int, int] | None) -> str:
    return "n/a" if h is None else f"{h[0]}/{h[1]} seeds"


def share(h: tuple[int, int]) -> float:
    return h[0] / h[1] if h[1] else 0.0


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average of a curve (for plots), starting at its first value."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out
