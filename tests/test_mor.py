"""Mixture-of-Recursions: the recursions against hand-written references (expert and token
choice, recursion-wise and shared K/V), cached decoding at batch > 1 with rows at different
depths, causal decisions, the K/V each recursion keeps, cost accounting, the knob, saving, the
commands and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from causality import (
    assert_causal,
    assert_decodable,
    assert_round_trip,
    fed_in_steps,
    method_decisions,
)
from test_cache import V, backbone, close, tokens
from test_cli import assert_user_error, serve

import adadepth
from adadepth import flops as fl
from adadepth.cli import main
from adadepth.depth.dispatch import Call, ThresholdController
from adadepth.depth.mor import MixtureOfRecursions, MoRConfig, resolve_block, scaled
from adadepth.errors import UserError
from adadepth.generate import generate
from adadepth.model import Context
from adadepth.model.transformer import apply_rope
from adadepth.runs import load_run


def mor_model(name: str = "ours", seed: int = 0, **options) -> MixtureOfRecursions:
    """A MoR model over a 3-layer test backbone (block = layer 1, looped 3 times) with random
    routers, calibrated when it decides by thresholds."""
    model = MixtureOfRecursions(backbone(name, seed), MoRConfig(**options)).eval()
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for router in model.routers:
            router.linear.weight.copy_(torch.randn(router.linear.weight.shape, generator=gen))
    if model.expert and model.options.threshold == "calibrated":
        model.calibrate(tokens(16, 24, seed=seed + 5))
    return model


def run_masks(model: MixtureOfRecursions, idx, cache=None, start: int = 0, **call):
    """Logits, each recursion's mask and each token's recursions in one forward."""
    records: dict = {}
    depth: list = []
    with torch.no_grad():
        logits = model(idx, cache, start, call=Call(records=records, depth=depth, **call)).logits
    return logits, [records["mask", r] for r in range(model.n)], depth[0]


def varied(depth: torch.Tensor) -> None:
    """Tokens and rows at different depths, else the tests using this could not fail."""
    assert len(set(depth.flatten().tolist())) >= 3, depth
    assert not all(torch.equal(depth[0], row) for row in depth[1:]), depth


def block_by_hand(model: MixtureOfRecursions, x: torch.Tensor, positions: torch.Tensor):
    """The shared block on one row's tokens as a sequence of their own, at their positions."""
    ctx = Context.at(positions.unsqueeze(0))
    for layer in model.block:
        x = model.backbone.run_layer(layer, x, ctx)
    return x


def by_hand(model: MixtureOfRecursions, idx: torch.Tensor, masks: list[torch.Tensor]):
    """MoR written out: the first layer, then per recursion each row's chosen tokens run the
    block alone, and the last layer. Expert: H + g * block(H) (or g * (block(H) - H)); token:
    plain block outputs, and H^1 + g * block(H^i) at the token's last recursion."""
    bb = model.backbone
    x, ctx = bb.prepare(idx)
    x = bb.run_layer(0, x, ctx)
    first = x
    if not model.expert:
        logits = model.routers[0](x)
        depth = logits.argmax(-1) + 1
        gate = model.alpha * logits.softmax(-1).gather(-1, (depth - 1).unsqueeze(-1))
    for r, mask in enumerate(masks):
        if model.expert:
            gate = model.alpha * torch.sigmoid(model.routers[r].linear(x))
        new = x.clone()
        for b in range(idx.shape[0]):
            chosen = mask[b].nonzero().squeeze(1)
            if len(chosen) == 0:
                continue
            part = x[b:b + 1, chosen]
            h = block_by_hand(model, part, chosen)
            g = gate[b:b + 1, chosen]
            if model.expert:
                y = part + g * h if model.options.update == "paper" else part + g * (h - part)
            else:
                last = (depth[b, chosen] == r + 1).view(1, -1, 1)
                y = torch.where(last, first[b:b + 1, chosen] + g * h, h)
            new[b, chosen] = y[0]
        x = new
    return bb.head(bb.run_layer(2, x, ctx))


