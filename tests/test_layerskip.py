"""LayerSkip: self-speculative decoding is exactly the full model's greedy decoding at batch 1
and above, with the draft's K/V and states reused; the count of what ran is the blocks that
really ran; early-exit decoding is the first E blocks and the shared head; the training
schedules are the paper's; and runs train (from scratch or from a backbone), evaluate, bench
and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cache import backbone, tokens
from test_calm import assert_harness_scores_the_deployed_model, lively
from test_cli import assert_user_error
from torch import Tensor

from adadepth.cli import main
from adadepth.depth.exits import layer_states
from adadepth.depth.layerskip import LayerSkipConfig, LayerSkipModel, Speculator
from adadepth.depth.method import TrainingPlan
from adadepth.generate import generate
from adadepth.runs import load_run


def skip_model(name: str = "ours", **options) -> LayerSkipModel:
    return LayerSkipModel(lively(backbone(name)), LayerSkipConfig(**options)).eval()


@pytest.mark.parametrize("name", ["ours", "llama", "gpt2"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("exit_layer", [1, 2])
def test_self_speculative_greedy_decoding_is_the_full_models(name: str, batch: int,
                                                             exit_layer: int) -> None:
    model = skip_model(name, exit_layer=exit_layer, draft_tokens=3)
    prompt = tokens(batch, 5, seed=4)
    runner, m = model.measured()
    with torch.no_grad():
        expected = generate(model.backbone, prompt, 30, temperature=0.0)
        got = generate(runner, prompt, 30, temperature=0.0)
    assert torch.equal(got, expected)
    assert 0 <= m.summary()["acceptance_rate"] <= 1


def test_rows_accept_different_numbers_of_drafts() -> None:
    """The equality above is only worth something if drafts are both kept and rejected, by
    different rows in the same round (rows then sit at different positions)."""
    model = skip_model("ours", exit_layer=1, draft_tokens=3)
    kept: list[list[int]] = []
    observe = Speculator.observe

    def noting(self, accepted, active):
        kept.append(accepted[active].tolist())
        observe(self, accepted, active)

    prompt = tokens(3, 5, seed=4)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(Speculator, "observe", noting)
        expected = generate(model.backbone, prompt, 30, temperature=0.0)
        assert torch.equal(generate(model, prompt, 30, temperature=0.0), expected)
    assert any(len(set(row)) > 1 for row in kept)
    assert any(0 in row for row in kept) and any(3 in row for row in kept)


def counting(model: LayerSkipModel) -> dict[str, int]:
    """Count, independently of the method's tally, the token-blocks and head reads that run."""
    bb, seen = model.backbone, {"blocks": 0, "heads": 0}
    run_layer, unembed = bb.run_layer, bb.unembed

    def counted_layer(i: int, x: Tensor, ctx) -> Tensor:
        seen["blocks"] += x.shape[0] * x.shape[1]
        return run_layer(i, x, ctx)

    def counted_unembed(h: Tensor) -> Tensor:
        seen["heads"] += h.shape[0] * h.shape[1]
        return unembed(h)

    bb.run_layer, bb.unembed = counted_layer, counted_unembed
    bb.head = lambda h: counted_unembed(bb.final_norm(h))
    return seen


def test_the_measurement_counts_what_ran_drafts_verification_and_rejections() -> None:
    model = skip_model(exit_layer=1, draft_tokens=4)
    L, B, n = model.backbone.n_layers, 3, 20
    prompt = tokens(B, 5, seed=8)
    cache = model.new_cache(B, 5 + n + 5)
    row_rounds = []  # rows that took part in each round
    with torch.no_grad():
        logits = model(prompt, cache, 0).logits[:, -1]
        seen = counting(model)
        runner, m = model.measured()
        spec = runner.speculator
        observe = spec.observe
        spec.observe = lambda accepted, active: (row_rounds.append(int(active.sum())),
                                                 observe(accepted, active))
        from adadepth.generate import Sampler, speculative
        out = speculative(spec, cache, logits, 5, n, Sampler())
    t = m.tally
    summary = m.summary()
    produced = summary["tokens"]
    assert produced >= B * (n - 1)  # the first token came from the prompt's logits
    costs, context = model.costs, 10.0
    scores = 2 * 2.0 * context * model.cfg.n_heads * model.cfg.head_dim
    by_hand = (seen["blocks"] * (costs.layer + scores) + seen["heads"] * costs.head) / produced
    assert m.flops_per_token(context) == pytest.approx(by_hand)
    # every token of a round passes every block once: L * (drafts + 1) per row and round; rows
    # that have all their tokens leave the rounds and run nothing more
    assert seen["blocks"] == L * (t.get("drafted") + sum(row_rounds))
    assert len(row_rounds) == t.get("rounds") and row_rounds[-1] < B
    assert t.get("row_rounds") == sum(row_rounds)
    assert out.shape == (B, n)
    assert summary["acceptance_rate"] == pytest.approx(t.get("accepted") / t.get("drafted"))


def test_early_exit_decoding_is_the_first_blocks_and_the_shared_head() -> None:
    model = skip_model(decoding="early_exit", exit_layer=2)
    bb = model.backbone
    idx = tokens(2, 9)
    with torch.no_grad():
        x, ctx = bb.prepare(idx)
        for i in range(2):
            x = bb.run_layer(i, x, ctx)
        expected = bb.unembed(bb.final_norm(x))
        torch.testing.assert_close(model(idx).logits, expected)
        assert model.speculator is None
        out = generate(model, idx[:, :3], 8, temperature=0.0)
        cache = model.new_cache(2, 11)
        steps = [model(out[:, :3], cache, 0).logits]
        steps += [model(out[:, t:t + 1], cache, t).logits for t in range(3, 11)]
        torch.testing.assert_close(torch.cat(steps, 1), model(out).logits)
    assert torch.equal(model.dense_reference()(idx).logits, bb(idx).logits)


