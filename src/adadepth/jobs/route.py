"""`adadepth route`: train a routing controller on a backbone and measure it."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from adadepth import flops as fl
from adadepth import runs
from adadepth.config import DataConfig, OptimConfig, Strict, TrainConfig, dump_yaml
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth.oracle import oracle_utilities, rank_loss, util_loss
from adadepth.depth.routing import RoutedModel, RoutingConfig
from adadepth.jobs.fit import MethodObjective, heldout_halves
from adadepth.model import causal_lm_loss
from adadepth.train import checkpoint as ck
from adadepth.train.loop import StepOutput, evaluate, resolve_device, seed_everything, train
from adadepth.train.parallel import is_main


class RouteConfig(Strict):
    backbone: str
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    data: DataConfig | None = Field(None, description="None = the backbone's data settings")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=20,
                                                                   weight_decay=0.0))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        steps=300, eval_interval=100, ckpt_interval=100, log_interval=10))


class RoutingObjective(MethodObjective):
    """LM loss through the routed model plus the auxiliary losses of the configured recipe."""

    model: RoutedModel

    def __init__(self, model: RoutedModel, seed: int) -> None:
        super().__init__(model)
        self.rcfg = model.rcfg
        self.rng = random.Random(seed)
        self.pair_gen = torch.Generator().manual_seed(seed)

    @property
    def may_skip_parameters(self) -> bool:
        """Some trainable module can sit out a step (a constant gate's cheap FFN; every token
        full at budget 1 under sparse dispatch): DDP must then look for unused parameters."""
        return any(r.gate.fixed is not None or r.budget >= 1 for r in self.model.routers)

    def label_layers(self) -> list[int]:
        if not {"util", "rank"} & set(self.rcfg.aux):
            return []
        n = self.rcfg.oracle_layers
        layers = self.model.layers
        return sorted(self.rng.sample(layers, n)) if 0 < n < len(layers) else list(layers)

    def forward(self, x: Tensor, y: Tensor, step: int) -> StepOutput:
        m, cfg = self.model, self.rcfg
        bb = m.backbone
        labelled = self.label_layers()
        h, ctx = bb.prepare(x)
        layer_inputs: dict[int, Tensor] = {}
        for i in range(bb.n_layers):
            if i in labelled:
                layer_inputs[i] = h.detach()
            h = bb.run_layer(i, h, ctx)
        lm = causal_lm_loss(bb.head(h), y)
        records = {layer: r.record for layer, r in zip(m.layers, m.routers, strict=True)}
        loss, metrics = lm, {"lm_loss": lm.item()}
        if layer_inputs:
            utilities = oracle_utilities(m, layer_inputs, ctx, y, cfg.oracle)
            util_terms, rank_terms = [], []
            for layer, u in utilities.items():
                score = records[layer].score
                if "util" in cfg.aux:
                    util_terms.append(util_loss(score, u))
                if "rank" in cfg.aux:
                    rank_terms.append(rank_loss(score, u, cfg.rank_margin, cfg.rank_max_pairs,
                                                self.pair_gen))
            for name, terms, weight in (("util", util_terms, cfg.lambda_util),
                                        ("rank", rank_terms, cfg.lambda_rank)):
                if terms:
                    term = torch.stack(terms).mean()
                    loss = loss + weight * term
                    metrics[f"{name}_loss"] = term.item()
        if "jepa" in cfg.aux:
            term = torch.stack([r.gate.alignment_loss(records[layer].predictions,
                                                      records[layer].mask,
                                                      records[layer].outcome)
                                for layer, r in zip(m.layers, m.routers, strict=True)]).mean()
            loss = loss + cfg.lambda_jepa * term
            metrics["jepa_loss"] = term.item()
        if cfg.inference == "predictor":
            term = torch.stack([F.binary_cross_entropy_with_logits(
                r.predictor(r.record.u.detach()).squeeze(-1), r.record.mask.float())
                for r in m.routers]).mean()
            loss = loss + cfg.lambda_predictor * term
            metrics["predictor_loss"] = term.item()
        fractions = [records[layer].mask.float().mean().item() for layer in m.layers]
        for layer, f in zip(m.layers, fractions, strict=True):
            metrics[f"full_fraction/L{layer}"] = f
        step_flops = self.training_flops(x.shape[1], fractions, list(layer_inputs)) * y.numel()
        metrics["flops_proxy"] = step_flops / (y.numel() * self.dense_training_flops(x.shape[1]))
        return StepOutput(loss=loss, metrics=metrics, flops=step_flops)

    # -- cost accounting (docs/methods.md, "Cost accounting") ------------------------------------
    def dense_training_flops(self, seq_len: int) -> float:
        """The yardstick: training the dense backbone itself (forward + full backward, 3x)."""
        return fl.train_per_token(self.model.cfg, fl.causal_context(seq_len))

    def training_flops(self, seq_len: int, fractions: list[float], labelled: list[int]) -> float:
        """FLOPs per token of one controller step: the routed forward, the backward that the
        trainable modules really need, and the oracle's counterfactual forwards.

        Joint training differentiates everything (2x the forward). Controller-only training
        differentiates nothing below the lowest controlled layer; above it, gradients cross the
        frozen weights once (inputs only) and attention scores twice, and the gates, cheap FFNs
        and predictors take twice their forward (weights and inputs; weights only at the lowest
        controlled layer, whose input needs no gradient).
        """
        m, cfg = self.model, self.model.cfg
        ctx = fl.causal_context(seq_len)
        attn = fl.attention(cfg, ctx)
        proj, scores = attn["attn_proj"], attn["attn_scores"]
        full, head = fl.ffn(cfg), fl.linear(cfg.d_model, cfg.vocab_size)
        routers = dict(zip(m.layers, m.routers, strict=True))
        frac = dict(zip(m.layers, fractions, strict=True))

        def ffn_parts(layer: int, forced: bool | None = None) -> tuple[float, float]:
            """(frozen FFN FLOPs, trainable controller FLOPs) executed at a layer's FFN site."""
            r = routers.get(layer)
            if r is None:
                return full, 0.0
            cheap = fl.module_flops(r.cheap)
            if forced is not None:  # an oracle counterfactual: the gate is not run
                return (full, 0.0) if forced else (0.0, cheap)
            gate = fl.module_flops(r.gate) if r.gate.fixed is None else 0.0
            gate += fl.module_flops(r.predictor) if r.predictor is not None else 0.0
            if r.gate.needs_grad and not r.use_sparse(True):  # dense mixture: both paths run
                return full, gate + cheap
            return frac[layer] * full, gate + (1 - frac[layer]) * cheap

        forward = head + sum(proj + scores + sum(ffn_parts(i)) for i in range(cfg.n_layers))
        if self.rcfg.regime == "joint":
            backward = 2 * forward
        else:
            lowest = min(m.layers)
            backward = head  # the gradient enters through the head, inputs only
            for i in range(lowest, cfg.n_layers):
                crossed = i > lowest  # the gradient goes on below this layer
                frozen_ffn, controller = ffn_parts(i)
                backward += controller * (2 if crossed else 1)
                if crossed:
                    backward += proj + 2 * scores + frozen_ffn
        total = forward + backward
        off_policy = self.rcfg.oracle == "off_policy"
        for layer in labelled:  # counterfactual passes: forward only, without gradient
            for forced in (True, False):
                total += head + sum(
                    proj + scores + sum(ffn_parts(i, forced if i == layer else
                                                  (True if off_policy else None)))
                    for i in range(layer, cfg.n_layers))
        return total


