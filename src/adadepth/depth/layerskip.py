"""LayerSkip: layer dropout and an early-exit loss in training, then early exit or lossless
self-speculative decoding at inference (Elhoushi et al., ACL 2024, "LayerSkip: Enabling Early
Exit Inference and Self-Speculative Decoding"); docs/methods/layerskip.md explains the method,
its options and which choices are the paper's and which are ours.

Training (`training_loss`): each sample skips block l with probability p_l = S(t) D(l) p_max,
rising with depth (D(0) = 0, D(L-1) = 1) and, from scratch, over training (S(t) from 0 to 1);
every block's output is read through the one shared LM head, and the per-layer losses are
averaged with weights that grow with depth, over the exits a curriculum enables at step t
(rotational: every R-th layer, shifted by one each step; gradual: from the last layer down).

Inference, at exit layer E (default: a quarter of the layers, the ratio of the public code's
example):
- `decoding: early_exit`: the first E blocks and the shared head, nothing else (every call);
- `decoding: speculative` (default): the model is the full model, and generation drafts
  `draft_tokens` tokens with the first E blocks, then verifies them with one pass of the full
  model over one shared cache. The verify pass reuses what the draft computed: the K/V of the
  first E blocks and the drafted tokens' states at block E, so it runs blocks E..L-1 on every
  token and blocks 0..E-1 only on the last drafted one. Greedy output is exactly the full
  model's; rows of a batch accept different numbers of tokens (`adadepth.generate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.dispatch import PLAIN, Call, Tally
from adadepth.depth.drafting import prepare, verify_reusing
from adadepth.depth.exits import ExitHeads, ExitMethod, UnitCosts, exit_loss, layer_states
from adadepth.depth.method import Evaluate, Knob, MethodSpec, StepLoss, TrainingPlan
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.generate import Draft, Round
from adadepth.model import KVCache, LayerStack, Output, causal_lm_loss


class LayerSkipConfig(Strict):
    """LayerSkip; defaults are the paper's or ours (docs/methods/layerskip.md)."""

    p_max: float = Field(0.1, ge=0, lt=1, description="layer dropout rate of the last layer")
    dropout_curriculum: Literal["auto", "constant", "exponential"] = Field(
        "auto", description="S(t): exponential (0 to 1 over training) or constant 1; auto = "
        "exponential from scratch, constant over a backbone, as the paper pairs them")
    e_scale: float = Field(1.0, gt=0, description="scale of the early exits' loss weights "
                           "against the last layer's")
    curriculum: Literal["rotational", "gradual", "none"] = "rotational"
    rotation: PositiveInt = Field(4, description="R of the rotational curriculum")
    gradual_fraction: float = Field(0.5, gt=0, le=1, description="fraction of training after "
                                    "which the gradual curriculum has enabled every exit")
    exit_norm: Literal["shared", "per_layer"] = Field(
        "shared", description="exits read the final norm and head (the paper) or a norm each")
    decoding: Literal["speculative", "early_exit"] = "speculative"
    exit_layer: PositiveInt | None = Field(None, description="E: blocks the draft (or the "
                                           "early-exit model) runs; None = a quarter of them")
    draft_tokens: PositiveInt = Field(4, description="tokens drafted per round")


def default_sweep(n_layers: int) -> tuple[float, ...]:
    """Exit layers the bench sweeps: a quarter, half and three quarters of the depth."""
    return tuple(sorted({float(min(n_layers - 1, max(1, round(n_layers * f))))
                         for f in (0.25, 0.5, 0.75)}))


