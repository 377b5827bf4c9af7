"""Mixture-of-Depths: the router-scaled block, blocks run on the selected tokens alone, causal
decisions, K/V of skipped tokens, cost accounting. Each mechanism runs on our transformer and on
Hugging Face families, through the layer-stack interface only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from causality import assert_causal, assert_decodable, assert_round_trip, fed_in_steps
from test_cache import BACKBONES, V, backbone, close, random_routers, tokens
from test_cli import assert_user_error, serve

import adadepth
from adadepth import flops as fl
from adadepth.cli import main
from adadepth.config import ModelConfig
from adadepth.depth.dispatch import Call
from adadepth.depth.mod import MixtureOfDepths, MoDConfig
from adadepth.errors import UserError
from adadepth.generate import generate
from adadepth.model import Context, Transformer
from adadepth.runs import load_run


def mod_model(name: str = "ours", seed: int = 0, **options) -> MixtureOfDepths:
    """A MoD model over a test backbone with random routers and predictors, calibrated."""
    return random_routers(MixtureOfDepths(backbone(name, seed), MoDConfig(**options)).eval(), seed)


def run_masks(model: MixtureOfDepths, idx, cache=None, start: int = 0, **call):
    """The logits of a forward and each routed block's decisions in it."""
    records: dict = {}
    logits = model(idx, cache, start, call=Call(records=records, **call)).logits
    return logits, [records["mask", j] for j in range(len(model.layers))]


def mod_decisions(model: MixtureOfDepths, **call):
    """Which routed blocks each token ran, (B, T, routed blocks)."""

    def decide(idx, cache=None, start=0):
        with torch.no_grad():
            return torch.stack(run_masks(model, idx, cache, start, **call)[1], -1)

    return decide


