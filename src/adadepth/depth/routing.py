"""Conditional depth routing: per token, a controlled layer runs its full FFN or a cheap one.

"Revisiting Auxiliary Losses for Conditional Depth Routing" (2026); docs/methods.md explains the
method and which choices are the paper's and which are ours.

`RoutedFFN` replaces the backbone's FFN at a controlled layer. It scores every token with a gate,
decides full or cheap under the full-path budget b, and computes only what it decided:

- decisions: top-k per sequence (k = ceil(b*T), training), or causal thresholds calibrated on
  held-out data (inference and decoding), read from the gate score or from a small predictor
  trained to imitate top-k membership. With `threshold_control: online` (default) each row's
  threshold is then steered token by token so that the running full fraction stays on budget
  whatever the text (see `ThresholdController`);
- dispatch: `sparse` gathers the full-path tokens into a packed tensor, runs the full FFN on
  them alone and the cheap FFN on the rest, and scatters back; `dense` runs both paths on every
  token and mixes (needed by the straight-through estimator, kept for comparison);
- the gate's gradient through the hard decision: straight-through (forward m, backward
  sigma(s)), or the ratio estimator that scales each executed path by sigma/sg(sigma) or
  (1-sigma)/sg(1-sigma), which needs only the executed path. Both read s relative to the
  decision boundary (`surrogate_center: boundary`, the default): top-k and thresholds ignore a
  shift of every score, so the LM gradient, which pushes all scores up wherever the full path
  helps, would otherwise drive sigma(s) into saturation and its own gradient to zero.

`RoutedModel` installs RoutedFFNs into any backbone with the layer-stack interface.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth import cheap as _cheap  # noqa: F401  (registers the cheap paths)
from adadepth.depth.gates import Gate
from adadepth.depth.method import Knob, Measurement, Method, MethodSpec
from adadepth.depth.registry import build, register
from adadepth.errors import UserError
from adadepth.model import KVCache, Output

Decision = Literal["auto", "topk", "causal", "calibrate"]


class RoutingConfig(Strict):
    """Conditional depth routing; defaults are the paper's or ours (docs/methods.md)."""

    gate: str = "g1"
    budget: float = Field(0.5, gt=0, le=1, description="fraction of tokens on the full path")
    layers: list[int] | None = Field(None, description="controlled layers; None = all but ends")
    cheap: str = "low_rank"
    rank: PositiveInt | None = Field(None, description="cheap FFN rank; None = d_model/8")
    d_z: PositiveInt = 64
    gate_hidden: PositiveInt | None = Field(None, description="None = 4*d_z")
    estimator: Literal["straight_through", "ratio"] = "straight_through"
    surrogate_center: Literal["boundary", "none"] = Field(
        "boundary", description="the estimator's sigma() reads the score minus the decision "
        "boundary (top-k edge or threshold), or the raw score")
    dispatch: Literal["auto", "dense", "sparse"] = "auto"
    inference: Literal["threshold", "predictor"] = "threshold"
    threshold_control: Literal["online", "fixed"] = Field(
        "online", description="steer each row's causal threshold to keep its running full "
        "fraction on budget, or keep the calibrated thresholds fixed")
    control_gain: float = Field(0.5, gt=0, description="threshold step per token of surplus, "
                                "in units of the layer's calibrated score spread")
    control_slack: float = Field(4.0, ge=1, description="surplus (tokens) beyond which the "
                                 "next decision is forced back toward the budget")
    aux: list[Literal["util", "rank", "jepa"]] = Field(default_factory=lambda: ["util", "rank"])
    oracle: Literal["off_policy", "on_policy"] = "off_policy"
    oracle_layers: int = Field(0, ge=0, description="layers labelled per step; 0 = all")
    lambda_util: float = Field(1.0, ge=0)
    lambda_rank: float = Field(1.0, ge=0)
    lambda_jepa: float = Field(1.0, ge=0)
    lambda_predictor: float = Field(1.0, ge=0)
    rank_margin: float = Field(0.0, ge=0)
    rank_max_pairs: PositiveInt = 16384
    regime: Literal["controller-only", "joint"] = "controller-only"
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.2, 0.1, 0.05])
    smoothing: float = Field(0.1, gt=0, le=1, description="EMA weight of the smoothed LM loss")
    calibration_windows: PositiveInt = Field(
        256, description="held-out windows the causal thresholds are calibrated on")


