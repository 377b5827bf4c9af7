"""Mixture-of-Depths block routing (Raposo et al. 2024, arXiv:2404.02258).

At every routed block (by default every other block) a linear router scores each token,
r_t = w^T x_t + b. In training the top-C fraction of each sequence by r (capacity C, default
12.5%) runs the whole block, attending only to one another at their own positions (rotary
positions are the tokens' original ones), and its update is scaled by the router weight:

    x_t + r_t * f(x_t)   for the selected tokens,     x_t   for the others,

where f(x) = block(x) - x is the block's whole residual update (attention and MLP of a
pre-norm block), so the router sits on the gradient path of the language-modelling loss.

Top-k over a sequence looks at future tokens, so decoding decides causally instead, from a
score of the token alone: the router's own output trained with an auxiliary binary
cross-entropy towards top-k membership (`causal: aux_loss`), or a small MLP predictor reading
the router's input under a stop-gradient (`causal: predictor`, the default). The score passes a
threshold: the paper's sigmoid(score) > 0.5 (`threshold: half`), or (our default) per-layer
thresholds calibrated on held-out windows to the capacity, steered token by token by the shared
`ThresholdController` (`depth/dispatch.py`) so the realised capacity holds on any text.

Skipped tokens leave the computation: the block runs on the gathered selected tokens only (a
`Subset`), and a skipped token writes no K/V at that block, in training and in cached decoding
alike, so later tokens see exactly the same keys either way. docs/methods/mod.md says
which choices are the paper's and which are ours.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.capacity import CapacityRouted, resolve_layers
from adadepth.depth.dispatch import (
    PLAIN,
    Call,
    CausalPredictor,
    CausalRule,
    Subset,
    Tally,
    ThresholdController,
    attended_keys,
    membership_loss,
    topk_count,
    topk_index,
)
from adadepth.depth.method import Evaluate, Knob, MethodSpec, StepLoss
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.model import Context, LayerStack


class CausalRouting(Strict):
    """How routers that choose top-k in training decide causally when decoding, and what trains
    them (Mixture-of-Depths, Mixture-of-Recursions)."""

    causal: Literal["predictor", "aux_loss"] = Field(
        "predictor", description="what decides causally at inference: a stop-gradient MLP "
        "predictor of top-k membership, or the router itself trained with an auxiliary BCE")
    predictor_hidden: PositiveInt = 64
    lambda_aux: float = Field(0.1, ge=0, description="weight of the router's BCE (aux_loss)")
    lambda_predictor: float = Field(1.0, ge=0, description="weight of the predictor's BCE")
    threshold: Literal["calibrated", "half"] = Field(
        "calibrated", description="causal thresholds: calibrated to the capacity on held-out "
        "windows, or the paper's sigmoid(score) > 0.5")
    threshold_control: Literal["online", "fixed"] = "online"
    control_gain: float = Field(0.5, gt=0)
    control_slack: float = Field(4.0, ge=1)
    regime: Literal["joint", "routers"] = Field(
        "joint", description="retrofit of a pretrained backbone: the backbone trains with the "
        "routers and predictors, or stays frozen (from scratch everything trains)")


class MoDConfig(CausalRouting):
    """Mixture-of-Depths; defaults are the paper's or ours (docs/methods/mod.md)."""

    capacity: float = Field(0.125, gt=0, le=1, description="fraction of a sequence's tokens "
                            "that run a routed block")
    layers: Literal["every_other", "all_but_first", "all"] | list[int] = Field(
        "every_other", description="routed blocks: every other one (1, 3, 5, ...), all but the "
        "first, all, or a list")
    router_norm: bool = Field(False, description="the router reads RMS-normalised x instead "
                              "of the raw residual stream")


