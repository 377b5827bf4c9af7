"""Conditional depth routing: decisions, oracle labels, gradients, budgets, costs."""

from __future__ import annotations

import math

import pytest
import torch

from adadepth import flops as fl
from adadepth.bench import dense_view
from adadepth.config import ModelConfig, RoutingConfig
from adadepth.depth.oracle import oracle_utilities, rank_loss, token_losses_from, util_loss
from adadepth.depth.routing import RoutedModel, topk_mask
from adadepth.errors import UserError
from adadepth.model import Transformer, causal_lm_loss
from adadepth.route import RoutingObjective

CFG = ModelConfig(vocab_size=37, d_model=32, n_layers=5, n_heads=4, d_ff=64, max_seq_len=64)


def routed(gate: str = "g1", **kw) -> RoutedModel:
    torch.manual_seed(0)
    model = RoutedModel(Transformer(CFG), RoutingConfig(gate=gate, d_z=16, **kw))
    for r in model.routers:  # a cheap path that differs from skip, so labels are not trivial
        for p in r.cheap.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return model


def batch(b: int = 3, t: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def test_topk_gives_exactly_k_full_tokens_per_sequence():
    score = torch.randn(4, 17)
    for b in (0.1, 0.25, 0.5, 1.0):
        mask = topk_mask(score, b)
        assert (mask.sum(-1) == math.ceil(b * 17)).all()
        # the chosen tokens are the highest-scoring ones
        kth = score.topk(math.ceil(b * 17), -1).values[:, -1:]
        assert (score[mask] >= kth.expand_as(score)[mask]).all()


def test_training_forward_routes_exactly_the_budget():
    model = routed(budget=0.25).train()
    x, _ = batch(t=20)
    model(x)
    for r in model.routers:
        assert (r.record.mask.sum(-1) == 5).all()


@pytest.mark.parametrize("oracle", ["off_policy", "on_policy"])
def test_oracle_labels_equal_brute_force(oracle):
    model = routed().train()
    x, y = batch()
    bb = model.backbone
    h, ctx = bb.prepare(x)
    inputs = {}
    for i in range(bb.n_layers):
        if i in model.layers:
            inputs[i] = h.detach()
        h = bb.run_layer(i, h, ctx)
    labels = oracle_utilities(model, inputs, ctx, y, oracle)
    routers = dict(zip(model.layers, model.routers, strict=True))
    for layer in model.layers:
        losses = {}
        for force in (True, False):
            # Brute force: a whole separate forward from the tokens, layer forced, later layers
            # full (off-policy) or gated (on-policy), earlier layers deciding as in training.
            for i, r in routers.items():
                r.force = force if i == layer else (
                    (True if oracle == "off_policy" else None) if i > layer else None)
            with torch.no_grad():
                losses[force] = causal_lm_loss(model(x).logits, y, reduction="none")
        for r in routers.values():
            r.force = None
        torch.testing.assert_close(labels[layer], losses[False] - losses[True],
                                   atol=1e-5, rtol=1e-4)
        assert labels[layer].abs().max() > 1e-4  # the cheap path really differs


def test_oracle_keeps_training_records():
    model = routed().train()
    x, y = batch()
    model(x)
    before = [r.record.mask.clone() for r in model.routers]
    h, ctx = model.backbone.prepare(x)
    token_losses_from(model, 1, h, ctx, y, False, "on_policy")
    for r, m in zip(model.routers, before, strict=True):
        assert torch.equal(r.record.mask, m) and r.force is None


def test_straight_through_gives_nonzero_gate_gradients():
    model = routed(aux=[]).train()
    model.freeze_backbone()
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
        model(held_out)
    for f in model.full_fractions():
        assert abs(f - 0.3) <= 0.02
    # Causal: a token's decision does not depend on later tokens.
    with torch.no_grad():
        model(held_out[:, :10])
        first = [r.record.mask.clone() for r in model.routers]
        model(held_out)
    for r, m in zip(model.routers, first, strict=True):
        assert torch.equal(r.record.mask[:, :10], m)


def test_controller_only_training_leaves_backbone_bitwise_unchanged():
    model = routed(gate="g3", aux=["util", "rank", "jepa"])
    model.freeze_backbone()
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters()
              if not p.requires_grad}
    objective = RoutingObjective(model, seed=0)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        x, y = batch(seed=step)
        objective(x, y, step).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    target = model.routers[0].gate.target_proj.clone()
    assert torch.equal(target, model.routers[0].gate.target_proj)  # fixed head stays fixed


def train_g3_predictions_variance(aux: list[str], steps: int = 60) -> float:
    model = routed(gate="g3", aux=aux)
    model.freeze_backbone()
    objective = RoutingObjective(model, seed=0)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        x, y = batch(seed=step)
        objective(x, y, step).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model(batch(seed=999)[0])
    zhat = torch.stack([r.record.predictions for r in model.routers])
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
        loss = RoutingObjective(model, seed=0)(x, y, 0).loss
        grads.append(torch.autograd.grad(loss, [r.gate.action_emb.weight for r in model.routers]))
    for with_oracle, without in zip(*grads, strict=True):
        torch.testing.assert_close(with_oracle, without)


def test_removing_jepa_lowers_prediction_variance():
    with_jepa = train_g3_predictions_variance(["util", "rank", "jepa"])
    without = train_g3_predictions_variance(["util", "rank"])
    assert without < with_jepa


def test_flops_proxy_matches_closed_form():
    model = routed(aux=["util", "rank"], oracle="off_policy")
    objective = RoutingObjective(model, seed=0)
    T, c = 16, CFG
    ctx = (T + 1) / 2
    attn = 2 * (4 * c.d_model * c.d_model) + 4 * ctx * c.d_model
    full = 2 * 3 * c.d_model * c.d_ff
    head = 2 * c.d_model * c.vocab_size
    cheap = 2 * 2 * c.d_model * (c.d_model // 8)
    d_z, hid = 16, 64
    gate = 2 * (c.d_model * hid + hid * 1)
    L = c.n_layers
    # Straight-through trains on the dense mixture: controlled layers run both paths.
    main = head + L * attn + (L - 3) * full + 3 * (full + cheap + gate)
    oracle = 0.0
    for layer in model.layers:
        rest = L - layer
        for forced_cost in (full, cheap):
            # off-policy: later layers forced full; forced layers do not run their gates
            oracle += head + rest * attn + forced_cost + (rest - 1) * full
    expected = 3 * main + oracle
    got = objective.training_flops(T, [0.5] * 3, True, model.layers)
    assert got == pytest.approx(expected, rel=1e-9)
    dense = 3 * (head + L * (attn + full))
    assert objective.dense_training_flops(T) == pytest.approx(dense, rel=1e-9)
    assert d_z == 16


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
        with dense_view(model):
            dense = model(batch()[0]).logits
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
        model(batch()[0])
    assert sorted(model.full_fractions()) == [0.0, 1.0, 1.0]