@dataclass
class RouteRecord:
    """What one routed forward decided, for the auxiliary losses and the metrics."""

    score: Tensor | None  # (B, T) gate scores, with gradient when the gate trains; None when
    # the decision could not depend on them and the gate did not run
    mask: Tensor  # (B, T) bool, True = full path
    outcome: Tensor | None  # (B, T, d) executed FFN output, when kept for the JEPA loss
    u: Tensor | None  # (B, T, d) normalised input, when kept for the causal predictor
    predictions: Tensor | None = None  # (B, T, 2, d_z) G3's latent predictions, this forward's


def topk_count(T: int, budget: float) -> int:
    """k = ceil(b*T), at least one token; the epsilon keeps 0.3*10 from rounding up to 4."""
    return max(1, min(T, math.ceil(budget * T - 1e-9)))


def topk_mask(score: Tensor, budget: float) -> Tensor:
    """Exactly k = ceil(b*T) full tokens in every sequence."""
    return topk_route(score, budget)[0]


def topk_route(score: Tensor, budget: float) -> tuple[Tensor, Tensor]:
    """The top-k mask and each row's decision boundary, (B, 1): midway between the k-th and
    the (k+1)-th largest score (the k-th itself when every token is full)."""
    T = score.shape[-1]
    k = topk_count(T, budget)
    top = score.topk(min(k + 1, T), dim=-1, sorted=True)
    mask = torch.zeros_like(score, dtype=torch.bool).scatter(-1, top.indices[..., :k], True)
    edge = top.values[..., k - 1:k + 1]
    return mask, edge.mean(-1, keepdim=True)


@dataclass
class Route:
    """One layer's decisions, with what is known of their shape before looking at them."""

    mask: Tensor  # (B, T) bool, True = full path
    per_row: int | None = None  # every row has exactly this many full tokens (top-k)
    uniform: bool | None = None  # every token takes the same path (True = full)
    boundary: Tensor | float = 0.0  # the score at which the decision flips, (B, 1) or scalar


class ThresholdController:
    """Keeps each row's running full fraction on budget, token by token, causally.

    Token t goes full when its score passes theta_t = theta_0 + eta * surplus_t, where
    surplus_t = sum over earlier tokens of (decision - b) and theta_0 is the calibrated
    threshold: each full token beyond the budget raises the bar, each cheap one lowers it (an
    integral controller, i.e. an online (1-b)-quantile tracker). When the surplus reaches
    +-slack tokens the decision is forced back toward the budget, so over any T tokens the
    realised fraction is within (slack + 1) / T of b, whatever the text. eta is `gain` times the
    spread of the layer's calibration scores, so the step means the same for every gate.

    Decisions depend only on earlier tokens of the same row; a cache carries the surplus from
    one decoding call to the next, so cached decoding decides exactly as a full forward does.
    """

    def __init__(self, budget: float, gain: float, slack: float) -> None:
        self.budget, self.gain, self.slack = budget, gain, slack

    def decide(self, scores: Tensor, theta0: float, spread: float,
               surplus: list[float]) -> tuple[Tensor, list[float]]:
        """Decisions for scores (B, T) in order, from each row's surplus; returns the new ones.

        A plain Python loop over host floats: ~0.3 us a token, far cheaper per token than
        tensor ops, and it is inherently sequential."""
        eta, b, slack = self.gain * spread, self.budget, self.slack
        rows, out = scores.tolist(), []
        surplus = list(surplus)
        for i, row in enumerate(rows):
            s, decided = surplus[i], []
            for value in row:
                full = value > theta0 + eta * s
                if s <= -slack:
                    full = True
                elif s >= slack:
                    full = False
                decided.append(full)
                s += (1.0 - b) if full else -b
            surplus[i] = s
            out.append(decided)
        return torch.tensor(out, dtype=torch.bool, device=scores.device), surplus


