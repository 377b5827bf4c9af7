"""Every study report judges its findings by the one rule of protocol.py, and the aux-loss report
compares learned routing with random routing at equal realised inference FLOPs: on hand-made
results, and the closed form the study plans its matched random arms by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adadepth import flops as fl
from adadepth.cli import main
from adadepth.config import ModelConfig
from adadepth.depth.routing import RoutedModel, RoutingConfig
from adadepth.model import Transformer
from adadepth.studies import equal_flops
from adadepth.studies.aux_losses import AuxLosses
from adadepth.studies.ensemble_report import paper_comparison
from adadepth.studies.findings import scales_table
from adadepth.studies.ponder_report import findings as ponder_findings
from adadepth.studies.protocol import RULE
from adadepth.studies.shape import StudyOptions
from adadepth.studies.stats import by_arm, read_along
from adadepth.train import checkpoint as ck

# Per-seed differences (> 0 supports the claim): every seed agrees but the mean is within two
# standard errors (the small aux-loss study's "G3 lower average LM than G1"); one seed
# disagrees; clear.
WITHIN_NOISE = [0.0004, 0.0006, 0.0066]
ONE_DISAGREES = [0.010, -0.001, 0.012]
CLEAR = [0.010, 0.012, 0.011]


def aux_run(arm: str, seed: int, val: float, **extra) -> dict:
    return {"arm": arm, "seed": seed, "val_lm_causal": val, "avg_lm": val, "best_lm": val,
            "lm_curve": [val] * 8, "grad_norm_mean": 1.0, "flops_proxy": 1.0,
            "prediction_variance": None, **extra}


@pytest.mark.parametrize("diffs, said", [(WITHIN_NOISE, "within noise"),
                                         (ONE_DISAGREES, "within noise"),
                                         (CLEAR, "reproduced"),
                                         ([-d for d in CLEAR], "contradicted")])
def test_the_aux_loss_report_judges_a_finding_by_the_rule(diffs: list[float], said: str) -> None:
    """'G3 lower average LM than G1': G1's avg LM − G3's per seed, whatever the seed count."""
    runs = [aux_run("G1", s, 2.0) for s in range(3)]
    runs += [aux_run("G3", s, 2.0 - d) for s, d in enumerate(diffs)]
    row = next(line for line in scales_table({"tiny": by_arm(runs)})
               if line.startswith("| G3 lower average LM"))
    cell = [c.strip() for c in row.strip("|").split("|")][2]
    assert cell.endswith(f"**{said}**"), cell
    assert "per seed: " + ", ".join(f"{d:+.4f}" for d in diffs) in cell


def ponder_arm(arm: str, seed: int, loss: float, passes: float) -> dict:
    return {"arm": arm, "seed": seed, "val_loss": loss, "avg_passes": passes,
            "flops_vs_backbone": passes, "group": "ada"}


def test_the_ponder_report_judges_a_finding_of_two_parts_by_the_rule() -> None:
    """The kept ponder study's 'one shared gate is unstable': the loss gaps agree in sign but are
    within noise, so the finding is, even where the spread of passes over seeds is clear."""
    gaps = [0.0003, 0.0049, 0.0014]
    runs = [ponder_arm("AdaPonderLM", s, 2.0, 3.3 + 0.01 * s) for s in range(3)]
    runs += [ponder_arm("Ada-shared-gate", s, 2.0 + g, p)
             for s, (g, p) in enumerate(zip(gaps, (2.0, 3.0, 2.6), strict=True))]
    row = next(line for line in ponder_findings(by_arm(runs), {"savings": [], "diffs": []},
                                                {"uniform": [], "geometric": []}, [])
               if "shared gate" in line)
    assert "+0.0003, +0.0049, +0.0014 nats" in row
    assert "(within noise)" in row and "(reproduced)" in row  # loss, then spread
    assert row.endswith("| within noise |")


def test_the_ensemble_report_judges_one_seed_the_other_way_as_within_noise() -> None:
    losses = {"lora": [2.0, 2.0, 2.0], "ensemble+lora": [2.01, 2.0096, 1.99999]}
    runs = [{"arm": a, "seed": s, "val_loss": v, "val_accuracy": 0.5}
            for a, vs in losses.items() for s, v in enumerate(vs)]
    row = next(line for line in paper_comparison(by_arm(runs), {"val_loss": 2.5})
               if "improves it" in line)
    assert "ensemble+lora below LoRA's validation loss in 1/3 seeds" in row
    assert row.endswith("| within noise |")


def test_every_report_states_the_rule_once_near_its_top(tmp_path: Path) -> None:
    kept = Path(__file__).resolve().parents[1] / "docs" / "studies"
    for name in ("aux-losses-tiny", "aux-losses-small", "ponder-tiny", "ensemble-tiny"):
        report = (kept / name / "report.md").read_text()
        assert report.count(RULE) == 1, name
        assert report.index(RULE) < report.index("\n## "), name  # before the first section
        for word in ("**yes**", "**partly", "**no**", "| partly |", "| yes |"):
            assert word not in report, (name, word)


# -- equal inference FLOPs ---------------------------------------------------------------------
# Hand-made costs: per controlled layer an FFN of 100 FLOPs, a cheap path of 10, gates of 20
# (G1) and 60 (G3), two controlled layers and a dense model of 600 FLOPs per token. All-cheap
# then costs 1 - 2 * 90 / 600 = 0.7 of dense; random routing at budget b, 0.7 + 0.3 b; G1 at a
# full fraction of 0.5, 1 + (2 * 20 - 90) / 600; G3, 1 + (2 * 60 - 90) / 600 = 1.05.
COSTS = {"ffn": 100.0, "cheap": 10.0, "cheap_kind": "low_rank", "layers": 2,
         "gates": {"g1": 20.0, "g3": 60.0}, "source": "hand-made"}
G1_FLOPS, G3_FLOPS = 1 + (40 - 90) / 600, 1.05


def routed(arm: str, seed: int, gate: str, budget: float, fraction: float, flops: float,
           val: float, group: str = "main") -> dict:
    """A run with everything the aux-loss report reads."""
    return {**aux_run(arm, seed, val), "gate": gate, "budget": budget, "group": group,
            "flops_ratio_inference": flops, "full_fraction_causal": [fraction, fraction],
            "full_fraction_train": [fraction, fraction], "controlled_layers": [1, 2],
            "endpoint_lm": val, "threshold_hits": {"+0.1": 3}, "grad_norm_curve": [1.0] * 8,
            "wall_s": 1.0}


def hand_made(seeds: int = 3) -> dict:
    runs = []
    for s in range(seeds):
        jitter = 0.001 * s
        runs += [routed("G1", s, "g1", 0.5, 0.5, G1_FLOPS, 1.25 + jitter),
                 routed("G3", s, "g3", 0.5, 0.5, G3_FLOPS, 1.2 + jitter),
                 routed("random", s, "random", 0.5, 0.5, 0.85, 1.5, "baseline"),
                 routed("all-full", s, "all-full", 0.5, 1.0, 1.0, 1.0, "baseline"),
                 routed("all-cheap", s, "all-cheap", 0.5, 0.0, 0.7, 2.0, "baseline")]
    return {"preset": "tiny", "seeds": seeds, "steps": 8, "recipe": {}, "costs": COSTS,
            "backbone": {"name": "hand-made", "pretrained_by_study": False,
                         "description": "hand-made"}, "runs": runs}


def test_random_routing_is_read_at_a_learned_arms_flops_never_extrapolated() -> None:
    points = [(0.7, 2.0), (0.85, 1.5), (1.0, 1.0)]
    assert read_along(points, 0.85, 0.005) == (1.5, "measured")
    assert read_along(points, 0.853, 0.005) == (1.5, "measured")  # within the tolerance
    loss, how = read_along(points, 0.925, 0.005)
    assert how == "interpolated" and loss == pytest.approx(1.25)
    assert read_along(points, 1.05, 0.005) is None and read_along(points, 0.6, 0.005) is None


def test_equal_flops_recovery_is_against_random_at_matched_flops(tmp_path: Path) -> None:
    arms = by_arm(hand_made()["runs"])
    # G1 costs 0.9167 of dense: between random at 0.5 (0.85, loss 1.5) and all-full (1.0,
    # loss 1.0), 0.0667 / 0.15 of the way: random's loss there 1.5 - 0.444 x 0.5 = 1.2778.
    reads = equal_flops.random_at_flops(arms, "G1")
    expected = 1.5 + (G1_FLOPS - 0.85) / 0.15 * (1.0 - 1.5)
    assert {s: how for s, (_, how) in reads.items()} == {0: "interpolated", 1: "interpolated",
                                                          2: "interpolated"}
    assert reads[0][0] == pytest.approx(expected)
    assert equal_flops.random_at_flops(arms, "G3") == {}  # costs more than the dense model
    table = equal_flops.equal_cost_table(arms)
    row = next(r for r in table if r.startswith("| G1 "))
    g1 = [c.strip() for c in row.strip("|").split("|")]
    # At equal full fraction G1 (loss 1.25) beats random (1.5) by 0.25 in every seed; at equal
    # FLOPs by only 1.2778 - 1.25 = 0.0278 (less the jitter): random's budget there, 0.722.
    assert g1[5] == "50.0 ± 0.0 %" and g1[6].startswith("+0.2500, +0.2490, +0.2480 (")
    assert g1[7] == f"{(G1_FLOPS - 0.7) / 0.3:.3f}"
    assert g1[8].startswith(f"{100 * (2.0 - expected):.1f} ± 0.0 % (interpolated)")
    assert g1[9].startswith(f"{expected - 1.25:+.4f}") and g1[9].endswith("**reproduced**")
    g3 = next(r for r in table if r.startswith("| G3 "))
    assert "no random budget costs as much: the arm costs 1.05x" in g3
    assert equal_flops.saves_nothing(arms) == [
        "- G3 at its trained budget (0.5) costs 1.05x the dense model's FLOPs: it saves "
        "nothing.", ""]

    # The whole report, from the hand-made results.json alone.
    ck.write_json_atomic(tmp_path / "results.json", hand_made())
    assert main(["study", "aux-losses", "--report-only", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| G1 | 0.5 |" in report and "(interpolated)" in report
    words = next(line for line in report.splitlines() if "Where the inference FLOPs go" in line)
    for said in ("an FFN of 100 FLOPs", "random routing at budget b costs 0.700 + b x 0.300",
                 "G1's gate costs 20 FLOPs per layer (20% of the FFN it may replace), so it saves "
                 "FLOPs at a layer only where more than 22% of the tokens go cheap",
                 f"still costs {0.7 + 2 * 20 / 600:.3f} of the dense model",
                 "G3's gate costs 60 FLOPs per layer (60% of the FFN"):
        assert said in words, said
    assert (tmp_path / "quality_vs_inference_flops.png").stat().st_size > 1000


def test_costs_that_miss_the_recorded_flops_are_not_decomposed() -> None:
    arms = by_arm(hand_made()["runs"])
    wrong = {**COSTS, "gates": {"g1": 30.0, "g3": 60.0}}  # G1's recorded FLOPs say 20
    assert "not decomposed" in equal_flops.cost_words(arms, wrong)[0]
    assert "not decomposed" in equal_flops.cost_words(arms, None)[0]


# -- the matched random arms of a new study ----------------------------------------------------
CFG = ModelConfig(vocab_size=37, d_model=64, n_layers=4, n_heads=4, d_ff=256, max_seq_len=64)


def flops_of(gate: str, fractions: list[float], budget: float = 0.5) -> float:
    model = RoutedModel(Transformer(CFG), RoutingConfig(gate=gate, budget=budget,
                                                        cheap="low_rank", aux=[]))
    ctx = fl.causal_context(64)
    return model.inference_flops_per_token(ctx, fractions) / model.reference_flops_per_token(ctx)


def test_the_matched_random_arm_realises_the_learned_arms_flops(tmp_path: Path) -> None:
    g1, g3 = flops_of("g1", [0.48, 0.53]), flops_of("g3", [0.5, 0.5])
    cheap = flops_of("all-cheap", [0.0, 0.0])
    assert g1 < 1 < g3  # G3's gate costs more than it saves here
    folder = tmp_path / "runs"
    done = {folder / f"{name}-seed0": {"flops_ratio_inference": v, "gate": gate}
            for name, gate, v in (("G1", "g1", g1), ("G3", "g3", g3),
                                  ("all-cheap", "all-cheap", cheap))}
    study = AuxLosses(StudyOptions(seeds=1, device="cpu", show_progress=False))
    assert not [r for r in study.plan(tmp_path, {}) if r.arm.group == "matched"]  # waits
    matched = [r for r in study.plan(tmp_path, done) if r.arm.group == "matched"]
    assert [r.name for r in matched] == ["random@G1-seed0"]  # none matches G3's FLOPs
    routing = matched[0].config["routing"]
    assert routing["gate"] == "random" and routing["aux"] == []
    b = routing["budget"]
    # Random gates cost nothing: at budget b random routing realises G1's FLOPs.
    assert flops_of("random", [b, b], budget=b) == pytest.approx(g1, abs=1e-4)
    assert equal_flops.matched_budget(g3, cheap) is None
    assert equal_flops.matched_budget(cheap - 0.01, cheap) is None


def test_the_kept_reports_routing_costs_give_their_recorded_flops() -> None:
    """The kept aux-loss studies did not record their costs: rebuilt from the preset's shape,
    they give every run's recorded inference FLOPs (the report shows them only if so)."""
    kept = Path(__file__).resolve().parents[1] / "docs" / "studies"
    for preset in ("tiny", "small"):
        results = json.loads((kept / f"aux-losses-{preset}" / "results.json").read_text())
        costs = equal_flops.preset_costs(results)
        assert costs is not None and costs["cheap_kind"] == "low_rank"
        words = equal_flops.cost_words(by_arm(results["runs"]), costs)[0]
        assert words.startswith("**Where the inference FLOPs go.**"), words
