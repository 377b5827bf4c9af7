"""Conditional depth routing: per token, a controlled layer runs its full FFN or a cheap one.

"Revisiting Auxiliary Losses for Conditional Depth Routing" (2026); docs/methods.md explains the
method and which choices are the paper's and which are ours.

`RoutedFFN` replaces the backbone's FFN at a controlled layer. It scores every token with a gate,
decides full or cheap under the full-path budget b, and computes only what it decided:

- decisions (`depth/dispatch.py`): top-k per sequence (k = ceil(b*T), training), or causal
  thresholds calibrated on held-out data (inference and decoding), read from the gate score or
  from a small predictor trained to imitate top-k membership. With `threshold_control: online`
  (default) each row's threshold is then steered token by token so that the running full
  fraction stays on budget whatever the text (`ThresholdController`);
- dispatch: `sparse` gathers the full-path tokens into a packed tensor, runs the full FFN on
  them alone and the cheap FFN on the rest, and scatters back; `dense` runs both paths on every
  token and mixes (needed by the straight-through estimator, kept for comparison);
- the gate's gradient through the hard decision: straight-through (forward m, backward
  sigma(s)), or the ratio estimator that scales each executed path by sigma/sg(sigma) or
  (1-sigma)/sg(1-sigma), which needs only the executed path. Both read s relative to the
  decision boundary (`surrogate_center: boundary`, the default): top-k and thresholds ignore a
  shift of every score, so the LM gradient, which pushes all scores up wherever the full path
  helps, would otherwise drive sigma(s) into saturation and its own gradient to zero.

`RoutedModel` installs RoutedFFNs into any layer stack; they read the call's instructions and
the budget from `Context.call`. Its training objective (LM loss plus the oracle-labelled
auxiliary losses) and training cost are in `depth/oracle.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn
from tqdm import tqdm

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.cheap import gated
from adadepth.depth.dispatch import (
    PLAIN,
    Call,
    CausalPredictor,
    CausalRule,
    Tally,
    ThresholdController,
    split_tokens,
    topk_count,
    topk_route,
)
from adadepth.depth.gates import Gate
from adadepth.depth.method import Evaluate, Knob, Method, MethodSpec, StepLoss, TrainingPlan
from adadepth.depth.registry import build, register
from adadepth.errors import UserError
from adadepth.model import Context, KVCache, LayerStack, Output


class RoutingConfig(Strict):
    """Conditional depth routing; defaults are the paper's or ours (docs/methods.md)."""

    gate: str = "g1"
    budget: float = Field(0.5, gt=0, le=1, description="fraction of tokens on the full path")
    layers: list[int] | None = Field(None, description="controlled layers; None = all but ends")
    cheap: str = Field("auto", description="low_rank, skip, narrow (zero output at the "
                       "start: cheap means skip) or pruned (a copy of the full FFN's most "
                       "important neurons, refitted: gated FFNs only); auto = pruned where the "
                       "FFN is gated, else low_rank")
    rank: PositiveInt | None = Field(None, description="cheap FFN rank (width); None = d_model/8 "
                                     "(low_rank) or d_ff/8 (narrow, pruned)")
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
    oracle_layers: int | None = Field(
        None, ge=0, description="controlled layers the oracle labels per step, drawn at random; "
        "None = as many as keep a step's training FLOPs within oracle_proxy times a dense "
        "training step (at least one); 0 = all")
    oracle_proxy: float = Field(1.5, gt=0, description="the FLOPs proxy the default number of "
                                "labelled layers aims at (the paper reports ~1.5x with util/rank)")
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
    cheap_training: Literal["routed", "all"] = Field(
        "routed", description="the cheap path learns from the tokens routed to it (the paper), "
        "or also imitates the full FFN on every token (so it serves at other budgets)")
    lambda_cheap: float = Field(1.0, ge=0, description="weight of the imitation term "
                                "(cheap_training: all)")


