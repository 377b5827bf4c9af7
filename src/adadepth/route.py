"""`adadepth route`: train a routing controller on a backbone and measure it (DESIGN.md §1)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth import runs
from adadepth.config import (
    DataConfig,
    OptimConfig,
    RoutingConfig,
    Strict,
    TrainConfig,
    dump_yaml,
)
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth.oracle import oracle_utilities, rank_loss, util_loss
from adadepth.depth.routing import RoutedModel
from adadepth.errors import UserError
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


class RoutingObjective(nn.Module):
    """LM loss through the routed model plus the auxiliary losses of the configured recipe."""

    def __init__(self, model: RoutedModel, seed: int) -> None:
        super().__init__()
        self.model, self.rcfg = model, model.rcfg
        self.rng = random.Random(seed)
        self.pair_gen = torch.Generator().manual_seed(seed)

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
        step_flops = self.training_flops(x.shape[1], fractions, len(layer_inputs) > 0,
                                         list(layer_inputs)) * y.numel()
        metrics["flops_proxy"] = step_flops / (y.numel() * self.dense_training_flops(x.shape[1]))
        return StepOutput(loss=loss, metrics=metrics, flops=step_flops)

    # -- cost accounting (DESIGN.md §5): forward + 2x backward + oracle forwards -----------------
    def dense_training_flops(self, seq_len: int) -> float:
        return fl.train_per_token(self.model.cfg, fl.causal_context(seq_len))

    def training_flops(self, seq_len: int, fractions: list[float], oracle: bool,
                       labelled: list[int]) -> float:
        m, cfg = self.model, self.model.cfg
        ctx = fl.causal_context(seq_len)
        attn = sum(fl.attention(cfg, ctx).values())
        full = fl.swiglu(cfg.d_model, cfg.d_ff)
        head = fl.linear(cfg.d_model, cfg.vocab_size)
        routers = dict(zip(m.layers, m.routers, strict=True))
        frac = dict(zip(m.layers, fractions, strict=True))

        def ffn_cost(layer: int, forced: bool | None = None) -> float:
            r = routers.get(layer)
            if r is None:
                return full
            cheap = fl.module_flops(r.cheap)
            if forced is not None:  # an oracle counterfactual: the gate is not run
                return full if forced else cheap
            gate = fl.module_flops(r.gate) + (fl.module_flops(r.predictor) if r.predictor else 0)
            if r.gate.needs_grad and not r.use_sparse(True):  # dense mixture: both paths run
                return gate + full + cheap
            return gate + frac[layer] * full + (1 - frac[layer]) * cheap

        main = head + sum(attn + ffn_cost(i) for i in range(cfg.n_layers))
        total = 3 * main
        for layer in labelled:
            for forced in (True, False):
                total += head + sum(
                    attn + (ffn_cost(i, forced) if i == layer else
                            ffn_cost(i, True if self.rcfg.oracle == "off_policy" else None))
                    for i in range(layer, cfg.n_layers))
        return total

    def lm_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return causal_lm_loss(self.model(x).logits, y)

    def checkpoint_state(self) -> dict[str, Tensor]:
        state = self.model.controller_state()
        if self.rcfg.regime == "joint":
            state.update({f"backbone.{k}": v for k, v in
                          ck.unique_state(self.model.backbone).items()})
        return state

    def load_checkpoint_state(self, tensors: dict[str, Tensor]) -> None:
        load_routed_state(self.model, tensors)


def load_routed_state(model: RoutedModel, tensors: dict[str, Tensor]) -> None:
    model.load_controller_state(tensors)
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if backbone:
        model.backbone.load_state_dict(backbone, strict=False)


def backbone_checksum(params: list[nn.Parameter]) -> float:
    """A cheap fingerprint of the backbone's weights, to notice them change under a routed run."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum().item() for p in params))


def load_backbone(path: str, device: str) -> runs.LoadedRun:
    """An adadepth dense run folder, a transformers model directory or a known backbone name."""
    from adadepth import hf

    if hf.is_known(path):
        return hf.load_backbone(path, device)
    loaded = runs.load_run(Path(path), device)
    if loaded.meta.get("kind") not in ("dense", "hf"):
        raise UserError(f"backbone {path} is a {loaded.meta.get('kind')!r} run, not a dense model")
    return loaded


