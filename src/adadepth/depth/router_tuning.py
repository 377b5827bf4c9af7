"""Router-Tuning with MindSkip: tokens skip the attention of deep layers, decided by small
routers trained alone on a frozen pretrained model (He, Ge, Sun, Tian, Wang, Li, Yu, 2024,
"Router-Tuning: A Simple and Effective Approach for Enabling Dynamic-Depth in Transformers",
arXiv:2410.13184).

At each routed layer (the paper's: the deeper half of the layers, the last excluded) a router
scores every token from its normalised state, z = w . rmsnorm(x) (one linear map, no bias,
w = 0 at the start), and the token runs the layer's *attention* sub-block when
sigmoid(z) >= 0.5; the FFN sub-block always runs. In training the gate is binary in the forward
pass and straight-through in the backward one, so the LM loss reaches the router through the
attention update of the tokens that ran it:

    h = x + attn(x) + (s - stopgrad(s)) * attn(x)    (s = sigmoid(z), the added term is 0)

and a sparsity term, lambda * sum over routed layers of relu(c_l - C), pushes each layer's
realised capacity c_l (its straight-through mean gate) down to the target capacity C (the
released code's `target_capacity` regulariser). Only the routers train (`set_trainable`).

Skipped tokens leave the computation: the attention runs on the gathered attending tokens
alone (a `Subset`). What later tokens see of a skipped one is an option: by default its keys and
values are still written at that layer (`write_kv` from its own state: the k/v projections
only), so every query attends to the same keys as in the frozen backbone the routers were tuned
on; `skipped_kv=drop` writes none (MoD's choice: cheaper, and the cache holds less).

Decisions are per token and causal. Deployment decides with the causal rule of the shared
`CausalRule`: by default per-layer thresholds on z calibrated on held-out windows to the
capacity and steered per row by the online `ThresholdController` (ours), or the paper's
sigmoid(z) >= 0.5 (`threshold=paper`, also the training rule). docs/methods/router-tuning.md
says which choices are the paper's and which are ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.capacity import CapacityRouted, resolve_layers
from adadepth.depth.dispatch import (
    PLAIN,
    Call,
    CausalRule,
    Subset,
    Tally,
    ThresholdController,
    attended_keys,
)
from adadepth.depth.method import Evaluate, Knob, MethodSpec, StepLoss
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.model import Context, LayerStack


class RouterTuningConfig(Strict):
    """Router-Tuning (MindSkip); the paper's defaults or ours (docs/methods/router-tuning.md)."""

    capacity: float = Field(0.5, gt=0, le=1, description="target fraction of tokens that run "
                            "a routed layer's attention (1 - the skip ratio)")
    layers: Literal["upper_half", "all_but_first", "all"] | list[int] = Field(
        "upper_half", description="routed layers: the deeper half but the last (the paper's), "
        "all but the first, all, or a list")
    lambda_sparsity: float = Field(1.0, ge=0, description="weight of the sparsity term "
                                   "relu(realised capacity - capacity), summed over layers")
    threshold: Literal["calibrated", "paper"] = Field(
        "calibrated", description="deployment rule: thresholds calibrated to the capacity on "
        "held-out windows, or the paper's sigmoid(z) >= 0.5 (always the training rule)")
    threshold_control: Literal["online", "fixed"] = "online"
    control_gain: float = Field(0.5, gt=0)
    control_slack: float = Field(4.0, ge=1)
    skipped_kv: Literal["write", "drop"] = Field(
        "write", description="a skipped token's K/V at the layer: written from its state "
        "(later tokens see it, as in the backbone) or not at all")
    training_attention: Literal["all", "attending"] = Field(
        "all", description="in training, every token runs a routed attention (a skipped one's "
        "update gated to 0, so its router still learns what attending would give) or only the "
        "attending ones (skipped tokens get no LM gradient)")


class AttentionRouter(nn.Module):
    """One routed layer's router z = w . rmsnorm(x) and its causal deployment rule.

    The paper's router reads the attention's normalised input; an RMS norm without gain is the
    same family of functions (the gain folds into w) and needs no access to the layer's norm.
    w = 0 at the start: sigmoid(0) = 0.5 passes, so a fresh model is exactly its backbone."""

    def __init__(self, key: str, d_model: int, control: ThresholdController | None) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.rule = CausalRule(key, control)  # key: where its controller state lives

    def forward(self, x: Tensor) -> Tensor:
        """z, (B, T)."""
        return self.linear(F.rms_norm(x, (x.shape[-1],))).squeeze(-1)


