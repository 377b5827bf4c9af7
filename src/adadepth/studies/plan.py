"""Running a study's matrix of runs: one folder per (arm, seed), finished ones skipped."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

A = TypeVar("A")


def run_plan(plan: list[tuple[A, int]], out: Path, name: Callable[[A], str],
             launch: Callable[[A, int, Path], dict[str, Any]], desc: str,
             show_progress: bool = True) -> list[tuple[A, dict[str, Any]]]:
    """Each (arm, seed) runs into out/runs/NAME-seedS through `launch(arm, seed, folder)`,
    unless its metrics.json is already there (the study is resumable); returns the metrics."""
    results = []
    bar = tqdm(plan, desc=desc, disable=not show_progress, dynamic_ncols=True)
    for arm, seed in bar:
        run_dir = out / "runs" / f"{name(arm)}-seed{seed}"
        bar.set_postfix(run=run_dir.name)
        metrics_path = run_dir / "metrics.json"
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
        else:
            metrics = launch(arm, seed, run_dir)
        results.append((arm, metrics))
    return results
