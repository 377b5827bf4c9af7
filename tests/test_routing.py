"""Conditional depth routing: decisions, oracle labels, gradients, budgets, costs."""

from __future__ import annotations

import math

import pytest
import torch

from adadepth import flops as fl
from adadepth.config import ModelConfig
from adadepth.depth.dispatch import Call, topk_route
from adadepth.depth.oracle import (
    dense_training_flops,
    oracle_utilities,
    rank_loss,
    token_losses_from,
    training_flops,
    util_loss,
)
from adadepth.depth.routing import RoutedModel, RoutingConfig
from adadepth.errors import UserError
from adadepth.model import Transformer, causal_lm_loss

CFG = ModelConfig(vocab_size=37, d_model=32, n_layers=5, n_heads=4, d_ff=64, max_seq_len=64)


def routed(gate: str = "g1", **kw) -> RoutedModel:
    torch.manual_seed(0)
    kw.setdefault("cheap", "low_rank")  # the closed forms below count a low-rank cheap path
    model = RoutedModel(Transformer(CFG), RoutingConfig(gate=gate, d_z=16, **kw))
    for r in model.routers:  # a cheap path that differs from skip, so labels are not trivial
        for p in r.cheap.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return model


def masks(model: RoutedModel, x, cache=None, start: int = 0, **call) -> list[torch.Tensor]:
    """Each controlled layer's decisions in one forward (True = full)."""
    records: dict = {}
    model(x, cache, start, call=Call(records=records, **call))
    return [records[i].mask for i in model.layers]


