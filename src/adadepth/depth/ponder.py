"""AdaPonderLM: a looped LM that learns, token by token, when to stop pondering.

"AdaPonderLM: Gated Pondering Language Models with Token-Wise Adaptive Depth" (arXiv 2603.01914)
over PonderLM, "Pretraining Language Models to Ponder in Continuous Space" (arXiv 2505.20674);
docs/methods/ponder.md says which choices are the papers' and which are ours.

The whole backbone runs K times (`passes`). After pass i a token's distribution
P^i = softmax(logits^i) gives its pondering embedding e^i = P^i W_emb (the probability-weighted
input embeddings, `embed_soft`), and its next input is E^{i+1} = E^i + m^{i+1} s^i e^i:

- `halting: learned` (AdaPonderLM): s^i = sigmoid(MLP_i(h^i)), one small MLP per pass (or one
  shared, the ablation), and a monotonic mask m^{i+1} = m^i [s^i >= tau]: a token whose gate falls
  below tau halts and stays halted. Its output is the prediction of its last pass;
- `halting: none` (PonderLM): every token runs every pass, s = 1;
- `halting: uniform | geometric`: the fixed pruning schedules the paper compares against: after
  each pass a fraction of the still-active tokens, chosen at random (a hash of position, token and
  pass, so cached decoding draws the same), halts; s = 1.

A halted token leaves the computation: each pass gathers the active tokens of every row (a ragged,
padded selection) and runs the layer stack on them alone. It keeps, at every layer, the keys and
values of its last active pass (KV reuse): the cache holds one K/V set per pass and a halted
token's K/V are carried into the sets of the passes after it, so later passes of other tokens
attend to them. Training, evaluation and cached decoding all take this path (without a cache the
forward keeps a private one for the call), so they see the same model. `dispatch: masked` is the
dense reference: every token runs every pass and halted tokens only replay their old layer inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.dispatch import PLAIN, Call, Subset, Tally
from adadepth.depth.gates import mlp
from adadepth.depth.method import Knob, Method, MethodSpec, StepLoss
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.model import KVCache, LayerStack, Output

Halting = Literal["learned", "none", "uniform", "geometric"]


class PonderConfig(Strict):
    """Gated pondering; defaults are the paper's or ours (docs/methods/ponder.md)."""

    passes: int = Field(4, ge=1, description="K: runs of the whole backbone per token, at most")
    halting: Halting = "learned"
    gate: Literal["per_pass", "shared"] = Field(
        "per_pass", description="one MLP gate per pass (the paper's), or one shared (ablation)")
    gate_hidden: PositiveInt | None = Field(None, description="gate MLP width; None = d_model/4")
    gate_bias: float = Field(2.0, description="initial gate logit: sigmoid(2) = 0.88, open")
    tau: float = Field(1e-4, ge=0, lt=1, description="a token halts when its gate is below tau")
    lam: float = Field(0.1, ge=0, description="lambda: weight of the bottom-k gate loss")
    k: float = Field(0.1, gt=0, le=1, description="fraction of gate values the loss pulls down")
    ce_steps: int = Field(100, ge=0, description="first stage: cross-entropy only")
    k_warmup_steps: int = Field(100, ge=0, description="then k rises linearly from 0")
    gates_only_steps: int = Field(100, ge=0, description="over a pretrained backbone: steps "
                                  "in which only the gates train, before everything does")
    train_backbone: bool = Field(True, description="over a pretrained backbone: train it too "
                                 "after the gates-only stage (continued pretraining)")
    schedule_passes: float | None = Field(None, ge=1, description="uniform/geometric: the "
                                          "average passes per token the schedule aims at")
    schedule_growth: float = Field(2.0, gt=0, description="geometric: the halting fraction "
                                   "after pass i+1 is this times that after pass i")
    schedule_seed: int = 0
    scale_embeds: bool = Field(False, description="multiply token and pondering embeddings by "
                               "sqrt(d_model) (PonderLM's option for training from scratch)")
    dispatch: Literal["sparse", "masked"] = Field(
        "sparse", description="gather the active tokens, or the dense masked reference")