@dataclass
class RouteRecord:
    """What one routed forward decided at a layer, for the auxiliary losses (`Call.records`,
    keyed by the layer)."""

    score: Tensor | None  # (B, T) gate scores, with gradient when the gate trains; None when
    # the decision could not depend on them and the gate did not run
    mask: Tensor  # (B, T) bool, True = full path
    outcome: Tensor | None  # (B, T, d) executed FFN output, when kept for the JEPA loss
    u: Tensor | None  # (B, T, d) normalised input, when kept for the causal predictor
    predictions: Tensor | None = None  # (B, T, 2, d_z) G3's latent predictions, this forward's
    imitation: Tensor | None = None  # how far the cheap path is from the full FFN on every
    # token, relative (cheap_training: all, in training)


@dataclass
class Route:
    """One layer's decisions, with what is known of their shape before looking at them."""

    mask: Tensor  # (B, T) bool, True = full path
    per_row: int | None = None  # every row has exactly this many full tokens (top-k)
    uniform: bool | None = None  # every token takes the same path (True = full)
    boundary: Tensor | float = 0.0  # the score at which the decision flips, (B, 1) or scalar


def ratio_weight(score: Tensor, mask: Tensor) -> Tensor:
    """sigma(s)/sg(sigma(s)) on full tokens, (1-sigma(s))/sg(1-sigma(s)) on cheap ones.

    Written as exp(log p - sg(log p)) with p from logsigmoid: exactly 1 in value and never 0/0
    when a saturated score underflows sigma to zero; the gradient is d log p / ds.
    """
    logp = F.logsigmoid(torch.where(mask, score, -score).float())
    return torch.exp(logp - logp.detach())


