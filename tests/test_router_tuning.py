"""Router-Tuning (MindSkip): routers on a frozen backbone let tokens skip the attention sub-block
of routed layers. A skipped token runs no q/o (nor k/v unless its K/V are written), decisions are
causal and cached decoding equals recomputation, only the routers train, and the costs counted
are what ran. On our transformer and on Hugging Face Llama and Gemma 3, through the layer-stack
interface only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from causality import assert_causal, assert_decodable, assert_round_trip, fed_in_steps
from test_cache import V, backbone, close, random_routers, tokens
from test_cli import assert_user_error, serve

import adadepth
from adadepth import flops as fl
from adadepth.cli import main
from adadepth.depth.dispatch import Call
from adadepth.depth.router_tuning import RouterTuning, RouterTuningConfig
from adadepth.errors import UserError
from adadepth.generate import generate
from adadepth.model import Transformer
from adadepth.runs import load_run

SPLIT = ["ours", "llama", "gemma3"]  # the families whose layers split into sub-blocks


def rt_model(name: str = "ours", seed: int = 0, **options) -> RouterTuning:
    """A Router-Tuning model over a test backbone with random routers, calibrated."""
    model = RouterTuning(backbone(name, seed), RouterTuningConfig(**options)).eval()
    return random_routers(model, seed)


def attend_masks(model: RouterTuning, idx, cache=None, start: int = 0, **call):
    """The logits of a forward and which tokens attended at each routed layer, (B, T, m)."""
    records: dict = {}
    logits = model(idx, cache, start, call=Call(records=records, **call)).logits
    return logits, torch.stack([records["attend", j] for j in range(len(model.layers))], -1)


def decisions(model: RouterTuning, **call):
    def decide(idx, cache=None, start=0):
        with torch.no_grad():
            return attend_masks(model, idx, cache, start, **call)[1]
    return decide


def attention_of(bb, layer: int):
    return bb.blocks[layer].attn if isinstance(bb, Transformer) else bb.layers[layer].self_attn


@pytest.mark.parametrize("name", SPLIT)
def test_a_fresh_model_is_its_backbone(name: str) -> None:
    """w = 0: sigmoid(0) = 0.5 passes the paper's rule, so every token attends and the model is
    its backbone to the bit, under the training rule, at capacity 1 and as the dense reference."""
    bb = backbone(name)
    idx = tokens(2, 9)
    with torch.no_grad():
        dense = bb(idx).logits
        for capacity, call in ((0.5, Call(rule="topk")), (1.0, Call()), (0.5, Call(force=True))):
            model = RouterTuning(bb, RouterTuningConfig(capacity=capacity, layers="all")).eval()
            assert torch.equal(model(idx, call=call).logits, dense)
            assert torch.equal(model.dense_reference()(idx).logits, dense)


@pytest.mark.parametrize("name", ["ours", "llama"])
@pytest.mark.parametrize("kv", ["write", "drop"])
def test_skipped_tokens_run_no_attention(name: str, kv: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced pattern (3 of 8 tokens attend per row at layer 1): the query and output
    projections run on those 6 tokens only, the key and value projections on all 16 when the
    skipped tokens' K/V are written, on the 6 otherwise; the FFN on all 16. The tally counts
    exactly that, and the FLOPs it reports follow."""
    model = RouterTuning(backbone(name), RouterTuningConfig(
        layers=[1], skipped_kv=kv, training_attention="attending")).eval()
    pattern = torch.zeros(2, 8, dtype=torch.bool)
    pattern[0, [0, 3, 7]] = pattern[1, [1, 2, 5]] = True
    monkeypatch.setattr(model.routers[0], "forward", lambda x: pattern.float() * 2 - 1)
    rows: dict[str, int] = {}
    hooks = [getattr(attention_of(model.backbone, 1), p).register_forward_hook(
        lambda m, a, o, p=p: rows.__setitem__(p, rows.get(p, 0) + a[0].shape[:-1].numel()))
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    runner, m = model.measured(Call(rule="topk"))
    with torch.no_grad():
        runner(tokens(2, 8))
    for h in hooks:
        h.remove()
    kv_rows = 16 if kv == "write" else 6
    assert rows == {"q_proj": 6, "o_proj": 6, "k_proj": kv_rows, "v_proj": kv_rows}
    assert m.summary()["capacity_per_layer"] == [6 / 16]
    cfg, ctx = model.cfg, fl.causal_context(8)
    q = cfg.n_heads * cfg.head_dim
    qo, kvp = 2 * fl.linear(cfg.d_model, q), 2 * fl.linear(cfg.d_model, cfg.kv_heads * cfg.head_dim)
    per_key = fl.attention(cfg, 1.0)["attn_scores"]
    if kv == "write":  # each attending query sees every earlier token
        keys = (1 + 4 + 8) + (2 + 3 + 6)
    else:  # the i-th attending token of a row sees i keys
        keys = 2 * (1 + 2 + 3)
    router = fl.linear(cfg.d_model, 1)
    expected = (model.dense_flops_per_token(ctx) - (10 / 16) * qo - (1 - kv_rows / 16) * kvp
                - fl.attention(cfg, ctx)["attn_scores"] + keys / 16 * per_key + router)
    assert m.flops_per_token(ctx) == pytest.approx(expected)
    parts = m.breakdown(ctx)
    assert set(parts) == {"attention skipped", "routers"} and parts["routers"] == router
    assert sum(parts.values()) == pytest.approx(expected - model.dense_flops_per_token(ctx))


def test_forced_patterns_cost_what_ran() -> None:
    """Everyone attends (the reference: the backbone, no router run), nobody attends."""
    model = rt_model(layers="all")
    cfg, ctx = model.cfg, fl.causal_context(10)
    dense = model.dense_flops_per_token(ctx)
    attn = fl.attention(cfg, ctx)
    kvp = 2 * fl.linear(cfg.d_model, cfg.kv_heads * cfg.head_dim)
    for force, expected in ((True, dense),
                            (False, dense - 3 * (attn["attn_proj"] - kvp + attn["attn_scores"]))):
        runner, m = model.measured(Call(force=force))
        depth: list = []
        with torch.no_grad():
            runner(tokens(2, 10))
            model(tokens(2, 10), call=Call(force=force, depth=depth))
        assert m.flops_per_token(ctx) == pytest.approx(expected)
        assert torch.equal(depth[0], torch.full((2, 10), 3.0 if force else 0.0))
    assert model.reference_flops_per_token(ctx) == dense


@pytest.mark.parametrize("name", SPLIT)
@pytest.mark.parametrize("kv", ["write", "drop"])
def test_cached_decoding_equals_recomputation(name: str, kv: str) -> None:
    """Batch 3, rows deciding differently at the same step: a prefill then one token per call
    gives the logits of one uncached forward; the cache holds every token's K/V at a routed
    layer when they are written, exactly the attending tokens' when they are dropped; greedy
    generation with and without the cache agree."""
    # Layer 0 runs for everyone: a token that skipped every attention so far has a state that
    # depends on its id alone, and may then sit exactly on a calibrated threshold (a quantile
    # of such states), where rounding decides.
    model = rt_model(name, capacity=0.5, layers="all_but_first", skipped_kv=kv,
                     training_attention="attending")
    idx = tokens(3, 16, seed=2)
    with torch.no_grad():
        full, masks = attend_masks(model, idx)
        stepped, cache = fed_in_steps(model, idx, 6)
        close(stepped, full, 2e-5)
        split = [(masks[:, t].any(0) & ~masks[:, t].all(0)).any() for t in range(6, 16)]
        assert any(split)  # some decoding step had rows attending and rows skipping
        for j, layer in enumerate(model.layers):
            valid = cache.valid[layer, :, :16]
            assert torch.equal(valid, torch.ones_like(valid) if kv == "write" else masks[..., j])
        cached = generate(model, idx[:, :5], 8, temperature=0.0)
        recomputed = generate(model, idx[:, :5], 8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("threshold", ["calibrated", "paper"])
@pytest.mark.parametrize("control", ["online", "fixed"])
def test_every_decision_is_causal(threshold: str, control: str) -> None:
    model = rt_model("llama", capacity=0.4, layers="all_but_first", threshold=threshold,
                     threshold_control=control)  # why not layer 0: see the test above
    idx = tokens(3, 30, seed=3)
    assert_decodable(model, decisions(model), idx, V, (1, 12, 29), prefill=7)
    changed = assert_causal(decisions(model), idx, V, 12)[0]
    assert not torch.equal(changed[:, 12:], decisions(model)(idx)[:, 12:])  # it can move


def test_the_online_controller_holds_the_capacity() -> None:
    model = rt_model(capacity=0.25, layers="all")
    runner, m = model.measured()
    with torch.no_grad():
        runner(tokens(4, 60, seed=9))
    for fraction in m.summary()["capacity_per_layer"]:
        assert abs(fraction - 0.25) <= 5 / 60


def test_only_the_routers_train_and_skipped_tokens_still_learn() -> None:
    """set_trainable leaves the backbone frozen; the loss is the LM loss plus lambda times the
    hinge on each layer's realised capacity; with every token skipping a layer, the paper's
    straight-through gate still reaches its router through the LM loss (all tokens run the
    attention in training), and does not when only attending tokens run it."""
    for mode, learns in (("all", True), ("attending", False)):
        model = RouterTuning(backbone("ours"), RouterTuningConfig(
            capacity=0.25, layers=[1, 2], training_attention=mode, lambda_sparsity=0.5))
        model.set_trainable(from_scratch=False)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            "routers.0.linear.weight", "routers.1.linear.weight"}
        router = model.routers[1]  # z < 0 for every token: all skip
        router.forward = lambda x, z=router.forward: z(x) - 1.0  # w = 0: z = -1
        model.train()
        idx = tokens(2, 17)
        step = model.training_loss(idx[:, :-1], idx[:, 1:], 0)
        figures = step.metrics
        assert step.loss.item() == pytest.approx(figures["lm_loss"] + 0.5 * figures["sparsity"])
        assert figures["sparsity"] == pytest.approx(0.75)  # layer 1: everyone (1 - 0.25)
        step.loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert model.routers[0].linear.weight.grad.abs().sum() > 0
        grad = model.routers[1].linear.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == learns


def test_training_flops_count_the_backward_the_routers_need() -> None:
    """One routed layer (the 3rd of 3), every token attending: the forward is the backbone plus
    the router; the backward stops at that layer: its FFN and the head crossed once, the
    router's weights, nothing else."""
    model = RouterTuning(backbone("ours"), RouterTuningConfig(layers=[2], capacity=1.0))
    model.set_trainable(from_scratch=False)
    model.train()
    idx = tokens(2, 9)
    step = model.training_loss(idx[:, :-1], idx[:, 1:], 0)
    cfg, ctx = model.cfg, fl.causal_context(8)
    router = fl.linear(cfg.d_model, 1)
    expected = (model.dense_flops_per_token(ctx) + router
                + fl.linear(cfg.d_model, cfg.vocab_size) + fl.ffn(cfg) + router)
    assert step.flops_per_token == pytest.approx(expected)
    assert model.training_flops_per_token(8) == pytest.approx(expected)


def test_from_pretrained_and_save_pretrained(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      max_position_embeddings=64)).eval()
    model = adadepth.from_pretrained(hf, method="router-tuning", capacity=0.5).eval()
    assert model.layers == [1, 2]
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for router in model.routers:
            router.linear.weight.normal_()
    model.calibrate(torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(2)))
    loaded = assert_round_trip(model, idx, tmp_path / "saved")
    assert isinstance(loaded, RouterTuning)
    assert [r.rule.threshold.item() for r in loaded.routers] == [
        r.rule.threshold.item() for r in model.routers]


