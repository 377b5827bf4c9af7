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
thresholds calibrated on held-out windows to the capacity, steered token by token by routing's
`ThresholdController` so the realised capacity holds on any text.

Skipped tokens leave the computation: the block runs on the gathered selected tokens only
(`Context.select`), and a skipped token writes no K/V at that block, in training and in cached
decoding alike, so later tokens see exactly the same keys either way. docs/methods/mod.md says
which choices are the paper's and which are ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.method import Knob, Measurement, Method, MethodSpec, attribute_set
from adadepth.depth.registry import register
from adadepth.depth.routing import ThresholdController, quantile_threshold, topk_count
from adadepth.errors import UserError
from adadepth.model import Context, KVCache, Output, causal_lm_loss

Decision = Literal["auto", "topk", "causal"]


class MoDConfig(Strict):
    """Mixture-of-Depths; defaults are the paper's or ours (docs/methods/mod.md)."""

    capacity: float = Field(0.125, gt=0, le=1, description="fraction of a sequence's tokens "
                            "that run a routed block")
    layers: Literal["every_other", "all_but_first", "all"] | list[int] = Field(
        "every_other", description="routed blocks: every other one (1, 3, 5, ...), all but the "
        "first, all, or a list")
    causal: Literal["predictor", "aux_loss"] = Field(
        "predictor", description="what decides causally at inference: a stop-gradient MLP "
        "predictor of top-k membership, or the router itself trained with an auxiliary BCE")
    predictor_hidden: PositiveInt = 64
    lambda_aux: float = Field(0.1, ge=0, description="weight of the router's BCE (aux_loss)")
    lambda_predictor: float = Field(1.0, ge=0, description="weight of the predictor's BCE")
    router_norm: bool = Field(False, description="the router reads RMS-normalised x instead "
                              "of the raw residual stream")
    threshold: Literal["calibrated", "half"] = Field(
        "calibrated", description="causal thresholds: calibrated to the capacity on held-out "
        "windows, or the paper's sigmoid(score) > 0.5")
    threshold_control: Literal["online", "fixed"] = "online"
    control_gain: float = Field(0.5, gt=0)
    control_slack: float = Field(4.0, ge=1)
    regime: Literal["joint", "routers"] = Field(
        "joint", description="retrofit of a pretrained backbone: the backbone trains with the "
        "routers and predictors, or stays frozen (from scratch everything trains)")


class Router(nn.Module):
    """One routed block's router r = w^T x + b and, if used, its causal predictor.

    The router starts at w = 0, b = 1: every token's weight is 1, so at capacity 1 a fresh
    model is exactly its backbone (a retrofit starts from the pretrained function)."""

    def __init__(self, d_model: int, normalize: bool, predictor_hidden: int | None) -> None:
        super().__init__()
        self.normalize = normalize
        self.linear = nn.Linear(d_model, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.ones_(self.linear.bias)
        self.predictor = None
        if predictor_hidden is not None:
            self.predictor = nn.Sequential(nn.Linear(d_model, predictor_hidden), nn.SiLU(),
                                           nn.Linear(predictor_hidden, 1))
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("spread", torch.tensor(1.0))

    def read(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],)) if self.normalize else x

    def weight(self, x: Tensor) -> Tensor:
        """r_t, (B, T)."""
        return self.linear(self.read(x)).squeeze(-1)

    def predict(self, x: Tensor) -> Tensor:
        """The predictor's logit of top-k membership, (B, T); its input carries no gradient."""
        assert self.predictor is not None
        return self.predictor(self.read(x).detach()).squeeze(-1)


@dataclass
class Tally:
    """What the forwards inside a `measure()` block ran, per routed block."""

    tokens: int = 0  # tokens of every forward
    dense_keys: float = 0.0  # keys every token would attend to in a dense layer
    run: list[float] = field(default_factory=list)  # tokens that ran the block
    keys: list[float] = field(default_factory=list)  # keys the tokens that ran attended to
    routers: list[float] = field(default_factory=list)  # router evaluations
    predictors: list[float] = field(default_factory=list)  # predictor evaluations


