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
from adadepth.studies.leaderboard_report import anchors
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
    result = decode_eval(model, windows, call=forced)
    fraction, summary, depth = result.flops_fraction, result.summary, result.depth
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


def test_a_resumed_leaderboard_gives_the_same_report(toy_sizes, tmp_path: Path) -> None:
    """Every method at its trained setting and along its knob (five settings and the trained
    one), each point measured and timed against the backbone; the report opens with the speed
    at +1/+2/+5 % loss; a re-run resumes every measured point and writes the same report."""
    out = tmp_path / "lb"
    first = run_leaderboard(out, ["routing-g1", "random-routing"])
    report = (out / "report.md").read_text()
    runs = {r["entry"]: r for r in first["runs"]}
    assert set(runs) == {"routing-g1", "random-routing", "all-cheap"}
    for name in ("routing-g1", "random-routing"):
        points = runs[name]["points"]
        trained = [p for p in points if p["trained"]]
        assert len(trained) == 1 and trained[0]["setting"] == 0.5  # the budget it trained at
        assert runs[name]["trained_setting"] == 0.5 and len(points) >= 6
        assert {p["setting"] for p in points} >= {0.2, 0.4, 0.6, 0.8, 1.0, 0.5}
        for p in points:
            assert p["in_trained_range"] == (p["setting"] == 0.5)
            assert p["flops_fraction"] > 0 and p["val_loss"] > 0
            if name == "random-routing":  # random gates cost nothing: never above dense
                assert p["flops_fraction"] <= 1.0 + 1e-9
            assert p["speed"]["decode_b1"]["measured_speedup"] > 0
            parts = p["breakdown"]
            assert sum(parts.values()) == pytest.approx(p["flops_fraction"] - 1, abs=1e-9)
        assert runs[name]["training_flops"] > 0
    assert [p["trained"] for p in runs["all-cheap"]["points"]] == [True]
    assert report.index("at no more than +1 %") < report.index("frontier")
    assert "| routing-g1 |" in report and "**trained**" in report
    for png in ("quality_vs_speed.png", "where_compute_goes.png"):
        assert (out / png).stat().st_size > 5000
    (out / "report.md").unlink()
    again = run_leaderboard(out, ["routing-g1", "random-routing"])
    assert (out / "report.md").read_text() == report
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(first["runs"], sort_keys=True)