def by_hand(model: MixtureOfDepths, idx: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """The MoD forward written out: at a routed block each row's selected tokens run the block
    as a sequence of their own, at their original positions, and add r * (block - input)."""
    bb = model.backbone
    x, ctx = bb.prepare(idx)
    j = 0
    for layer in range(bb.n_layers):
        if layer not in model.layers:
            x = bb.run_layer(layer, x, ctx)
            continue
        new = x.clone()
        for b in range(idx.shape[0]):
            chosen = masks[j][b].nonzero().squeeze(1)
            if len(chosen) == 0:
                continue
            sub = x[b:b + 1, chosen]
            out = bb.run_layer(layer, sub, Context.at(chosen.unsqueeze(0)))
            r = model.routers[j].linear(sub).squeeze(-1)
            new[b, chosen] = (sub + r.unsqueeze(-1) * (out - sub))[0]
        x, j = new, j + 1
    return bb.head(x)


def test_capacity_one_equals_the_dense_model_with_router_scaled_blocks() -> None:
    """x + r * (attention + MLP): the router scales the block's residual update, not its
    output; the training (top-k) and inference paths agree at capacity 1."""
    model = mod_model(capacity=1.0)
    bb: Transformer = model.backbone
    idx = tokens(2, 10)
    with torch.no_grad():
        x, ctx = bb.prepare(idx)
        cos, sin = bb.rope(ctx)
        for layer, block in enumerate(bb.blocks):
            attn = block.attn(block.attn_norm(x), cos, sin, ctx, layer)
            ffn = block.ffn(block.ffn_norm(x + attn))
            r = 1.0
            if layer in model.layers:
                r = model.routers[model.layers.index(layer)].linear(x)
            x = x + r * (attn + ffn)
        expected = bb.head(x)
        close(model(idx).logits, expected)
        model.train()
        close(model(idx).logits, expected)


def test_a_fresh_model_is_its_backbone() -> None:
    """The router starts at r = 1 for every token: at capacity 1 a retrofit starts from the
    pretrained function (x + 1 * (block(x) - x), equal up to rounding)."""
    bb = backbone("llama")
    model = MixtureOfDepths(bb, MoDConfig(capacity=1.0)).eval()
    idx = tokens(2, 9)
    with torch.no_grad():
        close(model(idx).logits, bb(idx).logits, 1e-6)


@pytest.mark.parametrize("name", ["ours", "llama", "gpt2"])
@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_a_routed_block_runs_on_the_selected_tokens_alone(name: str, mode: str) -> None:
    """Top-k (training) and causal (ragged: rows choose different numbers) selections equal the
    block run on each row's selected tokens as a sequence of their own."""
    model = mod_model(name, capacity=0.4, layers="all")
    idx = tokens(3, 14)
    with torch.no_grad():
        got, masks = run_masks(model, idx, rule=mode)
        close(got, by_hand(model, idx, masks), 2e-5)
    counts = torch.stack(masks).sum(-1)
    if mode == "topk":
        assert (counts == 6).all()  # ceil(0.4 * 14) per row
    else:
        assert len(set(counts.flatten().tolist())) > 1  # ragged: the padded path ran


@pytest.mark.parametrize("name", BACKBONES)
def test_cached_generation_with_skipped_blocks_equals_recomputation(name: str) -> None:
    """Batch 3: a ragged prefill and then one token per step, each skipped token writing no K/V
    at its skipped blocks, gives the logits and the greedy text of the uncached model."""
    model = mod_model(name, capacity=0.5, layers="all")
    idx = tokens(3, 16, seed=2)
    with torch.no_grad():
        full, masks = run_masks(model, idx)
        stepped, cache = fed_in_steps(model, idx, 6)
        close(stepped, full, 2e-5)
        for j, layer in enumerate(model.layers):  # K/V exactly where the block ran
            assert torch.equal(cache.valid[layer, :, :16], masks[j])
        prompt = idx[:, :5]
        cached = generate(model, prompt, 8, temperature=0.0)
        recomputed = generate(model, prompt, 8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("causal", ["predictor", "aux_loss"])
@pytest.mark.parametrize("threshold", ["calibrated", "half"])
def test_every_causal_decision_is_causal(causal: str, threshold: str) -> None:
    model = mod_model("llama", capacity=0.3, layers="all", causal=causal, threshold=threshold)
    idx = tokens(3, 30, seed=3)
    assert_decodable(model, mod_decisions(model), idx, V, (1, 12, 29), prefill=7)


def test_the_causality_check_catches_top_k() -> None:
    """The check can fail: top-k over the sequence looks ahead."""
    model = mod_model(capacity=0.3, layers="all")
    with pytest.raises(AssertionError, match="depend on later tokens"):
        assert_causal(mod_decisions(model, rule="topk"), tokens(3, 30, seed=3), V, 10)


@pytest.mark.parametrize("control", ["online", "fixed"])
def test_online_thresholds_hold_the_capacity_on_shifted_text(control: str) -> None:
    """Calibrated on one text, decoding text whose scores all moved by one spread: the realised
    capacity stays on the setting with routing's controller (reused), not without it."""
    torch.manual_seed(0)
    long = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                                   max_seq_len=256)).eval()
    model = MixtureOfDepths(long, MoDConfig(capacity=0.25, threshold_control=control)).eval()
    with torch.no_grad():
        model.routers[0].linear.weight.normal_()
        model.calibrate(tokens(16, 64, seed=5))
        model.routers[0].predictor.net[-1].bias += model.routers[0].rule.spread
        runner, m = model.measured()
        runner(tokens(4, 256, seed=8))
    worst = max(abs(f - 0.25) for f in m.summary()["capacity_per_layer"])
    assert (worst <= 0.02) == (control == "online"), worst


