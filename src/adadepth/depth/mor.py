"""Mixture-of-Recursions (Bae et al. 2025, arXiv:2507.10524).

A parameter-shared *recursion block* (some consecutive layers of the backbone) runs up to N_r times
(`recursions`, default 3), and a router decides per token how many of those recursions it gets.
The paper's default sharing is Middle-Cycle: the first and the last layer run once, the layers
between form the block (`block: middle`; `stepwise` keeps the paper's effective depth over a
pretrained backbone, see `resolve_block`).

- `routing: expert` (the paper's default): before recursion r a router per recursion scores the
  tokens still active, g = alpha * sigmoid(w_r . H^r + b_r), and in training the top-C_r of each
  sequence (capacities (N_r - r)/N_r: 1, 2/3, 1/3) run the block; the others leave for good
  (hierarchical: only tokens that ran recursion r may run r+1). A chosen token's state becomes
  H^r + g * block(H^r) (the paper's `update`; `residual`, ours: H^r + g * (block(H^r) - H^r)).
  Top-k sees the whole sequence, so decoding decides causally: the router's own logit, trained
  with an auxiliary BCE towards top-k membership (`causal: aux_loss`, the paper's) or a
  stop-gradient predictor (`predictor`), passes a threshold calibrated on held-out text to the
  fraction C_r / C_{r-1} of the tokens still active, steered per row by the shared online
  controller (`CausalRule`, state in the cache), exactly as Mixture-of-Depths decodes.
- `routing: token`: one router reads H^1 (after the first layer) and picks each token's depth
  once, the argmax of softmax(W H^1) over N_r depths; the token runs recursions 1..i plainly,
  and at its last one leaves with H^1 + g * block(H^i), g its router probability (the paper's
  code). A balancing loss (Switch-style, N_r * sum_i P_i f_i) and a z-loss train the router.
  Decisions read the token alone: causal by construction.

Skipped tokens leave the computation: each recursion gathers its active tokens (`Subset`) and
runs the block on them alone. KV caching is recursion-wise by default (`kv: recursive`): the
cache holds one K/V set per recursion, only the tokens active at recursion r write theirs there,
and a query at r attends to the earlier tokens active at r (validity masks the rest), in
training, prefill and cached decoding alike. `kv: shared` is the paper's recursive KV sharing:
recursions after the first write no K/V and their queries read the first recursion's, i.e. the
K/V of every earlier token that ran recursion 1 (all of them under the default schedule) and
the token's own from recursion 1. docs/methods/mor.md says which choices are the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.depth.dispatch import (
    PLAIN,
    Call,
    Subset,
    Tally,
    attended_keys,
    count_tokens,
    membership_loss,
    topk_index,
)
from adadepth.depth.method import Evaluate, Knob, Method, MethodSpec, StepLoss
from adadepth.depth.mod import CausalRouting, build_routers
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.model import Context, KVCache, LayerStack, Output


class MoRConfig(CausalRouting):
    """Mixture-of-Recursions; defaults are the paper's or ours (docs/methods/mor.md). The causal
    options (`CausalRouting`) concern expert choice; the paper's is the router's own BCE."""

    recursions: int = Field(3, ge=2, description="N_r: most times the shared block runs")
    block: Literal["middle", "stepwise"] | list[int] = Field(
        "middle", description="the shared block: the layers between the first and the last "
        "(middle), the paper's effective depth over a pretrained backbone (stepwise), or a list")
    routing: Literal["expert", "token"] = "expert"
    capacities: list[float] | None = Field(
        None, description="expert: fraction of a sequence that runs each recursion, "
        "non-increasing; None: (N_r - r) / N_r")
    kv: Literal["recursive", "shared"] = Field(
        "recursive", description="recursion-wise K/V, or every recursion reading the first's")
    router_func: Literal["sigmoid", "tanh", "none"] = Field(
        "sigmoid", description="expert: g = alpha * func(w . x + b)")
    alpha: float | None = Field(None, gt=0, description="gate scale; None: 0.1 expert, 1 token")
    update: Literal["paper", "residual"] = Field(
        "paper", description="x + g * block(x) (paper), or x + g * (block(x) - x)")
    causal: Literal["predictor", "aux_loss"] = "aux_loss"
    lambda_aux: float = Field(1e-3, ge=0, description="weight of the router's BCE (aux_loss)")
    lambda_balance: float = Field(0.1, ge=0, description="token: weight of the balancing loss")
    lambda_z: float = Field(1e-5, ge=0, description="token: weight of the router z-loss")


def resolve_block(spec: str | list[int], n_layers: int, recursions: int
                  ) -> tuple[list[int], list[int], list[int]]:
    """(prelude, block, coda): the layers run once before the recursions, the shared block, the
    layers run once after. Layers in none of them are not run at all (a `stepwise` block leaves
    out the middle layers it does not pick, a list may leave gaps)."""
    if spec in ("middle", "stepwise") and n_layers < 3:
        raise UserError(f"mor.block={spec} needs at least 3 layers (the first and the last run "
                        f"once), the backbone has {n_layers}; give mor.block a list")
    if spec == "middle":
        return [0], list(range(1, n_layers - 1)), [n_layers - 1]
    if spec == "stepwise":  # the paper's Middle-Cycle at the backbone's depth (RRT's init)
        base = (n_layers - 2) // recursions
        if base < 1:
            raise UserError(f"mor.block=stepwise needs layers - 2 >= recursions: {n_layers} "
                            f"layers, {recursions} recursions")
        step = (n_layers - 3) / max(base - 1, 1)
        return [0], sorted({round(1 + i * step) for i in range(base)}), [n_layers - 1]
    block = sorted(spec)
    if not block or len(set(block)) != len(block) or not all(0 <= i < n_layers for i in block):
        raise UserError(f"mor.block {spec} must be distinct layers in 0..{n_layers - 1}")
    return list(range(block[0])), block, list(range(block[-1] + 1, n_layers))


def schedule(options: MoRConfig) -> list[float]:
    n = options.recursions
    caps = options.capacities or [(n - r) / n for r in range(n)]
    if len(caps) != n or any(not 0 < c <= 1 for c in caps) or any(
            b > a for a, b in zip(caps, caps[1:], strict=False)):
        raise UserError(f"mor.capacities {caps} must be {n} non-increasing fractions in (0, 1]")
    return list(caps)


def scaled(base: list[float], total: float) -> list[float]:
    """The schedule min(1, s * base) whose capacities sum to `total` (bisection on s)."""
    lo, hi = 0.0, 1.0 / min(base)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(min(1.0, mid * c) for c in base) < total else (lo, mid)
    return [min(1.0, hi * c) for c in base]


class DepthRouter(nn.Module):
    """Token choice: logits over the N_r depths from H^1; `tilt` (the bench's knob, 0 as
    trained) is added as tilt * i to depth i's logit for the decision only."""

    def __init__(self, d_model: int, recursions: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, recursions)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("tilt", torch.tensor(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).float()

    def choose(self, logits: Tensor) -> Tensor:
        """The chosen depth index (0 .. N_r - 1) of every token."""
        steps = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        return (logits + self.tilt * steps).argmax(-1)


class MixtureOfRecursions(Method):
    """A backbone whose shared block runs up to N_r times, as often as each token's router says."""

    name = "mor"
    knob = Knob("depth_fraction", (1.0, 0.75, 0.5, 0.35), low=0.0, high=1.0)
    depth_unit = "recursions"
    options: MoRConfig

    def __init__(self, backbone: LayerStack, options: MoRConfig) -> None:
        super().__init__(backbone, options)
        self.n = options.recursions
        self.prelude, self.block, self.coda = resolve_block(options.block, backbone.n_layers,
                                                            self.n)
        ran = {*self.prelude, *self.block, *self.coda}
        self.unused = [i for i in range(backbone.n_layers) if i not in ran]
        self.expert = options.routing == "expert"
        self.schedule = schedule(options)
        self.capacities = list(self.schedule)  # the knob's setting (as trained until set)
        self.fraction: float | None = None if not self.expert else sum(self.schedule) / self.n
        self.alpha = options.alpha or (0.1 if self.expert else 1.0)
        if self.expert:
            self.routers = build_routers(options, [f"mor-surplus-{r}" for r in range(self.n)],
                                         backbone)
        else:
            p = next(backbone.parameters())
            self.routers = nn.ModuleList([DepthRouter(backbone.cfg.d_model, self.n)]).to(
                device=p.device, dtype=p.dtype)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """One K/V set per recursion (recursion-wise caching), or one set (KV sharing)."""
        sets = 1 if self.options.kv == "shared" else self.n
        return self.backbone.new_cache(batch, max_len, sets=sets)

    # -- the forward ---------------------------------------------------------------------------
    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        bb = self.backbone
        B, T = idx.shape
        store = cache
        if store is None and self.options.kv == "shared":  # later recursions read the first's
            end = start + T if positions is None else int(positions.max()) + 1
            store = bb.new_cache(B, end)
        x, ctx = bb.prepare(idx, store, start, positions=positions, call=call)
        if call.tally is not None:
            count_tokens(call.tally, ctx, B * T)
        for i in self.prelude:
            x = bb.run_layer(i, x, ctx)
        x, depth = self.recur_expert(x, ctx, call) if self.expert else self.recur_token(
            x, ctx, call)
        for i in self.coda:
            x = bb.run_layer(i, x, ctx)
        if call.tally is not None:
            for d, count in enumerate(torch.bincount(depth.flatten(), minlength=self.n + 1)
                                      .tolist()):
                call.count("depth", count, d)
        call.note_depth(depth)
        return Output(hidden=x, head=bb.head)

    def recur_expert(self, x: Tensor, ctx: Context, call: Call) -> tuple[Tensor, Tensor]:
        active = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        depth = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        for r in range(self.n):
            x, active = self.expert_step(r, x, ctx, active, call)
            depth += active
        return x, depth

    def expert_step(self, r: int, x: Tensor, ctx: Context, active: Tensor, call: Call
                    ) -> tuple[Tensor, Tensor]:
        """Recursion r: which of the active tokens run it, and their new states."""
        router = self.routers[r]
        B, T = active.shape
        forced, index, fraction = call.forced_at(r), None, self.step_fraction(r)
        if forced is False or (forced is None and fraction <= 0):
            return x, torch.zeros_like(active)
        logit = router.weight(x)
        call.count("routers", B * T, r)
        if forced is True or (fraction >= 1 and not call.topk(self.training)):
            mask = active
        elif call.topk(self.training):  # the top-C_r of the sequence, among the active
            index = topk_index(logit.detach().masked_fill(~active, -math.inf),
                               self.capacities[r])
            mask = torch.zeros_like(active).scatter(1, index, True)
            if self.training:  # what the causal score learns to predict, on the active tokens
                score = logit
                if router.predictor is not None:
                    score = router.predict(x)
                    call.count("predictors", B * T, r)
                call.record(("target", r), (score[active], mask[active]))
        else:
            if not router.rule.calibrated:
                raise UserError("Mixture-of-Recursions decoding needs calibrated thresholds: "
                                "run calibrate() (adadepth fit does) or mor.threshold=half")
            score = logit.detach()
            if router.predictor is not None:
                score = router.predict(x)
                call.count("predictors", B * T, r)
            mask = router.rule.decide(score, fraction, ctx, among=active)
        return self.run_block(r, x, ctx, mask, self.gate(logit), index, call), mask

    def step_fraction(self, r: int) -> float:
        """The fraction of the tokens active before recursion r that run it: C_r / C_{r-1}."""
        previous = self.capacities[r - 1] if r else 1.0
        return self.capacities[r] / previous if previous > 0 else 0.0

    def gate(self, logit: Tensor) -> Tensor:
        func = self.options.router_func
        g = torch.sigmoid(logit) if func == "sigmoid" else (
            torch.tanh(logit) if func == "tanh" else logit)
        return self.alpha * g

    def recur_token(self, x: Tensor, ctx: Context, call: Call) -> tuple[Tensor, Tensor]:
        router = self.routers[0]
        logits = router(x)
        call.count("routers", x.shape[0] * x.shape[1], 0)
        forced = call.forced_at(0)
        choice = (router.choose(logits) if forced is None else torch.full(
            x.shape[:2], self.n - 1 if forced else 0, dtype=torch.long, device=x.device))
        if self.training:
            call.record("token", (logits, choice))
        gate = self.alpha * logits.softmax(-1).gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        depth = choice + 1
        first = x  # H^1: the residual a token leaves with (the paper's code)
        for r in range(self.n):
            x = self.run_block(r, x, ctx, depth > r, gate, None, call, depth == r + 1, first)
        return x, depth

    def run_block(self, r: int, x: Tensor, ctx: Context, mask: Tensor, gate: Tensor,
                  index: Tensor | None, call: Call, last: Tensor | None = None,
                  first: Tensor | None = None) -> Tensor:
        """The shared block on the tokens of `mask` alone, at recursion r's K/V. A token at its
        last recursion (every chosen token under expert choice; those of `last` under token
        choice) takes the gated update; the others (token choice) the plain block output."""
        call.record(("mask", r), mask)
        if call.tally is not None:
            self._count_run(call.tally, r, ctx, mask)
        sub = Subset.of_index(ctx, index) if index is not None else Subset.of(ctx, mask)
        if sub is None:
            return x
        sctx = sub.ctx.with_kv_offset(r * self.backbone.n_layers)
        if self.options.kv == "shared" and r > 0:
            sctx = sub.ctx.reading(0)
        part = h = sub.gather(x)
        for layer in self.block:
            h = self.backbone.run_layer(layer, h, sctx)
        g = sub.gather(gate).unsqueeze(-1).to(h.dtype)
        base = part if first is None else sub.gather(first)
        y = base + g * h if self.options.update == "paper" else part + g * (h - part)
        if last is not None:
            y = torch.where(sub.gather(last).unsqueeze(-1), y, h)
        return sub.scatter(x, y)

    # -- training --------------------------------------------------------------------------------
    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        """LM loss of the training forward plus, under expert choice, the causal score's BCE
        towards top-k membership over the active tokens of every recursion; under token choice,
        the balancing loss and the router z-loss. The FLOPs are those of what ran."""
        records: dict[Any, Any] = {}
        tally = Tally()
        lm = self(x, call=Call(records=records, tally=tally)).loss(y)
        loss, metrics = lm, {"lm_loss": lm.item()}
        if self.expert:
            targets = [records["target", r] for r in range(self.n) if ("target", r) in records]
            bce = torch.stack([membership_loss(s, m) for s, m in targets]).mean()
            agree = torch.stack([((s.detach() > 0) == m).float().mean() for s, m in targets])
            weight = (self.options.lambda_aux if self.options.causal == "aux_loss"
                      else self.options.lambda_predictor)
            loss = lm + weight * bce
            metrics.update(causal_bce=bce.item(), causal_accuracy=agree.mean().item())
        else:
            logits, choice = records["token"]
            share = torch.bincount(choice.flatten(), minlength=self.n).float() / choice.numel()
            balance = self.n * (logits.softmax(-1).mean((0, 1)) * share).sum()
            z = torch.logsumexp(logits, -1).square().mean()
            loss = lm + self.options.lambda_balance * balance + self.options.lambda_z * z
            metrics.update(balance_loss=balance.item(), z_loss=z.item())
        metrics["mean_recursions"] = self.tally_summary(tally)["mean_recursions"]
        flops = self.tally_flops(tally, fl.causal_context(x.shape[1]))
        return StepLoss(loss, metrics, flops * (3 if self.backbone_trained() else 2))

    def set_trainable(self, from_scratch: bool) -> None:
        """From scratch, or in a `joint` retrofit, everything trains; `routers` trains the
        routers and predictors alone."""
        super().set_trainable(from_scratch or self.options.regime == "joint")

    @property
    def may_skip_parameters(self) -> bool:
        return bool(self.unused)  # layers a stepwise block leaves out get no gradient

    def training_flops_per_token(self, seq_len: int) -> float:
        """Before a step has run: every token every recursion (each step says what it ran)."""
        forward = self.reference_flops_per_token(fl.causal_context(seq_len))
        return forward * (3 if self.backbone_trained() else 2)

    def method_modules(self) -> dict[str, nn.Module]:
        return {"routers": self.routers}  # thresholds, spreads and the tilt are buffers inside

    # -- cost accounting -------------------------------------------------------------------------
    def _count_run(self, tally: Tally, r: int, ctx: Context, mask: Tensor) -> None:
        """Tokens that run recursion r and the keys their queries see there: the earlier tokens
        that ran it (recursion-wise) or that ran recursion 1 (shared), from the call and the
        cache."""
        tally.add("run", mask.sum().item(), r)
        if self.options.kv == "shared" and r > 0:  # the cache holds this call's first recursion
            valid = ctx.cache.valid[self.block[0], :, :ctx.cache.max_len].long().cumsum(1)
            seen = valid.gather(1, ctx.positions.expand(mask.shape[0], -1))
            tally.add("keys", float(seen[mask].sum()), r)
        else:
            layer = r * self.backbone.n_layers + self.block[0]
            tally.add("keys", attended_keys(ctx, mask, layer), r)

    def flops_per_token(self, context: float, run: list[float], keys: list[float],
                        routers: list[float], predictors: list[float]) -> float:
        """Forward FLOPs per token when recursion r runs on a fraction run[r] of the tokens,
        whose queries see a fraction keys[r] of the keys a dense layer's would, and router r /
        predictor r score fractions routers[r] / predictors[r] of the tokens."""
        dense = fl.forward_per_token(self.cfg, context)
        n = self.cfg.n_layers
        proj_ffn, scores = (dense["attn_proj"] + dense["ffn"]) / n, dense["attn_scores"] / n
        once = len(self.prelude) + len(self.coda)
        total = dense["lm_head"] + once * (proj_ffn + scores)
        for r in range(self.n):
            total += len(self.block) * (run[r] * proj_ffn + keys[r] * scores)
            router = self.routers[min(r, len(self.routers) - 1)]
            total += routers[r] * fl.module_flops(router.linear)
            if getattr(router, "predictor", None) is not None:
                total += predictors[r] * fl.module_flops(router.predictor)
        return total

    def reference_flops_per_token(self, context: float) -> float:
        """Every token every recursion, router-weighted (routers run on every token)."""
        ones, none = [1.0] * self.n, [0.0] * self.n
        routers = ones if self.expert else [1.0] + none[1:]
        return self.flops_per_token(context, ones, ones, routers, none)

    def tally_flops(self, tally: Tally, context: float) -> float:
        m = range(self.n)
        keys = [v / max(tally.get("dense_keys"), 1.0) for v in tally.sites("keys", m)]
        return self.flops_per_token(context, tally.per_token("run", m), keys,
                                    tally.per_token("routers", m),
                                    tally.per_token("predictors", m))

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        """Against the backbone's own depth: the recursions beyond (or short of) it, and the
        routers and predictors run."""
        m = range(self.n)
        run, routers = tally.per_token("run", m), tally.per_token("routers", m)
        predictors = tally.per_token("predictors", m)
        keys = [v / max(tally.get("dense_keys"), 1.0) for v in tally.sites("keys", m)]
        routing = sum(routers[r] * fl.module_flops(self.routers[min(r, len(self.routers) - 1)]
                                                   .linear) for r in m)
        predicting = sum(predictors[r] * fl.module_flops(p) for r in m if (p := getattr(
            self.routers[min(r, len(self.routers) - 1)], "predictor", None)) is not None)
        blocks = (self.flops_per_token(context, run, keys, [0.0] * self.n, [0.0] * self.n)
                  - self.dense_flops_per_token(context))
        return {"blocks skipped" if blocks <= 0 else "recursions beyond the backbone": blocks,
                "routers": routing, "predictors": predicting}

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        """Recursions per token (mean and histogram over 0..N_r) and each recursion's share."""
        counts = tally.sites("depth", range(self.n + 1))
        tokens = max(sum(counts), 1.0)
        return {"mean_recursions": sum(d * c for d, c in enumerate(counts)) / tokens,
                "recursions_histogram": [int(c) for c in counts],
                "run_per_recursion": tally.per_token("run", range(self.n)),
                "depth_fraction": self.fraction, "tokens": int(tally.tokens)}

    def most_token_depth(self) -> float:
        return float(self.n)

    def depth_fraction(self, depth: float) -> float:
        """The once-run layers and `depth` runs of the shared block, against the backbone's."""
        return (len(self.prelude) + len(self.coda) + depth * len(self.block)) / (
            self.backbone.n_layers)

    # -- causal thresholds (expert choice) and the knob ------------------------------------------
    @torch.no_grad()
    def calibrate(self, windows: Tensor, chunk: int = 32) -> list[float | None]:
        """Each recursion's threshold: the quantile of its causal scores over the tokens still
        active on held-out windows that lets C_r / C_{r-1} of them through. Recursion by
        recursion, so each sees the tokens the thresholds below it let through, as deployed."""
        was_training = self.training
        self.eval()
        call = Call(rule="causal")
        try:
            states = [(x, ctx, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
                      for x, ctx in self.entry_states(windows, chunk, call)]
            for r in range(self.n):
                fraction = self.step_fraction(r)
                if 0 < fraction < 1:
                    scores = torch.cat([self.routers[r].causal_score(x)[active]
                                        for x, _, active in states])
                    self.routers[r].rule.calibrate(scores, fraction)
                stepped = [self.expert_step(r, x, ctx, active, call) for x, ctx, active in states]
                states = [(x, ctx, a) for (x, a), (_, ctx, _) in zip(stepped, states, strict=True)]
        finally:
            self.train(was_training)
        return [r.rule.threshold.item() if r.rule.calibrated else None  # None: all continue
                for r in self.routers]

    def entry_states(self, windows: Tensor, chunk: int, call: Call = PLAIN
                     ) -> list[tuple[Tensor, Context]]:
        """H^1 (the states after the prelude) of held-out windows, chunk by chunk, with their
        contexts (and the private cache KV sharing reads)."""
        out = []
        for part in windows.split(chunk):
            store = self.new_cache(*part.shape) if self.options.kv == "shared" else None
            x, ctx = self.backbone.prepare(part, store, call=call)
            for i in self.prelude:
                x = self.backbone.run_layer(i, x, ctx)
            out.append((x, ctx))
        return out

    def _setting(self, fraction: float | None, capacities: list[float], rules: list[Tensor],
                 tilt: float) -> Callable[[], None]:
        def apply() -> None:
            self.fraction, self.capacities = fraction, list(capacities)
            if self.expert:
                for router, rule in zip(self.routers, rules, strict=True):
                    router.rule.set(*rule.tolist())
            else:
                self.routers[0].tilt.fill_(tilt)
        return apply

    def trained_range(self) -> tuple[float, float] | None:
        """Expert choice trains at its capacity schedule (token choice has no knob)."""
        if not self.expert:
            return None
        trained = sum(self.schedule) / self.n
        return trained, trained

    def current_knob_value(self) -> float | None:
        return self.fraction

    def current_setting(self) -> Callable[[], None]:
        rules = [torch.stack([r.rule.threshold, r.rule.spread]).clone() for r in self.routers
                 ] if self.expert else []
        tilt = 0.0 if self.expert else self.routers[0].tilt.item()
        return self._setting(self.fraction, self.capacities, rules, tilt)

    @torch.no_grad()
    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        """Mean recursions per token `value` * N_r. Expert choice: the trained schedule scaled
        (min(1, s * C_r)) to sum to it, thresholds calibrated to it. Token choice: the tilt
        that makes the mean chosen depth on the calibration windows equal it (at least 1:
        every token runs one recursion)."""
        if not 0 < value <= 1:
            raise UserError(f"depth_fraction settings must lie in (0, 1], got {value:g}")
        target = value * self.n
        if self.expert:
            self.capacities = scaled(self.schedule, target)
            for router in self.routers:
                router.rule.set(float("nan"))
            self.calibrate(calibration)
        else:
            self.routers[0].tilt.fill_(self._tilt_for(max(target, 1.0), calibration))
        self.fraction = value
        return self.current_setting()

    def _tilt_for(self, target: float, calibration: Tensor) -> float:
        router = self.routers[0]
        logits = router(torch.cat([x.flatten(0, 1) for x, _ in self.entry_states(calibration,
                                                                                 32)]))
        bound = float(logits.max() - logits.min()) + 1.0  # beyond it one depth takes all
        lo, hi = -bound, bound
        for _ in range(50):
            router.tilt.fill_((lo + hi) / 2)
            mean = float(router.choose(logits).float().mean()) + 1
            lo, hi = ((lo + hi) / 2, hi) if mean < target else (lo, (lo + hi) / 2)
        return hi

    # -- after training, eval --------------------------------------------------------------------
    @torch.no_grad()
    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        """Calibrate the causal thresholds (expert choice), then on other held-out windows the
        LM loss of the decoding decisions (and of top-k, expert) and the recursions realised."""
        figures: dict[str, Any] = {"recursions": self.n, "prelude": self.prelude,
                                   "block": self.block, "coda": self.coda,
                                   "routing": self.options.routing}
        x, y = held_out[:, :-1], held_out[:, 1:]
        if self.expert:
            if self.options.threshold == "calibrated":
                figures["thresholds"] = self.calibrate(calibration)
            figures["held_out_loss_topk"] = self(x, call=Call(rule="topk")).loss(y).item()
        figures["held_out_loss_causal"] = self(x, call=Call(rule="causal")).loss(y).item()
        summary = self.measured_over([x], Call(rule="causal")).summary()
        figures.update(mean_recursions=summary["mean_recursions"],
                       recursions_histogram=summary["recursions_histogram"])
        return figures

    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        batches = (x for x, _ in data.eval_batches("val", batch_size, block_size, max_batches))
        measured = self.measured_over(batches, Call(rule="causal"))
        summary = measured.summary()
        return {"routing": self.options.routing, "recursions": self.n,
                "mean_recursions": summary["mean_recursions"],
                "recursions_histogram": summary["recursions_histogram"],
                **self.flops_ratios(measured, fl.causal_context(block_size))}


register("method", "mor")(MethodSpec(
    name="mor", config=MoRConfig, build=MixtureOfRecursions, kind="mor",
    summary="Mixture-of-Recursions: a shared block run up to N_r times, a router choosing "
            "each token's recursions; recursion-wise or shared K/V"))

__all__ = ["MixtureOfRecursions", "MoRConfig"]