class LayerSkipModel(ExitMethod):
    """A backbone trained to exit early, decoding by drafting with its first E layers."""

    name = "layerskip"
    depth_unit = "layers run"
    options: LayerSkipConfig

    def __init__(self, backbone: LayerStack, cfg: LayerSkipConfig) -> None:
        super().__init__(backbone, cfg)
        L = backbone.n_layers
        if cfg.exit_layer is not None and not 1 <= cfg.exit_layer <= L - 1:
            raise UserError(f"layerskip.exit_layer must be in [1, {L - 1}] for a backbone of "
                            f"{L} layers, got {cfg.exit_layer}")
        self.heads = ExitHeads(backbone, own_norms=cfg.exit_norm == "per_layer")
        p = next(backbone.parameters())
        self.heads.to(device=p.device, dtype=p.dtype)
        self.exit_layer = cfg.exit_layer or max(1, round(L / 4))  # the knob's one value
        self.decoding = cfg.decoding  # an inference choice: the weights do not depend on it
        self.knob = Knob("exit_layer", default_sweep(L), low=0, high=L - 1, integer=True)
        self.costs = UnitCosts.of(backbone.cfg)
        self.total_steps: int | None = None
        self.from_scratch = False

    # -- inference ----------------------------------------------------------------------------
    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        bb = self.backbone
        early = self.decoding == "early_exit" and call.force is not True
        depth = self.exit_layer if early else bb.n_layers
        self.count_forward(call, idx, depth)
        if not early:
            return bb(idx, cache, start, positions=positions)
        x, ctx = bb.prepare(idx, cache, start, positions=positions)
        for i in range(depth):
            x = bb.run_layer(i, x, ctx)
        return Output(hidden=x, head=lambda h: self.heads.logits(bb, depth - 1, h))

    def speculator_for(self, call: Call) -> Speculator | None:
        if call.force is True or self.decoding != "speculative":
            return None
        return Speculator(self, call)

    # -- training -----------------------------------------------------------------------------
    def begin_training(self, plan: TrainingPlan) -> dict[str, Any]:
        self.total_steps = plan.total_steps  # the curricula run over the planned steps
        return {}

    def set_trainable(self, from_scratch: bool) -> None:
        """Every weight trains: pretraining from scratch or continued pretraining (the paper)."""
        super().set_trainable(from_scratch)
        self.from_scratch = from_scratch
        self.requires_grad_(True)
        self.trains_backbone = True

    @property
    def may_skip_parameters(self) -> bool:
        return self.options.p_max > 0  # a dropped block gets no gradient in that step

    def progress(self, step: int) -> float:
        """t / T, the fraction of training done (1 when the length of training is unknown)."""
        if not self.total_steps or self.total_steps < 2:
            return 1.0
        return min(1.0, step / (self.total_steps - 1))

    def dropout_rates(self, step: int) -> list[float]:
        """p_l = S(t) D(l) p_max, D(l) = exp(l ln2 / (L-1)) - 1, S(t) = exp(t ln2 / T) - 1 or 1."""
        L, cfg = self.backbone.n_layers, self.options
        kind = cfg.dropout_curriculum
        if kind == "auto":
            kind = "exponential" if self.from_scratch else "constant"
        s = math.exp(self.progress(step) * math.log(2)) - 1 if kind == "exponential" else 1.0
        return [s * (math.exp(i * math.log(2) / (L - 1)) - 1) * cfg.p_max for i in range(L)]

    def enabled_exits(self, step: int) -> list[int]:
        """Layers whose exit loss counts at `step` (the last layer's always does)."""
        L, cfg = self.backbone.n_layers, self.options
        if cfg.curriculum == "rotational":
            early = [i for i in range(L - 1) if (i - step) % cfg.rotation == 0]
        elif cfg.curriculum == "gradual":
            done = self.progress(step)
            early = [i for i in range(L - 1) if done >= cfg.gradual_fraction * (L - i) / L]
        else:
            early = list(range(L - 1))
        return [*early, L - 1]

    def loss_scales(self, layers: list[int]) -> list[float]:
        """Weights that grow with depth as sums of layer indices: e_scale * (l+1)(l+2)/2 for an
        early exit after block l, L(L+1)/2 for the last, normalised over the enabled ones."""
        L = self.backbone.n_layers
        raw = [(i + 1) * (i + 2) / 2 * (self.options.e_scale if i < L - 1 else 1.0) for i in layers]
        return [r / sum(raw) for r in raw]

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        rates = self.dropout_rates(step)

        def runs(layer: int) -> Tensor | None:
            if rates[layer] <= 0:
                return None
            keep = (torch.rand(x.shape[0], device=x.device) >= rates[layer]).nonzero()
            return None if len(keep) == x.shape[0] else keep.squeeze(1)

        states = layer_states(self.backbone, x, runs)
        layers = self.enabled_exits(step)
        losses = [exit_loss(self.heads, self.backbone, i, states[i], y) for i in layers]
        loss = sum(w * v for w, v in zip(self.loss_scales(layers), losses, strict=True))
        metrics = {"lm_loss": losses[-1].item(), "early_exit_loss": loss.item(),
                   "dropout_last_layer": rates[-1]}
        return StepLoss(loss, metrics)

    def training_flops_per_token(self, seq_len: int) -> float:
        """Forward and backward of the blocks that run (dropout skips some) and of the heads of
        the enabled exits, at the mid-training rates (the curriculum's average)."""
        step = (self.total_steps or 2) // 2
        scores = fl.attention(self.cfg, (seq_len + 1) / 2)["attn_scores"]
        blocks = sum(1 - p for p in self.dropout_rates(step))
        heads = len(self.enabled_exits(step))
        return 3 * (blocks * (self.costs.layer + scores) + heads * self.costs.head)

    # -- saving --------------------------------------------------------------------------------
    def method_modules(self) -> dict[str, nn.Module]:
        return {"heads": self.heads} if self.heads.norms is not None else {}

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def exit_quality(self, batches: Any) -> dict[str, list[float]]:
        """Per exit layer over (x, y) batches: its LM loss, and how often its top token is the
        last layer's (what a greedy draft exiting there would get accepted)."""
        bb, L = self.backbone, self.backbone.n_layers
        device = next(self.parameters()).device
        loss, agree, tokens = [0.0] * L, [0.0] * L, 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            states = layer_states(bb, x)
            final = self.heads.logits(bb, L - 1, states[-1]).argmax(-1)
            for i, h in enumerate(states):
                logits = self.heads.logits(bb, i, h)
                loss[i] += causal_lm_loss(logits, y).item() * y.numel()
                agree[i] += float((logits.argmax(-1) == final).sum())
            tokens += y.numel()
        return {"exit_loss_per_layer": [v / max(tokens, 1) for v in loss],
                "exit_agreement_per_layer": [v / max(tokens, 1) for v in agree]}

    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        """Nothing to calibrate: how good each exit is on held-out windows."""
        return self.exit_quality([(held_out[:, :-1], held_out[:, 1:])])

    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        quality = self.exit_quality(data.eval_batches("val", batch_size, block_size,
                                                      max_batches))
        E = self.exit_layer
        flops = (self.inference_flops_per_token(fl.causal_context(block_size), E)
                 if self.decoding == "early_exit" else None)
        reference = self.reference_flops_per_token(fl.causal_context(block_size))
        return {"decoding": self.decoding, "exit_layer": E,
                "draft_agreement": quality["exit_agreement_per_layer"][E - 1],
                "flops_ratio": 1.0 if flops is None else flops / reference, **quality}

    def inference_flops_per_token(self, context: float, layers: int) -> float:
        """FLOPs per token of the first `layers` blocks and the head."""
        scores = fl.attention(self.cfg, context)["attn_scores"]
        return layers * (self.costs.layer + scores) + self.costs.head

    # -- the bench -------------------------------------------------------------------------------
    def set_exit_layer(self, value: float) -> None:
        layer = int(value)
        if not 1 <= layer <= self.backbone.n_layers - 1:
            raise UserError(f"exit_layer must be in [1, {self.backbone.n_layers - 1}], "
                            f"got {value:g}")
        self.exit_layer = layer

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        self.set_exit_layer(value)  # a bad value fails now, not in the middle of the bench
        return lambda: self.set_exit_layer(value)

    def current_knob_value(self) -> float | None:
        return float(self.exit_layer)

    def current_setting(self) -> Callable[[], None]:
        layer = self.exit_layer
        return lambda: self.set_exit_layer(layer)

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        """Blocks and head reads that really ran (drafts, verify passes, rejected drafts
        included) per token produced, and the acceptance rate of the drafts."""
        tokens = max(tally.tokens, 1)
        out: dict[str, Any] = {}
        drafted, accepted = tally.get("drafted"), tally.get("accepted")
        if drafted:
            out["acceptance_rate"] = accepted / drafted
            L, E = self.backbone.n_layers, self.exit_layer
            row_rounds = max(tally.get("row_rounds"), 1)
            per_round = 1 + accepted / row_rounds  # tokens a row gets per round
            drafts = drafted / row_rounds  # drafts per row and round (the last rounds draft less)
            out["tokens_per_round"] = per_round
            # A block call costs the same for 1 or d+1 tokens when memory-bound: a round
            # makes d*E + L sequential block calls where plain decoding makes L per token.
            out["ideal_latency_speedup"] = L * per_round / (drafts * E + L)
        out.update({"blocks_run_per_token": tally.get("layers") / tokens,
                    "exit_layer": self.exit_layer, "decoding": self.decoding,
                    "tokens": int(tally.tokens)})
        return out


