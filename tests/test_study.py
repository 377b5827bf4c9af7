"""The aux-loss study end to end on a small backbone: every arm runs, the report is filled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adadepth.studies.aux_losses import run_study
from adadepth.train import checkpoint as ck

STEPS, SEEDS = 3, 2
ARMS = {"G1", "G3", "G1-A3", "G3-A3", "random", "all-full", "all-cheap"}


def test_study_runs_every_arm_and_writes_a_filled_report(tiny_backbone: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "study"
    # A backbone already in place (with its eval.json) is reused instead of pretrained.
    shutil.copytree(tiny_backbone, out / "backbone")
    ck.write_json_atomic(out / "backbone" / "eval.json", {"val_loss": 3.0})
    results = run_study("tiny", SEEDS, out, steps=STEPS, device="cpu", show_progress=False)

    assert {(r["arm"], r["seed"]) for r in results["runs"]} == {
        (arm, seed) for arm in ARMS for seed in range(SEEDS)}
    by_arm = {r["arm"]: r for r in results["runs"]}
    assert all(f == 1.0 for f in by_arm["all-full"]["full_fraction_causal"])
    assert all(f == 0.0 for f in by_arm["all-cheap"]["full_fraction_causal"])
    for r in results["runs"]:
        assert len(r["lm_curve"]) == STEPS and r["wall_s"] > 0
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["backbone"]["val_loss"] == 3.0 and len(on_disk["runs"]) == len(ARMS) * SEEDS
    report = (out / "report.md").read_text()
    for arm in ARMS:
        assert f"| {arm} " in report or f"| {arm} |" in report, arm
    assert "n/a" not in report.split("##")[1]  # the main table has a figure in every cell
    for png in ("loss_curves.png", "full_fraction.png", "flops_proxy.png"):
        assert (out / png).stat().st_size > 1000

    # Re-running skips finished runs: no run folder is touched again.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    run_study("tiny", SEEDS, out, steps=STEPS, device="cpu", show_progress=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