def test_measure_counts_what_ran() -> None:
    """Forced patterns: top-k with k per row known, then everyone and nobody; with a cache, the
    keys each selected token attended to are counted from what the cache held."""
    model = mod_model(capacity=0.5)  # 3 layers: block 1 routed
    cfg, T = model.cfg, 10
    ctx = fl.causal_context(T)
    attn = fl.attention(cfg, ctx)
    layer = attn["attn_proj"] + fl.ffn(cfg)
    head, router = fl.linear(cfg.d_model, cfg.vocab_size), fl.linear(cfg.d_model, 1)
    dense = sum(fl.forward_per_token(cfg, ctx).values())
    runner, m = model.measured(Call(rule="topk"))
    with torch.no_grad():
        runner(tokens(2, T))
    keys = sum(range(1, 6)) / sum(range(1, T + 1))  # the i-th of 5 selected sees i keys
    expected = head + 2 * (layer + attn["attn_scores"]) + 0.5 * layer \
        + keys * attn["attn_scores"] + router
    assert m.flops_per_token(ctx) == pytest.approx(expected)
    assert m.summary()["realised_capacity"] == 0.5
    runner, m = model.measured(Call(force=True))  # the dense reference
    with torch.no_grad():
        runner(tokens(2, T))
    assert m.flops_per_token(ctx) == pytest.approx(model.reference_flops_per_token(ctx))
    assert model.reference_flops_per_token(ctx) == pytest.approx(dense + router)
    runner, m = model.measured(Call(force=False))
    with torch.no_grad():
        runner(tokens(2, T))
    assert m.flops_per_token(ctx) == pytest.approx(dense - layer - attn["attn_scores"])
    idx = tokens(2, 12, seed=4)  # cached decoding: count keys from the cache's validity
    runner, m = model.measured()
    _, cache = fed_in_steps(runner, idx, 4)
    valid = cache.valid[1, :, :12]
    attended = sum(valid[b, :p + 1].sum().item() for b in range(2) for p in range(12)
                   if valid[b, p])
    summary = m.summary()
    assert summary["capacity_per_layer"][0] == pytest.approx(valid.float().mean().item())
    ctx = 6.5  # mean keys a dense query sees over positions 0..11
    per_key = fl.attention(cfg, 1.0)["attn_scores"]
    expected = head + 2 * (layer + fl.attention(cfg, ctx)["attn_scores"]) \
        + valid.float().mean().item() * (layer + router) \
        + attended / 24 * per_key + fl.module_flops(model.routers[0].predictor)
    assert m.flops_per_token(ctx) == pytest.approx(expected)


def test_the_predictor_learns_top_k_membership_behind_a_stop_gradient() -> None:
    """Its BCE reaches the predictor alone, even when the backbone trains: it leaves the LM
    objective as it is (the paper's second method)."""
    model = mod_model(capacity=0.25)
    model.set_trainable(from_scratch=False)  # joint: everything requires grad
    model.train()
    idx = tokens(2, 17)
    records: dict = {}
    model(idx, call=Call(records=records))
    targets = [v for k, v in records.items() if k[0] == "target"]
    assert len(targets) == len(model.layers)
    bce = sum(F.binary_cross_entropy_with_logits(s, m.float()) for s, m in targets)
    bce.backward()
    assert model.routers[0].predictor.net[0].weight.grad.abs().sum() > 0
    assert model.routers[0].linear.weight.grad is None
    assert all(p.grad is None for p in model.backbone.parameters())


def test_training_loss_adds_the_causal_bce_to_the_lm_loss() -> None:
    """aux_loss: the router's own BCE (the paper's first method) joins the LM loss."""
    model = mod_model(capacity=0.25, causal="aux_loss", regime="routers")
    model.set_trainable(from_scratch=False)
    model.train()
    idx = tokens(2, 17)
    step = model.training_loss(idx[:, :-1], idx[:, 1:], 0)
    loss, figures = step.loss, step.metrics
    assert {"lm_loss", "causal_bce", "causal_accuracy"} <= set(figures)
    assert loss.item() == pytest.approx(figures["lm_loss"] + 0.1 * figures["causal_bce"])
    loss.backward()
    assert model.routers[0].linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_token_depth_counts_blocks_run() -> None:
    model = mod_model(capacity=0.5)
    depth: list = []
    with torch.no_grad():
        model(tokens(2, 5), call=Call(force=False, depth=depth))
    assert torch.equal(depth[0], torch.full((2, 5), 2.0))  # 3 blocks, 1 routed