# -- the pieces ------------------------------------------------------------------------------
def bottom_k_mean(values: Tensor, k: float) -> Tensor:
    """The mean of the smallest ceil(k*N) of N values (the epsilon keeps 0.3*10 at 3)."""
    n = max(1, math.ceil(k * values.numel() - 1e-9))
    return values.flatten().topk(n, largest=False).values.mean()


def token_uniform(positions: Tensor, tokens: Tensor, pass_index: int, seed: int) -> Tensor:
    """A reproducible draw in [0, 1) per (position, token, pass): a 32-bit integer hash, so the
    same token at the same position draws the same whether it is decoded or recomputed."""
    mask = 0xFFFFFFFF
    x = (positions.long() * 0x9E3779B1 + tokens.long() * 0x85EBCA77
         + (pass_index + 1) * 0xC2B2AE3D + seed * 0x27D4EB2F) & mask
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * mult) & mask
    x = x ^ (x >> 16)
    return x.double().div(2.0**32).float()


def schedule_fractions(passes: int, target: float, kind: str, growth: float) -> list[float]:
    """Halting fraction after each of the first K-1 passes so that the average passes per token
    is `target`: the same fraction every pass (uniform), or one growing by `growth` per pass
    (geometric), each capped at 1. Solved by bisection on the first fraction."""
    def shape(p: float) -> list[float]:
        return [min(1.0, p * (growth**i if kind == "geometric" else 1.0))
                for i in range(passes - 1)]

    def average(p: float) -> float:
        alive, total = 1.0, 1.0
        for q in shape(p):
            alive *= 1 - q
            total += alive
        return total

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) > target else (lo, mid)
    return shape((lo + hi) / 2)


@dataclass
class PonderRecord:
    """What the last forward did: passes per token (B, T), and the gate values it computed
    (real entries only, with their gradient), pass by pass."""

    passes: Tensor
    gates: list[Tensor] = field(default_factory=list)