def validation_halves(data, block: int, count: int) -> tuple[Tensor, Tensor]:
    """Disjoint held-out windows for the causal thresholds: even and odd validation windows.

    Thresholds are calibrated on the even windows and their full fraction is measured on the
    odd ones: different text from the same distribution.
    """
    val = data.split("val")
    n = (len(val) - 1) // block
    windows = torch.from_numpy(val[: n * block].astype("int64")).view(n, block)
    even, odd = windows[0::2][:count], windows[1::2][:count]
    return even, (odd if len(odd) else even)


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
    backbone = load_backbone(cfg.backbone, str(device))
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
    backbone_params = list(model_backbone.parameters())  # before the controller moves in
    checksum = backbone_checksum(backbone_params)
    # The frozen backbone's dense loss on training windows: the reference for threshold hits.
    reference, _ = evaluate(lambda x, y: causal_lm_loss(model_backbone(x).logits, y), data,
                            "train", cfg.train.batch_size, block, device, cfg.train.eval_batches)
    model = RoutedModel(model_backbone, cfg.routing)
    if cfg.routing.regime == "controller-only":
        model.freeze_backbone()
    if resume and (out / runs.CONFIG).is_file():
        runs.check_compatible(out, "routed", model_backbone.cfg)
    if is_main():  # under torchrun, one process writes the run folder
        runs.write_run_config(out, "routed", model_backbone.cfg, backbone.tokenizer, extra={
            "backbone": backbone.meta.get("ref", str(Path(cfg.backbone).resolve())),
            "backbone_checksum": checksum,
            "routing": cfg.routing.model_dump(), "data": data_cfg.model_dump()})
        dump_yaml(cfg, out / "config.yaml")
    objective = RoutingObjective(model, cfg.train.seed)
    result = train(objective, data, cfg.train, cfg.optim, block, out, resume=resume,
                   desc=f"route {cfg.routing.gate} b={cfg.routing.budget}",
                   show_progress=show_progress)
    calibration, held_out = validation_halves(data, block, cfg.routing.calibration_windows)
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
    if cfg.routing.regime == "controller-only" and backbone_checksum(backbone_params) != checksum:
        raise RuntimeError("controller-only training changed the backbone weights")
    metrics = {
        **summarise(result.history, reference, cfg.routing, model.layers),
        "gate": cfg.routing.gate, "aux": list(cfg.routing.aux), "oracle": cfg.routing.oracle,
        "budget": cfg.routing.budget, "seed": cfg.train.seed, "regime": cfg.routing.regime,
        "steps": result.step, "controlled_layers": model.layers,
        "reference_dense_loss": reference, "val_lm_causal": val_causal, "val_lm_topk": val_topk,
        "full_fraction_causal": fractions,
        "flops_ratio_inference": model.inference_flops_per_token(
            fl.causal_context(block), fractions) / sum(
            fl.forward_per_token(model.cfg, fl.causal_context(block)).values()),
        "wall_s": result.wall_s,
        "lambda_jepa": cfg.routing.lambda_jepa,
        "prediction_variance": collapse,
    }
    if any(math.isnan(v) for v in (metrics["avg_lm"], val_causal)):
        raise RuntimeError("training diverged: the LM loss is NaN")
    if is_main():
        ck.write_json_atomic(out / "metrics.json", metrics)
    return metrics


@runs.register_loader("routed")
def load_routed(run_dir: Path, meta: dict[str, Any], device: str) -> nn.Module:
    backbone = load_backbone(meta["backbone"], device).model
    if abs(backbone_checksum(list(backbone.parameters())) - meta["backbone_checksum"]) > 1e-6 * max(
            1.0, abs(meta["backbone_checksum"])) and meta["routing"]["regime"] != "joint":
        raise UserError(f"the backbone at {meta['backbone']} changed since {run_dir} was trained")
    model = RoutedModel(backbone, RoutingConfig(**meta["routing"]))
    load_routed_state(model, ck.load_file(str(ck.require_checkpoint(run_dir) / ck.WEIGHTS)))
    return model.to(device)