def test_which_blocks_are_routed() -> None:
    four = Transformer(backbone("ours").cfg.model_copy(update={"n_layers": 4}))
    expected = {"every_other": [1, 3], "all_but_first": [1, 2, 3], "all": [0, 1, 2, 3],
                (2, 0): [0, 2]}
    for spec, layers in expected.items():
        model = MixtureOfDepths(four, MoDConfig(layers=list(spec) if isinstance(spec, tuple)
                                                else spec))
        assert model.layers == layers and len(model.routers) == len(layers)


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="at least 2"):
        MixtureOfDepths(Transformer(backbone("ours").cfg.model_copy(update={"n_layers": 1})),
                        MoDConfig())
    with pytest.raises(UserError, match="routed layers"):
        MixtureOfDepths(backbone("ours"), MoDConfig(layers=[0, 7]))
    model = MixtureOfDepths(backbone("ours"), MoDConfig()).eval()
    with pytest.raises(UserError, match="calibrated thresholds"):
        model(tokens(1, 4))


# -- the method end to end: fit, run folders, eval, generate, bench, from_pretrained, lm-eval --
QUICK = ["train.batch_size=4", "train.eval_batches=2", "train.eval_interval=3",
         "train.ckpt_interval=3", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def retrofit(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mod") / "retrofit"
    assert main(["fit", "--method", "mod", "--backbone", str(tiny_backbone), "--steps", "3",
                 "--out", str(out), "mod.capacity=0.25", "mod.regime=routers", *QUICK]) == 0
    return out


def test_a_retrofit_trains_the_backbone_too_unless_told_otherwise() -> None:
    joint = MixtureOfDepths(backbone("ours"), MoDConfig())
    joint.set_trainable(from_scratch=False)
    assert joint.backbone_trained()
    assert all(p.requires_grad for p in joint.parameters())
    routers = MixtureOfDepths(backbone("ours"), MoDConfig(regime="routers"))
    routers.set_trainable(from_scratch=False)
    assert not routers.backbone_trained()
    assert {n for n, p in routers.named_parameters() if p.requires_grad} == {
        n for n, _ in routers.named_parameters() if n.startswith("routers.")}


def test_a_routers_only_retrofit_leaves_the_backbone_alone(retrofit: Path,
                                                           tiny_backbone: Path) -> None:
    metrics = json.loads((retrofit / "metrics.json").read_text())
    assert metrics["method"] == "mod" and metrics["steps"] == 3
    assert metrics["routed_layers"] == [1, 3]
    for fraction in metrics["realised_capacity_causal"]:
        assert abs(fraction - 0.25) < 0.05
    model = load_run(retrofit).model
    assert isinstance(model, MixtureOfDepths) and not model.backbone_trained()
    assert model.routers[0].linear.weight.abs().sum() > 0  # the router moved from zero
    original = load_run(tiny_backbone).model
    for a, b in zip(model.backbone.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)


def test_eval_generate_and_bench_serve_a_mod_run(retrofit: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    report, err, rows = serve(retrofit, tmp_path, capsys, "1.0,0.25", "1,2")
    assert report["kind"] == "mod" and 0.5 < report["flops_ratio"] < 1
    assert '"realised_capacity"' in err
    assert {(r["phase"], r["batch"], r["capacity"]) for r in rows} == {
        (phase, batch, c) for phase, batch in (("prefill", 2), ("decode", 1), ("decode", 2))
        for c in (1.0, 0.25)}
    for r in rows:
        if r["capacity"] == 1.0:  # the reference itself: every token, router-scaled
            assert r["ideal_speedup"] == pytest.approx(1.0)
            assert r["realised"]["realised_capacity"] == 1.0
        else:
            assert r["ideal_speedup"] > 1.1 and r["realised"]["realised_capacity"] < 0.5
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_fit_from_scratch_trains_everything(tmp_path: Path) -> None:
    out = tmp_path / "scratch"
    assert main(["fit", "--method", "mod", "--preset", "tiny", "--steps", "2", "--out", str(out),
                 "model.d_model=32", "model.n_layers=4", "model.d_ff=64", "data.block_size=16",
                 "mod.causal=aux_loss", *QUICK]) == 0
    loaded = load_run(out).model
    assert loaded.backbone_trained() and loaded.routers[0].predictor is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_parameters"] > 10_000


def test_lm_eval_scores_do_not_depend_on_the_batch(retrofit: Path) -> None:
    """Causal decisions: a right-padded neighbour in the batch changes no score."""
    from lm_eval.api.instance import Instance

    from adadepth.hf.harness import AdadepthLM

    lm = AdadepthLM(run=str(retrofit), batch_size=2)
    short = Instance("loglikelihood", {}, ("ROMEO: ", "What"), 0)
    long = Instance("loglikelihood", {}, ("JULIET: O Romeo, Romeo, wherefore ", "art thou"), 1)
    together = lm.loglikelihood([short, long])
    alone = lm.loglikelihood([short]) + lm.loglikelihood([long])
    for (a, _), (b, _) in zip(together, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_from_pretrained_and_save_pretrained(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      max_position_embeddings=64)).eval()
    model = adadepth.from_pretrained(hf, method="mod", capacity=0.5, threshold="half").eval()
    assert model.layers == [1, 3]
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for router in model.routers:
            router.linear.weight.normal_()
            router.predictor.net[-1].bias.fill_(0.3)
    assert isinstance(assert_round_trip(model, idx, tmp_path / "saved"), MixtureOfDepths)


@pytest.mark.parametrize("argv, match", [
    (["fit", "--method", "mod", "--out", "x", "mod.capacity=0"], "capacity"),
    (["fit", "--method", "mod", "--out", "x", "mod.capacity=1.5"], "capacity"),
    (["fit", "--method", "mod", "--out", "x", "mod.layers=[1,9]", "model.n_layers=4"],
     "routed layers"),
    (["fit", "--method", "mod", "--out", "x", "model.n_layers=1"], "at least 2"),
])
def test_bad_mod_input(capsys: pytest.CaptureFixture, argv: list[str], match: str) -> None:
    assert_user_error(capsys, *argv, match=match)


def test_bench_refuses_a_capacity_outside_the_range(retrofit: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert_user_error(capsys, "bench", str(retrofit), "--settings", "0.5,1.5",
                      match="capacity settings")


def test_the_leaderboard_reads_flops_from_what_ran() -> None:
    """Held-out text fed as generation feeds it (`decode_eval`) under forced patterns: nobody
    runs the routed block, then everybody (the reference: router-scaled, routers run)."""
    from adadepth.eval import decode_eval

    model = mod_model(capacity=0.5)
    windows = tokens(3, 17, seed=6)
    ctx = fl.causal_context(16)
    dense = fl.forward_per_token(model.cfg, ctx)
    block = (sum(dense.values()) - dense["lm_head"]) / model.cfg.n_layers
    router = fl.linear(model.cfg.d_model, 1)
    result = decode_eval(model, windows, call=Call(force=False))
    fraction, summary, depth = result.flops_fraction, result.summary, result.depth
    assert fraction == pytest.approx(1 - block / sum(dense.values()), rel=1e-9)
    assert summary["capacity_per_layer"] == [0.0]
    assert torch.equal(depth[0], torch.full((3, 16), 2.0))
    fraction = decode_eval(model, windows, call=Call(force=True)).flops_fraction
    assert fraction == pytest.approx(1 + router / sum(dense.values()), rel=1e-9)
    assert model.current_knob_value() == 0.5
