"""Routing's training objective: oracle utility labels, the auxiliary losses that train gates on
them, and what a controller step costs.

The oracle utility of token t at controlled layer l is its LM loss when layer l runs cheap minus
when it runs full. Both counterfactuals restart from the hidden state that entered layer l in
the training forward (earlier layers are unchanged), without gradient. Later controlled layers
either all run full (`off_policy`, the paper's) or route under the current gates (`on_policy`,
as they will at deployment).

The loss of a step is `L_LM + lambda_util L_util + lambda_rank L_rank` over the labelled layers,
`+ lambda_jepa L_JEPA` for G3 and `+ lambda_predictor` times the causal predictor's BCE
(docs/methods.md); `training_flops` counts what the step executed, the counterfactual passes
included, against a dense training step of the same tokens (the FLOPs proxy).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from adadepth import flops as fl
from adadepth.depth.cheap import PrunedFFN
from adadepth.depth.dispatch import Call, membership_loss
from adadepth.depth.method import StepLoss, TrainingPlan
from adadepth.depth.routing import RoutedModel, RouteRecord
from adadepth.model import Context, chunked_lm_loss


@torch.no_grad()
def token_losses_from(model: RoutedModel, layer: int, x: Tensor, ctx: Context, targets: Tensor,
                      force: bool, oracle: str) -> Tensor:
    """Per-token LM loss running layers layer..L-1 from hidden state x, layer forced full/cheap."""
    later = True if oracle == "off_policy" else None
    forced = {i: force if i == layer else later for i in model.layers if i >= layer}
    counterfactual = ctx.with_call(model.routed(Call(forced=forced)))
    for i in range(layer, model.backbone.n_layers):
        x = model.backbone.run_layer(i, x, counterfactual)
    return chunked_lm_loss(model.backbone.head, x, targets, reduction="none")


def oracle_utilities(model: RoutedModel, layer_inputs: dict[int, Tensor], ctx: Context,
                     targets: Tensor, oracle: str) -> dict[int, Tensor]:
    """u_t = loss(cheap at l) - loss(full at l), per labelled layer l: (B, T) each. On a large
    model the counterfactual passes are most of a step: a bar says so when they take a while."""
    labelling = tqdm(layer_inputs.items(), desc="oracle labels", unit="layer", delay=2,
                     leave=False, disable=None)
    return {
        layer: token_losses_from(model, layer, x, ctx, targets, False, oracle)
        - token_losses_from(model, layer, x, ctx, targets, True, oracle)
        for layer, x in labelling
    }


def standardise(u: Tensor) -> Tensor:
    return (u - u.mean()) / (u.std() + 1e-6)


def util_loss(score: Tensor, utility: Tensor) -> Tensor:
    """MSE of the score against the standardised oracle utility."""
    return F.mse_loss(score.float(), standardise(utility.float()))


def rank_loss(score: Tensor, utility: Tensor, margin: float = 0.0,
              max_pairs: int = 16384, generator: torch.Generator | None = None) -> Tensor:
    """Pairwise logistic loss -log sigmoid(s_i - s_j) over pairs in a sequence with u_i > u_j + m.

    Long sequences have T^2 pairs; beyond max_pairs per sequence we sample them uniformly.
    """
    B, T = score.shape
    if T * T <= max_pairs:
        i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
        i, j = i.flatten().to(score.device), j.flatten().to(score.device)
        i, j = i.expand(B, -1), j.expand(B, -1)
    else:
        i = torch.randint(0, T, (B, max_pairs), generator=generator).to(score.device)
        j = torch.randint(0, T, (B, max_pairs), generator=generator).to(score.device)
    u = utility.float()
    valid = u.gather(1, i) > u.gather(1, j) + margin
    if not valid.any():
        return score.sum() * 0.0
    s = score.float()
    diff = s.gather(1, i) - s.gather(1, j)
    return -F.logsigmoid(diff[valid]).mean()


# -- the objective ------------------------------------------------------------------------------
@dataclass
class LabelDraws:
    """The seeded draws of a training run: which layers the oracle labels, which pairs the rank
    loss samples on long sequences; and how many layers a step labels, per sequence length."""

    layers: random.Random
    pairs: torch.Generator
    counts: dict[int, int]

    @classmethod
    def seeded(cls, seed: int) -> LabelDraws:
        return cls(random.Random(seed), torch.Generator().manual_seed(seed), {})


def begin_training(model: RoutedModel, plan: TrainingPlan) -> dict[str, Any]:
    """Seed the draws; copy pruned cheap paths from the full FFNs over a pretrained backbone;
    the frozen backbone's dense loss on training windows is the reference of the threshold
    hits."""
    model.training_state = LabelDraws.seeded(plan.seed)
    figures: dict[str, Any] = {}
    if plan.windows is not None and not plan.from_scratch:
        figures.update(init_cheap_paths(model, plan.windows))
    if plan.evaluate is not None:
        dense = model.dense_reference()
        figures["reference_dense_loss"] = plan.evaluate(lambda x, y: dense(x).loss(y), "train")
    return figures


@torch.no_grad()
def init_cheap_paths(model: RoutedModel, windows: Tensor, chunk: int = 8) -> dict[str, Any]:
    """Initialise every `pruned` cheap path from its layer's full FFN on the FFN inputs the
    dense backbone gives calibration `windows` (`PrunedFFN.init_from`)."""
    pruned = {r.site: r for r in model.routers if isinstance(r.cheap, PrunedFFN)}
    if not pruned:
        return {}
    inputs: dict[int, list[Tensor]] = {site: [] for site in pruned}
    call = model.routed(Call(force=True, inputs=inputs))
    for part in windows.split(chunk):
        model.run_stack(part, call)
    for site, router in pruned.items():
        router.cheap.init_from(router.full, inputs[site])
    return {"cheap_init": "pruned", "cheap_init_tokens": int(windows.numel())}


def label_layers(model: RoutedModel, draws: LabelDraws, seq_len: int) -> list[int]:
    if not {"util", "rank"} & set(model.options.aux):
        return []
    n = model.options.oracle_layers
    if n is None:
        if seq_len not in draws.counts:
            draws.counts[seq_len] = label_count(model, seq_len)
        n = draws.counts[seq_len]
    layers = model.layers
    return sorted(draws.layers.sample(layers, n)) if 0 < n < len(layers) else list(layers)


def label_count(model: RoutedModel, seq_len: int) -> int:
    """The most controlled layers a step can label within `oracle_proxy` times a dense training
    step of the same tokens (at least one): the counterfactual passes of a labelled layer run
    every layer above it twice, so on a deep model labelling all of them costs many dense
    steps. Estimated at the budget's full fraction, the labelled layers spread evenly."""
    layers, target = model.layers, model.options.oracle_proxy
    fractions = [model.budget] * len(layers)
    dense = dense_training_flops(model, seq_len)
    for k in range(len(layers), 1, -1):
        spread = [layers[round(i * (len(layers) - 1) / (k - 1))] for i in range(k)]
        if training_flops(model, seq_len, fractions, spread) <= target * dense:
            return k
    return 1


