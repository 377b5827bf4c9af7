"""The leaderboard at toy sizes: realised FLOPs come from what ran, a resumed leaderboard gives
the same table, the report and its plots exist, bad input is one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_user_error

from adadepth import config
from adadepth import flops as fl
from adadepth.config import ModelConfig
from adadepth.depth.dispatch import Call
from adadepth.depth.routing import RoutedModel, RoutingConfig
from adadepth.eval import decode_eval
from adadepth.model import Transformer
from adadepth.studies import leaderboard, recipes
from adadepth.studies.runner import run
from adadepth.studies.shape import StudyOptions


def test_realised_flops_are_counted_from_the_decisions_that_ran() -> None:
    """Force a known pattern (first controlled layer all full, second all cheap) and check the
    fraction the leaderboard reads against the closed form."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=64)
    model = RoutedModel(Transformer(cfg), RoutingConfig(gate="g1", d_z=8, aux=[])).eval()
    model.calibrate([torch.randint(0, 30, (4, 16))])
    windows = torch.randint(0, 30, (3, 17), generator=torch.Generator().manual_seed(1))
    forced = Call(forced={model.layers[0]: True, model.layers[1]: False})
    _, fraction, summary, depth = decode_eval(model, windows, call=forced)
    context = fl.causal_context(16)
    dense = fl.forward_per_token(cfg, context)
    cheap = fl.module_flops(model.routers[1].cheap)
    # layer 2's FFN is replaced by its cheap path; forced layers run no gate
    expected = (sum(dense.values()) - dense["ffn"] / cfg.n_layers + cheap) / sum(dense.values())
    assert fraction == pytest.approx(expected, rel=1e-9)
    assert summary["full_fraction_per_layer"] == [1.0, 0.0]
    assert torch.equal(depth[0], torch.ones(3, 16))  # one full-path layer per token


def run_leaderboard(out: Path, methods: list[str], budgets: tuple[float, ...] | None = None
                    ) -> dict:
    options = StudyOptions(preset="toy", seeds=1, methods=tuple(methods), budgets=budgets,
                           show_progress=False)
    return run(leaderboard.Leaderboard(options), out)


@pytest.fixture
def toy_sizes(monkeypatch: pytest.MonkeyPatch) -> leaderboard.Preset:
    """A backbone of 40 steps and methods of 4 steps, on a few short windows."""
    recipe = recipes.Recipe("tiny-shakespeare", 32, 4, controller_steps=4, backbone_steps=40,
                            tokenizer="char")
    monkeypatch.setitem(recipes.RECIPES, "toy", recipe)
    preset = leaderboard.Preset("toy", steps=4, batch_size=4, windows=4, window_len=40,
                                decode_tokens=4, reps=1,
                                overrides=["train.eval_batches=1",
                                           "routing.calibration_windows=8"])
    monkeypatch.setitem(leaderboard.PRESETS, "toy", preset)
    monkeypatch.setitem(config.PRESETS, "toy", dict(d_model=32, n_layers=4, n_heads=2, d_ff=64,
                                                      max_seq_len=128))
    return preset


def test_a_resumed_leaderboard_gives_the_same_table(toy_sizes, tmp_path: Path) -> None:
    out = tmp_path / "lb"
    first = run_leaderboard(out, ["routing-g1", "random-routing"])
    table = (out / "report.md").read_text()
    rows = {(r["entry"], r["budget"]) for r in first["rows"]}
    assert rows == {("routing-g1", 0.5), ("routing-g1", 0.75), ("random-routing", 0.5),
                    ("random-routing", 0.75), ("all-cheap", None)}
    for r in first["rows"]:
        assert 0 < r["flops_fraction"] <= 1.0 and r["val_loss"] > 0
        if r["budget"] is not None:
            assert "decode_b1" in r["speed"] and r["speed"]["decode_b1"]["measured_speedup"] > 0
            assert r["training_flops"] > 0 and r["trainable_parameters"] > 0
    for png in ("quality_vs_cost.png", "where_compute_goes.png"):
        assert (out / png).stat().st_size > 5000
    (out / "report.md").unlink()
    again = run_leaderboard(out, ["routing-g1", "random-routing"])
    assert (out / "report.md").read_text() == table
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(first["rows"], sort_keys=True)


def test_every_other_method_trains_evaluates_and_benches(toy_sizes, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each non-routing entry on the shared backbone: trained, set to a budget through its own
    knob (or kept at its setting), evaluated as generation feeds it, and timed."""
    names = [e.name for e in leaderboard.ENTRIES if e.config["method"] != "routing"]
    assert {"mod", "static-skip", "calm", "layerskip-exit", "layerskip-spec", "ponder",
            "ensemble"} <= set(names)
    short = [dataclasses.replace(e, config={**e.config, "train": {"steps": 4}})
             if "train" in e.config else e for e in leaderboard.ENTRIES]
    monkeypatch.setattr(leaderboard, "ENTRIES", short)
    toy_sizes.overrides.extend(["calm.calibration_windows=4", "static-skip.calibration_windows=4",
                                "mod.capacity=0.5"])
    results = run_leaderboard(tmp_path / "lb", names, budgets=(0.75,))
    by_entry = {r["entry"]: r for r in results["rows"]}
    assert set(by_entry) == {*names, "all-cheap"}
    for name in names:
        row = by_entry[name]
        assert row["val_loss"] > 0 and row["flops_fraction"] > 0, name
        assert row["speed"]["decode_b8"]["measured_speedup"] > 0, name
        # static skipping trains nothing (it only measures influences)
        assert (row["training_flops"] > 0) == (name != "static-skip"), name
    for name in ("mod", "static-skip", "calm", "layerskip-exit"):
        assert by_entry[name]["budget"] == 0.75 and by_entry[name]["flops_fraction"] < 1, name
    assert by_entry["ponder"]["flops_fraction"] > 1  # pondering adds passes: above dense
    assert "calm" in (tmp_path / "lb" / "report.md").read_text()


@pytest.mark.parametrize("argv, match", [
    (["study", "leaderboard", "--methods", "routing-g1,warp-drive"], "unknown method"),
    (["study", "leaderboard", "--budgets", "0.5,1.5"], "budgets must lie in (0, 1]"),
    (["study", "leaderboard", "--preset", "huge"], "no recipe for preset"),
])
def test_bad_leaderboard_input(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str],
                               match: str) -> None:
    assert_user_error(capsys, *argv, "--out", tmp_path / "lb", match=match)