def test_every_other_method_trains_evaluates_and_benches(toy_sizes, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each non-routing entry on the shared backbone: trained, measured at its trained setting
    (and along its knob when it trades quality for compute), and timed."""
    names = [e.name for e in leaderboard.ENTRIES if e.config["method"] != "routing"]
    assert {"mod", "static-skip", "calm", "layerskip-exit", "layerskip-spec", "ponder",
            "ensemble", "mor", "router-tuning"} <= set(names)
    short = [dataclasses.replace(e, config={**e.config, "train": {"steps": 4}})
             if "train" in e.config else e for e in leaderboard.ENTRIES]
    monkeypatch.setattr(leaderboard, "ENTRIES", short)
    toy_sizes.overrides.extend(["calm.calibration_windows=4", "static-skip.calibration_windows=4",
                                "mod.capacity=0.5"])
    results = run_leaderboard(tmp_path / "lb", names, budgets=(0.75,))
    runs = {r["entry"]: r for r in results["runs"]}
    assert set(runs) == {*names, "all-cheap"}
    for name in names:
        points = runs[name]["points"]
        trained = [p for p in points if p["trained"]]
        assert len(trained) == 1, name
        assert trained[0]["val_loss"] > 0 and trained[0]["flops_fraction"] > 0, name
        assert trained[0]["speed"]["decode_b8"]["measured_speedup"] > 0, name
        # static skipping and the skip drafter train nothing (they measure and search)
        assert (runs[name]["training_flops"] > 0) == (
            name not in {"static-skip", "self-spec-skip"}), name
        frontier = runs[name]["group"] == "frontier"
        # five settings or more (the trained one may be one of them); an exit layer of a
        # 4-layer model has only three
        assert (len(points) >= (3 if name == "layerskip-exit" else 5)) == frontier, name
    assert min(p["flops_fraction"] for p in runs["static-skip"]["points"]) < 0.5
    assert trained_of(runs["ponder"])["flops_fraction"] > 1  # pondering adds passes
    assert "calm" in (tmp_path / "lb" / "report.md").read_text()


def trained_of(run: dict) -> dict:
    return next(p for p in run["points"] if p["trained"])


@pytest.mark.parametrize("argv, match", [
    (["study", "leaderboard", "--methods", "routing-g1,warp-drive"], "unknown method"),
    (["study", "leaderboard", "--budgets", "0.5,1.5"], "budgets must lie in (0, 1]"),
    (["study", "leaderboard", "--preset", "huge"], "no recipe for preset"),
])
def test_bad_leaderboard_input(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str],
                               match: str) -> None:
    assert_user_error(capsys, *argv, "--out", tmp_path / "lb", match=match)


# -- the pretrained-model leaderboard (the smollm2 preset) --------------------------------------
PRETRAINED = ["static-skip", "early-exit", "layerskip-exit", "calm", "self-spec-skip",
              "self-spec-exit", "router-tuning", "routing-g1", "ensemble"]


@pytest.fixture
def packaged(monkeypatch: pytest.MonkeyPatch, llama_dir: Path) -> Path:
    """The packaged backbone replaced by the tiny random Llama (no SmolLM2 conversion)."""
    from adadepth import hf

    monkeypatch.setattr(hf, "ensure_backbone", lambda name: llama_dir)
    return llama_dir


def test_the_smollm2_plan_adapts_the_packaged_backbone_and_never_trains_one(
        packaged: Path, tmp_path: Path) -> None:
    """Every entry of the pretrained list (no ponder, no routing floor) over the packaged
    backbone as it ships, tuned on smol-mix; training-free entries train nothing; each entry's
    sizes are the preset's; one seed unless --seeds is given; nothing pretrains, and the tiny
    preset keeps its own entries and three seeds."""
    study = leaderboard.Leaderboard(StudyOptions(preset="smollm2", show_progress=False))
    out = tmp_path / "lb"
    study.prepare(out)
    assert study.backbone == packaged and not (out / "backbone").exists()
    plan = study.plan(out, {})
    runs = {r.arm.name: r for r in plan}
    assert list(runs) == PRETRAINED and len(plan) == len(PRETRAINED)  # one seed by default
    preset = leaderboard.PRESETS["smollm2"]
    for name, r in runs.items():
        assert r.config["backbone"] == str(packaged), name
        assert r.config["data"] == {"corpus": "smol-mix", "block_size": preset.window_len}
        assert r.config["train"]["batch_size"] == preset.batch_size
    for name in ("static-skip", "early-exit", "calm"):  # training-free
        assert runs[name].config["train"]["steps"] == 0 or name == "static-skip", name
    assert runs["early-exit"].config["layerskip"]["decoding"] == "early_exit"
    for name, overrides in preset.entry_overrides.items():  # the preset sizes each entry
        for o in overrides:
            key, value = o.split("=", 1)
            section, option = key.split(".")
            assert str(runs[name].config[section][option]) == value, (name, o)
    from adadepth.jobs.fit import fit_config

    routing = fit_config(runs["routing-g1"].config).options
    assert routing["regime"] == "controller-only" and routing["cheap"] == "auto"
    assert routing["oracle_layers"] is None and routing["aux"] == ["util", "rank"]
    assert study.record()["backbone_recipe"] == {"packaged": "smollm2-135m"}
    assert leaderboard.Leaderboard(StudyOptions(preset="smollm2", seeds=2)).seeds == 2
    tiny = leaderboard.Leaderboard(StudyOptions(preset="tiny", show_progress=False))
    assert [e.name for e in tiny.entries] == [e.name for e in leaderboard.ENTRIES]
    assert tiny.seeds == 3
    assert "entries" not in leaderboard.PRESETS["tiny"].record()  # old folders still resume


def test_the_adaptation_budget_and_agreement_reach_results_and_report(
        packaged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At toy sizes on the tiny Llama: each run's budget (tokens, training and calibration
    seconds), greedy agreement with the dense model at every point (1 where every layer runs),
    and the out-of-domain loss at the trained setting, in results.json and the report."""
    base = leaderboard.PRESETS["smollm2"]
    toy = dataclasses.replace(
        base, windows=4, window_len=40, decode_tokens=4, reps=1, corpus="tiny-shakespeare",
        overrides=[*base.overrides, "train.eval_batches=1"],
        entry_overrides={"static-skip": ["static-skip.calibration_windows=4"],
                         "layerskip-exit": ["train.steps=2"]})
    monkeypatch.setitem(leaderboard.PRESETS, "smol-toy", toy)
    options = StudyOptions(preset="smol-toy", seeds=1, show_progress=False,
                           methods=("static-skip", "early-exit", "layerskip-exit"))
    results = run(leaderboard.Leaderboard(options), tmp_path / "lb")
    runs = {r["entry"]: r for r in results["runs"]}
    assert set(runs) == {"static-skip", "early-exit", "layerskip-exit"}
    assert runs["static-skip"]["budget"]["training_tokens"] == 0
    assert runs["early-exit"]["budget"]["training_tokens"] == 0
    assert runs["early-exit"]["steps"] == 0
    assert runs["layerskip-exit"]["budget"]["training_tokens"] == 2 * toy.batch_size * 40
    assert runs["layerskip-exit"]["budget"]["training_s"] > 0
    assert runs["static-skip"]["budget"]["calibration_s"] > 0
    for r in runs.values():
        for p in r["points"]:
            assert 0 <= p["agreement"] <= 1
        assert "tiny-shakespeare" in trained_of(r)["out_of_domain"]
    every_layer = next(p for p in runs["static-skip"]["points"] if p["setting"] == 1.0)
    assert every_layer["agreement"] == 1.0
    assert "predictions" not in results["dense"] and "out_of_domain" in results["dense"]
    report = (tmp_path / "lb" / "report.md").read_text()
    assert "## What adapting each method cost" in report and "0 (training-free)" in report
    assert "greedy agreement with dense" in report and "## Out of domain" in report
    assert "as it ships (no pretraining" in report
    papers = report.split("## Beside the papers' figures")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in papers.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "static-skip", "early-exit", "layerskip-exit"}
    assert "ShortGPT" in rows["static-skip"] and "no training" in rows["static-skip"]
    assert f"{2 * toy.batch_size * 40:,} training tokens" in rows["layerskip-exit"]


def test_a_reading_names_the_point_it_leans_on_and_calls_an_unchanged_one_noise() -> None:
    """Interpolated toward a point that removes nothing, the reading says that point's own
    speed is timing noise; a reading at a point that removes compute needs no such word."""
    def point(setting: float, loss: float, speed: float, removed: float) -> dict:
        return {"setting": setting, "val_loss": loss, "breakdown": {"layers skipped": removed},
                "speed": {"decode_b1": {"measured_speedup": speed}}}

    frontier = [{"points": [point(0.5, 2.2, 1.5, -0.3), point(1.0, 2.0, 1.02, 0.0)]}]
    said = anchors(frontier, 2.0, "decode_b1", 0.01)
    assert "interpolated from setting 1 at +0.0% loss, measured 1.02x" in said
    assert "timing noise" in said
    within = [{"points": [point(0.5, 2.01, 1.5, -0.3), point(1.0, 2.0, 1.02, 0.0)]}]
    assert anchors(within, 2.0, "decode_b1", 0.01) == ""  # a measured point that saves compute