@pytest.mark.parametrize("name", ["ours", "llama"])
@pytest.mark.parametrize("case", [("expert", "topk", "paper"), ("expert", "causal", "paper"),
                                  ("expert", "causal", "residual"), ("token", "auto", "paper")])
def test_recursions_run_the_shared_block_on_the_chosen_tokens_alone(name: str, case) -> None:
    routing, rule, update = case
    model = mor_model(name, routing=routing, update=update)
    idx = tokens(3, 14)
    got, masks, depth = run_masks(model, idx, rule=rule)
    varied(depth)
    with torch.no_grad():
        close(got, by_hand(model, idx, masks), 2e-5)
    for earlier, later in zip(masks, masks[1:], strict=False):  # hierarchical: never resumes
        assert not (later & ~earlier).any()
    if rule == "topk":  # ceil(C_r * T) per row: 14, 10, 5
        assert [m.sum(1).tolist() for m in masks] == [[14] * 3, [10] * 3, [5] * 3]


def shared_by_hand(model: MixtureOfRecursions, idx: torch.Tensor, masks: list[torch.Tensor]):
    """Recursive KV sharing written out on our transformer (block = layer 1): recursion 1 runs
    every token; a token at a later recursion attends with its own query to the recursion-1
    keys and values of itself and every earlier token."""
    bb = model.backbone
    blk, attn = bb.blocks[1], bb.blocks[1].attn
    x, ctx = bb.prepare(idx)
    x = bb.run_layer(0, x, ctx)
    B, T, _ = x.shape
    cos, sin = bb.rope_cos[:T].unsqueeze(0), bb.rope_sin[:T].unsqueeze(0)

    def heads(t, n):
        return t.view(B, T, n, attn.head_dim).transpose(1, 2)

    u1 = blk.attn_norm(x)  # recursion 1's block input: every token ran it
    k = apply_rope(heads(attn.k_proj(u1), attn.n_kv_heads), cos, sin)
    v = heads(attn.v_proj(u1), attn.n_kv_heads)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for r, mask in enumerate(masks):
        gate = model.alpha * torch.sigmoid(model.routers[r].linear(x))
        u = blk.attn_norm(x)
        q = apply_rope(heads(attn.q_proj(u), attn.n_heads), cos, sin)
        if r == 0:  # keys of this very recursion (they are recursion 1's)
            k_r = apply_rope(heads(attn.k_proj(u), attn.n_kv_heads), cos, sin)
            keys = k_r.repeat_interleave(rep, 1)
            values = heads(attn.v_proj(u), attn.n_kv_heads).repeat_interleave(rep, 1)
        else:
            keys, values = k, v
        scores = (q @ keys.transpose(-1, -2)) / attn.head_dim ** 0.5
        out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ values
        h = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        h = h + blk.ffn(blk.ffn_norm(h))
        x = torch.where(mask.unsqueeze(-1), x + gate * h, x)
    return bb.head(bb.run_layer(2, x, ctx))


@pytest.mark.parametrize("rule", ["topk", "causal"])
def test_kv_sharing_reads_the_first_recursions_keys(rule: str) -> None:
    model = mor_model(kv="shared")
    idx = tokens(3, 14, seed=4)
    got, masks, depth = run_masks(model, idx, rule=rule)
    varied(depth)
    with torch.no_grad():
        close(got, shared_by_hand(model, idx, masks), 2e-5)
        other = mor_model()  # same weights, recursion-wise K/V: a different model
        assert not torch.allclose(other(idx, call=Call(rule=rule)).logits, got, atol=1e-3)