def resolve_layers(spec: str | list[int], n_layers: int) -> list[int]:
    if spec == "every_other":
        layers = list(range(1, n_layers, 2))
    elif spec == "all_but_first":
        layers = list(range(1, n_layers))
    elif spec == "all":
        layers = list(range(n_layers))
    else:
        layers = sorted(spec)
        if any(not 0 <= i < n_layers for i in layers) or len(set(layers)) != len(layers):
            raise UserError(f"routed layers {spec} must be distinct, in 0..{n_layers - 1}")
    if not layers:
        raise UserError(f"no routed block: the backbone has {n_layers} layer(s); Mixture-of-"
                        "Depths needs at least 2 (or mod.layers=all)")
    return layers


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MixtureOfDepths(Method):
    """A backbone whose routed blocks run on the tokens their routers choose."""

    name = "mod"
    knob = Knob("capacity", (1.0, 0.5, 0.25, 0.125), low=0.0, high=1.0)
    depth_unit = "blocks run"

    def __init__(self, backbone: nn.Module, cfg: MoDConfig) -> None:
        super().__init__(backbone)
        self.mcfg = cfg
        self.layers = resolve_layers(cfg.layers, backbone.n_layers)
        self.slot = {layer: j for j, layer in enumerate(self.layers)}
        hidden = cfg.predictor_hidden if cfg.causal == "predictor" else None
        self.routers = nn.ModuleList(Router(backbone.cfg.d_model, cfg.router_norm, hidden)
                                     for _ in self.layers)
        if cfg.threshold == "half":  # the paper's rule: sigmoid(score) > 0.5, i.e. score > 0
            for router in self.routers:
                router.threshold.fill_(0.0)
        self.capacity = cfg.capacity
        self.control: ThresholdController | None = None
        if cfg.threshold == "calibrated" and cfg.threshold_control == "online":
            self.control = ThresholdController(cfg.capacity, cfg.control_gain, cfg.control_slack)
        self.decision: Decision = "auto"
        self.force: bool | None = None  # every token runs (True) / skips (False) every routed block
        self.masks: list[Tensor | None] = [None] * len(self.layers)  # last forward's decisions
        self.targets: list[tuple[Tensor, Tensor]] = []  # training: (causal logits, top-k mask)
        self.tally: Tally | None = None
        p = next(backbone.parameters())
        self.routers.to(device=p.device, dtype=p.dtype)

    # -- the forward ---------------------------------------------------------------------------
    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None) -> Output:
        bb = self.backbone
        x, ctx = bb.prepare(idx, cache, start, positions=positions)
        state: dict[str, Any] = {}
        if cache is not None:
            if start == 0 and positions is None:  # a new sequence: forget the controller's
                cache.state.pop("mod-surplus", None)
            state = cache.state
        self.targets = []
        if self.tally is not None:
            self._count_tokens(ctx, x.shape[0] * x.shape[1])
        for i in range(bb.n_layers):
            j = self.slot.get(i)
            x = bb.run_layer(i, x, ctx) if j is None else self.routed_block(j, i, x, ctx, state)
        return Output(logits=bb.head(x), hidden=x)

    def resolved_decision(self) -> Decision:
        if self.decision == "auto":
            return "topk" if self.training else "causal"
        return self.decision

    def routed_block(self, j: int, layer: int, x: Tensor, ctx: Context,
                     state: dict[str, Any]) -> Tensor:
        router = self.routers[j]
        B, T = x.shape[:2]
        decision = self.resolved_decision()
        if self.force is not None or (self.capacity >= 1 and decision == "causal"):
            everyone = self.force is not False
            mask = torch.full((B, T), everyone, dtype=torch.bool, device=x.device)
            return self.run_selected(j, layer, x, ctx, mask, None)
        if decision == "topk":
            weight = router.weight(x)
            k = topk_count(T, self.capacity)
            index = weight.detach().topk(k, dim=-1).indices.sort(dim=-1).values
            mask = torch.zeros((B, T), dtype=torch.bool, device=x.device).scatter(1, index, True)
            if self.training:  # what the causal score learns to predict
                logits = weight if router.predictor is None else router.predict(x)
                self.targets.append((logits, mask))
            return self.run_selected(j, layer, x, ctx, mask, weight, index)
        if torch.isnan(router.threshold):
            raise UserError("Mixture-of-Depths decoding needs calibrated thresholds: run "
                            "calibrate() (adadepth fit does) or use mod.threshold=half")
        if router.predictor is None:
            weight = router.weight(x)
            score = weight.detach()
        else:
            weight, score = None, router.predict(x)
            if self.tally is not None:
                self.tally.predictors[j] += B * T
        if self.control is None:
            mask = score > router.threshold
        else:
            key = f"mod-surplus-{j}"
            surplus = state.setdefault("mod-surplus", {}).get(key) or [0.0] * B
            mask, surplus = self.control.decide(score, router.threshold.item(),
                                                router.spread.item(), surplus)
            state["mod-surplus"][key] = surplus
        return self.run_selected(j, layer, x, ctx, mask, weight)

    def run_selected(self, j: int, layer: int, x: Tensor, ctx: Context, mask: Tensor,
                     weight: Tensor | None, index: Tensor | None = None) -> Tensor:
        """x + r * (block(x) - x) on the tokens of `mask`, computed on those tokens alone;
        `weight` is r for every token, or None to compute it for the selected ones only.
        `index` (B, k), when given, lists each row's selected positions (top-k)."""
        self.masks[j] = mask
        if self.tally is not None:
            self._count_run(j, ctx, mask, weight is None)
        rows = pad = None
        if index is None:
            counts = mask.sum(1).tolist()  # the packed shapes depend on them
            T = mask.shape[1]
            if min(counts) == T:  # everyone: the plain call
                return self._update(j, layer, x, ctx, weight)
            if max(counts) == 0:
                return x
            active = [b for b, c in enumerate(counts) if c]
            if len(active) < len(counts):  # rows where nobody runs are left out entirely
                rows = torch.tensor(active, device=x.device)
                mask = mask.index_select(0, rows)
                weight = weight.index_select(0, rows) if weight is not None else None
                counts = [counts[b] for b in active]
            width = max(counts)
            if min(counts) == width == T:  # whole rows (decoding one token per row)
                if rows is None:
                    return self._update(j, layer, x, ctx, weight)
                out = self._update(j, layer, x.index_select(0, rows), ctx.select(rows=rows),
                                   weight)
                return x.index_copy(0, rows, out)
            # each row's selected positions in order, padded with unselected ones
            index = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
            if min(counts) < width:
                pad = (torch.arange(width, device=x.device).unsqueeze(0)
                       >= torch.tensor(counts, device=x.device).unsqueeze(1))
        xr = x if rows is None else x.index_select(0, rows)
        sub = gather_tokens(xr, index)
        r = weight.gather(1, index) if weight is not None else None
        update = self._update(j, layer, sub, ctx.select(index=index, rows=rows, pad=pad), r,
                              delta=True)
        if pad is not None:  # padding entries ran but are discarded
            update = update.masked_fill(pad.unsqueeze(-1), 0)
        out = xr.scatter_add(1, index.unsqueeze(-1).expand_as(update), update)
        return out if rows is None else x.index_copy(0, rows, out)

    def _update(self, j: int, layer: int, sub: Tensor, ctx: Context, weight: Tensor | None,
                delta: bool = False) -> Tensor:
        """sub + r * (block(sub) - sub), or only r * (block(sub) - sub) with `delta`."""
        out = self.backbone.run_layer(layer, sub, ctx)
        r = self.routers[j].weight(sub) if weight is None else weight
        change = r.unsqueeze(-1).to(sub.dtype) * (out - sub)
        return change if delta else sub + change

    # -- which parameters train; what is saved ---------------------------------------------------
    def method_config(self) -> dict[str, Any]:
        return self.mcfg.model_dump()

    def method_modules(self) -> dict[str, nn.Module]:
        return {"routers": self.routers}  # thresholds and spreads are buffers inside

    def set_trainable(self, from_scratch: bool) -> None:
        """From scratch, or in a `joint` retrofit, everything trains (the blocks learn to work
        on the tokens they are given); `routers` trains the routers and predictors alone."""
        super().set_trainable(from_scratch or self.mcfg.regime == "joint")

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """LM loss of the top-k forward plus the causal score's BCE towards top-k membership:
        the router's own (aux_loss, on the LM's gradient path) or the predictor's (which
        reads a stop-gradient input, so it leaves the LM objective alone)."""
        lm = causal_lm_loss(self(x).logits, y)
        bce = torch.stack([F.binary_cross_entropy_with_logits(s.float(), m.float())
                           for s, m in self.targets]).mean()
        agree = torch.stack([((s.detach() > 0) == m).float().mean() for s, m in self.targets])
        weight = (self.mcfg.lambda_aux if self.mcfg.causal == "aux_loss"
                  else self.mcfg.lambda_predictor)
        return lm + weight * bce, {"lm_loss": lm.item(), "causal_bce": bce.item(),
                                   "causal_accuracy": agree.mean().item()}

    def training_flops_per_token(self, seq_len: int) -> float:
        """The top-k forward at the trained capacity (routers and predictors on every token),
        and a backward of twice that when the backbone trains, once that when it is frozen."""
        k = topk_count(seq_len, self.mcfg.capacity)
        run = [k / seq_len] * len(self.layers)
        keys = [k * (k + 1) / (seq_len * (seq_len + 1))] * len(self.layers)
        predictors = [1.0 if self.mcfg.causal == "predictor" else 0.0] * len(self.layers)
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

    def _count_tokens(self, ctx: Context, tokens: int) -> None:
        assert self.tally is not None
        self.tally.tokens += tokens
        # a dense query at position p sees p + 1 keys with a cache, its own prefix without
        seen = ctx.positions + 1 if ctx.cache is not None else (
            torch.arange(ctx.length, device=ctx.positions.device) + 1).unsqueeze(0)
        self.tally.dense_keys += float(seen.expand(tokens // ctx.length, -1).sum())

    def _count_run(self, j: int, ctx: Context, mask: Tensor, router_on_selected: bool) -> None:
        """Tokens that run block j in this call and the keys each attends to: the selected
        tokens before it in the call, and what the cache holds for the block below it."""
        tally = self.tally
        assert tally is not None
        run = mask.sum().item()
        tally.run[j] += run
        tally.routers[j] += run if router_on_selected else mask.numel()
        rank = mask.long().cumsum(1)  # keys from this call, the query's own included
        keys = rank
        if ctx.cache is not None:
            layer = ctx.kv_offset + self.layers[j]
            valid = ctx.cache.valid[layer, :, :ctx.cache.max_len].long().cumsum(1)
            positions = ctx.positions.expand(mask.shape[0], -1)
            first = positions[:, :1]  # keys before the call's first token
            keys = keys + torch.where(first > 0, valid.gather(1, (first - 1).clamp_min(0)), 0)
        tally.keys[j] += float(keys[mask].sum())

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Per routed block: the fraction of tokens that ran it, the keys they attended to, and
        the router and predictor evaluations, over every forward in the block."""
        m = len(self.layers)
        tally = Tally(run=[0.0] * m, keys=[0.0] * m, routers=[0.0] * m, predictors=[0.0] * m)
        self.tally = tally
        capacity = self.capacity if self.force is None else float(self.force)

        def per_token(values: list[float], total: float) -> list[float]:
            return [v / max(total, 1.0) for v in values]

        def flops(context: float) -> float:
            return self.flops_per_token(context, per_token(tally.run, tally.tokens),
                                        per_token(tally.keys, tally.dense_keys),
                                        per_token(tally.routers, tally.tokens),
                                        per_token(tally.predictors, tally.tokens))

        def summary() -> dict[str, Any]:
            run = per_token(tally.run, tally.tokens)
            return {"realised_capacity": sum(run) / m, "capacity_per_layer": run,
                    "capacity": capacity, "routed_layers": self.layers, "tokens": tally.tokens}

        try:
            yield Measurement(flops, summary)
        finally:
            self.tally = None

    def token_depth(self) -> Tensor | None:
        if any(m is None for m in self.masks):
            return None
        unrouted = self.backbone.n_layers - len(self.layers)
        return torch.stack([m for m in self.masks if m is not None]).sum(0) + unrouted

    # -- causal thresholds -----------------------------------------------------------------------
    def causal_score(self, j: int, x: Tensor) -> Tensor:
        router = self.routers[j]
        return router.weight(x) if router.predictor is None else router.predict(x)

    @torch.no_grad()
    def calibrate(self, windows: Tensor, chunk: int = 32) -> list[float]:
        """Each routed block's threshold: the (1 - C) quantile of its causal scores on held-out
        windows. Block by block, so a block sees inputs routed by the thresholds already set
        below it, as at deployment; the LM head never runs."""
        was_training = self.training
        self.eval()
        bb = self.backbone
        try:
            states = [(*bb.prepare(part), {}) for part in windows.split(chunk)]
            for i in range(bb.n_layers):
                j = self.slot.get(i)
                if j is not None and self.capacity < 1 and self.force is None:
                    scores = torch.cat([self.causal_score(j, h).flatten() for h, _, _ in states])
                    threshold, spread = quantile_threshold(scores, self.capacity)
                    self.routers[j].threshold.fill_(threshold)
                    self.routers[j].spread.fill_(spread)
                states = [(bb.run_layer(i, h, ctx) if j is None
                           else self.routed_block(j, i, h, ctx, state), ctx, state)
                          for h, ctx, state in states]
        finally:
            self.train(was_training)
        return [r.threshold.item() for r in self.routers]

    @torch.no_grad()
    def measured_over(self, batches) -> Measurement:
        """What causal decisions ran over batches of token ids (realised capacity, FLOPs)."""
        with self.measure() as m:
            for x in batches:
                self(x)
        return m

    @torch.no_grad()
    def after_training(self, calibration: Tensor, held_out: Tensor) -> dict[str, Any]:
        """Calibrate the causal thresholds (unless the paper's 0.5 rule is used), then on other
        held-out windows: how often the causal rule agrees with top-k, the realised capacity,
        and the LM loss under top-k and under causal decisions."""
        if self.mcfg.threshold == "calibrated":
            self.calibrate(calibration)
        x, y = held_out[:, :-1], held_out[:, 1:]
        self.decision = "topk"
        try:
            topk_loss = causal_lm_loss(self(x).logits, y).item()
            agree, agree_half = [], []
            scores = self._topk_scores(x)
            for j, (score, mask) in enumerate(scores):
                agree.append(((score > self.routers[j].threshold) == mask).float().mean().item())
                agree_half.append(((score > 0) == mask).float().mean().item())
        finally:
            self.decision = "auto"
        causal_loss = causal_lm_loss(self(x).logits, y).item()
        realised = self.measured_over([x]).summary()["capacity_per_layer"]
        return {"capacity": self.capacity, "routed_layers": self.layers,
                "thresholds": [r.threshold.item() for r in self.routers],
                "held_out_loss_topk": topk_loss, "held_out_loss_causal": causal_loss,
                "causal_agreement_with_topk": agree, "half_rule_agreement_with_topk": agree_half,
                "realised_capacity_causal": realised}

    def _topk_scores(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per routed block, the causal scores and the top-k decisions of a top-k forward."""
        bb = self.backbone
        h, ctx = bb.prepare(x)
        out = []
        for i in range(bb.n_layers):
            j = self.slot.get(i)
            if j is None:
                h = bb.run_layer(i, h, ctx)
                continue
            score = self.causal_score(j, h)
            h = self.routed_block(j, i, h, ctx, {})
            out.append((score, self.masks[j]))
        return out

    @torch.no_grad()
    def eval_report(self, data, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        batches = (x for x, _ in data.eval_batches("val", batch_size, block_size, max_batches))
        measured = self.measured_over(batches)
        ctx = fl.causal_context(block_size)
        flops = measured.flops_per_token(ctx)
        return {"capacity": self.capacity, "routed_layers": self.layers,
                "realised_capacity_causal": measured.summary()["capacity_per_layer"],
                "flops_ratio": flops / self.reference_flops_per_token(ctx),
                "flops_ratio_to_backbone": flops / sum(
                    fl.forward_per_token(self.cfg, ctx).values()),
                "causal": self.mcfg.causal}

    # -- the bench -------------------------------------------------------------------------------
    def _setting(self, capacity: float, thresholds: list[float],
                 spreads: list[float]) -> Callable[[], None]:
        def apply() -> None:
            self.capacity = capacity
            if self.control is not None:
                self.control.budget = capacity
            for router, t, s in zip(self.routers, thresholds, spreads, strict=True):
                router.threshold.fill_(t)
                router.spread.fill_(s)
        return apply

    def current_knob_value(self) -> float | None:
        return self.capacity

    def current_setting(self) -> Callable[[], None]:
        return self._setting(self.capacity, [r.threshold.item() for r in self.routers],
                             [r.spread.item() for r in self.routers])

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        """Capacity `value` with thresholds calibrated to it (the trained router and
        predictor, thresholds moved to let that fraction through)."""
        self._setting(value, [float("nan")] * len(self.routers), [1.0] * len(self.routers))()
        self.calibrate(calibration)
        return self.current_setting()

    def dense_reference(self) -> contextlib.AbstractContextManager[None]:
        return attribute_set(self, "force", True)


def _build(backbone: nn.Module, cfg: MoDConfig) -> MixtureOfDepths:
    return MixtureOfDepths(backbone, cfg)


register("method", "mod")(MethodSpec(
    name="mod", config=MoDConfig, build=_build, kind="mod",
    summary="Mixture-of-Depths: top-C tokens run each routed block, the rest skip it"))

__all__ = ["MixtureOfDepths", "MoDConfig", "Router"]
