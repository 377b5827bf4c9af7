"""Static layer skipping: block influence, the FLOPs budget, the dense model at budget 1, no
K/V for skipped layers, cost accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cache import backbone, close, tokens
from test_cli import assert_user_error

from adadepth import flops as fl
from adadepth.cli import main
from adadepth.config import ModelConfig
from adadepth.depth.dispatch import Call
from adadepth.depth.static_skip import StaticSkip, StaticSkipConfig
from adadepth.errors import UserError
from adadepth.generate import generate
from adadepth.model import Transformer
from adadepth.runs import load_run

V = 40


def four_layers(idle: int | None = None) -> Transformer:
    """A 4-layer model; layer `idle` adds nothing to the residual stream (influence 0)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, d_ff=48,
                                    max_seq_len=64)).eval()
    if idle is not None:
        with torch.no_grad():
            model.blocks[idle].attn.o_proj.weight.zero_()
            model.blocks[idle].ffn.down_proj.weight.zero_()
    return model


def windows(n: int = 8, length: int = 24) -> torch.Tensor:
    return tokens(n, length, seed=5)


def test_budget_one_is_the_dense_model() -> None:
    bb = four_layers()
    model = StaticSkip(bb, StaticSkipConfig(budget=1.0)).eval()
    assert model.choose(windows(), 1.0) == []
    idx = tokens(2, 12)
    with torch.no_grad():
        assert torch.equal(model(idx).logits, bb(idx).logits)


def test_the_layer_that_changes_nothing_goes_first() -> None:
    model = StaticSkip(four_layers(idle=2), StaticSkipConfig(budget=0.75)).eval()
    assert model.choose(windows(), 0.75) == [2]
    assert model.influence[2].item() == pytest.approx(0.0, abs=1e-6)
    assert (model.influence[[0, 1, 3]] > 1e-3).all()
    kept = StaticSkip(four_layers(idle=2), StaticSkipConfig(keep=[2], selection="iterative"))
    chosen = kept.eval().choose(windows(), 0.5)
    assert len(chosen) == 2 and 2 not in chosen


def test_budget_rounding_and_an_unreachable_budget() -> None:
    bb = four_layers()
    ctx = fl.causal_context(24)
    dense = fl.forward_per_token(bb.cfg, ctx)
    per_layer = (sum(dense.values()) - dense["lm_head"]) / 4
    layer_share = per_layer / sum(dense.values())  # a little under 1/4: the head costs too
    nearest = StaticSkip(bb, StaticSkipConfig(budget_of="model"))
    at_most = StaticSkip(bb, StaticSkipConfig(rounding="at_most", budget_of="model"))
    assert nearest.skip_count(0.75, ctx) == 1 and at_most.skip_count(0.75, ctx) == 2
    assert at_most.skip_count(1 - layer_share, ctx) == 1
    assert nearest.skip_count(0.05, ctx) == 4
    of_stack = StaticSkip(bb, StaticSkipConfig(rounding="at_most"))  # a quarter is one layer
    assert of_stack.skip_count(0.75, ctx) == 1
    keep = StaticSkip(bb, StaticSkipConfig(rounding="at_most", keep=[0]))
    with pytest.raises(UserError, match="cannot be met"):
        keep.skip_count(0.2, ctx)


@pytest.mark.parametrize("name", ["ours", "llama", "gpt2"])
def test_skipped_layers_write_no_kv_and_cached_generation_equals_recomputation(name: str) -> None:
    bb = backbone(name)
    model = StaticSkip(bb, StaticSkipConfig(budget=0.7)).eval()
    skipped = model.choose(windows(), 0.7)
    assert skipped
    prompt = tokens(3, 5, seed=2)
    with torch.no_grad():
        cached = generate(model, prompt, 8, temperature=0.0)
        assert torch.equal(cached, generate(model, prompt, 8, temperature=0.0, use_cache=False))
        cache = model.new_cache(3, 13)
        full = model(cached).logits
        close(model(cached, cache, 0).logits, full)
    for layer in range(bb.n_layers):
        assert bool(cache.valid[layer, :, :13].any()) == (layer not in skipped)


def test_measure_counts_the_layers_run_and_save_load_keeps_them() -> None:
    model = StaticSkip(four_layers(idle=1), StaticSkipConfig(budget=0.5)).eval()
    model.choose(windows(), 0.5)
    ctx = fl.causal_context(10)
    dense = fl.forward_per_token(model.cfg, ctx)
    per_layer = (sum(dense.values()) - dense["lm_head"]) / 4
    runner, m = model.measured()
    with torch.no_grad():
        runner(tokens(2, 10))
    assert m.summary()["layers_run"] == 2
    assert m.flops_per_token(ctx) == pytest.approx(dense["lm_head"] + 2 * per_layer)
    depth: list = []
    runner, m = model.measured(Call(force=True, depth=depth))  # the dense reference
    with torch.no_grad():
        runner(tokens(2, 10))
    assert m.flops_per_token(ctx) == pytest.approx(model.reference_flops_per_token(ctx))
    assert depth[0].unique().tolist() == [4]
    loaded = StaticSkip(four_layers(idle=1), StaticSkipConfig(budget=0.5))
    loaded.load_method_state(model.method_state())
    assert loaded.skipped_layers() == model.skipped_layers() and len(loaded.kept) == 2