class PonderModel(Method):
    """A backbone looped K times with gated pondering embeddings and token-wise halting."""

    name = "ponder"
    knob = Knob("tau", (1e-4, 0.1, 0.3, 0.5), low=0.0, high=1.0,
                sweep=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9))  # 0: every pass; near 1: one
    depth_unit = "passes"

    options: PonderConfig

    def __init__(self, backbone: LayerStack, cfg: PonderConfig) -> None:
        super().__init__(backbone, cfg)
        self.passes = cfg.passes
        self.tau = cfg.tau  # the knob's one value
        if cfg.halting in ("uniform", "geometric"):
            if cfg.schedule_passes is None or cfg.schedule_passes > cfg.passes:
                raise UserError(f"halting {cfg.halting} needs schedule_passes in [1, "
                                f"{cfg.passes}] (the average passes it aims at)")
            self.fractions = schedule_fractions(cfg.passes, cfg.schedule_passes, cfg.halting,
                                                cfg.schedule_growth)
        d = backbone.cfg.d_model
        n_gates = 0 if cfg.halting != "learned" else (
            min(1, cfg.passes - 1) if cfg.gate == "shared" else cfg.passes - 1)
        self.gates = nn.ModuleList(mlp(d, cfg.gate_hidden or max(8, d // 4), 1)
                                   for _ in range(n_gates))
        for gate in self.gates:
            nn.init.constant_(gate[-1].bias, cfg.gate_bias)
        p = next(backbone.parameters())
        self.gates.to(device=p.device, dtype=p.dtype)
        self.from_scratch = False

    def gated(self, call: Call) -> bool:
        """Learned halting, unless the call forces every gate open (the dense reference)."""
        return self.options.halting == "learned" and call.force is not True

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """One K/V set per pass."""
        return self.backbone.new_cache(batch, max_len, sets=self.passes)

    # -- the forward -----------------------------------------------------------------------------
    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        bb, K, L = self.backbone, self.passes, self.backbone.n_layers
        B, T = idx.shape
        scale = math.sqrt(self.cfg.d_model) if self.options.scale_embeds else 1.0
        embeds = bb.embed(idx) * scale
        masked = self.options.dispatch == "masked"
        if masked and cache is not None:
            raise ValueError("dispatch masked is the dense reference: it keeps no cache")
        halts = K > 1 and self.options.halting != "none" and call.force is not True
        store = cache
        if store is None and halts and not masked:  # KV reuse within the call needs K/V sets
            end = start + T if positions is None else int(positions.max()) + 1
            store = bb.new_cache(B, end, sets=K)
        active = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        passes = torch.zeros(B * T, dtype=torch.long, device=idx.device)
        logits_out: Tensor | None = None
        hidden_out: Tensor | None = None
        record = PonderRecord(passes.view(B, T))
        replay: list[Tensor | None] = [None] * L  # masked reference: last active layer inputs
        for i in range(K):
            x, ctx = bb.prepare(embeds=embeds, cache=store, start=start, positions=positions)
            ctx = ctx.with_kv_offset(i * L)
            if i > 0 and store is not None and not bool(active.all()):
                halted = Subset.of(ctx, ~active)
                assert halted is not None
                for layer in range(L):  # KV reuse: halted tokens keep their last pass's K/V
                    store.carry((i - 1) * L + layer, i * L + layer, halted.ctx)
            sub = Subset.whole(ctx, B, T) if masked else Subset.of(ctx, active)
            if sub is None:  # every token of the call has halted (the cache still gets K/V)
                if cache is None:
                    break
                continue
            h = sub.gather(x)
            for layer in range(L):
                if masked:  # halted tokens replay their last active inputs
                    if replay[layer] is not None:
                        h = torch.where(active.unsqueeze(-1), h, replay[layer])
                    replay[layer] = h
                h = bb.run_layer(layer, h, sub.ctx)
            normed = bb.final_norm(h)
            logits = bb.unembed(normed)
            flat, real = sub.flat_index(), active if masked else sub.real_mask()
            passes[flat[real]] += 1
            if logits_out is None:
                logits_out = logits.new_empty(B * T, logits.shape[-1])
                hidden_out = h.new_empty(B * T, h.shape[-1])
            done = real
            if i < K - 1:  # decide who goes on, and give them their pondering embedding
                go, gate = self._continue(i, sub, normed, idx, real, record, call)
                e = bb.embed_soft(logits.float().softmax(-1)) * scale
                step = e if gate is None else gate.unsqueeze(-1).to(e.dtype) * e
                if sub.is_whole:
                    embeds = embeds + step
                else:
                    embeds = embeds.flatten(0, 1).index_copy(
                        0, flat[real], (sub.gather(embeds) + step)[real]).view_as(embeds)
                done = real & ~go
                active = torch.zeros(B * T, dtype=torch.bool, device=idx.device)
                active[flat[go]] = True
                active = active.view(B, T)
            logits_out[flat[done]] = logits[done]  # a halting token leaves with this pass's
            hidden_out[flat[done]] = h[done]
            if cache is None and not bool(active.any()):
                break
        assert logits_out is not None and hidden_out is not None
        call.record("ponder", record)
        if call.tally is not None:
            for p, n in enumerate(torch.bincount(passes, minlength=K + 1).tolist()):
                call.count("passes", n, p)
        call.note_depth(record.passes)
        return Output(logits_out.view(B, T, -1), hidden_out.view(B, T, -1))

    def _continue(self, i: int, sub: Subset, normed: Tensor, idx: Tensor, real: Tensor,
                  record: PonderRecord, call: Call) -> tuple[Tensor, Tensor | None]:
        """Which real entries run pass i+1, and the gate values that scale their pondering
        embedding (None: unscaled)."""
        if self.gated(call):
            gate = self.gates[min(i, len(self.gates) - 1)]
            s = torch.sigmoid(gate(normed).squeeze(-1).float())
            record.gates.append(s[real])
            return real & (s >= self.tau), s
        if self.options.halting == "none" or call.force is True:
            return real, None
        positions = sub.ctx.positions.expand(real.shape[0], -1)
        draw = token_uniform(positions, sub.gather(idx), i, self.options.schedule_seed)
        return real & (draw >= self.fractions[i]), None

    # -- training ------------------------------------------------------------------------------
    def k_at(self, step: int) -> float:
        """k of the bottom-k loss at `step`: 0 through the cross-entropy stage, then rising
        linearly to its value over k_warmup_steps."""
        cfg = self.options
        if step < cfg.ce_steps:
            return 0.0
        ramp = (step - cfg.ce_steps + 1) / cfg.k_warmup_steps if cfg.k_warmup_steps else 1.0
        return cfg.k * min(1.0, ramp)

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        """CE + lambda * bottomK_k(gates): the mean of the smallest k-fraction of the gate
        values computed in the batch (tokens x passes)."""
        records: dict[str, Any] = {}
        ce = self(x, call=Call(records=records)).loss(y)
        record: PonderRecord = records["ponder"]
        metrics = {"lm_loss": ce.item(), "avg_passes": record.passes.float().mean().item()}
        loss = ce
        k = self.k_at(step)
        if record.gates:
            gates = torch.cat(record.gates)
            metrics["gate_mean"] = gates.mean().item()
            if k > 0 and self.options.lam > 0:
                sparsity = bottom_k_mean(gates, k)
                loss = ce + self.options.lam * sparsity
                metrics["bottom_k"] = sparsity.item()
        metrics["k"] = k
        counts = torch.bincount(record.passes.flatten(), minlength=self.passes + 1)
        forward = self.flops_per_token(counts.double().cpu(), fl.causal_context(x.shape[1]),
                                       self.gated(PLAIN))
        return StepLoss(loss, metrics, forward * (3 if self.trains_backbone else 2))

    def set_trainable(self, from_scratch: bool) -> None:
        """From scratch everything trains; over a pretrained backbone the gates train, and the
        backbone too after the gates-only stage (`held_back`) unless train_backbone is off."""
        self.from_scratch = from_scratch
        self.trains_backbone = from_scratch or self.options.train_backbone
        self.requires_grad_(self.trains_backbone)
        self.gates.requires_grad_(True)

    def held_back(self, step: int) -> set[str]:
        """Continued pretraining: the backbone sits out the first gates_only_steps steps."""
        if (self.from_scratch or not self.trains_backbone or not len(self.gates)
                or step >= self.options.gates_only_steps):
            return set()
        return {f"backbone.{name}" for name, _ in self.backbone.named_parameters()}

    @property
    def may_skip_parameters(self) -> bool:
        return len(self.gates) > 0  # a pass no token reaches leaves its gate without gradient

    def training_flops_per_token(self, seq_len: int) -> float:
        """Before a step has run: every token every pass (a step says what it ran, with its
        loss), plus a backward of twice that when the backbone trains, once that when only the
        gates do."""
        forward = self.reference_flops_per_token(fl.causal_context(seq_len))
        return forward * (3 if self.trains_backbone else 2)

    # -- saving ---------------------------------------------------------------------------------
    def method_modules(self) -> dict[str, nn.Module]:
        return {"gates": self.gates} if len(self.gates) else {}

    # -- costs ----------------------------------------------------------------------------------
    def pass_flops(self, context: float) -> dict[str, float]:
        """FLOPs per token of one pass through the layers, of the LM head, of the pondering
        embedding (P W_emb) and of one gate."""
        dense = fl.forward_per_token(self.cfg, context)
        return {"layers": dense["attn_proj"] + dense["attn_scores"] + dense["ffn"],
                "head": dense["lm_head"], "soft": fl.linear(self.cfg.vocab_size, self.cfg.d_model),
                "gate": fl.module_flops(self.gates[0]) if len(self.gates) else 0.0}

    def flops_per_token(self, counts: Tensor, context: float, gated: bool) -> float:
        """Mean forward FLOPs per token for a histogram of passes (counts[p] tokens ran p
        passes). A token that ran p passes paid p layer stacks and p heads, and at each of its
        passes before the K-th a pondering embedding and, when gated, a gate (both computed
        before the decision to halt)."""
        f = self.pass_flops(context)
        extra = f["soft"] + (f["gate"] if gated else 0.0)
        total = sum(n * (p * (f["layers"] + f["head"]) + min(p, self.passes - 1) * extra)
                    for p, n in enumerate(counts.tolist()))
        return total / max(float(counts.sum()), 1.0)

    def reference_flops_per_token(self, context: float) -> float:
        """Fixed-K pondering (PonderLM): every token, every pass, no gate."""
        counts = torch.zeros(self.passes + 1, dtype=torch.float64)
        counts[self.passes] = 1.0
        return self.flops_per_token(counts, context, gated=False)

    def backbone_flops_per_token(self, context: float) -> float:
        """The backbone alone: one pass."""
        return sum(fl.forward_per_token(self.cfg, context).values())

    def tally_flops(self, tally: Tally, context: float) -> float:
        """The FLOPs of the passes histogram counted, gated as the method runs."""
        counts = torch.tensor(tally.sites("passes", range(self.passes + 1)), dtype=torch.float64)
        return self.flops_per_token(counts, context, self.gated(PLAIN))

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        """Against the one-pass backbone: the passes beyond the first (layers and head), the
        pondering embeddings, the gates."""
        counts = tally.sites("passes", range(self.passes + 1))
        n = max(sum(counts), 1.0)
        passes = sum(p * c for p, c in enumerate(counts)) / n
        between = sum(min(p, self.passes - 1) * c for p, c in enumerate(counts)) / n
        f = self.pass_flops(context)
        return {"passes beyond the first": (passes - 1) * (f["layers"] + f["head"]),
                "pondering embeddings": between * f["soft"],
                "gates": between * f["gate"] if self.gated(PLAIN) else 0.0}

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        """Passes per token (mean and histogram) at the setting measured."""
        counts = tally.sites("passes", range(self.passes + 1))
        n = max(sum(counts), 1.0)
        return {"avg_passes": sum(p * c for p, c in enumerate(counts)) / n,
                "passes_histogram": [int(c) for c in counts[1:]],
                "tau": self.tau if self.gated(PLAIN) else None, "tokens": int(sum(counts))}

    def most_token_depth(self) -> float:
        return float(self.passes)

    def depth_fraction(self, depth: float) -> float:
        return depth  # every pass runs the whole stack

    @torch.no_grad()
    def eval_report(self, data, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        """Passes per token on held-out text (mean and histogram) and the FLOPs they cost
        relative to fixed-K pondering and to the backbone alone."""
        context = fl.causal_context(block_size)
        runner, m = self.measured()
        for x, _ in data.eval_batches("val", batch_size, block_size, max_batches):
            runner(x.to(next(self.parameters()).device))
        flops = m.flops_per_token(context)
        return {**{k: v for k, v in m.summary().items() if k != "tokens"},
                "passes": self.passes, "halting": self.options.halting,
                "flops_vs_fixed_k": flops / self.reference_flops_per_token(context),
                "flops_vs_backbone": flops / self.backbone_flops_per_token(context)}

    # -- the bench -----------------------------------------------------------------------------
    def _check_knob(self) -> None:
        if self.options.halting != "learned" or self.passes < 2:
            raise UserError(f"this ponder run halts by {self.options.halting!r} with "
                            f"{self.passes} passes: it has no gate threshold (tau) to bench")

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        self._check_knob()
        if not 0 <= value < 1:
            raise UserError(f"tau settings must lie in [0, 1), got {value:g}")
        return lambda: setattr(self, "tau", value)

    def trained_range(self) -> tuple[float, float] | None:
        return (self.options.tau, self.options.tau)

    def current_knob_value(self) -> float | None:
        return self.tau if self.options.halting == "learned" else None

    def current_setting(self) -> Callable[[], None]:
        tau = self.tau
        return lambda: setattr(self, "tau", tau)

    def dense_reference(self) -> nn.Module:
        """Fixed-K pondering on the same weights: every gate open, every token every pass."""
        return super().dense_reference()


register("method", "ponder")(MethodSpec(
    name="ponder", config=PonderConfig, build=PonderModel, kind="ponder",
    summary="AdaPonderLM: K passes of the backbone with pondering embeddings; gated, "
            "token-wise halting with KV reuse"))