def prediction_variance(model: RoutedModel) -> float | None:
    """Across-token variance of G3's latent predictions in the last forward: ~0 means collapse."""
    values = [r.record.predictions.float().flatten(0, -3).var(0).mean().item()
              for r in model.routers if r.record and r.record.predictions is not None]
    return sum(values) / len(values) if values else None


def smoothed(values: list[float], alpha: float) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else alpha * v + (1 - alpha) * ema
        out.append(ema)
    return out


def summarise(history: list[dict[str, Any]], reference: float, rcfg: RoutingConfig,
              layers: list[int]) -> dict[str, Any]:
    lm = [row["lm_loss"] for row in history]
    smooth = smoothed(lm, rcfg.smoothing)
    tail = smooth[-max(1, len(smooth) // 20):]
    hits = {}
    for delta in rcfg.thresholds:
        step = next((row["step"] for row, s in zip(history, smooth, strict=True)
                     if s < reference + delta), None)
        hits[f"+{delta:g}"] = step
    return {
        "lm_curve": lm, "avg_lm": sum(lm) / len(lm), "best_lm": min(smooth),
        "endpoint_lm": sum(tail) / len(tail), "threshold_hits": hits,
        "grad_norm_mean": sum(r["grad_norm"] for r in history) / len(history),
        "grad_norm_curve": [r["grad_norm"] for r in history],
        "full_fraction_train": [sum(r[f"full_fraction/L{i}"] for r in history) / len(history)
                                for i in layers],
        "flops_proxy": sum(r["flops_proxy"] for r in history) / len(history),
    }


def route(cfg: RouteConfig, out: Path, resume: bool = False,
          show_progress: bool = True) -> dict[str, Any]:
    """Train the controller, calibrate causal thresholds, and write OUT/metrics.json."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    backbone = runs.load_backbone(cfg.backbone, str(device))
    # The backbone's data settings, with the keys this config set on top (data.block_size=...).
    given = cfg.data.model_dump(exclude_unset=True) if cfg.data else {}
    data_cfg = DataConfig(**{**backbone.meta.get("data", {}), **given})
    cfg.data = data_cfg
    block = min(data_cfg.block_size, backbone.model.cfg.max_seq_len)
    corpus = load_corpus(data_cfg.corpus, val_fraction=data_cfg.val_fraction,
                         max_docs=data_cfg.max_docs, text_field=data_cfg.text_field)
    data = prepare_tokens(corpus, backbone.tokenizer)
    data.check_block(block)
    seed_everything(cfg.train.seed)
    model_backbone = backbone.model
    checksum = runs.fingerprint(model_backbone)
    meta = {"method": "routing", "method_config": cfg.routing.model_dump(),
            "backbone": backbone.meta.get("ref", str(Path(cfg.backbone).resolve())),
            "backbone_checksum": checksum, "data": data_cfg.model_dump()}
    if resume and (out / runs.CONFIG).is_file():
        runs.check_compatible(out, {"kind": "routed", "model": model_backbone.cfg.model_dump(),
                                    **meta})
    # The frozen backbone's dense loss on training windows: the reference for threshold hits.
    reference, _ = evaluate(lambda x, y: causal_lm_loss(model_backbone(x).logits, y), data,
                            "train", cfg.train.batch_size, block, device, cfg.train.eval_batches,
                            cfg.train.amp)
    model = RoutedModel(model_backbone, cfg.routing)
    if cfg.routing.regime == "controller-only":
        model.freeze_backbone()
    if is_main():  # under torchrun, one process writes the run folder
        runs.write_run_config(out, "routed", model_backbone.cfg, backbone.tokenizer, extra=meta)
        dump_yaml(cfg, out / "config.yaml")
    objective = RoutingObjective(model, cfg.train.seed)
    result = train(objective, data, cfg.train, cfg.optim, block, out, resume=resume,
                   desc=f"route {cfg.routing.gate} b={cfg.routing.budget}",
                   show_progress=show_progress)
    calibration, held_out = heldout_halves(data, block, cfg.routing.calibration_windows)
    model.calibrate([calibration.to(device)])
    collapse = prediction_variance(model)
    model.eval()
    fractions = model.full_fraction_over(held_out.split(cfg.train.batch_size))
    val_causal, _ = evaluate(objective.lm_loss, data, "val", cfg.train.batch_size, block,
                             device, cfg.train.eval_batches, cfg.train.amp)
    model.set_decision("topk")
    val_topk, _ = evaluate(objective.lm_loss, data, "val", cfg.train.batch_size, block,
                           device, cfg.train.eval_batches, cfg.train.amp)
    model.set_decision("auto")
    latest = ck.latest_checkpoint(out)
    if is_main():
        ck.save_checkpoint(out, result.step, objective.checkpoint_state(),
                           ck.load_train_state(latest) if latest else None)
    with model.original_backbone() as original:
        after = runs.fingerprint(original)
    if cfg.routing.regime == "controller-only" and not runs.same_fingerprint(after, checksum):
        raise RuntimeError("controller-only training changed the backbone weights")
    ctx = fl.causal_context(block)
    metrics = {
        **summarise(result.history, reference, cfg.routing, model.layers),
        "gate": cfg.routing.gate, "aux": list(cfg.routing.aux), "oracle": cfg.routing.oracle,
        "budget": cfg.routing.budget, "seed": cfg.train.seed, "regime": cfg.routing.regime,
        "steps": result.step, "controlled_layers": model.layers,
        "reference_dense_loss": reference, "val_lm_causal": val_causal, "val_lm_topk": val_topk,
        "full_fraction_causal": fractions,
        "flops_ratio_inference": model.inference_flops_per_token(ctx, fractions)
        / model.reference_flops_per_token(ctx),
        "wall_s": result.wall_s,
        "training_flops": sum(row["flops"] for row in result.history),
        "trainable_parameters": sum(p.numel() for p in model.controller_parameters())
        if cfg.routing.regime == "controller-only" else model.trainable_parameters(),
        "lambda_jepa": cfg.routing.lambda_jepa,
        "prediction_variance": collapse,
    }
    if any(math.isnan(v) for v in (metrics["avg_lm"], val_causal)):
        raise RuntimeError("training diverged: the LM loss is NaN")
    if is_main():
        ck.write_json_atomic(out / "metrics.json", metrics)
    return metrics

