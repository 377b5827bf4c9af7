"""CALM: per-token early exit at the first confident layer (Schuster et al., NeurIPS 2022,
"Confident Adaptive Language Modeling"); docs/methods/calm.md explains the method, its options
and which choices are the paper's and which are ours.

After every layer but the last, each token still running reads the LM head through a norm of
its own exit (`ExitHeads`) and measures its confidence: the gap between its two most likely
tokens (`softmax`, the default), the cosine between the layer's input and output
(`saturation`), or a trained linear exit classifier (`classifier`). A token whose confidence
passes the threshold exits: its logits are that layer's, and its state is copied upward. Later
tokens still attend to it at every layer, through keys and values computed from the copied
state alone (`write_kv`): an exited token leaves the computation of every later block.

Decisions are causal (a token's confidence depends on earlier tokens only) and per token:
rows of a batch exit at different layers when decoding, tokens of a prompt at different layers
within their rows when scoring text. The threshold is calibrated on held-out text so that the
early-exit model agrees with the full model to a target, with a distribution-free guarantee
(Learn then Test with Hoeffding-Bentkus p-values and fixed-sequence testing, as the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.dispatch import PLAIN, Call, Subset, Tally
from adadepth.depth.exits import ExitHeads, ExitMethod, UnitCosts, exit_loss, layer_states
from adadepth.depth.method import Evaluate, Knob, MethodSpec, StepLoss
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.generate import generate
from adadepth.model import KVCache, LayerStack, Output

Confidence = Literal["softmax", "saturation", "classifier"]


class CalmConfig(Strict):
    """CALM early exit; defaults are the paper's or ours (docs/methods/calm.md)."""

    confidence: Confidence = "softmax"
    threshold: float | None = Field(None, ge=0, le=1, description="exit when the confidence "
                                    "exceeds it; None = calibrated after training")
    agreement: float = Field(0.9, gt=0, lt=1, description="calibration target: the expected "
                             "agreement of the early-exit model with the full model")
    epsilon: float = Field(0.05, gt=0, lt=1, description="allowed probability that the "
                           "calibrated threshold misses the agreement target")
    consistency: Literal["generated", "teacher_forced"] = Field(
        "generated", description="calibrate on greedy continuations of held-out prompts "
        "(the paper's textual consistency) or on next-token predictions over held-out text")
    calibration_windows: PositiveInt = Field(64, description="held-out windows calibrated on")
    calibration_prompt: PositiveInt = Field(16, description="prompt tokens per window")
    calibration_tokens: PositiveInt = Field(32, description="generated tokens per window")
    calibration_step: float = Field(0.05, gt=0, le=0.5, description="spacing of the "
                                    "thresholds tested, from 1 down")
    decay: float = Field(0.0, ge=0, description="temperature tau of the decaying threshold "
                         "(the paper uses 4); 0 = a constant threshold")
    decay_horizon: PositiveInt | None = Field(None, description="positions over which the "
                                              "threshold decays; None = the context length")
    prefill: Literal["exit", "full"] = Field(
        "exit", description="calls of several tokens (prompts, scored text) exit per token "
        "too, or run every layer as the paper does with its encoder input")
    regime: Literal["joint", "heads"] = Field(
        "joint", description="a given backbone trains with the per-layer loss (the paper), or "
        "stays frozen while only the exit norms and classifier train")
    loss_weights: Literal["linear", "uniform"] = Field(
        "linear", description="weight of layer i's loss: i / sum(j) (the paper) or 1/L")