@pytest.mark.parametrize("name", ["ours", "llama"])
@pytest.mark.parametrize("routing", ["expert", "token"])
@pytest.mark.parametrize("kv", ["recursive", "shared"])
def test_cached_decoding_equals_recomputation(name: str, routing: str, kv: str) -> None:
    """Batch 3, rows and tokens at different depths: a ragged prefill, then one token per
    step, gives the logits and the greedy text of the uncached model; recursion-wise, a token
    has valid K/V at recursion r exactly when it ran it (later queries there mask the rest)."""
    model = mor_model(name, routing=routing, kv=kv)
    idx = tokens(3, 16, seed=2)
    full, masks, depth = run_masks(model, idx)
    varied(depth)
    stepped, cache = fed_in_steps(model, idx, 6)
    close(stepped, full, 2e-5)
    with torch.no_grad():
        L = model.backbone.n_layers
        assert len(cache) == L * (model.n if kv == "recursive" else 1)
        for r in range(model.n if kv == "recursive" else 1):
            for layer in model.block:
                assert torch.equal(cache.valid[r * L + layer, :, :16], masks[r])
        prompt = idx[:, :5]
        cached = generate(model, prompt, 8, temperature=0.0)
        assert torch.equal(cached, generate(model, prompt, 8, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("options", [dict(), dict(causal="predictor"), dict(threshold="half"),
                                     dict(routing="token"), dict(kv="shared")])
def test_every_decision_is_causal(options: dict) -> None:
    model = mor_model("llama", **options)
    idx = tokens(3, 30, seed=3)
    assert_decodable(model, method_decisions(model), idx, V, (1, 12, 29), prefill=7)


def test_the_causality_check_catches_top_k() -> None:
    with pytest.raises(AssertionError, match="depend on later tokens"):
        assert_causal(method_decisions(mor_model(), rule="topk"), tokens(3, 30, seed=3), V, 10)


def test_decisions_among_the_active_tokens_keep_the_fraction_among_them() -> None:
    """The controller skips tokens outside `among`: the same decisions as on the others alone."""
    control = ThresholdController(0.5, 4.0)
    scores = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))
    among = torch.rand(2, 40, generator=torch.Generator().manual_seed(1)) > 0.4
    got, surplus = control.decide(scores, 0.3, 0.2, 1.0, [0.0, 0.0], among)
    assert not (got & ~among).any()
    for b in range(2):
        alone, s = control.decide(scores[b:b + 1, among[b]], 0.3, 0.2, 1.0, [0.0])
        assert torch.equal(got[b, among[b]], alone[0]) and surplus[b] == s[0]


def test_measure_counts_what_ran() -> None:
    """Forced patterns and top-k (no cache: the i-th chosen token of a row sees i keys), then
    cached decoding, whose keys per recursion are read from the cache's validity."""
    model = mor_model()
    cfg, T = model.cfg, 12
    ctx = fl.causal_context(T)
    attn = fl.attention(cfg, ctx)
    layer, scores = attn["attn_proj"] + fl.ffn(cfg), attn["attn_scores"]
    head, router = fl.linear(cfg.d_model, cfg.vocab_size), fl.linear(cfg.d_model, 1)

    def measure(**call):
        runner, m = model.measured(Call(**call))
        with torch.no_grad():
            runner(tokens(2, T))
        return m

    m = measure(force=True)
    assert m.flops_per_token(ctx) == pytest.approx(model.reference_flops_per_token(ctx))
    assert model.reference_flops_per_token(ctx) == pytest.approx(
        head + 5 * (layer + scores) + 3 * router)  # 2 layers once, the block 3 times
    assert m.summary()["recursions_histogram"] == [0, 0, 0, 24]
    assert measure(force=False).flops_per_token(ctx) == pytest.approx(head + 2 * (layer + scores))
    m = measure(rule="topk")  # 12, 8, 4 tokens run the three recursions
    keys = sum(sum(range(1, k + 1)) for k in (12, 8, 4)) / sum(range(1, T + 1))
    expected = head + 2 * (layer + scores) + (24 / 12) * layer + keys * scores + 3 * router
    assert m.flops_per_token(ctx) == pytest.approx(expected)
    assert m.summary()["mean_recursions"] == 2.0
    assert m.summary()["recursions_histogram"] == [0, 8, 8, 8]
    idx = tokens(2, 12, seed=4)
    runner, m = model.measured()
    _, cache = fed_in_steps(runner, idx, 4)
    L, per_key = cfg.n_layers, fl.attention(cfg, 1.0)["attn_scores"]
    ran, attended = 0.0, 0.0
    for r in range(3):
        valid = cache.valid[r * L + 1, :, :12]
        ran += valid.float().sum().item() / 24
        attended += sum(valid[b, :p + 1].sum().item() for b in range(2) for p in range(12)
                        if valid[b, p]) / 24
    ctx = 6.5
    expected = head + 2 * (attn["attn_proj"] + fl.ffn(cfg) + fl.attention(cfg, ctx)[
        "attn_scores"]) + ran * layer + attended * per_key + 3 * router
    assert m.flops_per_token(ctx) == pytest.approx(expected)
    assert m.summary()["mean_recursions"] == pytest.approx(ran)


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_the_knob_sets_the_mean_recursions(routing: str) -> None:
    """A setting of the knob is realised on other text (within the controller's slack for
    expert choice; token choice has no controller: its tilt is set on the calibration text)."""
    model = mor_model(routing=routing)
    calibration, text = tokens(16, 32, seed=6), tokens(16, 32, seed=7)
    for value in (0.5, 0.8):
        model.knob_setter(value, calibration)()
        runner, m = model.measured()
        with torch.no_grad():
            runner(text)
        assert abs(m.summary()["mean_recursions"] - 3 * value) < 0.25, (value, m.summary())
    restore = model.current_setting()
    model.knob_setter(0.1, calibration)()  # below one recursion
    _, _, depth = run_masks(model, text)
    assert bool((depth == 1).all()) if routing == "token" else depth.float().mean() < 0.6
    restore()
    assert model.current_knob_value() == 0.8
    assert scaled([1.0, 2 / 3, 1 / 3], 2.0) == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert scaled([1.0, 2 / 3, 1 / 3], 2.5) == pytest.approx([1.0, 1.0, 0.5])