class RoutedFFN(nn.Module):
    """The FFN site of controlled layer `site`: full or cheap per token, as the call says."""

    takes_context = True  # called as ffn(u, ctx) by the block (`model/transformer.py`)

    def __init__(self, site: int, full: nn.Module, cheap: nn.Module, gate: Gate,
                 estimator: str = "straight_through", dispatch: str = "auto",
                 predictor: nn.Module | None = None, center: str = "boundary",
                 control: ThresholdController | None = None, keep_outcome: bool = False,
                 cheap_on_all: bool = False) -> None:
        super().__init__()
        self.site = site
        self.full, self.cheap, self.gate = full, cheap, gate
        self.estimator, self.dispatch, self.center = estimator, dispatch, center
        self.predictor = predictor  # causal imitation of top-k; None = threshold the score
        self.rule = CausalRule(f"routing-surplus-{site}", control)
        self.keep_outcome = keep_outcome
        self.cheap_on_all = cheap_on_all  # training: the cheap path imitates full everywhere

    # -- deciding ---------------------------------------------------------------------------
    def causal_score(self, u: Tensor, score: Tensor) -> Tensor:
        return score if self.predictor is None else self.predictor(u)

    def uniform_decision(self, call: Call, budget: float) -> bool | None:
        """The path of every token when no score can change it (True = full), else None:
        forced calls (oracle counterfactuals, the dense reference), constant gates, and causal
        routing at budget 1."""
        forced = call.forced_at(self.site)
        if forced is not None:
            return forced
        if self.gate.fixed is not None:
            return self.gate.fixed
        if budget >= 1 and not call.topk(self.training):
            return True
        return None

    def decide(self, u: Tensor, score: Tensor, call: Call, budget: float,
               ctx: Context) -> Route:
        if call.topk(self.training):
            k = topk_count(score.shape[-1], budget)
            mask, boundary = topk_route(score.detach(), budget)
            return Route(mask, per_row=k, uniform=True if k == score.shape[-1] else None,
                         boundary=boundary)
        causal = self.causal_score(u, score).detach()
        if not self.rule.calibrated:
            raise UserError("causal routing needs calibrated thresholds; run calibrate() first")
        return Route(self.rule.decide(causal, budget, ctx), boundary=self.rule.threshold)

    # -- computing ----------------------------------------------------------------------------
    def use_sparse(self, needs_gate_grad: bool, training: bool = True) -> bool:
        if self.cheap_on_all and training:  # both paths on every token: the imitation's need
            return False
        if self.dispatch != "auto":
            return self.dispatch == "sparse"
        return not (needs_gate_grad and self.estimator == "straight_through")

    def forward(self, u: Tensor, ctx: Context | None = None) -> Tensor:
        call = ctx.call if ctx is not None and ctx.call is not None else PLAIN
        if call.force is True and call.forced is None and call.tally is None \
                and call.records is None and call.inputs is None:  # the dense reference
            return self.full(u)
        budget = call.setting
        if budget is None:
            raise ValueError("a routed FFN runs inside its RoutedModel, which sets the budget")
        full = self.uniform_decision(call, budget)
        if call.inputs is not None and self.site in call.inputs:
            call.inputs[self.site].append(u.detach())
        if full is None and call.collect is not None and self.site in call.collect:
            score, _ = self.gate.scored(u)  # calibration: the causal scores, then the full path
            call.collect[self.site].append(self.causal_score(u, score).detach().float()
                                           .flatten().cpu())
            full = True
        if full is not None:  # the gate is not run: its score could not change anything
            out = (self.full if full else self.cheap)(u).to(u.dtype)
            if call.records is not None or call.tally is not None:
                mask = torch.full(u.shape[:-1], full, dtype=torch.bool, device=u.device)
                self.note(call, RouteRecord(None, mask, out if self.keep_outcome else None,
                                            u if self.predictor is not None else None))
            return out
        score, predictions = self.gate.scored(u)
        route = self.decide(u, score, call, budget, ctx)
        grad = torch.is_grad_enabled() and score.requires_grad
        logit = None  # what the surrogate sigma() reads; None = no gradient to the gate
        if grad:
            logit = score - route.boundary if self.center == "boundary" else score
        imitation = None
        if self.use_sparse(grad, torch.is_grad_enabled()):
            out = self._sparse(u, route, logit)
        else:
            out, full_out, cheap_out = self._dense(u, route.mask, logit)
            if self.cheap_on_all and torch.is_grad_enabled():
                target = full_out.detach().float()
                imitation = ((cheap_out.float() - target).pow(2).mean()
                             / target.pow(2).mean().clamp_min(1e-12))
        self.note(call, RouteRecord(score, route.mask, out if self.keep_outcome else None,
                                    u if self.predictor is not None else None, predictions,
                                    imitation))
        return out

    def note(self, call: Call, record: RouteRecord) -> None:
        call.record(self.site, record)
        if call.tally is not None:
            call.count("full", record.mask.sum().item(), self.site)
            if record.score is not None:  # the gate ran on these tokens
                call.count("gated", record.mask.numel(), self.site)

    def _dense(self, u: Tensor, mask: Tensor,
               score: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Both paths on every token, then mixed: the reference, and straight-through's need.
        Returns the mixture and the two paths' outputs."""
        full, cheap = self.full(u).to(u.dtype), self.cheap(u).to(u.dtype)
        m = mask.unsqueeze(-1)
        if score is not None and self.estimator == "straight_through":
            p = torch.sigmoid(score).unsqueeze(-1).to(u.dtype)
            soft = m.to(u.dtype) + p - p.detach()  # forward: the hard mask; backward: sigma'(s)
            return cheap + soft * (full - cheap), full, cheap
        out = torch.where(m, full, cheap)
        if score is not None:
            out = out * ratio_weight(score, mask).unsqueeze(-1).to(u.dtype)
        return out, full, cheap

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
        flat = u.reshape(-1, u.shape[-1])
        n = flat.shape[0]
        if route.per_row is not None:
            n_full = route.per_row * (n // route.mask.shape[-1])
        else:
            n_full = int(route.mask.sum())
            if n_full in (0, n):  # common at decode: one row, or all rows agree
                return (self.full if n_full else self.cheap)(u).to(u.dtype)
        full_idx, cheap_idx = split_tokens(route.mask, n_full)
        full_out = self.full(flat.index_select(0, full_idx)).to(flat.dtype)
        if getattr(self.cheap, "is_skip", False):
            out = torch.zeros_like(flat)
        else:
            cheap_out = self.cheap(flat.index_select(0, cheap_idx)).to(flat.dtype)
            out = torch.empty_like(flat).index_copy_(0, cheap_idx, cheap_out)
        return out.index_copy_(0, full_idx, full_out).view_as(u)


def cheap_kind(name: str, full: nn.Module) -> str:
    """The cheap path `auto` stands for: a pruned copy of a gated FFN (over a pretrained model
    it starts near the full FFN instead of at "skip": benchmarks/README.md), else low_rank."""
    if name != "auto":
        return name
    return "pruned" if gated(full) else "low_rank"


def default_layers(n_layers: int) -> list[int]:
    return list(range(1, n_layers - 1))


class RoutedModel(Method):
    """A backbone whose controlled layers route each token to a full or a cheap FFN."""

    name = "routing"
    knob = Knob("budget", (1.0, 0.75, 0.5, 0.25), low=0.0, high=1.0)
    depth_unit = "controlled layers on the full path"
    options: RoutingConfig

    def __init__(self, backbone: LayerStack, options: RoutingConfig) -> None:
        super().__init__(backbone, options)
        n = backbone.n_layers
        self.layers = list(options.layers) if options.layers is not None else default_layers(n)
        if not self.layers:
            raise UserError(f"no controlled layer: the backbone has {n} layers; "
                            "set routing.layers explicitly")
        if any(not 0 <= i < n for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise UserError(f"controlled layers {self.layers} must be distinct, in 0..{n - 1}")
        with torch.random.fork_rng():  # the probe must not shift the real gates' init
            probe = build("gate", options.gate, d_model=8)
        if "jepa" in options.aux and not probe.has_predictor:
            raise UserError(f"gate {options.gate!r} has no predictor to take the jepa loss")
        if {"util", "rank"} & set(options.aux) and not probe.needs_grad:
            raise UserError(f"gate {options.gate!r} has no parameters for the util/rank losses "
                            "to train; pass --aux none")
        if options.estimator == "straight_through" and options.dispatch == "sparse":
            raise UserError("the straight-through estimator needs dispatch dense (or auto); "
                            "use estimator=ratio for sparse training")
        self.budget = options.budget  # the knob's one value: the routers read it from the call
        d, d_ff = backbone.cfg.d_model, backbone.cfg.d_ff
        static_full = self._static_full_layers() if options.gate == "static" else set()
        self.routers = nn.ModuleList()
        for i in self.layers:
            if options.gate == "static":
                gate = build("gate", "all-full" if i in static_full else "all-cheap")
            else:
                gate = build("gate", options.gate, d_model=d, d_z=options.d_z,
                             hidden=options.gate_hidden)
            predictor = CausalPredictor(d) if options.inference == "predictor" else None
            control = (ThresholdController(options.control_gain, options.control_slack)
                       if options.threshold_control == "online" else None)
            cheap = build("cheap", cheap_kind(options.cheap, backbone.get_ffn(i)), d_model=d,
                          d_ff=d_ff, rank=options.rank, full=backbone.get_ffn(i))
            router = RoutedFFN(i, backbone.get_ffn(i), cheap, gate, options.estimator,
                               options.dispatch, predictor, options.surrogate_center, control,
                               keep_outcome="jepa" in options.aux,
                               cheap_on_all=options.cheap_training == "all")
            backbone.set_ffn(i, router)
            self.routers.append(router)
        # The controller lives where the backbone does, in its floating-point type.
        p = next(backbone.parameters())
        self.routers.to(device=p.device, dtype=p.dtype)
        self.training_state: Any = None  # the seeded label draws of a training run (oracle.py)

    def _static_full_layers(self) -> set[int]:
        """Evenly spaced controlled layers run full, round(b * #layers) of them."""
        count = round(self.options.budget * len(self.layers))
        if count == 0:
            return set()
        step = len(self.layers) / count
        return {self.layers[int(j * step)] for j in range(count)}

    def routed(self, call: Call) -> Call:
        """The call as the routers see it: with the budget."""
        return call.but(setting=self.budget)

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        inner = self.routed(call)
        if call.depth is not None and call.records is None:
            inner = inner.but(records={})
        out = self.backbone(idx, cache, start, positions=positions, call=inner)
        call.count("tokens", idx.numel())
        if call.depth is not None:
            assert inner.records is not None
            call.note_depth(torch.stack([inner.records[i].mask for i in self.layers]).sum(0))
        return out

    def run_stack(self, x: Tensor, call: Call) -> None:
        """The layer stack on token ids without the LM head (its logits are not needed)."""
        bb = self.backbone
        h, ctx = bb.prepare(x, call=self.routed(call))
        for i in range(bb.n_layers):
            h = bb.run_layer(i, h, ctx)
        call.count("tokens", x.numel())

    # -- which parameters train; what is saved -----------------------------------------------------
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
            out[f"routers.{j}.threshold"] = r.rule.threshold
            out[f"routers.{j}.spread"] = r.rule.spread
        return out

    def controller_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.method_modules().values() for p in m.parameters()]

    def backbone_trained(self) -> bool:
        return self.options.regime == "joint"

    def set_trainable(self, from_scratch: bool) -> None:
        """Controller-only (the paper's regime, over a given backbone): only the gates, cheap
        paths and predictors train; joint, or from scratch: everything."""
        joint = from_scratch or self.options.regime == "joint"
        self.trains_backbone = joint
        self.backbone.requires_grad_(joint)
        for module in self.method_modules().values():
            module.requires_grad_(True)

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

    @property
    def may_skip_parameters(self) -> bool:
        """Some trainable module can sit out a step (a constant gate's cheap FFN; every token
        full at budget 1 under sparse dispatch): DDP must then look for unused parameters."""
        return any(r.gate.fixed is not None for r in self.routers) or self.budget >= 1

    # -- training (the objective and its cost: depth/oracle.py) ------------------------------------
    def begin_training(self, plan: TrainingPlan) -> dict[str, Any]:
        from adadepth.depth.oracle import begin_training

        return begin_training(self, plan)

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        from adadepth.depth.oracle import training_loss

        return training_loss(self, x, y)

    @torch.no_grad()
    def run_figures(self, history: list[dict[str, Any]], figures: dict[str, Any],
                    evaluate: Evaluate) -> dict[str, Any]:
        """The study's figures of the run (`oracle.training_summary`), and the validation loss
        under top-k decisions beside the causal one."""
        from adadepth.depth.oracle import training_summary

        topk = Call(rule="topk")
        val_topk = evaluate(lambda x, y: self(x, call=topk).loss(y), "val")
        return {**training_summary(self, history, figures), "val_lm_topk": val_topk}

    def calibration_windows(self, default: int) -> int:
        return self.options.calibration_windows

    @torch.no_grad()
    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        """Calibrate the causal thresholds; then on other held-out windows the realised full
        fractions, and whether G3's predictions collapsed (their variance across the last
        calibration batch's tokens)."""
        records: dict[int, RouteRecord] = {}
        self.calibrate([calibration], records=records)
        self.eval()
        fractions = self.full_fraction_over(held_out.split(evaluate.batch_size))
        ctx = fl.causal_context(held_out.shape[1])
        return {"gate": self.options.gate, "aux": list(self.options.aux),
                "oracle": self.options.oracle, "budget": self.budget,
                "regime": self.options.regime, "controlled_layers": self.layers,
                "lambda_jepa": self.options.lambda_jepa, "full_fraction_causal": fractions,
                "flops_ratio_inference": self.inference_flops_per_token(ctx, fractions)
                / self.reference_flops_per_token(ctx),
                "prediction_variance": prediction_variance(records)}

    # -- causal inference ------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, batches: list[Tensor], chunk: int = 32,
                  records: dict[int, RouteRecord] | None = None) -> list[float]:
        """Set each layer's threshold to the (1-b) quantile of its held-out causal scores.

        Layer by layer, so layer l+1 sees inputs routed by the thresholds already set below it,
        as at deployment; windows go through in chunks and the LM head never runs, so memory
        stays at the hidden states of the calibration windows, whatever the vocabulary.
        `records` receives what the last chunk's routed pass decided at each layer.
        """
        was_training = self.training
        self.eval()
        windows = torch.cat(batches, 0)
        routers = dict(zip(self.layers, self.routers, strict=True))
        bb, budget = self.backbone, self.budget
        run = self.routed(Call(rule="causal", records=records))
        try:
            states = [bb.prepare(part, call=run) for part in windows.split(chunk)]
            for i in tqdm(range(bb.n_layers), desc="calibrating thresholds", unit="layer",
                          delay=2, leave=False, disable=None):
                r = routers.get(i)
                uniform = None if r is None else r.uniform_decision(run, budget)
                if r is not None and uniform is None:
                    collect = run.but(collect={i: []})
                    for h, ctx in states:
                        bb.run_layer(i, h, ctx.with_call(collect))
                    r.rule.calibrate(torch.cat(collect.collect[i]), budget)
                elif r is not None:  # every token takes one path: any score passes
                    r.rule.set(float("-inf") if uniform else float("inf"))
                states = [(bb.run_layer(i, h, ctx), ctx) for h, ctx in states]
        finally:
            self.train(was_training)
        return [r.rule.threshold.item() for r in self.routers]

    @torch.no_grad()
    def full_fraction_over(self, batches: Any) -> list[float]:
        """Realised full fraction per controlled layer over batches of token ids, decided
        causally (the LM head never runs)."""
        device = next(self.parameters()).device
        tally = Tally()
        for x in batches:
            self.run_stack(x.to(device), Call(rule="causal", tally=tally))
        return tally.per_token("full", self.layers)

    def most_token_depth(self) -> float:
        return float(len(self.routers))

    def depth_fraction(self, depth: float) -> float:
        """A token full at `depth` controlled layers skipped the full FFN at the others and ran
        a cheap path there (gates left out: they are the same for every token)."""
        dense = fl.forward_per_token(self.cfg, 1.0)
        stack = dense["attn_proj"] + dense["attn_scores"] + dense["ffn"]
        ffn = dense["ffn"] / self.cfg.n_layers
        cheap = sum(fl.module_flops(r.cheap) for r in self.routers) / len(self.routers)
        return 1 - (len(self.routers) - depth) * (ffn - cheap) / stack

    def inference_flops_per_token(self, context: float, fractions: list[float],
                                  budget: float | None = None,
                                  gates_run: list[float] | None = None) -> float:
        """Forward FLOPs per token at the given full fractions (what sparse dispatch executes).
        `gates_run` is the fraction of tokens whose gate (and predictor) ran at each layer, as
        recorded; without it, the gate runs wherever a score can matter: under causal routing
        at `budget` (default: the model's) below 1, with a gate that is not constant."""
        dense = fl.forward_per_token(self.cfg, context)
        per_layer_ffn = dense["ffn"] / self.cfg.n_layers
        total = sum(dense.values())
        budget = self.budget if budget is None else budget
        for j, (r, f) in enumerate(zip(self.routers, fractions, strict=True)):
            total += (f - 1) * per_layer_ffn + (1 - f) * fl.module_flops(r.cheap)
            ran = gates_run[j] if gates_run is not None else float(
                r.gate.fixed is None and budget < 1)
            gate = fl.module_flops(r.gate)
            if r.predictor is not None:
                gate += fl.module_flops(r.predictor)
            total += ran * gate
        return total

    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, object]:
        """Full fraction per controlled layer under causal routing on the validation split and
        routed/dense FLOPs, for `adadepth eval` (fit's metrics keep `full_fraction_causal`, on
        held-out windows other than the calibration's)."""
        batches = (x for x, _ in data.eval_batches("val", batch_size, block_size, max_batches))
        fractions = self.full_fraction_over(batches)
        ctx = fl.causal_context(block_size)
        return {"full_fraction_val": fractions, "controlled_layers": self.layers,
                "budget": self.budget, "gate": self.options.gate,
                "flops_ratio": self.inference_flops_per_token(ctx, fractions)
                / self.reference_flops_per_token(ctx)}

    # -- the bench -----------------------------------------------------------------------------
    def _setting(self, budget: float, thresholds: list[float],
                 spreads: list[float]) -> Callable[[], None]:
        def apply() -> None:
            self.budget = budget
            for r, t, s in zip(self.routers, thresholds, spreads, strict=True):
                r.rule.set(t, s)
        return apply

    def trained_range(self) -> tuple[float, float] | None:
        return (self.options.budget, self.options.budget)

    def current_knob_value(self) -> float | None:
        return self.budget

    def current_setting(self) -> Callable[[], None]:
        return self._setting(self.budget, [r.rule.threshold.item() for r in self.routers],
                             [r.rule.spread.item() for r in self.routers])

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        self._setting(value, [float("nan")] * len(self.routers), [1.0] * len(self.routers))()
        self.calibrate([calibration])
        return self.current_setting()

    def reference_flops_per_token(self, context: float) -> float:
        return sum(fl.forward_per_token(self.cfg, context).values())

    def tally_flops(self, tally: Tally, context: float) -> float:
        return self.inference_flops_per_token(context, tally.per_token("full", self.layers),
                                              gates_run=tally.per_token("gated", self.layers))

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        """Full FFNs not run, the cheap paths run instead, the gates (and predictors) run."""
        fractions = tally.per_token("full", self.layers)
        gated = tally.per_token("gated", self.layers)
        ffn = fl.forward_per_token(self.cfg, context)["ffn"] / self.cfg.n_layers
        out = {"full FFNs skipped": 0.0, "cheap paths": 0.0, "gates": 0.0}
        for r, f, g in zip(self.routers, fractions, gated, strict=True):
            out["full FFNs skipped"] -= (1 - f) * ffn
            out["cheap paths"] += (1 - f) * fl.module_flops(r.cheap)
            gate = fl.module_flops(r.gate)
            if r.predictor is not None:
                gate += fl.module_flops(r.predictor)
            out["gates"] += g * gate
        return out

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        fractions = tally.per_token("full", self.layers)
        return {"full_fraction": sum(fractions) / len(fractions),
                "full_fraction_per_layer": fractions, "budget": self.budget,
                "tokens": int(tally.tokens)}


def prediction_variance(records: dict[int, RouteRecord]) -> float | None:
    """Across-token variance of G3's latent predictions in a forward: ~0 means collapse."""
    values = [r.predictions.float().flatten(0, -3).var(0).mean().item()
              for r in records.values() if r.predictions is not None]
    return sum(values) / len(values) if values else None


register("method", "routing")(MethodSpec(
    name="routing", config=RoutingConfig, build=RoutedModel, kind="routed",
    summary="conditional depth routing: per token, full or cheap FFN at controlled layers",
    defaults={"optim": {"lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.0}}))