def test_which_layers_are_routed() -> None:
    expected = {"upper_half": [1, 2], "all_but_first": [1, 2, 3], "all": [0, 1, 2, 3],
                (3, 0): [0, 3]}
    four = Transformer(backbone("ours").cfg.model_copy(update={"n_layers": 4}))
    for spec, layers in expected.items():
        model = RouterTuning(four, RouterTuningConfig(
            layers=list(spec) if isinstance(spec, tuple) else spec))
        assert model.layers == layers
    thirty_two = Transformer(backbone("ours").cfg.model_copy(update={"n_layers": 32}))
    assert RouterTuning(thirty_two, RouterTuningConfig()).layers == list(range(15, 31))


def test_bad_options_are_user_errors() -> None:
    one = Transformer(backbone("ours").cfg.model_copy(update={"n_layers": 1}))
    with pytest.raises(UserError, match="at least 2"):
        RouterTuning(one, RouterTuningConfig())
    with pytest.raises(UserError, match="routed layers"):
        RouterTuning(backbone("ours"), RouterTuningConfig(layers=[0, 7]))
    with pytest.raises(UserError, match="skipped_kv=write"):
        RouterTuning(backbone("ours"), RouterTuningConfig(skipped_kv="drop"))
    model = RouterTuning(backbone("ours"), RouterTuningConfig()).eval()
    with pytest.raises(UserError, match="calibrated thresholds"):
        model(tokens(1, 4))
    with pytest.raises(UserError, match="pretrained backbone"):
        model.set_trainable(from_scratch=True)
    paper = RouterTuning(backbone("ours"), RouterTuningConfig(threshold="paper"))
    with pytest.raises(UserError, match="calibrated thresholds"):
        paper.knob_setter(0.5, tokens(4, 8))
    gpt2 = RouterTuning(backbone("gpt2"), RouterTuningConfig(threshold="paper")).eval()
    with pytest.raises(UserError, match="Llama or Gemma 3"):
        gpt2(tokens(1, 4))