class ExitClassifier(nn.Module):
    """The paper's early-exit classifier: a linear map of the exit-normed state to P(exit)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, 1)

    def forward(self, normed: Tensor) -> Tensor:
        return torch.sigmoid(self.linear(normed).squeeze(-1).float())


def top2_gap(logits: Tensor) -> Tensor:
    """The softmax's two largest probabilities, their difference (the paper's softmax response)."""
    top = logits.float().softmax(-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def hoeffding_bentkus(risk: float, n: int, delta: float) -> float:
    """p-value of "the expected risk exceeds delta" given the mean `risk` of n risks in [0, 1]
    (Bates et al. 2021; the p-value Learn then Test uses)."""
    r = min(risk, delta)

    def xlogy(a: float, b: float) -> float:
        return 0.0 if a == 0 else a * math.log(a / b)

    hoeffding = math.exp(-n * (xlogy(r, delta) + xlogy(1 - r, 1 - delta)))
    return min(1.0, hoeffding, math.e * binomial_cdf(math.ceil(n * risk - 1e-9), n, delta))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space."""
    if k >= n:
        return 1.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
             + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


class CalmModel(ExitMethod):
    """A backbone whose tokens exit at the first layer where they are confident."""

    name = "calm"
    knob = Knob("threshold", (1.0, 0.9, 0.8, 0.6, 0.4), low=0.0, high=1.0)
    depth_unit = "layers run before exiting"

    options: CalmConfig

    def __init__(self, backbone: LayerStack, cfg: CalmConfig) -> None:
        super().__init__(backbone, cfg)
        self.heads = ExitHeads(backbone, own_norms=True)
        self.classifier = (ExitClassifier(backbone.cfg.d_model)
                           if cfg.confidence == "classifier" else None)
        p = next(backbone.parameters())
        self.heads.to(device=p.device, dtype=p.dtype)
        if self.classifier is not None:
            self.classifier.to(device=p.device, dtype=p.dtype)
        start = float("nan") if cfg.threshold is None else cfg.threshold
        self.register_buffer("threshold", torch.tensor(start, dtype=torch.float64))
        self.costs = UnitCosts.of(backbone.cfg, self.classifier)

    # -- deciding ---------------------------------------------------------------------------
    def exits_possible(self) -> bool:
        """False when no confidence can pass (threshold 1, no decay): none is measured then."""
        if torch.isnan(self.threshold):
            if self.training:  # evaluations while training, before any calibration
                return False
            raise UserError("calm needs an exit threshold: set calm.threshold, or calibrate "
                            "one on held-out text (model.calibrate(windows))")
        return float(self.threshold) < 1 or self.options.decay > 0

    def thresholds(self, positions: Tensor) -> float | Tensor:
        """The threshold of tokens at `positions` (B or 1, T): one number, or decaying with
        the position as the paper's decaying threshold does with the decoding step."""
        lam = float(self.threshold)
        if self.options.decay == 0:
            return lam
        horizon = self.options.decay_horizon or self.cfg.max_seq_len
        return lam * (0.9 + 0.1 * torch.exp(-self.options.decay * positions.float() / horizon))

    def decide(self, layer: int, conf: Tensor, sub: Subset) -> Tensor:
        """Which entries of `sub` exit after `layer`: those whose confidence passes their
        threshold (a strict inequality, so threshold 1 never exits)."""
        return conf > self.thresholds(sub.ctx.positions)

    def confidence(self, layer: int, out: Tensor, inp: Tensor) -> tuple[Tensor, Tensor | None]:
        """Confidence in [0, 1] of each token after `layer`, and its logits if they were needed
        to measure it (softmax)."""
        kind = self.options.confidence
        if kind == "softmax":
            logits = self.heads.logits(self.backbone, layer, out)
            return top2_gap(logits).clamp(0, 1), logits
        if kind == "saturation":  # the state stopped changing: the layer's output ~ its input
            return F.cosine_similarity(out.float(), inp.float(), dim=-1).clamp(0, 1), None
        assert self.classifier is not None
        return self.classifier(self.heads.normed(self.backbone, layer, out)), None

    # -- the forward ------------------------------------------------------------------------
    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        bb, L = self.backbone, self.backbone.n_layers
        B, T = idx.shape
        if (call.force is True or not self.exits_possible()
                or (T > 1 and self.options.prefill == "full")):
            self.count_forward(call, idx, L)  # no token can exit: the backbone's own forward
            return bb(idx, cache, start, positions=positions)
        own = cache is None  # a scoring call: copied states are only needed inside it
        if own:
            end = start + T if positions is None else int(positions.max()) + 1
            cache = bb.new_cache(B, end)
        h, ctx = bb.prepare(idx, cache, start, positions=positions)
        whole = self.whole_step(cache, ctx) if not own else []
        running = torch.ones(B, T, dtype=torch.bool, device=h.device)
        left = B * T  # tokens still running, kept on the host: one read-back per layer
        exit_layer = torch.full((B, T), L - 1, dtype=torch.long, device=h.device)
        logits: Tensor | None = None
        for i in range(L):
            if left < B * T:
                self.copy_states_up(i, h, ctx, running, own, B * T - left, call)
            sub = Subset.of(ctx, running, left, layout="pieces")
            if sub is None:
                continue
            inp = sub.gather(h)
            out = bb.run_layer(i, inp, sub.ctx)
            call.count("layers", sub.count)
            call.count("depth", left)
            h = sub.scatter(h, out)
            if i == L - 1:
                logits = self.place(logits, sub, bb.head(out), B, T, None)
                call.count("heads", sub.count)
                continue
            conf, layer_logits = self.confidence(i, out, inp)
            call.count("heads", sub.count if layer_logits is not None else 0)
            call.count("probes", sub.count if self.classifier is not None else 0)
            leave = self.decide(i, conf, sub)
            if sub.pad is not None:
                leave &= ~sub.pad
            leaving = int(leave.sum())
            if not leaving:
                continue
            if layer_logits is None:  # the head runs once, at the exit
                layer_logits = self.heads.logits(bb, i, out)
                call.count("heads", sub.count)
            logits = self.place(logits, sub, layer_logits, B, T, leave)
            flat = sub.flat()[sub.real(leave)]
            running.view(-1)[flat] = False
            exit_layer.view(-1)[flat] = i
            left -= leaving
        for layer in whole:  # every row wrote its slot, by running the block or copying
            cache.complete[layer] = True
        call.count("tokens", B * T)
        call.note_depth(exit_layer + 1)
        assert logits is not None
        return Output(logits=logits, hidden=h)

    @staticmethod
    def whole_step(cache: KVCache, ctx: Any) -> list[int]:
        """Layers whose cache stays complete after a decoding step of every row at the next
        position. Each row writes its slot at every layer (running rows by the block, exited
        ones by `write_kv`), but the cache must assume a write for chosen rows leaves holes and
        would make every later step build an attention mask; this restores what it knew."""
        if not ctx.contiguous:
            return []
        return [i for i in range(len(cache)) if cache.complete[i] and ctx.start <= cache.extent[i]]

    def copy_states_up(self, layer: int, h: Tensor, ctx: Any, running: Tensor, own: bool,
                       exited: int, call: Call) -> None:
        """K/V at `layer` of the `exited` tokens that left below it, from their copied states.
        Within a scoring call only tokens that a later running token attends to need them; a
        decoding cache keeps them all for the tokens still to come."""
        need = ~running
        if own:
            T = running.shape[1]
            order = torch.arange(T, device=running.device)
            last = torch.where(running, order, -1).max(1).values
            need &= order < last.unsqueeze(1)
        sub = Subset.of(ctx, need, None if own else exited, layout="pieces")
        if sub is not None:
            self.backbone.write_kv(layer, sub.gather(h), sub.ctx)
            call.count("kv", sub.count)

    @staticmethod
    def place(logits: Tensor | None, sub: Subset, values: Tensor, B: int, T: int,
              chosen: Tensor | None) -> Tensor:
        """Write the logits of the subset's real entries (those `chosen`, if given)."""
        if logits is None:
            logits = values.new_empty(B, T, values.shape[-1])
        flat, rows = sub.flat(), sub.real(values)
        if chosen is not None:
            keep = sub.real(chosen)
            flat, rows = flat[keep], rows[keep]
        logits.view(B * T, -1).index_copy_(0, flat, rows.to(logits.dtype))
        return logits

    # -- training ---------------------------------------------------------------------------
    def set_trainable(self, from_scratch: bool) -> None:
        super().set_trainable(from_scratch)
        if self.options.regime == "joint":  # the paper trains the whole model with the exit loss
            self.requires_grad_(True)
            self.trains_backbone = True

    def layer_weights(self) -> list[float]:
        L = self.backbone.n_layers
        raw = [i + 1.0 for i in range(L)] if self.options.loss_weights == "linear" else [1.0] * L
        return [w / sum(raw) for w in raw]

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        """The paper's weighted average of every layer's LM loss (weight i / sum j), plus the
        exit classifier's loss on detached states (so it never changes the model)."""
        states = layer_states(self.backbone, x)
        losses = [exit_loss(self.heads, self.backbone, i, h, y) for i, h in enumerate(states)]
        loss = sum(w * value for w, value in zip(self.layer_weights(), losses, strict=True))
        metrics = {"lm_loss": losses[-1].item(), "exit_loss": loss.item()}
        metrics.update({f"loss_layer_{i}": v.item() for i, v in enumerate(losses[:-1])})
        if self.classifier is not None:
            probe = self.classifier_loss(states)
            loss = loss + probe
            metrics["classifier_loss"] = probe.item()
        return StepLoss(loss, metrics)

    def classifier_loss(self, states: list[Tensor]) -> Tensor:
        """Class-balanced binary cross-entropy of P(exit) against "this layer's top token is the
        last layer's" (the paper's consistency label; balancing as its public code does)."""
        assert self.classifier is not None
        bb, total = self.backbone, 0.0
        with torch.no_grad():
            final = self.heads.logits(bb, len(states) - 1, states[-1]).argmax(-1)
        for i, h in enumerate(states[:-1]):
            with torch.no_grad():
                label = (self.heads.logits(bb, i, h).argmax(-1) == final).float()
                normed = self.heads.normed(bb, i, h)
            p = self.classifier(normed.detach())
            pos = label.mean().clamp(1e-6, 1 - 1e-6)
            weight = torch.where(label > 0, 1 - pos, pos)
            total = total + (weight * F.binary_cross_entropy(p, label, reduction="none")).mean()
        return total / (len(states) - 1)

    def training_flops_per_token(self, seq_len: int) -> float:
        """The dense forward, the head at every other layer too, and the backward."""
        L = self.backbone.n_layers
        forward = (self.reference_flops_per_token((seq_len + 1) / 2)
                   + (L - 1) * (self.costs.head + self.costs.probe))
        return forward * (3 if self.backbone_trained() else 2)

    # -- saving --------------------------------------------------------------------------------
    def method_modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"heads": self.heads}
        if self.classifier is not None:
            out["classifier"] = self.classifier
        return out

    def method_buffers(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}

    def load_method_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_method_state(tensors)
        if self.options.threshold is not None:  # an explicit threshold wins over a saved one
            self.threshold.fill_(self.options.threshold)

    # -- calibration -------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, windows: Tensor) -> dict[str, Any]:
        """The smallest threshold whose agreement with the full model is certified.

        Learn then Test (Angelopoulos et al. 2021), as the paper: thresholds 1, 1-s, 1-2s, ...
        are tested in that fixed order against "the expected disagreement exceeds 1 -
        agreement", each with a Hoeffding-Bentkus p-value over the calibration examples (one
        per window); testing stops at the first one not rejected at level epsilon. With
        probability at least 1 - epsilon over the calibration draw, the chosen threshold's
        expected agreement with the full model on text like it meets the target.
        """
        was = self.training
        self.eval()
        cfg = self.options
        windows = windows[:cfg.calibration_windows]
        delta = 1 - cfg.agreement
        steps = int(round(1 / cfg.calibration_step))
        candidates = [1 - k * cfg.calibration_step for k in range(1, steps + 1)]
        reference = self.consistency_outputs(windows, self.dense_reference())
        chosen, tested = 1.0, []
        try:
            for lam in candidates:
                self.threshold.fill_(max(lam, 0.0))
                risks = self.disagreement(windows, reference)
                p = hoeffding_bentkus(float(risks.mean()), len(risks), delta)
                tested.append({"threshold": round(lam, 6), "agreement": 1 - float(risks.mean()),
                               "p_value": p})
                if p > cfg.epsilon:
                    break
                chosen = max(lam, 0.0)
        finally:
            self.threshold.fill_(chosen)
            self.train(was)
        certified = bool(tested) and tested[0]["p_value"] <= cfg.epsilon
        return {"threshold": chosen, "calibration_examples": len(windows),
                "calibration_consistency": cfg.consistency, "threshold_certified": certified,
                "thresholds_tested": tested}

    def consistency_outputs(self, windows: Tensor, model: nn.Module | None = None) -> Tensor:
        """What `model` (default: this one) does on the calibration examples: its greedy
        continuation of each prompt, or its next-token prediction at every position."""
        cfg, model = self.options, model or self
        if cfg.consistency == "teacher_forced":
            return model(windows).logits.argmax(-1)
        prompt = windows[:, :cfg.calibration_prompt]
        new = min(cfg.calibration_tokens, self.cfg.max_seq_len - prompt.shape[1])
        return generate(model, prompt, new, temperature=0.0)[:, prompt.shape[1]:]

    def disagreement(self, windows: Tensor, reference: Tensor) -> Tensor:
        """Per window, the fraction of its outputs that differ from the full model's."""
        return (self.consistency_outputs(windows) != reference).float().mean(1)

    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if self.options.threshold is None:
            report.update(self.calibrate(calibration))
        reference = self.consistency_outputs(held_out[:self.options.calibration_windows],
                                             self.dense_reference())
        agreement = 1 - float(self.disagreement(held_out[:self.options.calibration_windows],
                                                reference).mean())
        report["held_out_agreement"] = agreement
        return report

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        """Layers run per token, where tokens exit, agreement with the full model's next-token
        prediction and the FLOPs ratio, over the validation text the loss was measured on."""
        device = self.threshold.device
        L = self.backbone.n_layers
        exits = torch.zeros(L, dtype=torch.float64)
        agree, total = 0.0, 0
        depths: list[Tensor] = []
        runner, m = self.measured(Call(depth=depths))
        dense = self.dense_reference()
        for x, _ in data.eval_batches("val", batch_size, block_size, max_batches):
            x = x.to(device)
            predicted = runner(x).logits.argmax(-1)
            exits += torch.bincount(depths[-1].flatten().long() - 1, minlength=L)
            agree += float((dense(x).logits.argmax(-1) == predicted).sum())
            total += x.numel()
        context = fl.causal_context(block_size)
        summary = m.summary()
        return {"threshold": float(self.threshold), "confidence": self.options.confidence,
                "layers_per_token": summary["layers_per_token"],
                "exit_fraction_per_layer": (exits / max(total, 1)).tolist(),
                "agreement_with_full_model": agree / max(total, 1),
                "flops_ratio": m.flops_per_token(context)
                / self.reference_flops_per_token(context)}

    # -- the bench -------------------------------------------------------------------------------
    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        return lambda: self.threshold.fill_(value)

    def current_knob_value(self) -> float | None:
        value = float(self.threshold)
        return None if math.isnan(value) else value

    def current_setting(self) -> Callable[[], None]:
        value = float(self.threshold)
        return lambda: self.threshold.fill_(value)

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        """Layers run per token, copied states' K/V and head reads per token."""
        tokens = max(tally.tokens, 1)
        return {"layers_per_token": tally.get("depth") / tokens,
                "threshold": float(self.threshold),
                "kv_copies_per_token": tally.get("kv") / tokens,
                "head_reads_per_token": tally.get("heads") / tokens, "tokens": int(tally.tokens)}


register("method", CalmModel.name)(MethodSpec(
    name=CalmModel.name, config=CalmConfig, build=CalmModel, kind="calm",
    summary="CALM: per-token early exit at the first confident layer, states copied upward"))
