"""Conditional depth routing: per token, a controlled layer runs its full FFN or a cheap one.

`RoutedFFN` replaces the backbone's FFN at a controlled layer. It scores every token with a gate,
decides full or cheap under the full-path budget b, and computes only what it decided:

- decisions: top-k per sequence (k = ceil(b*T), training), or causal thresholds calibrated on
  held-out data (inference and decoding), read from the gate score or from a small predictor
  trained to imitate top-k membership;
- dispatch: `sparse` gathers the full-path tokens into a packed tensor, runs the full FFN on
  them alone and the cheap FFN on the rest, and scatters back; `dense` runs both paths on every
  token and mixes (needed by the straight-through estimator, kept for comparison);
- the gate's gradient through the hard decision: straight-through (forward m, backward
  sigma(s)), or the ratio estimator that scales each executed path by sigma/sg(sigma) or
  (1-sigma)/sg(1-sigma), which needs only the executed path. Both read s relative to the
  decision boundary (`surrogate_center: boundary`, the default): top-k and thresholds ignore a
  shift of every score, so the LM gradient, which pushes all scores up wherever the full path
  helps, would otherwise drive sigma(s) into saturation and its own gradient to zero.

`RoutedModel` installs RoutedFFNs into any backbone with the layer-stack interface
(`prepare` / `run_layer` / `head` / `get_ffn` / `set_ffn`), ours or a Hugging Face adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import RoutingConfig
from adadepth.depth import cheap as _cheap  # noqa: F401  (registers the cheap paths)
from adadepth.depth.gates import Gate
from adadepth.depth.registry import build
from adadepth.errors import UserError
from adadepth.model import Output

Decision = Literal["auto", "topk", "causal", "calibrate"]


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
                 predictor: nn.Module | None = None, center: str = "boundary") -> None:
        super().__init__()
        self.full, self.cheap, self.gate = full, cheap, gate
        self.budget, self.estimator, self.dispatch = budget, estimator, dispatch
        self.center = center  # "boundary": the surrogate reads s - boundary; "none": s itself
        self.predictor = predictor  # causal imitation of top-k; None = threshold the score
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.decision: Decision = "auto"
        self.force: bool | None = None  # oracle counterfactuals: every token full / cheap
        self.keep_outcome = False
        self.record: RouteRecord | None = None

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
        if decision == "calibrate":
            # The (1-b) quantile of this layer's scores, given the thresholds already set below.
            q = torch.quantile(causal.float().flatten(), 1 - self.budget)
            self.threshold.fill_(q.item())
        elif torch.isnan(self.threshold):
            raise UserError("causal routing needs calibrated thresholds; run calibrate() first")
        return Route(causal > self.threshold, boundary=self.threshold)

    # -- computing ----------------------------------------------------------------------------
    def use_sparse(self, needs_gate_grad: bool) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "sparse"
        return not (needs_gate_grad and self.estimator == "straight_through")

    def forward(self, u: Tensor) -> Tensor:
        full = self.uniform_decision()
        if full is not None:  # the gate is not run: its score could not change anything
            if self.decision == "calibrate":  # every score passes
                self.threshold.fill_(float("-inf") if full else float("inf"))
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


class RoutedModel(nn.Module):
    """A backbone whose controlled layers route each token to a full or a cheap FFN."""

    def __init__(self, backbone: nn.Module, cfg: RoutingConfig) -> None:
        super().__init__()
        self.backbone, self.rcfg = backbone, cfg
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
            router = RoutedFFN(backbone.get_ffn(i), build("cheap", cfg.cheap, d_model=d,
                                                          d_ff=d_ff, rank=cfg.rank),
                               gate, cfg.budget, cfg.estimator, cfg.dispatch, predictor,
                               cfg.surrogate_center)
            router.keep_outcome = "jepa" in cfg.aux
            backbone.set_ffn(i, router)
            self.routers.append(router)
        p = next(backbone.parameters())
        self.routers.to(device=p.device)

    def _static_full_layers(self) -> set[int]:
        """Evenly spaced controlled layers run full, round(b * #layers) of them."""
        count = round(self.rcfg.budget * len(self.layers))
        if count == 0:
            return set()
        step = len(self.layers) / count
        return {self.layers[int(j * step)] for j in range(count)}

    @property
    def cfg(self):
        return self.backbone.cfg

    # -- the layer-stack interface, so generation and evaluation treat it like any model ------
    def new_cache(self, batch: int, max_len: int | None = None):
        return self.backbone.new_cache(batch, max_len)

    def forward(self, idx: Tensor, cache=None, start: int = 0) -> Output:
        return self.backbone(idx, cache, start)

    # -- which parameters train ------------------------------------------------------------------
    def controller_modules(self) -> dict[str, nn.Module]:
        """Everything the router adds: gates, cheap FFNs, predictors (not the backbone's FFN)."""
        out: dict[str, nn.Module] = {}
        for j, r in enumerate(self.routers):
            out[f"routers.{j}.gate"] = r.gate
            out[f"routers.{j}.cheap"] = r.cheap
            if r.predictor is not None:
                out[f"routers.{j}.predictor"] = r.predictor
        return out

    def freeze_backbone(self) -> None:
        """Controller-only regime: only the gates, cheap paths and predictors train."""
        self.backbone.requires_grad_(False)
        for p in self.controller_parameters():
            p.requires_grad_(True)

    def controller_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.controller_modules().values() for p in m.parameters()]

    def controller_state(self) -> dict[str, Tensor]:
        state = {}
        for prefix, module in self.controller_modules().items():
            for k, v in module.state_dict().items():
                state[f"{prefix}.{k}"] = v.detach().contiguous().cpu()
        for j, r in enumerate(self.routers):
            state[f"routers.{j}.threshold"] = r.threshold.detach().cpu().reshape(1)
        return state

    def load_controller_state(self, tensors: dict[str, Tensor]) -> None:
        for prefix, module in self.controller_modules().items():
            sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            module.load_state_dict(sub)
        for j, r in enumerate(self.routers):
            r.threshold.copy_(tensors[f"routers.{j}.threshold"].reshape(()))

    def set_decision(self, decision: Decision) -> None:
        for r in self.routers:
            r.decision = decision

    # -- causal inference ------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, batches: list[Tensor]) -> list[float]:
        """Set each layer's threshold to the (1-b) quantile of its held-out scores.

        One pass over all calibration tokens: layer l sets its threshold, routes, and layer l+1
        then sees inputs produced under the thresholds of the layers below it, as at deployment.
        """
        was_training = self.training
        self.eval()
        self.set_decision("calibrate")
        try:
            self.backbone(torch.cat(batches, 0))
        finally:
            self.set_decision("auto")
            self.train(was_training)
        return [r.threshold.item() for r in self.routers]

    @torch.no_grad()
    def full_fraction_over(self, batches) -> list[float]:
        """Realised full fraction per controlled layer over batches of token ids."""
        counts, n = torch.zeros(len(self.routers)), 0
        device = next(self.parameters()).device
        for x in batches:
            self.backbone(x.to(device))
            counts += torch.tensor(self.full_fractions()) * x.numel()
            n += x.numel()
        return (counts / max(n, 1)).tolist()

    def full_fractions(self) -> list[float]:
        """Realised full fraction per controlled layer in the last forward."""
        return [r.record.mask.float().mean().item() for r in self.routers]

    def inference_flops_per_token(self, context: float, fractions: list[float],
                                  budget: float | None = None) -> float:
        """Forward FLOPs per token at the given full fractions (what sparse dispatch executes),
        under causal routing at `budget` (default: each layer's own)."""
        dense = fl.forward_per_token(self.cfg, context)
        per_layer_ffn = dense["ffn"] / self.cfg.n_layers
        total = sum(dense.values())
        for r, f in zip(self.routers, fractions, strict=True):
            total += (f - 1) * per_layer_ffn + (1 - f) * fl.module_flops(r.cheap)
            if r.gate.fixed is None and (r.budget if budget is None else budget) < 1:
                # at budget 1 (or with a constant gate) no score is needed: the gate is not run
                total += fl.module_flops(r.gate)
                if r.predictor is not None:
                    total += fl.module_flops(r.predictor)
        return total

    @torch.no_grad()
    def eval_report(self, data, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, object]:
        """Full fraction under causal routing and routed/dense FLOPs, for `adadepth eval`."""
        batches = (x for x, _ in data.eval_batches("val", batch_size, block_size, max_batches))
        fractions = self.full_fraction_over(batches)
        ctx = fl.causal_context(block_size)
        dense = sum(fl.forward_per_token(self.cfg, ctx).values())
        return {"full_fraction_causal": fractions, "controlled_layers": self.layers,
                "budget": self.rcfg.budget, "gate": self.rcfg.gate,
                "flops_ratio": self.inference_flops_per_token(ctx, fractions) / dense}