# -- the method end to end: fit, run folders, eval, generate, bench, lm-eval -------------------
QUICK = ["train.batch_size=4", "train.eval_batches=2", "train.eval_interval=3",
         "train.ckpt_interval=3", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def tuned(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("router-tuning") / "run"
    assert main(["fit", "--method", "router-tuning", "--backbone", str(tiny_backbone),
                 "--steps", "3", "--out", str(out), "router-tuning.capacity=0.5", *QUICK]) == 0
    return out


def test_fit_tunes_the_routers_alone(tuned: Path, tiny_backbone: Path) -> None:
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["method"] == "router-tuning" and metrics["steps"] == 3
    assert metrics["routed_layers"] == [1, 2] and metrics["trainable_parameters"] == 2 * 64
    for fraction in metrics["realised_capacity_causal"]:
        assert abs(fraction - 0.5) < 0.1
    assert metrics["held_out_loss_dense"] <= metrics["held_out_loss_causal"] + 1e-6
    history = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert {"lm_loss", "sparsity", "capacity"} <= set(history[-1])
    model = load_run(tuned).model
    assert isinstance(model, RouterTuning) and not model.backbone_trained()
    assert all(r.linear.weight.abs().sum() > 0 for r in model.routers)  # moved from zero
    original = load_run(tiny_backbone).model
    for a, b in zip(model.backbone.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)


def test_eval_generate_and_bench_serve_a_run(tuned: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    report, err, rows = serve(tuned, tmp_path, capsys, "1.0,0.5", "1,2")
    assert report["kind"] == "router-tuning" and 0.8 < report["flops_ratio"] < 1
    assert '"skip_ratio"' in err
    assert {(r["phase"], r["batch"], r["capacity"]) for r in rows} == {
        (phase, batch, c) for phase, batch in (("prefill", 2), ("decode", 1), ("decode", 2))
        for c in (1.0, 0.5)}
    for r in rows:
        if r["capacity"] == 1.0:  # the reference itself: the backbone
            assert r["ideal_speedup"] == pytest.approx(1.0)
            assert r["realised"]["realised_capacity"] == 1.0
        else:
            assert r["ideal_speedup"] > 1.0 and r["realised"]["realised_capacity"] < 0.75


def test_lm_eval_scores_do_not_depend_on_the_batch(tuned: Path) -> None:
    """Causal decisions: a right-padded neighbour in the batch changes no score."""
    from lm_eval.api.instance import Instance

    from adadepth.hf.harness import AdadepthLM

    lm = AdadepthLM(run=str(tuned), batch_size=2)
    short = Instance("loglikelihood", {}, ("ROMEO: ", "What"), 0)
    long = Instance("loglikelihood", {}, ("JULIET: O Romeo, Romeo, wherefore ", "art thou"), 1)
    together = lm.loglikelihood([short, long])
    alone = lm.loglikelihood([short]) + lm.loglikelihood([long])
    for (a, _), (b, _) in zip(together, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("argv, match", [
    (["router-tuning.capacity=0"], "capacity"),
    (["router-tuning.capacity=1.5"], "capacity"),
    (["router-tuning.layers=[1,9]"], "routed layers"),
    (["router-tuning.skipped_kv=drop"], "skipped_kv=write"),
    (["router-tuning.threshold=half"], "threshold"),
])
def test_bad_fit_input(capsys: pytest.CaptureFixture, tiny_backbone: Path, tmp_path: Path,
                       argv: list[str], match: str) -> None:
    assert_user_error(capsys, "fit", "--method", "router-tuning", "--backbone",
                      str(tiny_backbone), "--out", str(tmp_path / "x"), *argv, match=match)


def test_fit_from_scratch_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert_user_error(capsys, "fit", "--method", "router-tuning", "--out", str(tmp_path / "x"),
                      "model.d_model=32", "model.n_layers=4", "model.d_ff=64",
                      match="pretrained backbone")


def test_bench_refuses_a_capacity_outside_the_range(tuned: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert_user_error(capsys, "bench", str(tuned), "--settings", "0.5,1.5",
                      match="capacity settings")