class Speculator:
    """LayerSkip's draft and verify for one decoding session, counting into its call: draft
    with the first E blocks and the shared head, verify with the full model reusing what the
    draft computed (the K/V of the first E blocks and the drafted tokens' states at block E,
    LayerSkip's exit query cache). Per-round state travels in `Round` and `Draft`."""

    def __init__(self, model: LayerSkipModel, call: Call) -> None:
        self.model, self.call = model, call
        self.draft_tokens = model.options.draft_tokens

    def draft(self, rnd: Round, cache: KVCache) -> Draft:
        """`draft_tokens` tokens after `rnd.last` (fewer if the round allows fewer), each
        from the first E blocks and the shared head; their states at block E travel with the
        draft to the verify pass."""
        model = self.model
        bb, E, B = model.backbone, model.exit_layer, rnd.last.shape[0]
        n = min(self.draft_tokens, rnd.most)
        token = rnd.last
        drafts, probs, states = [], [], []
        for k in range(n):
            x, ctx = prepare(bb, token, cache, rnd.positions.unsqueeze(1) + k, rnd.rows)
            for i in range(E):
                x = bb.run_layer(i, x, ctx)
            states.append(x)
            token, p = rnd.sample(model.heads.logits(bb, E - 1, x)[:, -1])
            drafts.append(token)
            if p is not None:
                probs.append(p)
        self.call.count("layers", B * n * E)
        self.call.count("heads", B * n)
        self.call.count("drafted", B * n)
        return Draft(torch.cat(drafts, 1), torch.stack(probs, 1) if probs else None,
                     torch.cat(states, 1))

    def verify(self, rnd: Round, draft: Draft, cache: KVCache) -> Tensor:
        """Full-model logits of [last, drafts]: blocks 0..E-1 for the last drafted token alone
        (the others' K/V and states come from the draft), then blocks E..L-1 for all of them."""
        h, blocks = verify_reusing(self.model.backbone, rnd, draft.tokens, draft.carry,
                                   self.model.exit_layer, cache)
        self.call.count("layers", blocks)
        self.call.count("heads", h.shape[0] * h.shape[1])
        return self.model.backbone.head(h)

    def observe(self, accepted: Tensor, active: Tensor) -> None:
        """What a round kept: drafted tokens accepted per row, and which rows still generate."""
        if self.call.tally is None:
            return
        rows = int(active.sum())
        kept = int(accepted[active].sum())
        self.call.count("tokens", kept + rows)  # the accepted drafts and the verifier's next
        self.call.count("depth", (kept + rows) * self.model.backbone.n_layers)
        self.call.count("accepted", kept)
        self.call.count("rounds", 1)
        self.call.count("row_rounds", rows)


register("method", LayerSkipModel.name)(MethodSpec(
    name=LayerSkipModel.name, config=LayerSkipConfig, build=LayerSkipModel, kind="layerskip",
    summary="LayerSkip: layer dropout and early-exit loss; self-speculative decoding"))
