"""Mixture-of-Depths ensemble: the last layers of a pretrained LM vote on the next token.

"Tuning Language Models by Mixture-of-Depths Ensemble" (Luo and Specia, arXiv 2410.13077);
docs/methods/ensemble.md explains the method and which choices are the paper's and which ours.

Each of the last n layers' hidden states h_l gets a new norm N_l (a copy of the backbone's final
norm to start with) and goes through the backbone's own LM head U; learned routing weights w_l,
per token from a small router reading the last layer's normalised state or one global vector,
combine them (softmax over the late layers, so they sum to one):

    logits = sum_l w_l U(N_l(h_l))                   combine: logits (default)
    logits = sum_l w_l log_softmax(U(N_l(h_l)))      combine: log_probs

Training minimises the LM loss of the combination plus lambda times the mean, over the other late
layers, of KL(p_final || p_l), the final layer's distribution detached: a teacher that pulls the
late layers toward it without being pulled back.

Cost: U is linear, so a per-token weighted sum of logits (weights summing to one) is U applied
once to the weighted sum of the normalised states. Inference therefore runs the head once,
whatever n; only training, which needs every layer's distribution for the distillation term, runs
it n times. A mixture of log-probabilities is not linear in the states: it runs the head n times,
always (the `late_layers` knob of `adadepth bench` measures what that costs).

`EnsembleModel` is the ensemble on a frozen backbone (method `ensemble`); `EnsembleLora` adds
LoRA adapters through peft (method `ensemble+lora`); both build on `depth/tuning.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.dispatch import PLAIN, Call
from adadepth.depth.method import Knob, MethodSpec, StepLoss
from adadepth.depth.registry import register
from adadepth.depth.tuning import LoraOptions, TunedModel
from adadepth.errors import UserError
from adadepth.model import KVCache, LayerStack, Output, causal_lm_loss


class EnsembleConfig(Strict):
    """The late-layer ensemble; defaults are the paper's where it gives them, else ours."""

    layers: int = Field(4, ge=1, description="late layers in the ensemble, the last included")
    router: Literal["token", "global"] = Field(
        "token", description="routing weights per token from a linear router, or one vector")
    combine: Literal["logits", "log_probs"] = Field(
        "logits", description="what the routing weights mix: the late layers' logits or their "
        "log-probabilities")
    lambda_distill: float = Field(1.0, ge=0, description="weight of the distillation term")
    init_last: float = Field(0.5, gt=0, lt=1, description="routing weight of the last layer at "
                             "the start; the other late layers share the rest equally")


class EnsembleLoraConfig(EnsembleConfig):
    lora: LoraOptions = Field(default_factory=LoraOptions)


class GlobalRouter(nn.Module):
    """One routing vector for every token."""

    def __init__(self, bias: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(bias.clone())

    def forward(self, u: Tensor) -> Tensor:
        return self.logits.expand(*u.shape[:-1], -1)


class LateHeads(nn.Module):
    """What the ensemble adds: a norm per late layer and the router of their weights."""

    def __init__(self, backbone: nn.Module, cfg: EnsembleConfig) -> None:
        super().__init__()
        n = cfg.layers
        self.norms = nn.ModuleList(backbone.make_norm() for _ in range(n))
        prior = torch.full((n,), (1 - cfg.init_last) / max(n - 1, 1))
        prior[-1] = cfg.init_last if n > 1 else 1.0
        if cfg.router == "token":
            # Zero weights: every token starts at the prior, and the router learns to depart.
            self.router: nn.Module = nn.Linear(backbone.cfg.d_model, n)
            with torch.no_grad():
                self.router.weight.zero_()
                self.router.bias.copy_(prior.log())
        else:
            self.router = GlobalRouter(prior.log())

    def weights(self, last_normed: Tensor, k: int) -> Tensor:
        """(B, T, k) routing weights of the last k late layers, summing to one per token."""
        scores = self.router(last_normed)[..., -k:]
        return scores.float().softmax(-1).to(last_normed.dtype)


def mix(layer_logits: list[Tensor], weights: Tensor, combine: str) -> Tensor:
    """The weighted sum of the layers' logits or log-probabilities."""
    if combine == "log_probs":
        layer_logits = [z.float().log_softmax(-1) for z in layer_logits]
    return sum(weights[..., j, None] * z for j, z in enumerate(layer_logits))


def next_token_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-token cross-entropy in fp32, (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(
        y.shape)


def distillation(layer_logits: list[Tensor]) -> Tensor:
    """Mean over the other late layers of KL(p_final || p_l); the final layer is detached."""
    if len(layer_logits) < 2:
        return layer_logits[0].new_zeros(())
    teacher = layer_logits[-1].detach().float().log_softmax(-1).flatten(0, 1)
    return torch.stack([
        F.kl_div(z.float().log_softmax(-1).flatten(0, 1), teacher, log_target=True,
                 reduction="batchmean") for z in layer_logits[:-1]]).mean()


@torch.no_grad()
def head_is_affine(backbone: nn.Module) -> bool:
    """Whether the LM head is affine, so that mixing normalised states (weights summing to one)
    equals mixing logits. Probed with large inputs, so that a soft cap (tanh) would show."""
    p = next(backbone.parameters())
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 1, backbone.cfg.d_model, generator=gen) * 100).to(p)
    za, zb, zm = (backbone.unembed(v).float() for v in (a, b, 0.25 * a + 0.75 * b))
    expected = 0.25 * za + 0.75 * zb
    return bool(torch.allclose(zm, expected, rtol=1e-3,
                               atol=1e-3 * float(expected.abs().max())))