def training_loss(model: RoutedModel, x: Tensor, y: Tensor) -> StepLoss:
    """LM loss through the routed model (top-k decisions) plus the auxiliary losses."""
    cfg, bb = model.options, model.backbone
    if model.training_state is None:
        model.training_state = LabelDraws.seeded(0)
    draws = model.training_state
    labelled = label_layers(model, draws, x.shape[1])
    records: dict[int, RouteRecord] = {}
    h, ctx = bb.prepare(x, call=model.routed(Call(records=records)))
    layer_inputs: dict[int, Tensor] = {}
    for i in range(bb.n_layers):
        if i in labelled:
            layer_inputs[i] = h.detach()
        h = bb.run_layer(i, h, ctx)
    lm = chunked_lm_loss(bb.head, h, y)
    loss, metrics = lm, {"lm_loss": lm.item()}
    if layer_inputs:
        utilities = oracle_utilities(model, layer_inputs, ctx, y, cfg.oracle)
        util_terms, rank_terms = [], []
        for layer, u in utilities.items():
            score = records[layer].score
            if "util" in cfg.aux:
                util_terms.append(util_loss(score, u))
            if "rank" in cfg.aux:
                rank_terms.append(rank_loss(score, u, cfg.rank_margin, cfg.rank_max_pairs,
                                            draws.pairs))
        for name, terms, weight in (("util", util_terms, cfg.lambda_util),
                                    ("rank", rank_terms, cfg.lambda_rank)):
            if terms:
                term = torch.stack(terms).mean()
                loss = loss + weight * term
                metrics[f"{name}_loss"] = term.item()
    if "jepa" in cfg.aux:
        term = torch.stack([r.gate.alignment_loss(records[layer].predictions,
                                                  records[layer].mask, records[layer].outcome)
                            for layer, r in zip(model.layers, model.routers, strict=True)]).mean()
        loss = loss + cfg.lambda_jepa * term
        metrics["jepa_loss"] = term.item()
    imitations = [records[layer].imitation for layer in model.layers
                  if records[layer].imitation is not None]
    if imitations:  # cheap_training: all
        term = torch.stack(imitations).mean()
        loss = loss + cfg.lambda_cheap * term
        metrics["cheap_imitation"] = term.item()
    if cfg.inference == "predictor":
        term = torch.stack([membership_loss(r.predictor(records[layer].u), records[layer].mask)
                            for layer, r in zip(model.layers, model.routers, strict=True)]).mean()
        loss = loss + cfg.lambda_predictor * term
        metrics["predictor_loss"] = term.item()
    fractions = [records[layer].mask.float().mean().item() for layer in model.layers]
    for layer, f in zip(model.layers, fractions, strict=True):
        metrics[f"full_fraction/L{layer}"] = f
    metrics["oracle_labels"] = float(len(layer_inputs))
    per_token = training_flops(model, x.shape[1], fractions, list(layer_inputs))
    metrics["flops_proxy"] = per_token / dense_training_flops(model, x.shape[1])
    return StepLoss(loss, metrics, per_token)


