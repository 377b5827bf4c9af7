"""Dispatch of the routed FFN: sparse (packed gather/scatter) against dense (mask over both
paths), the ratio estimator's gradient, and generation with the KV cache under routing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from adadepth.config import ModelConfig
from adadepth.depth.dispatch import Call, topk_count, topk_route
from adadepth.depth.gates import Gate
from adadepth.depth.registry import build
from adadepth.depth.routing import RoutedFFN, RoutedModel, RouteRecord, RoutingConfig
from adadepth.generate import generate
from adadepth.model import Context, SwiGLU, Transformer

D, D_FF, VOCAB = 16, 40, 30


def router(cheap: str = "low_rank", dispatch: str = "sparse", estimator: str = "ratio",
           seed: int = 0) -> RoutedFFN:
    torch.manual_seed(seed)
    cheap_ffn = build("cheap", cheap, d_model=D, d_ff=D_FF, rank=4)
    for p in cheap_ffn.parameters():  # cheap paths start at zero output; make them matter
        nn.init.normal_(p, std=0.3)
    gate = build("gate", "g1", d_model=D, d_z=8)
    return RoutedFFN(0, SwiGLU(D, D_FF), cheap_ffn, gate, estimator, dispatch)


def run(r: RoutedFFN, u: Tensor, budget: float = 0.5, **call) -> tuple[Tensor, RouteRecord]:
    """The routed FFN on u, as its model's forward calls it: the call in the context."""
    records: dict = {}
    ctx = Context.block(0, u.shape[1], u.device,
                        call=Call(setting=budget, records=records, **call))
    return r(u, ctx), records[r.site]


def twins(**kw) -> tuple[RoutedFFN, RoutedFFN]:
    sparse = router(dispatch="sparse", **kw)
    dense = copy.deepcopy(sparse)
    dense.dispatch = "dense"
    return sparse, dense


def inputs(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed))


def per_token_reference(r: RoutedFFN, u: Tensor, mask: Tensor) -> Tensor:
    """Each token on its own through the path its mask names: no packing, no mixing."""
    out = torch.empty_like(u)
    for b in range(u.shape[0]):
        for t in range(u.shape[1]):
            path = r.full if mask[b, t] else r.cheap
            out[b, t] = path(u[b, t:t + 1])[0]
    return out


def grads(module: nn.Module, u: Tensor) -> dict[str, Tensor]:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    out["input"] = u.grad.clone()
    return out


@pytest.mark.parametrize("cheap", ["low_rank", "skip", "narrow"])
def test_sparse_equals_dense_forward_and_backward_with_ratio(cheap: str) -> None:
    sparse, dense = twins(cheap=cheap)
    sparse.train(), dense.train()
    results = []
    for r in (sparse, dense):
        u = inputs(3, 11).requires_grad_()
        out, record = run(r, u)
        (out * inputs(3, 11, seed=2)).sum().backward()
        results.append((out.detach(), record.mask, grads(r, u)))
    (out_s, mask_s, g_s), (out_d, mask_d, g_d) = results
    assert torch.equal(mask_s, mask_d)
    assert (mask_s.sum(1) == topk_count(11, 0.5)).all()
    torch.testing.assert_close(out_s, out_d)
    assert g_s.keys() == g_d.keys() and "gate.net.0.weight" in g_s
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], msg=name)
    assert g_s["gate.net.0.weight"].abs().sum() > 0  # the gate does receive a gradient


def test_rows_routing_differently_match_the_per_token_reference() -> None:
    sparse, dense = twins()
    u = inputs(4, 9)
    with torch.no_grad():
        scores = sparse.gate(u)
    for r in (sparse, dense):
        r.eval()
        r.rule.set(scores.median().item())
    with torch.no_grad():
        (out_s, record), (out_d, _) = run(sparse, u), run(dense, u)
    mask = record.mask
    counts = mask.sum(1)
    assert counts.min() != counts.max()  # rows really take different routes
    torch.testing.assert_close(out_s, per_token_reference(sparse, u, mask))
    torch.testing.assert_close(out_d, out_s)


def test_decode_step_with_rows_on_different_paths() -> None:
    """T = 1, batch 6: some rows full, others cheap, in one call."""
    r = router().eval()
    u = inputs(6, 1, seed=5)
    with torch.no_grad():
        scores = r.gate(u)
        r.rule.set(scores.median().item())
        out, record = run(r, u)
    mask = record.mask
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(out, per_token_reference(r, u, mask))


@pytest.mark.parametrize("training", [True, False])
def test_empty_and_full_selections(training: bool) -> None:
    u = inputs(2, 7)
    with torch.no_grad():
        r = router().train(training)
        r.rule.set(float("nan"))  # budget 1.0 needs no calibrated threshold
        out, record = run(r, u, budget=1.0)
        assert torch.equal(out, r.full(u)) and record.mask.all()
        if not training:  # no token clears the threshold
            r = router().eval()
            r.rule.set(float("inf"))
            out, record = run(r, u)
            assert torch.equal(out, r.cheap(u)) and not record.mask.any()
        assert torch.equal(run(r, u, force=False)[0], r.cheap(u))
        assert torch.equal(run(r, u, force=True)[0], r.full(u))