class EnsembleModel(TunedModel):
    """The last `layers` layers of a backbone read through their own norms and the shared head,
    mixed by learned routing weights; the backbone frozen (LoRA adapters in `EnsembleLora`)."""

    name = "ensemble"

    options: EnsembleConfig

    def __init__(self, backbone: LayerStack, cfg: EnsembleConfig,
                 lora: LoraOptions | None = None) -> None:
        n_layers = backbone.n_layers
        if cfg.layers > n_layers:
            raise UserError(f"an ensemble of {cfg.layers} late layers needs a backbone that deep; "
                            f"this one has {n_layers} (layers must be 1..{n_layers})")
        super().__init__(backbone, cfg, lora=lora)
        p = next(backbone.parameters())
        self.late = LateHeads(backbone, cfg).to(device=p.device, dtype=p.dtype)
        self.late_layers = list(range(n_layers - cfg.layers, n_layers))
        self.active = cfg.layers  # the bench's knob: mix only the last `active` late layers
        self.knob = Knob("late_layers", tuple(float(k) for k in range(1, cfg.layers + 1)),
                         low=0.0, high=float(cfg.layers), integer=True)
        # The head runs once at inference when it is affine and logits are mixed.
        self.mix_states = cfg.combine == "logits" and head_is_affine(backbone)

    def method_modules(self) -> dict[str, nn.Module]:
        return {"late": self.late}

    # -- running ----------------------------------------------------------------------------
    def late_states(self, idx: Tensor, cache: KVCache | None = None, start: int = 0,
                    positions: Tensor | None = None) -> list[Tensor]:
        """The hidden states after each late layer (the last one is the backbone's output)."""
        bb = self.backbone
        x, ctx = bb.prepare(idx, cache, start, positions=positions)
        states = []
        for i in range(bb.n_layers):
            x = bb.run_layer(i, x, ctx)
            if i >= self.late_layers[0]:
                states.append(x)
        return states

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        if call.force is True:  # the bench's reference: the pretrained model
            return super().forward(idx, cache, start, positions=positions, call=call)
        states = self.late_states(idx, cache, start, positions)[-self.active:]
        logits, heads = self.read_out(states)
        self.count(call, idx.numel(), heads=heads, mixed=float(len(states)))
        return Output(logits=logits, hidden=states[-1])

    def read_out(self, states: list[Tensor]) -> tuple[Tensor, float]:
        """The combined logits of the last len(states) late layers, and how many times the
        head ran per token: once on the mixed normalised states when it can, else per layer."""
        k = len(states)
        normed = [norm(h) for norm, h in zip(self.late.norms[-k:], states, strict=True)]
        weights = self.late.weights(normed[-1], k)
        if self.mix_states:
            mixed = sum(weights[..., j, None] * u for j, u in enumerate(normed))
            return self.backbone.unembed(mixed), 1.0
        logits = [self.backbone.unembed(u) for u in normed]
        return mix(logits, weights, self.options.combine), float(k)

    def layer_outputs(self, idx: Tensor) -> tuple[list[Tensor], Tensor]:
        """Every late layer's logits and the routing weights (B, T, n): what training and the
        report need (the head runs once per late layer)."""
        states = self.late_states(idx)
        normed = [norm(h) for norm, h in zip(self.late.norms, states, strict=True)]
        weights = self.late.weights(normed[-1], len(normed))
        return [self.backbone.unembed(u) for u in normed], weights

    def losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(LM loss of the combination, distillation term)."""
        layer_logits, weights = self.layer_outputs(x)
        lm = causal_lm_loss(mix(layer_logits, weights, self.options.combine), y)
        return lm, distillation(layer_logits)

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        lm, distill = self.losses(x, y)
        return StepLoss(lm + self.options.lambda_distill * distill,
                        {"lm_loss": lm.item(), "distill": distill.item()})

    # -- cost -------------------------------------------------------------------------------------
    def training_heads(self) -> int:
        return self.options.layers

    def extra_flops(self, heads: float, mixed: float) -> float:
        """The router, and the weighted sum: of normalised states when the head runs once, of
        vocabulary-wide vectors when it runs per layer (norms and softmaxes, elementwise, are
        not counted, as nowhere in flops.py)."""
        width = self.cfg.d_model if heads <= 1 else self.cfg.vocab_size
        return fl.module_flops(self.late.router) + 2.0 * mixed * width

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        k = int(value)
        return lambda: setattr(self, "active", k)

    def current_setting(self) -> Callable[[], None]:
        return self.knob_setter(self.active, torch.empty(0))

    def current_knob_value(self) -> float | None:
        return float(self.active)

    def summary(self, heads: float, tokens: float) -> dict[str, Any]:
        return {"late_layers": self.active, "head_evaluations": heads,
                "combine": self.options.combine, "tokens": tokens}

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        """Per late layer its own loss and next-token accuracy; the ensemble's accuracy; how
        often the best late layer for each token is right (complementarity); the routing
        weights over tokens (mean, spread, quantiles); the FLOPs ratio to the base."""
        n = len(self.late_layers)
        device = next(self.parameters()).device
        loss_sum, hits = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
        ensemble_hits = any_hits = total = 0
        weights = []
        for x, y in data.eval_batches("val", batch_size, block_size, max_batches):
            x, y = x.to(device), y.to(device)
            layer_logits, w = self.layer_outputs(x)
            right = torch.stack([z.argmax(-1) == y for z in layer_logits])  # (n, B, T)
            for j, z in enumerate(layer_logits):
                loss_sum[j] += next_token_loss(z, y).sum().item()
            hits += right.flatten(1).sum(1).cpu()
            any_hits += int(right.any(0).sum())
            ensemble_hits += int((mix(layer_logits, w, self.options.combine).argmax(-1) == y).sum())
            total += y.numel()
            weights.append(w.reshape(-1, n).float().cpu())
        w = torch.cat(weights)
        q = torch.quantile(w, torch.tensor([0.1, 0.5, 0.9]), dim=0)
        context = fl.causal_context(block_size)
        return {
            "val_accuracy": ensemble_hits / total, "late_layers": self.late_layers,
            "late_layer_loss": (loss_sum / total).tolist(),
            "late_layer_accuracy": (hits.double() / total).tolist(),
            "final_layer_accuracy": hits[-1].item() / total,
            "best_layer_per_token_accuracy": any_hits / total,
            "routing_weight_mean": w.mean(0).tolist(), "routing_weight_std": w.std(0).tolist(),
            "routing_weight_p10": q[0].tolist(), "routing_weight_p50": q[1].tolist(),
            "routing_weight_p90": q[2].tolist(),
            "flops_ratio": self.inference_flops_per_token(context, 1.0 if self.mix_states else n,
                                                          n)
            / self.reference_flops_per_token(context),
        }


class EnsembleLora(EnsembleModel):
    """The ensemble together with LoRA adapters (peft) in the backbone."""

    name = "ensemble+lora"

    def __init__(self, backbone: nn.Module, cfg: EnsembleLoraConfig) -> None:
        super().__init__(backbone, cfg, lora=cfg.lora)


register("method", "ensemble")(MethodSpec(
    name="ensemble", config=EnsembleConfig, build=EnsembleModel, kind="ensemble",
    summary="the last layers as an ensemble: new norms, shared head, learned routing weights, "
    "distillation to the final layer (frozen backbone)"))
register("method", "ensemble+lora")(MethodSpec(
    name="ensemble+lora", config=EnsembleLoraConfig, build=EnsembleLora, kind="ensemble+lora",
    summary="the late-layer ensemble together with LoRA adapters (peft)"))