def test_training_schedules_are_the_papers() -> None:
    model = skip_model(p_max=0.2, curriculum="rotational", rotation=2)
    L = model.backbone.n_layers  # 3
    model.begin_training(TrainingPlan(11, 0, None))
    model.from_scratch = False  # continual pretraining: S(t) = 1
    rates = model.dropout_rates(0)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates[0] < rates[1] < rates[2]
    model.from_scratch = True  # from scratch: S(t) rises from 0 to 1
    assert model.dropout_rates(0) == [0.0] * L
    assert model.dropout_rates(10)[-1] == pytest.approx(0.2)
    assert 0 < model.dropout_rates(5)[-1] < 0.1  # exponential: below the linear midpoint
    # rotational, R = 2: even layers, then odd ones; the last layer always
    assert model.enabled_exits(0) == [0, 2] and model.enabled_exits(1) == [1, 2]
    model.options.curriculum = "gradual"  # from the last layer down, all by half of training
    assert model.enabled_exits(0) == [2] and model.enabled_exits(5) == [0, 1, 2]
    scales = model.loss_scales([0, 1, 2])
    assert sum(scales) == pytest.approx(1.0) and scales[0] < scales[1] < scales[2]


def test_layer_dropout_passes_skipped_rows_unchanged() -> None:
    bb = backbone("ours")
    idx = tokens(4, 6)
    kept = torch.tensor([0, 2])
    with torch.no_grad():
        states = layer_states(bb, idx, lambda layer: kept if layer == 1 else None)
        plain = layer_states(bb, idx)
    torch.testing.assert_close(states[0], plain[0])
    torch.testing.assert_close(states[1][kept], plain[1][kept])
    torch.testing.assert_close(states[1][[1, 3]], states[0][[1, 3]])  # skipped block 1


# -- runs, end to end -------------------------------------------------------------------------
SCRATCH = ["model.d_model=32", "model.n_layers=4", "model.d_ff=64", "data.block_size=16",
           "train.batch_size=4", "train.eval_batches=2", "train.eval_interval=4",
           "train.ckpt_interval=4", "optim.warmup_steps=0", "layerskip.p_max=0.5"]


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("layerskip") / "run"
    assert main(["fit", "--method", "layerskip", "--preset", "tiny", "--steps", "4",
                 "--out", str(out), *SCRATCH]) == 0
    return out


def test_a_run_from_scratch_trains_evaluates_benches_and_generates(
        scratch_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = json.loads((scratch_run / "metrics.json").read_text())
    assert len(metrics["exit_loss_per_layer"]) == 4
    rows = [json.loads(line) for line in (scratch_run / "metrics.jsonl").read_text().splitlines()]
    # S(t) told the length of training: 0 at the first step, p_max at the last
    assert rows[-1]["dropout_last_layer"] == pytest.approx(0.5)
    model = load_run(scratch_run).model
    assert isinstance(model, LayerSkipModel) and model.backbone_trained()
    assert main(["eval", str(scratch_run), "--batches", "2"]) == 0
    report = json.loads((scratch_run / "eval.json").read_text())
    assert report["decoding"] == "speculative" and report["flops_ratio"] == 1.0
    assert main(["bench", str(scratch_run), "--settings", "1,3", "--prefill-batch", "2",
                 "--prefill-len", "16", "--decode-batches", "1,2", "--decode-tokens", "6",
                 "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {(r["phase"], r["batch"], r["setting"]) for r in rows} == {
        (p, b, s) for p, b in (("prefill", 2), ("decode", 1), ("decode", 2)) for s in (1, 3)}
    for r in rows:
        if r["phase"] == "prefill":  # the prompt runs the full model: nothing to gain
            assert r["ideal_speedup"] == pytest.approx(1.0)
        else:
            assert 0 <= r["realised"]["acceptance_rate"] <= 1
    capsys.readouterr()
    assert main(["generate", str(scratch_run), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert '"acceptance_rate"' in capsys.readouterr().err
    assert_harness_scores_the_deployed_model(scratch_run, model)


def test_continued_pretraining_of_a_backbone(tiny_backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "continued"
    assert main(["fit", "--method", "layerskip", "--backbone", str(tiny_backbone), "--steps",
                 "2", "--out", str(out), "train.batch_size=4", "train.eval_batches=1",
                 "layerskip.decoding=early_exit", "layerskip.exit_layer=2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["flops_ratio"] < 0.7  # 2 of 4 blocks and the head
    model = load_run(out).model
    original = load_run(tiny_backbone).model
    changed = any(not torch.equal(a, b) for a, b in
                  zip(model.backbone.parameters(), original.parameters(), strict=True))
    assert changed  # continued pretraining trains the backbone itself


@pytest.mark.parametrize("argv, match", [
    (["fit", "--method", "layerskip", "--out", "x", "layerskip.exit_layer=0"], "exit_layer"),
    (["fit", "--method", "layerskip", "--out", "x", "layerskip.exit_layer=4"], "[1, 3]"),
    (["fit", "--method", "layerskip", "--out", "x", "layerskip.p_max=1.0"], "p_max"),
])
def test_bad_input(capsys: pytest.CaptureFixture, argv: list[str], match: str) -> None:
    assert_user_error(capsys, *argv, match=match)


def test_bench_refuses_draft_depths_outside_the_model(scratch_run: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    for bad in ("0", "4", "1.5"):
        assert_user_error(capsys, "bench", scratch_run, "--settings", bad, match="exit_layer")