def test_which_layers_run() -> None:
    assert resolve_block("middle", 6, 3) == ([0], [1, 2, 3, 4], [5])
    # the paper's stepwise pick of the middle layers, as np.linspace(1, L - 2, base) rounds it
    assert resolve_block("stepwise", 32, 3)[1] == [1, 4, 7, 11, 14, 17, 20, 24, 27, 30]
    assert resolve_block("stepwise", 4, 2) == ([0], [1], [3])  # layer 2 is left out
    assert resolve_block([2, 3], 6, 3) == ([0, 1], [2, 3], [4, 5])
    model = MixtureOfRecursions(backbone("ours"), MoRConfig(block=[0, 1, 2]))
    assert model.prelude == model.coda == [] and not model.may_skip_parameters


def test_bad_options_are_user_errors() -> None:
    two = backbone("ours").cfg.model_copy(update={"n_layers": 2})
    from adadepth.model import Transformer

    for options, match in [(dict(), "at least 3 layers"), (dict(block="stepwise"), "at least")]:
        with pytest.raises(UserError, match=match):
            MixtureOfRecursions(Transformer(two), MoRConfig(**options))
    for options, match in [(dict(block="stepwise"), "layers - 2 >= recursions"),
                           (dict(block=[1, 5]), "distinct layers"),
                           (dict(capacities=[1.0, 0.5]), "non-increasing"),
                           (dict(capacities=[0.5, 1.0, 0.2]), "non-increasing")]:
        with pytest.raises(UserError, match=match):
            MixtureOfRecursions(backbone("ours"), MoRConfig(**options))
    model = MixtureOfRecursions(backbone("ours"), MoRConfig()).eval()
    with pytest.raises(UserError, match="calibrated thresholds"):
        model(tokens(1, 4))
    with pytest.raises(UserError, match="depth_fraction"):
        model.knob_setter(1.5, tokens(2, 8))


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_from_pretrained_and_save_pretrained(routing: str, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      max_position_embeddings=64)).eval()
    model = adadepth.from_pretrained(hf, method="mor", routing=routing, recursions=2,
                                     threshold="half").eval()
    assert (model.prelude, model.block, model.coda) == ([0], [1, 2], [3])
    with torch.no_grad():
        for router in model.routers:
            router.linear.weight.normal_()
            router.linear.bias.fill_(0.3)
        if routing == "token":
            model.routers[0].tilt.fill_(0.5)  # a knob setting is saved with the routers
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    assert isinstance(assert_round_trip(model, idx, tmp_path / "saved"), MixtureOfRecursions)