def batch(b: int = 3, t: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def test_topk_gives_exactly_k_full_tokens_per_sequence():
    score = torch.randn(4, 17)
    for b in (0.1, 0.25, 0.5, 1.0):
        mask = topk_route(score, b)[0]
        assert (mask.sum(-1) == math.ceil(b * 17)).all()
        # the chosen tokens are the highest-scoring ones
        kth = score.topk(math.ceil(b * 17), -1).values[:, -1:]
        assert (score[mask] >= kth.expand_as(score)[mask]).all()


def test_training_forward_routes_exactly_the_budget():
    model = routed(budget=0.25).train()
    x, _ = batch(t=20)
    for mask in masks(model, x):
        assert (mask.sum(-1) == 5).all()


@pytest.mark.parametrize("oracle", ["off_policy", "on_policy"])
def test_oracle_labels_equal_brute_force(oracle):
    model = routed().train()
    x, y = batch()
    bb = model.backbone
    h, ctx = bb.prepare(x, call=model.routed(Call()))
    inputs = {}
    for i in range(bb.n_layers):
        if i in model.layers:
            inputs[i] = h.detach()
        h = bb.run_layer(i, h, ctx)
    labels = oracle_utilities(model, inputs, ctx, y, oracle)
    for layer in model.layers:
        losses = {}
        for force in (True, False):
            # Brute force: a whole separate forward from the tokens, layer forced, later layers
            # full (off-policy) or gated (on-policy), earlier layers deciding as in training.
            forced = {i: force if i == layer else (
                (True if oracle == "off_policy" else None) if i > layer else None)
                for i in model.layers}
            with torch.no_grad():
                losses[force] = causal_lm_loss(model(x, call=Call(forced=forced)).logits, y,
                                               reduction="none")
        torch.testing.assert_close(labels[layer], losses[False] - losses[True],
                                   atol=1e-5, rtol=1e-4)
        assert labels[layer].abs().max() > 1e-4  # the cheap path really differs


def test_oracle_keeps_training_records():
    """The counterfactual passes run under their own call: the training forward's records (in
    the call the context carries) are not overwritten."""
    model = routed().train()
    x, y = batch()
    records: dict = {}
    h, ctx = model.backbone.prepare(x, call=model.routed(Call(records=records)))
    for i in range(2):
        h = model.backbone.run_layer(i, h, ctx)
    before = records[1].mask.clone()
    token_losses_from(model, 2, h, ctx, y, False, "on_policy")
    assert set(records) == {1} and torch.equal(records[1].mask, before)


def test_straight_through_gives_nonzero_gate_gradients():
    model = routed(aux=[]).train()
    model.set_trainable(from_scratch=False)
    x, y = batch()
    causal_lm_loss(model(x).logits, y).backward()
    for r in model.routers:
        grads = [p.grad for p in r.gate.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_aux_losses_have_signal():
    score = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    u = torch.tensor([[0.1, 0.5, 0.9]])
    rank_loss(score, u).backward()
    assert score.grad[0, 2] < 0 < score.grad[0, 0]  # raise the high-utility token's score
    assert util_loss(torch.zeros(1, 3), u) > 0.5


def test_causal_thresholds_meet_the_budget_on_held_out_data():
    model = routed(budget=0.3).eval()
    calib = torch.randint(0, CFG.vocab_size, (128, 32), generator=torch.Generator().manual_seed(5))
    held_out = torch.randint(0, CFG.vocab_size, (128, 32),
                             generator=torch.Generator().manual_seed(6))
    model.calibrate([calib])
    with torch.no_grad():
        for mask in masks(model, held_out):
            assert abs(mask.float().mean().item() - 0.3) <= 0.02
        # Causal: a token's decision does not depend on later tokens.
        first = masks(model, held_out[:, :10])
        later = masks(model, held_out)
    for m, full in zip(first, later, strict=True):
        assert torch.equal(full[:, :10], m)


def test_controller_only_training_leaves_backbone_bitwise_unchanged():
    model = routed(gate="g3", aux=["util", "rank", "jepa"])
    with model.original_backbone() as backbone:
        own = dict(backbone.named_parameters())  # the backbone's own weights, no controller
    model.set_trainable(from_scratch=False)
    assert own and not any(p.requires_grad for p in own.values())
    frozen = {n: p.detach().clone() for n, p in own.items()}
    target = model.routers[0].gate.target_proj.clone()  # before training, so it can differ
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        x, y = batch(seed=step)
        model.training_loss(x, y, step).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in own.items():
        assert torch.equal(p, frozen[n]), n
    assert torch.equal(target, model.routers[0].gate.target_proj)  # fixed head stays fixed
    # ... while the controller itself did train
    assert any(not torch.equal(p, q) for p, q in zip(
        model.routers[0].gate.parameters(), routed(gate="g3").routers[0].gate.parameters(),
        strict=True))


def train_g3_predictions_variance(aux: list[str], seed: int, steps: int = 60) -> float:
    torch.manual_seed(seed)
    model = RoutedModel(Transformer(CFG), RoutingConfig(gate="g3", d_z=16, aux=aux,
                                                        oracle_layers=0, cheap="low_rank"))
    for r in model.routers:
        for p in r.cheap.parameters():
            torch.nn.init.normal_(p, std=0.2)
    model.set_trainable(from_scratch=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        x, y = batch(seed=step + 100 * seed)
        model.training_loss(x, y, step).loss.backward()
        opt.step()
        opt.zero_grad()
    records: dict = {}
    with torch.no_grad():
        model(batch(seed=999)[0], call=Call(records=records))
    zhat = torch.stack([records[i].predictions for i in model.layers])
    return zhat.flatten(1, 2).var(1).mean().item()


@pytest.mark.parametrize("oracle_layers", [0, 1])
@pytest.mark.parametrize("oracle", ["off_policy", "on_policy"])
def test_jepa_loss_reads_the_training_forward_not_the_oracle_passes(oracle, oracle_layers):
    """The oracle's counterfactual passes run the gates again, without gradient; the JEPA term
    must still be the training forward's, with its gradient, as when no oracle runs at all.
    util and rank are weighted 0, so both objectives are LM + JEPA and their gradients agree."""
    x, y = batch()
    grads = []
    for aux in (["util", "rank", "jepa"], ["jepa"]):
        model = routed(gate="g3", aux=aux, oracle=oracle, oracle_layers=oracle_layers,
                       lambda_util=0.0, lambda_rank=0.0)
        loss = model.training_loss(x, y, 0).loss
        grads.append(torch.autograd.grad(loss, [r.gate.action_emb.weight for r in model.routers]))
    for with_oracle, without in zip(*grads, strict=True):
        torch.testing.assert_close(with_oracle, without)


def test_removing_jepa_lowers_prediction_variance():
    """Ablation A1: without the alignment loss the predictions stay near-constant across
    tokens. Three seeds, each with a margin (measured ratios 0.68, 0.18, 0.26): a JEPA term
    without gradient (an earlier bug) gives a ratio of 1."""
    ratios = [train_g3_predictions_variance(["util", "rank"], seed)
              / train_g3_predictions_variance(["util", "rank", "jepa"], seed)
              for seed in range(3)]
    assert max(ratios) < 0.85 and sum(ratios) / 3 < 0.5, ratios


def closed_form_parts(T: int = 16):
    c = CFG
    ctx = (T + 1) / 2
    proj, scores = 2 * (4 * c.d_model * c.d_model), 4 * ctx * c.d_model
    full = 2 * 3 * c.d_model * c.d_ff
    head = 2 * c.d_model * c.vocab_size
    cheap = 2 * 2 * c.d_model * (c.d_model // 8)
    gate = 2 * (c.d_model * 64 + 64 * 1)  # G1 with d_z 16: hidden 4 * d_z
    return proj, scores, full, head, cheap, gate


def off_policy_oracle(layers, L, proj, scores, full, head, cheap):
    total = 0.0
    for layer in layers:
        rest = L - layer
        for forced_cost in (full, cheap):
            # later layers forced full; forced layers do not run their gates
            total += head + rest * (proj + scores) + forced_cost + (rest - 1) * full
    return total


@pytest.mark.parametrize("regime", ["controller-only", "joint"])
def test_flops_proxy_matches_closed_form(regime):
    """Straight-through trains on the dense mixture: controlled layers run both paths. Joint
    training differentiates everything (3x the forward). Controller-only differentiates nothing
    below the lowest controlled layer (here layer 0), crosses frozen weights once and attention
    scores twice above it, and takes the gates and cheap FFNs twice (once at the lowest layer,
    whose input needs no gradient)."""
    model = routed(aux=["util", "rank"], oracle="off_policy", regime=regime)
    proj, scores, full, head, cheap, gate = closed_form_parts()
    L = CFG.n_layers  # 5; controlled layers 1, 2, 3
    forward = head + L * (proj + scores) + 2 * full + 3 * (full + cheap + gate)
    if regime == "joint":
        backward = 2 * forward
    else:
        backward = (head + (cheap + gate)  # layer 1: the lowest, weights only
                    + 2 * (2 * (cheap + gate) + proj + 2 * scores + full)  # layers 2, 3
                    + (proj + 2 * scores + full))  # layer 4: crossed, frozen
    expected = forward + backward + off_policy_oracle(model.layers, L, proj, scores, full,
                                                      head, cheap)
    got = training_flops(model, 16, [0.5] * 3, model.layers)
    assert got == pytest.approx(expected, rel=1e-9)
    dense = 3 * (head + L * (proj + scores + full))
    assert dense_training_flops(model, 16) == pytest.approx(dense, rel=1e-9)


def test_frozen_layers_below_the_controller_cost_no_backward():
    """One controlled layer at the top: the gradient never enters layers 0-2."""
    model = routed(aux=[], layers=[3], estimator="ratio")
    proj, scores, full, head, cheap, gate = closed_form_parts()
    L = CFG.n_layers
    # sparse dispatch at full fraction f: the full FFN on f of the tokens, the cheap on the rest
    f = 0.25
    site = f * full + (1 - f) * cheap
    forward = head + L * (proj + scores) + 4 * full + site + gate
    backward = head + ((1 - f) * cheap + gate) + (proj + 2 * scores + full)
    got = training_flops(model, 16, [f], [])
    assert got == pytest.approx(forward + backward, rel=1e-9)
    assert got < 2 * forward  # far below the 3x an everything-trains count would charge


def test_inference_flops_count_only_executed_paths():
    model = routed(gate="g1")
    ctx = 8.5
    dense = sum(fl.forward_per_token(CFG, ctx).values())
    full = 2 * 3 * CFG.d_model * CFG.d_ff
    cheap = 2 * 2 * CFG.d_model * (CFG.d_model // 8)
    gate = sum(fl.module_flops(r.gate) for r in model.routers)
    got = model.inference_flops_per_token(ctx, [0.5, 0.5, 0.5])
    assert got == pytest.approx(dense - 3 * 0.5 * full + 3 * 0.5 * cheap + gate)
    # At budget 1 every token is full whatever its score, and the gate is not run.
    assert model.inference_flops_per_token(ctx, [1.0] * 3, budget=1.0) == pytest.approx(dense)


def test_budget_one_inference_skips_the_gate():
    model = routed(gate="g1", budget=1.0).eval()
    calls = []
    for r in model.routers:
        r.gate.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = model(batch()[0]).logits
        dense = model.dense_reference()(batch()[0]).logits
    assert not calls
    torch.testing.assert_close(out, dense)


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": []}, "no controlled layer"),
    ({"layers": [7]}, "must be distinct"),
    ({"gate": "g9"}, "unknown gate"),
    ({"gate": "g1", "aux": ["jepa"]}, "no predictor"),
    ({"gate": "random"}, "no parameters for the util/rank"),  # default aux: util, rank
    ({"estimator": "straight_through", "dispatch": "sparse"}, "straight-through"),
])
def test_bad_routing_configs_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        RoutedModel(Transformer(CFG), RoutingConfig(**kwargs))


def test_static_gate_runs_fixed_layers_full_at_the_budget():
    model = routed(gate="static", budget=2 / 3, aux=[]).eval()
    with torch.no_grad():
        fractions = [m.float().mean().item() for m in masks(model, batch()[0])]
    assert sorted(fractions) == [0.0, 1.0, 1.0]


LONG = ModelConfig(vocab_size=37, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=300)


def decode_fractions(model: RoutedModel, text: torch.Tensor) -> list[float]:
    """Full fraction per controlled layer over a cached, token-by-token pass of `text`."""
    cache = model.new_cache(text.shape[0], text.shape[1])
    runner, m = model.measured()
    with torch.no_grad():
        for t in range(text.shape[1]):
            runner(text[:, t:t + 1], cache, t)
    return m.summary()["full_fraction_per_layer"]


@pytest.mark.parametrize("control", ["online", "fixed"])
def test_the_budget_holds_over_a_decoded_continuation_only_with_online_control(control):
    """Thresholds calibrated on one text, then every gate's scores shift (text the calibration
    never saw): the online controller keeps each layer within 0.02 of the budget over 256
    decoded tokens per row, batch 1 and 4; fixed thresholds do not."""
    torch.manual_seed(0)
    model = RoutedModel(Transformer(LONG), RoutingConfig(gate="g1", d_z=16, aux=[],
                                                         threshold_control=control)).eval()
    gen = torch.Generator().manual_seed(7)
    model.calibrate([torch.randint(0, 37, (32, 64), generator=gen)])
    with torch.no_grad():
        for r in model.routers:  # a shift of one calibrated spread
            r.gate.net[-1].bias += r.rule.spread
    for batch in (1, 4):
        text = torch.randint(0, 37, (batch, 256), generator=gen)
        worst = max(abs(f - 0.5) for f in decode_fractions(model, text))
        assert (worst <= 0.02) == (control == "online"), (batch, worst)


def test_controlled_decisions_are_causal_and_cached_decoding_decides_as_a_full_forward():
    torch.manual_seed(1)
    model = RoutedModel(Transformer(LONG), RoutingConfig(gate="g1", d_z=16, aux=[])).eval()
    gen = torch.Generator().manual_seed(3)
    model.calibrate([torch.randint(0, 37, (16, 64), generator=gen)])
    text = torch.randint(0, 37, (3, 40), generator=gen)
    with torch.no_grad():
        full = masks(model, text)
        changed = text.clone()
        changed[:, 25:] = (changed[:, 25:] + 1) % 37
        for m, other in zip(full, masks(model, changed), strict=True):
            assert torch.equal(other[:, :25], m[:, :25])  # the future never moves the past
        cache = model.new_cache(3, 40)
        steps = [[m] for m in masks(model, text[:, :10], cache, 0)]  # a prefill, then one by one
        for t in range(10, 40):
            for j, m in enumerate(masks(model, text[:, t:t + 1], cache, t)):
                steps[j].append(m)
    for j, m in enumerate(full):
        assert torch.equal(torch.cat(steps[j], 1), m)


def test_token_depth_counts_full_path_layers():
    model = routed(gate="static", budget=2 / 3, aux=[]).eval()
    depth: list = []
    with torch.no_grad():
        model(batch(b=2, t=5)[0], call=Call(depth=depth))
    assert len(depth) == 1 and torch.equal(depth[0], torch.full((2, 5), 2.0))


def test_the_default_labelling_keeps_a_deep_models_step_near_the_target_proxy() -> None:
    """Labelling every controlled layer of a 30-layer model costs many dense steps; by default a
    step labels as many as stay within oracle_proxy (at least one), drawn at random."""
    from adadepth.depth.oracle import LabelDraws, label_count, label_layers

    deep = ModelConfig(vocab_size=500, d_model=32, n_layers=30, n_heads=4, d_ff=64,
                       max_seq_len=64)
    model = RoutedModel(Transformer(deep), RoutingConfig(gate="g1", d_z=8))
    layers = model.layers
    everything = training_flops(model, 32, [0.5] * len(layers), layers)
    assert everything > 4 * dense_training_flops(model, 32)
    k = label_count(model, 32)
    spread = [layers[round(i * (len(layers) - 1) / (k - 1))] for i in range(k)] if k > 1 else []
    if spread:
        assert training_flops(model, 32, [0.5] * len(layers), spread) <= 1.5 * (
            dense_training_flops(model, 32))
    draws = LabelDraws.seeded(0)
    picked = [label_layers(model, draws, 32) for _ in range(20)]
    assert all(len(p) == k for p in picked) and len({tuple(p) for p in picked}) > 1
    model.options.oracle_layers = 0
    assert label_layers(model, draws, 32) == layers


def test_a_pruned_cheap_path_that_keeps_every_neuron_is_the_full_ffn() -> None:
    """Copied from the full FFN on calibration text: keeping all d_ff neurons, a model with
    every token on the cheap path is the dense model."""
    from adadepth.depth.oracle import init_cheap_paths

    torch.manual_seed(0)
    backbone = Transformer(CFG)
    model = RoutedModel(backbone, RoutingConfig(gate="all-cheap", aux=[], cheap="pruned",
                                                rank=CFG.d_ff)).eval()
    x, _ = batch()
    with torch.no_grad():
        dense = model.dense_reference()(x).logits
        before = model(x).logits  # cheap at its start: zero output, skip
        assert (before - dense).abs().max() > 1e-2
        init_cheap_paths(model, batch(b=4, seed=3)[0])
        torch.testing.assert_close(model(x).logits, dense, atol=1e-5, rtol=1e-5)


def test_pruning_keeps_the_important_neurons_and_the_refit_helps() -> None:
    """A quarter of the neurons, chosen by their contribution on calibration text, reproduces
    the full FFN better than zero (skip) and than a quarter chosen at random; refitting the
    output on the calibration text is no worse on other text (on random inputs the dropped
    neurons are independent of the kept ones, so it cannot gain much here)."""
    from adadepth.depth.cheap import PrunedFFN

    torch.manual_seed(0)
    full = Transformer(CFG).blocks[1].ffn
    with torch.no_grad():  # a few neurons that matter far more than the rest
        full.down_proj.weight[:, :8] *= 20
    inputs = [torch.randn(4, 16, CFG.d_model) for _ in range(20)]  # 1280 tokens
    test = torch.randn(4, 16, CFG.d_model)
    target = full(test)

    def error(ffn: torch.nn.Module) -> float:
        with torch.no_grad():
            return ((ffn(test) - target).norm() / target.norm()).item()

    pruned = PrunedFFN(CFG.d_model, CFG.d_ff // 4, torch.nn.SiLU())
    kept = pruned.init_from(full, inputs)
    assert set(range(8)) <= set(kept.tolist())
    copied = PrunedFFN(CFG.d_model, CFG.d_ff // 4, torch.nn.SiLU())
    copied.init_from(full, inputs)  # then its refitted projection is put back (below)
    random_quarter = PrunedFFN(CFG.d_model, CFG.d_ff // 4, torch.nn.SiLU())
    idx = torch.randperm(CFG.d_ff, generator=torch.Generator().manual_seed(1))[:CFG.d_ff // 4]
    with torch.no_grad():
        random_quarter.gate_proj.weight.copy_(full.gate_proj.weight[idx])
        random_quarter.up_proj.weight.copy_(full.up_proj.weight[idx])
        random_quarter.down_proj.weight.copy_(full.down_proj.weight[:, idx])
        copied.down_proj.weight.copy_(full.down_proj.weight[:, kept])
    assert error(pruned) <= 1.001 * error(copied) < error(random_quarter) < 1.0


def test_pruned_needs_a_gated_ffn() -> None:
    from adadepth.depth.registry import build

    with pytest.raises(UserError, match="gated FFN"):
        build("cheap", "pruned", d_model=8, d_ff=16, full=torch.nn.Linear(8, 8))


def test_training_the_cheap_path_on_every_token_adds_its_imitation_of_the_full_ffn() -> None:
    """cheap_training: all: the cheap path also learns to imitate the full FFN on the tokens
    routed full (the paper trains it on the ones routed cheap alone); both paths then run on
    every token, and the step's FLOPs say so."""
    x, y = batch()
    routed_only = routed(aux=[], estimator="ratio").train()  # sparse dispatch by default
    everywhere = routed(aux=[], estimator="ratio", cheap_training="all").train()
    everywhere.load_state_dict(routed_only.state_dict())
    plain, imitating = (m.training_loss(x, y, 0) for m in (routed_only, everywhere))
    assert "cheap_imitation" not in plain.metrics
    term = imitating.metrics["cheap_imitation"]
    assert term > 0
    assert imitating.loss.item() == pytest.approx(plain.loss.item() + term, rel=1e-5)
    imitating.loss.backward()
    grads = [p.grad for r in everywhere.routers for p in r.cheap.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert imitating.flops_per_token > plain.flops_per_token  # full and cheap on every token
    assert everywhere.routers[0].use_sparse(False, training=False)  # inference: sparse as before
