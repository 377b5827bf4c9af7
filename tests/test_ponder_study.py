"""The ponder study end to end on a very small recipe: every arm runs, the schedules aim at
AdaPonderLM's passes, the report is filled, and a re-run skips what is finished."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adadepth.studies import ponder as study
from adadepth.studies.ponder import PonderRecipe, Track
from adadepth.studies.ponder_analysis import average_ranks, spearman
from adadepth.studies.runner import run
from adadepth.studies.shape import StudyOptions

SMALL = PonderRecipe(
    "tiny-shakespeare", "char", 16, 4,
    (Track("cpt", preset="tiny", model={"d_model": 32, "n_layers": 1, "n_heads": 2,
                                        "d_ff": 64, "max_seq_len": 128},
           pretrain_steps=3, steps=4),),
    ponder={"passes": 3, "tau": 0.5, "gate_bias": 0.0, "ce_steps": 1, "k_warmup_steps": 1,
            "gates_only_steps": 1},
    sweep=(), optim={"lr": 1e-2, "warmup_steps": 0}, eval_batches=2,
    bench={"prefill_batch": 2, "prefill_len": 16, "decode_tokens": 3, "reps": 1},
    bench_taus=(0.9,))
ARMS = {"backbone", "PonderLM", "AdaPonderLM", "Ada-shared-gate", "uniform", "geometric"}


def test_spearman_with_ties() -> None:
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.array([1, 1, 2, 2, 3, 3])
    assert spearman(x, x * 10.0) == pytest.approx(1.0)
    assert spearman(x, -x.astype(float)) == pytest.approx(-1.0)
    assert spearman(x, np.ones(6)) == 0.0


def test_study_runs_every_arm_and_writes_a_filled_report(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(study.RECIPES, "tiny", SMALL)
    out = tmp_path / "study"
    options = StudyOptions(seeds=2, device="cpu", workers=1, show_progress=False)
    results = run(study.Ponder(options), out)
    assert {(r["arm"], r["seed"]) for r in results["runs"]} == {
        (arm, seed) for arm in ARMS for seed in range(2)}
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    for seed in range(2):
        assert runs["backbone", seed]["avg_passes"] == 1.0
        assert runs["PonderLM", seed]["avg_passes"] == 3.0
        config = json.loads((out / "runs" / "cpt" / f"uniform-seed{seed}" /
                             "config.json").read_text())
        assert config["backbone"] == str(out / "backbone" / "cpt")
        assert config["method_config"]["schedule_passes"] == pytest.approx(
            runs["AdaPonderLM", seed]["avg_passes"])
        analysis = results["analysis"][f"cpt-seed{seed}"]
        assert analysis["tokens"] == 2 * 4 * 16 and -1 <= analysis["spearman_backbone_nll"] <= 1
    assert {r["setting"] for r in results["bench"]["cpt"]["rows"]} == {0.5, 0.9}
    report = (out / "report.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in report, arm
    for finding in ("PonderLM at comparable perplexity", "high-NLL", "beats uniform",
                    "beats geometric", "shared gate"):
        assert finding in report, finding
    for png in ("pareto_cpt.png", "passes_cpt.png", "passes_vs_nll_cpt.png",
                "bench/cpt/bench.png"):
        assert (out / png).stat().st_size > 1000, png

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")}
    run(study.Ponder(options), out)
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")}