# -- cost accounting (docs/methods.md, "Cost accounting") ----------------------------------------
def dense_training_flops(model: RoutedModel, seq_len: int) -> float:
    """The yardstick: training the dense backbone itself (forward + full backward, 3x)."""
    return fl.train_per_token(model.cfg, fl.causal_context(seq_len))


def training_flops(model: RoutedModel, seq_len: int, fractions: list[float],
                   labelled: list[int]) -> float:
    """FLOPs per token of one controller step: the routed forward, the backward that the
    trainable modules really need, and the oracle's counterfactual forwards.

    Joint training differentiates everything (2x the forward). Controller-only training
    differentiates nothing below the lowest controlled layer; above it, gradients cross the
    frozen weights once (inputs only) and attention scores twice, and the gates, cheap FFNs
    and predictors take twice their forward (weights and inputs; weights only at the lowest
    controlled layer, whose input needs no gradient).
    """
    cfg = model.cfg
    ctx = fl.causal_context(seq_len)
    attn = fl.attention(cfg, ctx)
    proj, scores = attn["attn_proj"], attn["attn_scores"]
    full, head = fl.ffn(cfg), fl.linear(cfg.d_model, cfg.vocab_size)
    routers = dict(zip(model.layers, model.routers, strict=True))
    frac = dict(zip(model.layers, fractions, strict=True))

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
        if r.gate.fixed is None and not r.use_sparse(r.gate.needs_grad):  # both paths run
            return full, gate + cheap
        return frac[layer] * full, gate + (1 - frac[layer]) * cheap

    forward = head + sum(proj + scores + sum(ffn_parts(i)) for i in range(cfg.n_layers))
    if model.options.regime == "joint":
        backward = 2 * forward
    else:
        lowest = min(model.layers)
        backward = head  # the gradient enters through the head, inputs only
        for i in range(lowest, cfg.n_layers):
            crossed = i > lowest  # the gradient goes on below this layer
            frozen_ffn, controller = ffn_parts(i)
            backward += controller * (2 if crossed else 1)
            if crossed:
                backward += proj + 2 * scores + frozen_ffn
    total = forward + backward
    off_policy = model.options.oracle == "off_policy"
    for layer in labelled:  # counterfactual passes: forward only, without gradient
        for forced in (True, False):
            total += head + sum(
                proj + scores + sum(ffn_parts(i, forced if i == layer else
                                              (True if off_policy else None)))
                for i in range(layer, cfg.n_layers))
    return total


# -- the run's figures ----------------------------------------------------------------------------
def smoothed(values: list[float], alpha: float) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else alpha * v + (1 - alpha) * ema
        out.append(ema)
    return out


def training_summary(model: RoutedModel, history: list[dict[str, Any]],
                     figures: dict[str, Any]) -> dict[str, Any]:
    """The study's figures of a controller run: average / best / endpoint LM loss of the
    smoothed curve, the step at which it first came within each threshold of the dense
    reference, gradient norms, full fractions in training, the FLOPs proxy."""
    cfg, reference = model.options, figures.get("reference_dense_loss")
    out: dict[str, Any] = {"val_lm_causal": figures.get("val_loss")}
    if not history:
        return out
    lm = [row["lm_loss"] for row in history]
    smooth = smoothed(lm, cfg.smoothing)
    tail = smooth[-max(1, len(smooth) // 20):]
    hits = {}
    for delta in cfg.thresholds:
        hits[f"+{delta:g}"] = None if reference is None else next(
            (row["step"] for row, s in zip(history, smooth, strict=True)
             if s < reference + delta), None)
    return {
        **out, "lm_curve": lm, "avg_lm": sum(lm) / len(lm), "best_lm": min(smooth),
        "endpoint_lm": sum(tail) / len(tail), "threshold_hits": hits,
        "grad_norm_mean": sum(r["grad_norm"] for r in history) / len(history),
        "grad_norm_curve": [r["grad_norm"] for r in history],
        "full_fraction_train": [sum(r[f"full_fraction/L{i}"] for r in history) / len(history)
                                for i in model.layers],
        "flops_proxy": sum(r["flops_proxy"] for r in history) / len(history),
        "oracle_labels_per_step": sum(r.get("oracle_labels", 0.0) for r in history)
        / len(history),
    }