def quantile_threshold(scores: Tensor, budget: float) -> tuple[float, float]:
    """The causal threshold that lets a fraction `budget` of held-out scores pass (their
    (1-b) quantile), and the scores' spread for a `ThresholdController` (a robust std: the
    interquartile range / 1.349)."""
    scores = scores.float().flatten().cpu()
    threshold = torch.quantile(scores, 1 - budget).item()
    q75, q25 = torch.quantile(scores, torch.tensor([0.75, 0.25])).tolist()
    return threshold, max(q75 - q25, 1e-6) / 1.349


def ratio_weight(score: Tensor, mask: Tensor) -> Tensor:
    """sigma(s)/sg(sigma(s)) on full tokens, (1-sigma(s))/sg(1-sigma(s)) on cheap ones.

    Written as exp(log p - sg(log p)) with p from logsigmoid: exactly 1 in value and never 0/0
    when a saturated score underflows sigma to zero; the gradient is d log p / ds.
    """
    logp = F.logsigmoid(torch.where(mask, score, -score).float())
    return torch.exp(logp - logp.detach())


class RoutedFFN(nn.Module):
    def __init__(self, full: nn.Module, cheap: nn.Module, gate: Gate, budget: float,
                 estimator: str = "straight_through", dispatch: str = "auto",
                 predictor: nn.Module | None = None, center: str = "boundary",
                 control: ThresholdController | None = None) -> None:
        super().__init__()
        self.full, self.cheap, self.gate = full, cheap, gate
        self.budget, self.estimator, self.dispatch = budget, estimator, dispatch
        self.center = center  # "boundary": the surrogate reads s - boundary; "none": s itself
        self.predictor = predictor  # causal imitation of top-k; None = threshold the score
        self.control = control  # None: fixed causal thresholds
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("spread", torch.tensor(1.0))  # calibration scores' spread
        self.decision: Decision = "auto"
        self.force: bool | None = None  # oracle counterfactuals: every token full / cheap
        self.keep_outcome = False
        self.record: RouteRecord | None = None
        self.session: KVCache | None = None  # the cache of the call, for the controller's state
        self.collected: list[Tensor] | None = None  # calibration: causal scores seen

    # -- deciding ---------------------------------------------------------------------------
    def causal_score(self, u: Tensor, score: Tensor) -> Tensor:
        return score if self.predictor is None else self.predictor(u.detach()).squeeze(-1)

    def resolved_decision(self) -> Decision:
        if self.decision == "auto":
            return "topk" if self.training else "causal"
        return self.decision

    def uniform_decision(self) -> bool | None:
        """The path of every token when no score can change it (True = full), else None:
        oracle counterfactuals, constant gates, and causal routing at budget 1."""
        if self.force is not None:
            return self.force
        if self.gate.fixed is not None:
            return self.gate.fixed
        if self.budget >= 1 and self.resolved_decision() != "topk":
            return True
        return None

    def decide(self, u: Tensor, score: Tensor) -> Route:
        decision = self.resolved_decision()
        if decision == "topk":
            k = topk_count(score.shape[-1], self.budget)
            mask, boundary = topk_route(score.detach(), self.budget)
            return Route(mask, per_row=k, uniform=True if k == score.shape[-1] else None,
                         boundary=boundary)
        causal = self.causal_score(u, score).detach()
        if decision == "calibrate":  # collect only; the caller sets the threshold from them
            assert self.collected is not None
            self.collected.append(causal.float().flatten().cpu())
            return Route(torch.ones_like(causal, dtype=torch.bool), uniform=True)
        if torch.isnan(self.threshold):
            raise UserError("causal routing needs calibrated thresholds; run calibrate() first")
        if self.control is None:
            return Route(causal > self.threshold, boundary=self.threshold)
        key = ("routing-surplus", id(self))
        state = self.session.state if self.session is not None else {}
        surplus = state.get(key) or [0.0] * causal.shape[0]
        mask, surplus = self.control.decide(causal, self.threshold.item(), self.spread.item(),
                                            surplus)
        state[key] = surplus
        return Route(mask, boundary=self.threshold)

    # -- computing ----------------------------------------------------------------------------
    def use_sparse(self, needs_gate_grad: bool) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "sparse"
        return not (needs_gate_grad and self.estimator == "straight_through")

    def forward(self, u: Tensor) -> Tensor:
        full = self.uniform_decision()
        if full is not None:  # the gate is not run: its score could not change anything
            out = (self.full if full else self.cheap)(u).to(u.dtype)
            self.record = RouteRecord(
                score=None, mask=torch.full(u.shape[:-1], full, dtype=torch.bool, device=u.device),
                outcome=out if self.keep_outcome else None,
                u=u if self.predictor is not None else None)
            return out
        score = self.gate(u)
        route = self.decide(u, score)
        grad = torch.is_grad_enabled() and score.requires_grad  # forced passes returned above
        logit = None  # what the surrogate sigma() reads; None = no gradient to the gate
        if grad:
            logit = score - route.boundary if self.center == "boundary" else score
        if self.use_sparse(grad):
            out = self._sparse(u, route, logit)
        else:
            out = self._dense(u, route.mask, logit)
        self.record = RouteRecord(score=score, mask=route.mask,
                                  outcome=out if self.keep_outcome else None,
                                  u=u if self.predictor is not None else None,
                                  predictions=getattr(self.gate, "last_predictions", None))
        return out

    def _dense(self, u: Tensor, mask: Tensor, score: Tensor | None) -> Tensor:
        """Both paths on every token, then mixed: the reference, and straight-through's need."""
        full, cheap = self.full(u).to(u.dtype), self.cheap(u).to(u.dtype)
        m = mask.unsqueeze(-1)
        if score is not None and self.estimator == "straight_through":
            p = torch.sigmoid(score).unsqueeze(-1).to(u.dtype)
            soft = m.to(u.dtype) + p - p.detach()  # forward: the hard mask; backward: sigma'(s)
            return cheap + soft * (full - cheap)
        out = torch.where(m, full, cheap)
        if score is not None:
            out = out * ratio_weight(score, mask).unsqueeze(-1).to(u.dtype)
        return out

    def _sparse(self, u: Tensor, route: Route, score: Tensor | None) -> Tensor:
        """Only the executed path per token; the ratio estimator carries the gate's gradient."""
        if self.estimator == "straight_through" and score is not None:
            raise UserError("the straight-through estimator needs dispatch: dense")
        if route.uniform is not None:
            out = (self.full if route.uniform else self.cheap)(u).to(u.dtype)
        else:
            out = self._gather(u, route)
        if score is not None:
            out = out * ratio_weight(score, route.mask).unsqueeze(-1).to(u.dtype)
        return out

    def _gather(self, u: Tensor, route: Route) -> Tensor:
        """Pack the full tokens of all rows into one batch, run the full FFN on it alone, the
        cheap FFN on the rest, and scatter both back. With top-k the packed sizes follow from k
        (static shapes: no host sync, compilable); causal decisions need one count read back."""
        flat, m = u.reshape(-1, u.shape[-1]), route.mask.reshape(-1)
        n = m.numel()
        if route.per_row is not None:
            n_full = route.per_row * (n // route.mask.shape[-1])
        else:
            n_full = int(m.sum())
            if n_full in (0, n):  # common at decode: one row, or all rows agree
                return (self.full if n_full else self.cheap)(u).to(u.dtype)
        full_idx = torch.nonzero_static(m, size=n_full).squeeze(1)
        full_out = self.full(flat.index_select(0, full_idx)).to(flat.dtype)
        if getattr(self.cheap, "is_skip", False):
            out = torch.zeros_like(flat)
        else:
            cheap_idx = torch.nonzero_static(~m, size=n - n_full).squeeze(1)
            cheap_out = self.cheap(flat.index_select(0, cheap_idx)).to(flat.dtype)
            out = torch.empty_like(flat).index_copy_(0, cheap_idx, cheap_out)
        return out.index_copy_(0, full_idx, full_out).view_as(u)


def default_layers(n_layers: int) -> list[int]:
    return list(range(1, n_layers - 1))


def run_layers(backbone: nn.Module, x: Tensor) -> None:
    """The layer stack on token ids without the LM head (its logits are never needed here)."""
    h, ctx = backbone.prepare(x)
    for i in range(backbone.n_layers):
        h = backbone.run_layer(i, h, ctx)


class RoutedModel(Method):
    """A backbone whose controlled layers route each token to a full or a cheap FFN."""

    name = "routing"
    knob = Knob("budget", (1.0, 0.75, 0.5, 0.25), low=0.0, high=1.0)
    depth_unit = "controlled layers on the full path"

    def __init__(self, backbone: nn.Module, cfg: RoutingConfig) -> None:
        super().__init__(backbone)
        self.rcfg = cfg
        n = backbone.n_layers
        self.layers = list(cfg.layers) if cfg.layers is not None else default_layers(n)
        if not self.layers:
            raise UserError(f"no controlled layer: the backbone has {n} layers; "
                            "set routing.layers explicitly")
        if any(not 0 <= i < n for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise UserError(f"controlled layers {self.layers} must be distinct, in 0..{n - 1}")
        with torch.random.fork_rng():  # the probe must not shift the real gates' init
            probe = build("gate", cfg.gate, d_model=8)
        if "jepa" in cfg.aux and not probe.has_predictor:
            raise UserError(f"gate {cfg.gate!r} has no predictor to take the jepa loss")
        if {"util", "rank"} & set(cfg.aux) and not probe.needs_grad:
            raise UserError(f"gate {cfg.gate!r} has no parameters for the util/rank losses to "
                            "train; pass --aux none")
        if cfg.estimator == "straight_through" and cfg.dispatch == "sparse":
            raise UserError("the straight-through estimator needs dispatch dense (or auto); "
                            "use estimator=ratio for sparse training")
        d, d_ff = backbone.cfg.d_model, backbone.cfg.d_ff
        static_full = self._static_full_layers() if cfg.gate == "static" else set()
        self.routers = nn.ModuleList()
        for i in self.layers:
            if cfg.gate == "static":
                gate = build("gate", "all-full" if i in static_full else "all-cheap")
            else:
                gate = build("gate", cfg.gate, d_model=d, d_z=cfg.d_z, hidden=cfg.gate_hidden)
            predictor = nn.Linear(d, 1) if cfg.inference == "predictor" else None
            control = (ThresholdController(cfg.budget, cfg.control_gain, cfg.control_slack)
                       if cfg.threshold_control == "online" else None)
            router = RoutedFFN(backbone.get_ffn(i), build("cheap", cfg.cheap, d_model=d,
                                                          d_ff=d_ff, rank=cfg.rank),
                               gate, cfg.budget, cfg.estimator, cfg.dispatch, predictor,
                               cfg.surrogate_center, control)
            router.keep_outcome = "jepa" in cfg.aux
            backbone.set_ffn(i, router)
            self.routers.append(router)
        # The controller lives where the backbone does, in its floating-point type.
        p = next(backbone.parameters())
        self.routers.to(device=p.device, dtype=p.dtype)

    def _static_full_layers(self) -> set[int]:
        """Evenly spaced controlled layers run full, round(b * #layers) of them."""
        count = round(self.rcfg.budget * len(self.layers))
        if count == 0:
            return set()
        step = len(self.layers) / count
        return {self.layers[int(j * step)] for j in range(count)}

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None) -> Output:
        for r in self.routers:  # the controllers keep their per-row state in the cache
            r.session = cache
        try:
            return self.backbone(idx, cache, start, positions=positions)
        finally:
            for r in self.routers:
                r.session = None

    # -- which parameters train; what is saved -----------------------------------------------------
    def method_config(self) -> dict[str, Any]:
        return self.rcfg.model_dump()

    def method_modules(self) -> dict[str, nn.Module]:
        """Everything the router adds: gates, cheap FFNs, predictors (not the backbone's FFN)."""
        out: dict[str, nn.Module] = {}
        for j, r in enumerate(self.routers):
            out[f"routers.{j}.gate"] = r.gate
            out[f"routers.{j}.cheap"] = r.cheap
            if r.predictor is not None:
                out[f"routers.{j}.predictor"] = r.predictor
        return out

    def method_buffers(self) -> dict[str, Tensor]:
        out = {}
        for j, r in enumerate(self.routers):
            out[f"routers.{j}.threshold"] = r.threshold
            out[f"routers.{j}.spread"] = r.spread
        return out

    def backbone_trained(self) -> bool:
        return self.rcfg.regime == "joint"

    @contextlib.contextmanager
    def original_backbone(self) -> Iterator[nn.Module]:
        """The backbone with its original FFNs at the controlled layers, for the duration."""
        for layer, r in zip(self.layers, self.routers, strict=True):
            self.backbone.set_ffn(layer, r.full)
        try:
            yield self.backbone
        finally:
            for layer, r in zip(self.layers, self.routers, strict=True):
                self.backbone.set_ffn(layer, r)

    def freeze_backbone(self) -> None:
        """Controller-only regime: only the gates, cheap paths and predictors train."""
        self.backbone.requires_grad_(False)
        for p in self.controller_parameters():
            p.requires_grad_(True)

    def controller_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.method_modules().values() for p in m.parameters()]

    def set_decision(self, decision: Decision) -> None:
        for r in self.routers:
            r.decision = decision

    # -- causal inference ------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, batches: list[Tensor], chunk: int = 32) -> list[float]:
        """Set each layer's threshold to the (1-b) quantile of its held-out causal scores.

        Layer by layer, so layer l+1 sees inputs routed by the thresholds already set below it,
        as at deployment; windows go through in chunks and the LM head never runs, so memory
        stays at the hidden states of the calibration windows, whatever the vocabulary.
        """
        was_training = self.training
        self.eval()
        windows = torch.cat(batches, 0)
        routers = dict(zip(self.layers, self.routers, strict=True))
        bb = self.backbone
        try:
            states = []
            for part in windows.split(chunk):
                states.append(bb.prepare(part))
            for i in range(bb.n_layers):
                r = routers.get(i)
                if r is not None and r.uniform_decision() is None:
                    r.decision, r.collected = "calibrate", []
                    for h, ctx in states:
                        bb.run_layer(i, h, ctx)
                    threshold, spread = quantile_threshold(torch.cat(r.collected), r.budget)
                    r.threshold.fill_(threshold)
                    r.spread.fill_(spread)
                    r.decision, r.collected = "auto", None
                elif r is not None:  # every token takes one path: any score passes
                    r.threshold.fill_(float("-inf") if r.uniform_decision() else float("inf"))
                states = [(bb.run_layer(i, h, ctx), ctx) for h, ctx in states]
        finally:
            for r in self.routers:
                r.decision, r.collected = "auto", None
            self.train(was_training)
        return [r.threshold.item() for r in self.routers]

    @torch.no_grad()
    def full_fraction_over(self, batches) -> list[float]:
        """Realised full fraction per controlled layer over batches of token ids."""
        device = next(self.parameters()).device
        with self.measure() as m:
            for x in batches:
                run_layers(self.backbone, x.to(device))
        return m.summary()["full_fraction_per_layer"]

    def most_token_depth(self) -> float:
        return float(len(self.routers))

    def token_depth(self) -> Tensor | None:
        records = [r.record for r in self.routers]
        if any(rec is None for rec in records):
            return None
        return torch.stack([rec.mask for rec in records]).sum(0)

    def full_fractions(self) -> list[float]:
        """Realised full fraction per controlled layer in the last forward."""
        return [r.record.mask.float().mean().item() for r in self.routers]

    def inference_flops_per_token(self, context: float, fractions: list[float],
                                  budget: float | None = None,
                                  gates_run: list[float] | None = None) -> float:
        """Forward FLOPs per token at the given full fractions (what sparse dispatch executes).
        `gates_run` is the fraction of tokens whose gate (and predictor) ran at each layer, as
        recorded; without it, the gate runs wherever a score can matter: under causal routing
        at `budget` (default: each layer's own) below 1, with a gate that is not constant."""
        dense = fl.forward_per_token(self.cfg, context)
        per_layer_ffn = dense["ffn"] / self.cfg.n_layers
        total = sum(dense.values())
        for j, (r, f) in enumerate(zip(self.routers, fractions, strict=True)):
            total += (f - 1) * per_layer_ffn + (1 - f) * fl.module_flops(r.cheap)
            if gates_run is not None:
                ran = gates_run[j]
            else:
                ran = float(r.gate.fixed is None and (r.budget if budget is None else budget) < 1)
            gate = fl.module_flops(r.gate)
            if r.predictor is not None:
                gate += fl.module_flops(r.predictor)
            total += ran * gate
        return total

    @torch.no_grad()
    def eval_report(self, data, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, object]:
        """Full fraction under causal routing and routed/dense FLOPs, for `adadepth eval`."""
        batches = (x for x, _ in data.eval_batches("val", batch_size, block_size, max_batches))
        fractions = self.full_fraction_over(batches)
        ctx = fl.causal_context(block_size)
        return {"full_fraction_causal": fractions, "controlled_layers": self.layers,
                "budget": self.rcfg.budget, "gate": self.rcfg.gate,
                "flops_ratio": self.inference_flops_per_token(ctx, fractions)
                / self.reference_flops_per_token(ctx)}

    # -- the bench -----------------------------------------------------------------------------
    def _setting(self, budget: float, thresholds: list[float],
                 spreads: list[float]) -> Callable[[], None]:
        def apply() -> None:
            for r, t, s in zip(self.routers, thresholds, spreads, strict=True):
                r.budget = budget
                if r.control is not None:
                    r.control.budget = budget
                r.threshold.fill_(t)
                r.spread.fill_(s)
        return apply

    def current_knob_value(self) -> float | None:
        return self.routers[0].budget

    def current_setting(self) -> Callable[[], None]:
        return self._setting(self.routers[0].budget, [r.threshold.item() for r in self.routers],
                             [r.spread.item() for r in self.routers])

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        self._setting(value, [float("nan")] * len(self.routers), [1.0] * len(self.routers))()
        self.calibrate([calibration])
        return self.current_setting()

    @contextlib.contextmanager
    def dense_reference(self) -> Iterator[None]:
        with self.original_backbone():
            yield

    def reference_flops_per_token(self, context: float) -> float:
        return sum(fl.forward_per_token(self.cfg, context).values())

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Full fraction per controlled layer, and how often each gate ran, over every routed
        forward in the block."""
        full = torch.zeros(len(self.routers), dtype=torch.float64)
        gated = torch.zeros(len(self.routers), dtype=torch.float64)
        count = [0]

        def hook(j: int) -> Callable[..., None]:
            def record(module: RoutedFFN, _args: Any, _out: Any) -> None:
                full[j] += module.record.mask.sum().item()
                if module.record.score is not None:  # the gate ran on these tokens
                    gated[j] += module.record.mask.numel()
                if j == 0:
                    count[0] += module.record.mask.numel()
            return record

        hooks = [r.register_forward_hook(hook(j)) for j, r in enumerate(self.routers)]
        budget = self.routers[0].budget  # the setting measured, whatever is set later

        def fractions(totals: torch.Tensor) -> list[float]:
            return (totals / max(count[0], 1)).tolist()

        try:
            yield Measurement(
                lambda context: self.inference_flops_per_token(
                    context, fractions(full), gates_run=fractions(gated)),
                lambda: {"full_fraction": sum(fractions(full)) / len(self.routers),
                         "full_fraction_per_layer": fractions(full),
                         "budget": budget, "tokens": count[0]})
        finally:
            for h in hooks:
                h.remove()


register("method", "routing")(MethodSpec(
    name="routing", config=RoutingConfig, build=RoutedModel, kind="routed",
    summary="conditional depth routing: per token, full or cheap FFN at controlled layers",
    command="route"))