def test_nothing_trains_and_a_one_layer_backbone_is_refused() -> None:
    model = StaticSkip(four_layers(), StaticSkipConfig())
    model.set_trainable(from_scratch=False)
    assert model.trainable_parameters() == 0
    with pytest.raises(UserError, match="--backbone"):
        model.set_trainable(from_scratch=True)
    one = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=48))
    with pytest.raises(UserError, match="2 or more layers"):
        StaticSkip(one, StaticSkipConfig())


# -- the method end to end -------------------------------------------------------------------
QUICK = ["train.batch_size=4", "train.eval_batches=2"]


def test_fit_calibrates_and_eval_generate_bench_serve_the_run(
        tiny_backbone: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "skip"
    assert main(["fit", "--method", "static-skip", "--backbone", str(tiny_backbone),
                 "--out", str(out), "static-skip.budget=0.75", *QUICK]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 0 and metrics["trainable_parameters"] == 0
    assert len(metrics["skipped_layers"]) == 1 and 0.7 < metrics["flops_fraction"] < 0.8
    model = load_run(out).model
    assert isinstance(model, StaticSkip) and model.skipped_layers() == metrics["skipped_layers"]
    assert main(["eval", str(out), "--batches", "2"]) == 0
    assert json.loads((out / "eval.json").read_text())["kind"] == "static-skip"
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5"]) == 0
    assert '"layers_run": 3' in capsys.readouterr().err
    bench = tmp_path / "bench"
    assert main(["bench", str(out), "--settings", "1.0,0.5", "--prefill-batch", "2",
                 "--prefill-len", "32", "--decode-batches", "1,2", "--decode-tokens", "4",
                 "--reps", "1", "--out", str(bench)]) == 0
    rows = json.loads((bench / "bench.json").read_text())["rows"]
    assert len(rows) == 6
    for r in rows:
        expected = 1.0 if r["budget"] == 1.0 else 4 / 2
        assert r["ideal_speedup"] == pytest.approx(expected, rel=0.05)
        assert r["realised"]["layers_run"] == (4 if r["budget"] == 1.0 else 2)


@pytest.mark.parametrize("argv, match", [
    (["fit", "--method", "static-skip", "--out", "x", "static-skip.budget=0"], "budget"),
    (["fit", "--method", "static-skip", "--out", "x", "static-skip.budget=1.5"], "budget"),
    (["fit", "--method", "static-skip", "--preset", "tiny", "--out", "x",
      "model.d_model=32", "model.d_ff=64"], "--backbone"),
])
def test_bad_static_skip_input(capsys: pytest.CaptureFixture, argv: list[str],
                               match: str) -> None:
    assert_user_error(capsys, *argv, match=match)


def test_the_leaderboard_reads_flops_from_what_ran() -> None:
    from adadepth.eval import decode_eval

    model = StaticSkip(four_layers(), StaticSkipConfig()).eval()
    model.set_skipped([1, 3])
    result = decode_eval(model, tokens(3, 17, seed=6))
    fraction, summary, depth = result.flops_fraction, result.summary, result.depth
    dense = fl.forward_per_token(model.cfg, fl.causal_context(16))
    total = sum(dense.values())
    assert fraction == pytest.approx((dense["lm_head"] + (total - dense["lm_head"]) / 2) / total)
    assert summary["layers_run"] == 2 and torch.equal(depth[0], torch.full((3, 16), 2))


def test_a_budget_means_the_layer_stack_when_the_head_dominates() -> None:
    """A large vocabulary at a small width: the head is most of the FLOPs. A budget of 0.75
    skips a quarter of the layer stack (the default, what a user means), where a budget of the
    whole model would skip nearly every layer; reports give both fractions."""
    cfg = ModelConfig(vocab_size=20_000, d_model=32, n_layers=8, n_heads=4, d_ff=64,
                      max_seq_len=64)
    dense = fl.forward_per_token(cfg, fl.causal_context(16))
    assert dense["lm_head"] > 0.6 * sum(dense.values())
    stack = StaticSkip(Transformer(cfg), StaticSkipConfig(budget=0.75))
    whole = StaticSkip(Transformer(cfg), StaticSkipConfig(budget=0.75, budget_of="model"))
    assert stack.skip_count(0.75, fl.causal_context(16)) == 2
    assert whole.skip_count(0.75, fl.causal_context(16)) == 8
    stack.set_skipped([1, 2])
    fractions = stack.fractions(fl.causal_context(16))
    assert fractions["flops_fraction_stack"] == pytest.approx(0.75)
    assert 0.9 < fractions["flops_fraction"] < 1.0