def test_full_selection_backward_matches_dense() -> None:
    sparse, dense = twins()
    g = []
    for r in (sparse, dense):
        u = inputs(2, 5).requires_grad_()
        run(r.train(), u, budget=1.0)[0].square().sum().backward()
        g.append(grads(r, u))
    for name in g[0]:
        torch.testing.assert_close(g[0][name], g[1][name], msg=name)


class FixedScores(Gate):
    """A gate whose scores are a parameter, so the estimator's gradient can be read directly."""

    def __init__(self, scores: Tensor) -> None:
        super().__init__()
        self.scores = nn.Parameter(scores.clone())

    def forward(self, u: Tensor) -> Tensor:
        return self.scores


@pytest.mark.parametrize("center", ["boundary", "none"])
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_ratio_estimator_gradient_is_d_log_p(dispatch: str, center: str) -> None:
    """Value unchanged; d out_t / d s_t = out_t (1 - sigma) if full, -out_t sigma if cheap,
    with sigma read at s minus the top-k boundary (k = 4 of 7: midway between 0.5 and -1)."""
    r = router(dispatch=dispatch)
    r.center = center
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.5, 120.0, -120.0]])  # incl. saturated ones
    r.gate = FixedScores(scores)
    u, weight = inputs(1, 7), inputs(1, 7, seed=3)
    out = run(r.train(), u)[0]
    (out * weight).sum().backward()
    mask = topk_route(scores, 0.5)[0]
    with torch.no_grad():
        executed = per_token_reference(r, u, mask)
        p = torch.sigmoid(scores - (-0.25 if center == "boundary" else 0.0))
        expected = (executed * weight).sum(-1) * torch.where(mask, 1 - p, -p)
    torch.testing.assert_close(out.detach(), executed)
    assert torch.isfinite(r.gate.scores.grad).all()
    torch.testing.assert_close(r.gate.scores.grad, expected)


@pytest.mark.parametrize("estimator", ["straight_through", "ratio"])
def test_boundary_centred_gradient_ignores_a_common_shift(estimator: str) -> None:
    """Top-k ignores a shift of every score, and so does the centred surrogate: scores pushed to
    +50 (where a raw sigma has no gradient left) train the gate as scores around 0 do."""
    grads = []
    for shift in (0.0, 50.0):
        r = router(dispatch="auto", estimator=estimator)
        r.gate = FixedScores(torch.tensor([[0.3, -1.0, 0.8, -0.2, 1.5, 0.1]]) + shift)
        (run(r.train(), inputs(1, 6))[0] * inputs(1, 6, seed=3)).sum().backward()
        grads.append(r.gate.scores.grad)
    assert grads[0].abs().min() > 1e-3
    torch.testing.assert_close(grads[0], grads[1])


def test_topk_count_rounds_up_without_float_noise() -> None:
    assert topk_count(10, 0.3) == 3 and topk_count(7, 0.5) == 4 and topk_count(5, 0.01) == 1
    assert topk_count(8, 1.0) == 8


def test_straight_through_is_refused_on_sparse_training_and_auto_picks_dense() -> None:
    r = router(estimator="straight_through", dispatch="auto")
    assert not r.use_sparse(True) and r.use_sparse(False)
    r.dispatch = "sparse"
    u = inputs(1, 4).requires_grad_()
    with pytest.raises(Exception, match="straight-through"):
        run(r.train(), u)


# -- generation under routing -------------------------------------------------------------------
def routed_model(inference: str = "threshold") -> RoutedModel:
    torch.manual_seed(0)
    backbone = Transformer(ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=4, n_heads=2,
                                       d_ff=D_FF, max_seq_len=64)).eval()
    model = RoutedModel(backbone, RoutingConfig(gate="g1", d_z=8, estimator="ratio",
                                                inference=inference, aux=[], cheap="low_rank"))
    for r in model.routers:  # untrained controllers: give the cheap path and predictor a say
        nn.init.normal_(r.cheap.up.weight, std=0.3)
        if r.predictor is not None:
            nn.init.normal_(r.predictor.net.weight, std=1.0)
    model.calibrate([torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(9))])
    return model.eval()


@pytest.mark.parametrize("inference", ["threshold", "predictor"])
def test_generation_with_cache_equals_recomputation(inference: str) -> None:
    model = routed_model(inference)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    cached = generate(model, prompt, 20, temperature=0.0, use_cache=True)
    recomputed = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)

    # Step by step on a random text (greedy output of an untrained model soon repeats itself):
    # the cached decode sees the same logits and takes the same per-layer decisions as a full
    # recomputation of the prefix, for every row, whatever path each earlier token took.
    text = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(2, text.shape[1])
    model(text[:, :5], cache, 0)
    differing_rows = 0
    for t in range(5, text.shape[1]):
        step, whole = {}, {}
        step_logits = model(text[:, t:t + 1], cache, t, call=Call(records=step)).logits[:, -1]
        step_masks = torch.stack([step[i].mask[:, -1] for i in model.layers])
        full = model(text[:, :t + 1], call=Call(records=whole)).logits[:, -1]
        full_masks = torch.stack([whole[i].mask[:, -1] for i in model.layers])
        torch.testing.assert_close(step_logits, full, rtol=1e-4, atol=1e-5)
        assert torch.equal(step_masks, full_masks)
        differing_rows += int((step_masks[:, 0] != step_masks[:, 1]).any())
    assert differing_rows > 0  # the two rows did route differently at some steps