class RouterTuning(CapacityRouted):
    """A frozen backbone whose routed layers run attention on the tokens their routers let in."""

    name = "router-tuning"
    knob = Knob("capacity", (1.0, 0.75, 0.5, 0.25), low=0.0, high=1.0)
    RAN = "attend"
    depth_unit = "attention sub-blocks run"
    options: RouterTuningConfig

    def __init__(self, backbone: LayerStack, options: RouterTuningConfig) -> None:
        n = backbone.n_layers
        # The paper's upper half: the n//2 layers just below the last one (16 of Llama-3-8B's
        # 32: layers 15..30).
        super().__init__(backbone, options, resolve_layers(
            options.layers, n, {"upper_half": list(range(n - n // 2 - 1, n - 1))},
            "router-tuning"))
        if options.training_attention == "all" and options.skipped_kv == "drop":
            raise UserError("router-tuning.training_attention=all trains with every token's "
                            "K/V at the routed layers: it needs skipped_kv=write (or use "
                            "training_attention=attending)")
        control = (ThresholdController(options.control_gain, options.control_slack)
                   if options.threshold_control == "online" else None)
        p = next(backbone.parameters())
        self.routers = nn.ModuleList(
            AttentionRouter(f"router-tuning-surplus-{j}", backbone.cfg.d_model, control)
            for j in range(len(self.layers))).to(device=p.device, dtype=p.dtype)

    def causal_score(self, j: int, x: Tensor) -> Tensor:
        return self.routers[j](x)

    def routed_layer(self, j: int, layer: int, x: Tensor, ctx: Context) -> Tensor:
        """Decide which tokens attend at routed layer `layer`, then run it."""
        call = ctx.call if ctx.call is not None else PLAIN
        router, (B, T) = self.routers[j], x.shape[:2]
        forced = call.forced_at(layer)
        z = None
        if forced is not None:
            attend = torch.full((B, T), forced, dtype=torch.bool, device=x.device)
        elif call.topk(self.training) or self.options.threshold == "paper":
            z = router(x)
            attend = z >= 0  # sigmoid(z) >= 0.5
        elif self.capacity >= 1:  # everyone attends: no router to run
            attend = torch.ones((B, T), dtype=torch.bool, device=x.device)
        else:
            if not router.rule.calibrated:
                raise UserError("Router-Tuning decoding needs calibrated thresholds: run "
                                "calibrate() (adadepth fit does) or router-tuning.threshold=paper")
            z = router(x)
            attend = router.rule.decide(z.detach(), self.capacity, ctx)
        return self.run_routed(j, layer, x, ctx, attend, z)

    def run_routed(self, j: int, layer: int, x: Tensor, ctx: Context, attend: Tensor,
                   z: Tensor | None) -> Tensor:
        """The layer with its attention run by the tokens of `attend` alone, the FFN by all."""
        bb, call = self.backbone, ctx.call if ctx.call is not None else PLAIN
        call.record(("attend", j), attend)
        # sigmoid(z) where the straight-through gradient must reach the router (training)
        s = (torch.sigmoid(z) if z is not None and torch.is_grad_enabled() and z.requires_grad
             else None)
        if s is not None:
            call.record(("gate", j), (s, attend))
        B, T = attend.shape
        if s is not None and self.options.training_attention == "all":
            # The paper's straight-through estimator: every token's attention runs, the gate
            # (binary forward, identity backward) multiplies its update, so a skipped token's
            # router learns what attending would have changed. Training only; counted as run.
            if call.tally is not None:
                self._count(call.tally, j, ctx, torch.ones_like(attend), B * T, True)
            gate = (attend.to(s.dtype) + s - s.detach()).unsqueeze(-1).to(x.dtype)
            return bb.run_ffn(layer, x + gate * (bb.run_attention(layer, x, ctx) - x), ctx)
        n = int(attend.sum())
        write = self.options.skipped_kv == "write" and n < B * T
        if call.tally is not None:
            self._count(call.tally, j, ctx, attend, n, z is not None)
        if n == B * T and s is None:  # nobody skips: the layer as it is
            return bb.run_layer(layer, x, ctx)
        kv_ctx = self._kv_context(ctx, B) if write else ctx
        h = x
        if write:  # skipped tokens still leave their keys and values for later queries
            cache, slot = kv_ctx.cache, kv_ctx.kv_offset + layer
            assert cache is not None
            # Every token writes its slot, but subset writes mark the cache incomplete, which
            # would make each later step build a mask: restore what the cache knew (as CALM).
            whole = (cache.complete[slot] and kv_ctx.start is not None
                     and kv_ctx.contiguous and kv_ctx.start <= cache.extent[slot])
            skip = Subset.of(kv_ctx, ~attend, B * T - n)
            assert skip is not None
            bb.write_kv(layer, skip.gather(x), skip.ctx)
        sub = Subset.of(kv_ctx, attend, n)
        if sub is not None:
            part = sub.gather(x)
            out = bb.run_attention(layer, part, sub.ctx)
            if s is not None:  # the straight-through gate: adds exactly 0, its gradient is
                g = sub.gather(s)  # the attention update
                out = out + (g - g.detach()).unsqueeze(-1).to(out.dtype) * (out - part)
            h = sub.scatter(x, out)
        if write and whole:
            cache.complete[slot] = True
        return bb.run_ffn(layer, h, ctx)

    def _kv_context(self, ctx: Context, B: int) -> Context:
        """The call's context with a cache to hold skipped tokens' K/V: the call's own, or one
        made for an uncached call (training, scoring), shared by its routed layers."""
        if ctx.cache is not None:
            return ctx
        kv = ctx.memo.get("router-tuning-kv")
        if kv is None:
            kv = ctx.memo["router-tuning-kv"] = replace(
                ctx, cache=self.backbone.new_cache(B, ctx.end), memo={})
        return kv

    # -- training ------------------------------------------------------------------------------
    def set_trainable(self, from_scratch: bool) -> None:
        """The routers alone, on a frozen backbone: there is no Router-Tuning of a new model."""
        if from_scratch:
            raise UserError("Router-Tuning trains routers on a pretrained backbone: give "
                            "--backbone (a run folder, a transformers directory, smollm2-135m)")
        super().set_trainable(False)

    @property
    def may_skip_parameters(self) -> bool:
        return True  # a layer nobody attends at, below its capacity target, gets no gradient

    def method_modules(self) -> dict[str, nn.Module]:
        return {"routers": self.routers}  # thresholds and spreads are buffers inside

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        """The LM loss of the training rule's forward (sigmoid(z) >= 0.5, straight-through)
        plus lambda * sum_l relu(c_l - C), and the FLOPs this step really ran."""
        records: dict[Any, Any] = {}
        tally = Tally()
        lm = self(x, call=Call(records=records, tally=tally)).loss(y)
        realised, sparsity = [], lm.new_zeros(())
        for j in range(len(self.layers)):
            s, attend = records["gate", j]
            c = (attend.to(s.dtype) + s - s.detach()).float().mean()  # straight-through mean
            sparsity = sparsity + F.relu(c - self.capacity)
            realised.append(c.item())
        loss = lm + self.options.lambda_sparsity * sparsity
        context = fl.causal_context(x.shape[1])
        return StepLoss(loss, {"lm_loss": lm.item(), "sparsity": sparsity.item(),
                               "capacity": sum(realised) / len(realised)},
                        self._training_flops(context, *self._fractions(tally)[:3]))

    def training_flops_per_token(self, seq_len: int) -> float:
        """A step at the target capacity, the attending tokens spread evenly over positions."""
        c, m = self.capacity, len(self.layers)
        drop = self.options.skipped_kv == "drop"
        return self._training_flops(fl.causal_context(seq_len), [c] * m,
                                    [c if drop else 1.0] * m, [c * c if drop else c] * m)

    def _training_flops(self, context: float, attend: list[float], kv: list[float],
                        keys: list[float]) -> float:
        """The forward (routers on every token), and the backward the routers need: nothing
        below the lowest routed layer; its FFN and every sub-block above it crossed once
        (inputs only: the backbone is frozen), attention scores twice, the head once; the
        routers' weights (and inputs, above the lowest)."""
        m = len(self.layers)
        forward = self._flops(context, attend, kv, keys, [1.0] * m)
        qo, kvp, scores = self._attention_parts(context)
        ffn, router = fl.ffn(self.cfg), fl.linear(self.cfg.d_model, 1)
        lowest = min(self.layers)
        backward = fl.linear(self.cfg.d_model, self.cfg.vocab_size) + ffn + router
        for i in range(lowest + 1, self.cfg.n_layers):
            j = self.slot.get(i)
            a, k, s = (1.0, 1.0, 1.0) if j is None else (attend[j], kv[j], keys[j])
            backward += a * qo + k * kvp + 2 * s * scores + ffn + (0 if j is None else 2 * router)
        return forward + backward

    # -- cost accounting -------------------------------------------------------------------------
    def _attention_parts(self, context: float) -> tuple[float, float, float]:
        """One layer's attention FLOPs per token: q and o projections, k and v projections,
        scores at `context` keys."""
        cfg = self.cfg
        q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        return (fl.linear(cfg.d_model, q) + fl.linear(q, cfg.d_model),
                2 * fl.linear(cfg.d_model, kv), fl.attention(cfg, context)["attn_scores"])

    def _breakdown(self, context: float, attend: list[float], kv: list[float],
                   keys: list[float], routers: list[float]) -> dict[str, float]:
        """Against the dense backbone, when routed layer j's attention runs for a fraction
        attend[j] of the tokens, k/v projections for kv[j], scores over a fraction keys[j] of
        a dense layer's keys, and the router on routers[j]."""
        qo, kvp, scores = self._attention_parts(context)
        skipped = sum((1 - a) * qo + (1 - k) * kvp + (1 - s) * scores
                      for a, k, s in zip(attend, kv, keys, strict=True))
        return {"attention skipped": -skipped,
                "routers": sum(routers) * fl.linear(self.cfg.d_model, 1)}

    def _flops(self, context: float, attend: list[float], kv: list[float], keys: list[float],
               routers: list[float]) -> float:
        return self.dense_flops_per_token(context) + sum(
            self._breakdown(context, attend, kv, keys, routers).values())

    def _count(self, tally: Tally, j: int, ctx: Context, attend: Tensor, n: int,
               routed: bool) -> None:
        """Tokens that ran the attention of routed layer j, that computed K/V there, the keys
        the attending queries saw (the skipped tokens' too when their K/V are written), and
        the router's evaluations."""
        B, T = attend.shape
        write = self.options.skipped_kv == "write"
        tally.add("attend", n, j)
        tally.add("kv", B * T if write else n, j)
        keys = torch.ones_like(attend) if write else None
        tally.add("keys", attended_keys(ctx, attend, ctx.kv_offset + self.layers[j], keys), j)
        tally.add("routers", B * T if routed else 0, j)

    def _fractions(self, tally: Tally) -> tuple[list[float], ...]:
        m = range(len(self.layers))
        keys = [v / max(tally.get("dense_keys"), 1.0) for v in tally.sites("keys", m)]
        return (tally.per_token("attend", m), tally.per_token("kv", m), keys,
                tally.per_token("routers", m))

    def reference_flops_per_token(self, context: float) -> float:
        """Nothing skipped and no router run: the backbone itself."""
        return self.dense_flops_per_token(context)

    def tally_flops(self, tally: Tally, context: float) -> float:
        return self._flops(context, *self._fractions(tally))

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        return self._breakdown(context, *self._fractions(tally))

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        attend = self._fractions(tally)[0]
        mean = sum(attend) / len(attend)
        return {"realised_capacity": mean, "skip_ratio": 1 - mean, "capacity_per_layer": attend,
                "capacity": self.capacity, "routed_layers": self.layers,
                "tokens": int(tally.tokens)}

    # -- causal thresholds -----------------------------------------------------------------------
    @torch.no_grad()
    @torch.no_grad()
    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        """Calibrate the thresholds (unless the paper's rule deploys), then on other held-out
        windows: the LM loss dense, under the paper's rule and under the deployed rule, and the
        capacity each rule realises per layer."""
        if self.options.threshold == "calibrated":
            self.calibrate(calibration)
        x, y = held_out[:, :-1], held_out[:, 1:]
        out: dict[str, Any] = {"capacity": self.capacity, "routed_layers": self.layers,
                               "thresholds": self.thresholds()}
        for label, call in (("dense", Call(force=True)), ("paper_rule", Call(rule="topk")),
                            ("causal", Call(rule="causal"))):
            runner, m = self.measured(call)
            out[f"held_out_loss_{label}"] = runner(x).loss(y).item()
            if label != "dense":
                out[f"realised_capacity_{label}"] = m.summary()["capacity_per_layer"]
        return out

    # -- the knob -----------------------------------------------------------------------------
    def depth_fraction(self, depth: float) -> float:
        """A token that ran `depth` attention sub-blocks skipped the others (its FFNs all ran)."""
        dense = fl.forward_per_token(self.cfg, 1.0)
        stack = dense["attn_proj"] + dense["attn_scores"] + dense["ffn"]
        attention = (dense["attn_proj"] + dense["attn_scores"]) / self.cfg.n_layers
        return 1 - (self.backbone.n_layers - depth) * attention / stack

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        if self.options.threshold == "paper":
            raise UserError("router-tuning.threshold=paper decides by sigmoid(z) >= 0.5 alone, "
                            "whatever the capacity: bench a run with calibrated thresholds")
        return super().knob_setter(value, calibration)


register("method", RouterTuning.name)(MethodSpec(
    name=RouterTuning.name, config=RouterTuningConfig, build=RouterTuning, kind="router-tuning",
    summary="Router-Tuning (MindSkip): routers trained on a frozen model let tokens skip the "
    "attention of its deeper layers",
    defaults={"optim": {"lr": 1e-3, "warmup_steps": 10, "weight_decay": 0.0}}))

__all__ = ["AttentionRouter", "RouterTuning", "RouterTuningConfig"]