class Router(nn.Module):
    """One routed block's router r = w^T x + b, its causal predictor if used, and its causal
    decision rule.

    The router starts at w = 0, b = 1: every token's weight is 1, so at capacity 1 a fresh
    model is exactly its backbone (a retrofit starts from the pretrained function)."""

    def __init__(self, key: str, d_model: int, normalize: bool, predictor_hidden: int | None,
                 control: ThresholdController | None) -> None:
        super().__init__()
        self.normalize = normalize
        self.linear = nn.Linear(d_model, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.ones_(self.linear.bias)
        self.predictor = (CausalPredictor(d_model, predictor_hidden)
                          if predictor_hidden is not None else None)
        self.rule = CausalRule(key, control)  # key: where its controller state lives

    def read(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],)) if self.normalize else x

    def weight(self, x: Tensor) -> Tensor:
        """r_t, (B, T)."""
        return self.linear(self.read(x)).squeeze(-1)

    def predict(self, x: Tensor) -> Tensor:
        """The predictor's logit of top-k membership, (B, T); its input carries no gradient."""
        assert self.predictor is not None
        return self.predictor(self.read(x))

    def causal_score(self, x: Tensor) -> Tensor:
        return self.weight(x) if self.predictor is None else self.predict(x)


def build_routers(options: CausalRouting, keys: list[str], backbone: LayerStack,
                  normalize: bool = False) -> nn.ModuleList:
    """One `Router` per key (where its controller state lives in the cache), with a predictor
    when it decides causally, on the backbone's device and dtype."""
    hidden = options.predictor_hidden if options.causal == "predictor" else None
    control = None
    if options.threshold == "calibrated" and options.threshold_control == "online":
        control = ThresholdController(options.control_gain, options.control_slack)
    routers = nn.ModuleList(Router(key, backbone.cfg.d_model, normalize, hidden, control)
                            for key in keys)
    if options.threshold == "half":  # the paper's rule: sigmoid(score) > 0.5, i.e. score > 0
        for router in routers:
            router.rule.set(0.0)
    p = next(backbone.parameters())
    return routers.to(device=p.device, dtype=p.dtype)


