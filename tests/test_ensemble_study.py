"""The ensemble study end to end on a small backbone: every arm and seed runs, the report is
filled, a re-run skips what is finished."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from adadepth.studies import ensemble as study
from adadepth.studies.runner import run
from adadepth.studies.shape import StudyOptions
from adadepth.train import checkpoint as ck

SEEDS = 2
ARMS = [a.name for a in study.ARMS]


def test_study_runs_every_arm_and_writes_a_filled_report(
        tiny_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quick = dataclasses.replace(study.RECIPES["tiny"], block_size=32, batch_size=4,
                                tune_steps=2, eval_batches=2)
    monkeypatch.setitem(study.RECIPES, "tiny", quick)
    out = tmp_path / "study"
    # A backbone already in place (with its eval.json) is reused instead of pretrained.
    shutil.copytree(tiny_backbone, out / "backbone")
    ck.write_json_atomic(out / "backbone" / "eval.json", {"val_loss": 3.0})
    options = StudyOptions(seeds=SEEDS, device="cpu", show_progress=False)
    results = run(study.Ensemble(options), out)

    assert {(r["arm"], r["seed"]) for r in results["runs"]} == {
        (arm, seed) for arm in ARMS for seed in range(SEEDS)}
    params = {r["arm"]: r["trainable_parameters"] for r in results["runs"]}
    assert params["ensemble"] < params["lora"] < params["ensemble+lora"] < params["full"]
    before = results["before"]
    assert len(before["late_layer_loss"]) == 4 and 0 < before["val_accuracy"] < 1
    # the last late layer read through the copied final norm is the base model itself
    assert before["late_layer_loss"][-1] == pytest.approx(before["val_loss"], rel=1e-5)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["backbone"]["val_loss_own_corpus"] == 3.0
    report = (out / "report.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in report, arm
    assert "n/a" not in report
    for claim in ("comparable to the final layer", "complementary", "improves it",
                  "far fewer parameters"):
        assert claim in report, claim
    for png in ("loss_vs_parameters.png", "routing_weights.png", "late_layers.png"):
        assert (out / png).stat().st_size > 1000

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    run(study.Ensemble(options), out)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
