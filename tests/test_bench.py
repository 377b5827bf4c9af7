"""`adadepth bench` end to end on a tiny routed run: the machine-readable rows and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adadepth.cli import main

KEYS = {"phase", "budget", "batch", "tokens_per_s_dense", "tokens_per_s_method",
        "ideal_speedup", "measured_speedup", "realised"}


def test_bench_writes_rows_for_every_phase_batch_and_budget(tiny_backbone: Path,
                                                           tmp_path: Path) -> None:
    routed = tmp_path / "routed"
    assert main(["route", "--backbone", str(tiny_backbone), "--steps", "2", "--out", str(routed),
                 "train.eval_batches=1", "routing.calibration_windows=8"]) == 0
    out = tmp_path / "bench"
    assert main(["bench", str(routed), "--budgets", "1.0,0.5", "--prefill-batch", "2",
                 "--prefill-len", "32", "--decode-batches", "1,2", "--decode-tokens", "4",
                 "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {(r["phase"], r["batch"], r["budget"]) for r in rows} == {
        (phase, batch, budget) for phase, batch in (("prefill", 2), ("decode", 1), ("decode", 2))
        for budget in (1.0, 0.5)}
    for r in rows:
        assert KEYS <= set(r) and r["tokens_per_s_dense"] > 0 and r["tokens_per_s_method"] > 0
        assert (r["realised"]["full_fraction"] == 1.0) == (r["budget"] == 1.0)
    ideal = {(r["phase"], r["batch"], r["budget"]): r["ideal_speedup"] for r in rows}
    for phase, batch in (("prefill", 2), ("decode", 1), ("decode", 2)):
        # at 1.0 every token is full and the gate is not run: exactly the dense FLOPs
        assert ideal[phase, batch, 1.0] == pytest.approx(1.0)
        assert ideal[phase, batch, 0.5] != pytest.approx(1.0)
    assert (out / "bench.png").stat().st_size > 1000
    assert main(["bench", str(routed), "--budgets", "0"]) == 2