class MixtureOfDepths(CapacityRouted):
    """A backbone whose routed blocks run on the tokens their routers choose."""

    name = "mod"
    knob = Knob("capacity", (1.0, 0.5, 0.25, 0.125), low=0.0, high=1.0)
    RAN = "mask"
    depth_unit = "blocks run"
    options: MoDConfig

    def __init__(self, backbone: LayerStack, options: MoDConfig) -> None:
        n = backbone.n_layers
        super().__init__(backbone, options, resolve_layers(
            options.layers, n, {"every_other": list(range(1, n, 2))}, "mod"))
        self.routers = build_routers(options, [f"mod-surplus-{j}" for j in range(len(
            self.layers))], backbone, options.router_norm)

    def causal_score(self, j: int, x: Tensor) -> Tensor:
        return self.routers[j].causal_score(x)

    def routed_layer(self, j: int, layer: int, x: Tensor, ctx: Context) -> Tensor:
        call = ctx.call if ctx.call is not None else PLAIN
        router = self.routers[j]
        B, T = x.shape[:2]
        topk = call.topk(self.training)
        forced = call.forced_at(layer)
        if forced is not None or (self.capacity >= 1 and not topk):
            mask = torch.full((B, T), forced is not False, dtype=torch.bool, device=x.device)
            return self.run_selected(j, layer, x, ctx, mask, None)
        if topk:
            weight = router.weight(x)
            index = topk_index(weight.detach(), self.capacity)
            mask = torch.zeros((B, T), dtype=torch.bool, device=x.device).scatter(1, index, True)
            if self.training:  # what the causal score learns to predict
                logits = weight if router.predictor is None else router.predict(x)
                call.record(("target", j), (logits, mask))
            return self.run_selected(j, layer, x, ctx, mask, weight, index)
        if not router.rule.calibrated:
            raise UserError("Mixture-of-Depths decoding needs calibrated thresholds: run "
                            "calibrate() (adadepth fit does) or use mod.threshold=half")
        if router.predictor is None:
            weight = router.weight(x)
            score = weight.detach()
        else:
            weight, score = None, router.predict(x)
            call.count("predictors", B * T, j)
        return self.run_selected(j, layer, x, ctx, router.rule.decide(score, self.capacity, ctx),
                                 weight)

    def run_selected(self, j: int, layer: int, x: Tensor, ctx: Context, mask: Tensor,
                     weight: Tensor | None, index: Tensor | None = None) -> Tensor:
        """x + r * (block(x) - x) on the tokens of `mask`, computed on those tokens alone;
        `weight` is r for every token, or None to compute it for the selected ones only.
        `index` (B, k), when given, lists each row's selected positions (top-k)."""
        call = ctx.call if ctx.call is not None else PLAIN
        call.record(("mask", j), mask)
        if call.tally is not None:
            self._count_run(call.tally, j, ctx, mask, weight is None)
        sub = Subset.of_index(ctx, index) if index is not None else Subset.of(ctx, mask)
        if sub is None:  # nobody runs the block
            return x
        part = sub.gather(x)
        r = sub.gather(weight) if weight is not None else self.routers[j].weight(part)
        change = r.unsqueeze(-1).to(part.dtype) * (self.backbone.run_layer(layer, part, sub.ctx)
                                                   - part)
        return sub.add(x, change)

    # -- which parameters train; what is saved ---------------------------------------------------
    def method_modules(self) -> dict[str, nn.Module]:
        return {"routers": self.routers}  # thresholds and spreads are buffers inside

    def set_trainable(self, from_scratch: bool) -> None:
        """From scratch, or in a `joint` retrofit, everything trains (the blocks learn to work
        on the tokens they are given); `routers` trains the routers and predictors alone."""
        super().set_trainable(from_scratch or self.options.regime == "joint")

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        """LM loss of the top-k forward plus the causal score's BCE towards top-k membership:
        the router's own (aux_loss, on the LM's gradient path) or the predictor's (which
        reads a stop-gradient input, so it leaves the LM objective alone)."""
        records: dict[Any, Any] = {}
        lm = self(x, call=Call(records=records)).loss(y)
        targets = [records["target", j] for j in range(len(self.layers))
                   if ("target", j) in records]
        bce = torch.stack([membership_loss(s, m) for s, m in targets]).mean()
        agree = torch.stack([((s.detach() > 0) == m).float().mean() for s, m in targets])
        weight = (self.options.lambda_aux if self.options.causal == "aux_loss"
                  else self.options.lambda_predictor)
        return StepLoss(lm + weight * bce, {"lm_loss": lm.item(), "causal_bce": bce.item(),
                                            "causal_accuracy": agree.mean().item()})

    def training_flops_per_token(self, seq_len: int) -> float:
        """The top-k forward at the trained capacity (routers and predictors on every token),
        and a backward of twice that when the backbone trains, once that when it is frozen."""
        k = topk_count(seq_len, self.options.capacity)
        run = [k / seq_len] * len(self.layers)
        keys = [k * (k + 1) / (seq_len * (seq_len + 1))] * len(self.layers)
        predictors = [1.0 if self.options.causal == "predictor" else 0.0] * len(self.layers)
        forward = self.flops_per_token(fl.causal_context(seq_len), run, keys,
                                       [1.0] * len(self.layers), predictors)
        return forward * (3 if self.backbone_trained() else 2)

    # -- cost accounting -------------------------------------------------------------------------
    def flops_per_token(self, context: float, run: list[float], keys: list[float],
                        routers: list[float], predictors: list[float]) -> float:
        """Forward FLOPs per token when routed block j runs on a fraction run[j] of the tokens,
        which attend to a fraction keys[j] of the keys a dense layer's queries would see, and
        the router / predictor are evaluated on fractions routers[j] / predictors[j]."""
        dense = fl.forward_per_token(self.cfg, context)
        n = self.cfg.n_layers
        proj_ffn, scores = (dense["attn_proj"] + dense["ffn"]) / n, dense["attn_scores"] / n
        total = sum(dense.values()) - len(self.layers) * (proj_ffn + scores)
        for j, router in enumerate(self.routers):
            total += run[j] * proj_ffn + keys[j] * scores
            total += routers[j] * fl.module_flops(router.linear)
            if router.predictor is not None:
                total += predictors[j] * fl.module_flops(router.predictor)
        return total

    def reference_flops_per_token(self, context: float) -> float:
        """Capacity 1: every token runs every block, scaled by its router weight."""
        ones = [1.0] * len(self.layers)
        return self.flops_per_token(context, ones, ones, ones, [0.0] * len(self.layers))

    def _count_run(self, tally: Tally, j: int, ctx: Context, mask: Tensor,
                   router_on_selected: bool) -> None:
        """Tokens that run block j in this call and the keys each attends to: the selected
        tokens before it in the call, and what the cache holds for the block below it."""
        run = mask.sum().item()
        tally.add("run", run, j)
        tally.add("routers", run if router_on_selected else mask.numel(), j)
        tally.add("keys", attended_keys(ctx, mask, ctx.kv_offset + self.layers[j]), j)

    def tally_flops(self, tally: Tally, context: float) -> float:
        """Per routed block: the fraction of tokens that ran it, the keys they attended to, and
        the router and predictor evaluations, over every forward counted."""
        m = range(len(self.layers))
        keys = [v / max(tally.get("dense_keys"), 1.0) for v in tally.sites("keys", m)]
        return self.flops_per_token(context, tally.per_token("run", m), keys,
                                    tally.per_token("routers", m),
                                    tally.per_token("predictors", m))

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        """Routed blocks not run (and the attention their queries skipped); routers and
        predictors run."""
        m = range(len(self.layers))
        run, routers = tally.per_token("run", m), tally.per_token("routers", m)
        predictors = tally.per_token("predictors", m)
        keys = [v / max(tally.get("dense_keys"), 1.0) for v in tally.sites("keys", m)]
        dense = fl.forward_per_token(self.cfg, context)
        n = self.cfg.n_layers
        proj_ffn, scores = (dense["attn_proj"] + dense["ffn"]) / n, dense["attn_scores"] / n
        out = {"blocks skipped": 0.0, "routers": 0.0, "predictors": 0.0}
        for j, router in enumerate(self.routers):
            out["blocks skipped"] -= (1 - run[j]) * proj_ffn + (1 - keys[j]) * scores
            out["routers"] += routers[j] * fl.module_flops(router.linear)
            if router.predictor is not None:
                out["predictors"] += predictors[j] * fl.module_flops(router.predictor)
        return out

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        run = tally.per_token("run", range(len(self.layers)))
        return {"realised_capacity": sum(run) / len(run), "capacity_per_layer": run,
                "capacity": self.capacity, "routed_layers": self.layers,
                "tokens": int(tally.tokens)}

    # -- causal thresholds -----------------------------------------------------------------------
    @torch.no_grad()
    @torch.no_grad()
    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        """Calibrate the causal thresholds (unless the paper's 0.5 rule is used), then on other
        held-out windows: how often the causal rule agrees with top-k, the realised capacity,
        and the LM loss under top-k and under causal decisions."""
        if self.options.threshold == "calibrated":
            self.calibrate(calibration)
        x, y = held_out[:, :-1], held_out[:, 1:]
        topk_loss = self(x, call=Call(rule="topk")).loss(y).item()
        agree, agree_half = [], []
        for j, (score, mask) in enumerate(self._topk_scores(x)):
            agree.append(((score > self.routers[j].rule.threshold) == mask).float().mean().item())
            agree_half.append(((score > 0) == mask).float().mean().item())
        causal_loss = self(x, call=Call(rule="causal")).loss(y).item()
        realised = self.measured_over([x], Call(rule="causal")).summary()["capacity_per_layer"]
        return {"capacity": self.capacity, "routed_layers": self.layers,
                "thresholds": self.thresholds(),
                "held_out_loss_topk": topk_loss, "held_out_loss_causal": causal_loss,
                "causal_agreement_with_topk": agree, "half_rule_agreement_with_topk": agree_half,
                "realised_capacity_causal": realised}

    def _topk_scores(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per routed block, the causal scores and the top-k decisions of a top-k forward."""
        bb = self.backbone
        records: dict[Any, Any] = {}
        h, ctx = bb.prepare(x, call=Call(rule="topk", records=records))
        out = []
        for i in range(bb.n_layers):
            j = self.slot.get(i)
            if j is None:
                h = bb.run_layer(i, h, ctx)
                continue
            score = self.routers[j].causal_score(h)
            h = self.routed_layer(j, i, h, ctx)
            out.append((score, records["mask", j]))
        return out

    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        return {**super().eval_report(data, block_size, batch_size, max_batches),
                "causal": self.options.causal}


register("method", "mod")(MethodSpec(
    name="mod", config=MoDConfig, build=MixtureOfDepths, kind="mod",
    summary="Mixture-of-Depths: top-C tokens run each routed block, the rest skip it"))

__all__ = ["CausalRouting", "MixtureOfDepths", "MoDConfig", "Router", "build_routers"]