# -- the method end to end: fit from scratch, eval, generate, bench ------------------------------
QUICK = ["train.batch_size=4", "train.eval_batches=2", "train.eval_interval=3",
         "train.ckpt_interval=3", "optim.warmup_steps=0", "model.d_model=32", "model.n_layers=4",
         "model.d_ff=64", "data.block_size=16"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mor") / "scratch"
    assert main(["fit", "--method", "mor", "--preset", "tiny", "--steps", "3", "--out", str(out),
                 *QUICK]) == 0
    return out


def test_fit_from_scratch_trains_everything(scratch: Path) -> None:
    metrics = json.loads((scratch / "metrics.json").read_text())
    assert metrics["method"] == "mor" and metrics["steps"] == 3
    assert metrics["block"] == [1, 2] and metrics["recursions"] == 3
    assert abs(metrics["mean_recursions"] - 2.0) < 0.3  # the schedule 1, 2/3, 1/3, causally
    model = load_run(scratch).model
    assert isinstance(model, MixtureOfRecursions) and model.backbone_trained()
    assert all(r.rule.calibrated for r in model.routers[1:])


def test_eval_generate_and_bench_serve_a_mor_run(scratch: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    report, err, rows = serve(scratch, tmp_path, capsys, "1.0,0.4")
    assert report["kind"] == "mor" and 0.5 < report["flops_ratio"] < 1
    assert '"mean_recursions"' in err
    assert {(r["phase"], r["depth_fraction"]) for r in rows} == {
        (p, v) for p in ("prefill", "decode") for v in (1.0, 0.4)}
    for r in rows:
        if r["depth_fraction"] == 1.0:  # the reference itself: every token every recursion
            assert r["ideal_speedup"] == pytest.approx(1.0)
        else:
            assert r["ideal_speedup"] > 1.3 and r["realised"]["mean_recursions"] < 1.6
    assert_user_error(capsys, "bench", str(scratch), "--settings", "0.5,1.5",
                      match="depth_fraction settings")


def test_a_retrofit_keeps_the_backbones_depth_and_a_frozen_backbone(
        tiny_backbone: Path, tmp_path: Path) -> None:
    """Over a pretrained 4-layer backbone the stepwise block runs layers 0, 1, 1, 3: at full
    depth the backbone's FLOPs (and the routers'); `routers` leaves the backbone as it was."""
    out = tmp_path / "retrofit"
    assert main(["fit", "--method", "mor", "--backbone", str(tiny_backbone), "--steps", "2",
                 "--out", str(out), "mor.block=stepwise", "mor.recursions=2", "mor.regime=routers",
                 "mor.update=residual", "mor.router_func=none", "mor.alpha=1", *QUICK[:5]]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["prelude"], metrics["block"], metrics["coda"]) == ([0], [1], [3])
    assert metrics["reference_flops_per_token"] == pytest.approx(
        metrics["dense_flops_per_token"], rel=1e-3)
    model, original = load_run(out).model, load_run(tiny_backbone).model
    assert model.may_skip_parameters and not model.backbone_trained()
    for a, b in zip(model.backbone.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("argv, match", [
    (["fit", "--method", "mor", "--out", "x", "mor.recursions=1"], "recursions"),
    (["fit", "--method", "mor", "--out", "x", "mor.capacities=[0.5,1,1]"], "capacities"),
    (["fit", "--method", "mor", "--out", "x", "mor.block=[1,9]"], "mor.block"),
    (["fit", "--method", "mor", "--out", "x", "mor.routing=both"], "routing"),
])
def test_bad_mor_input(capsys: pytest.CaptureFixture, argv: list[str], match: str) -> None:
    assert_user_error(capsys, *argv, match=match)
