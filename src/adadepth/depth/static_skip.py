"""Static layer skipping: the same layers are dropped for every token, chosen on held-out text.

The baseline any adaptive-depth method must beat at equal compute. A layer whose output hidden
states are nearly its input ones does little: its *block influence* is one minus the mean cosine
similarity of each token's hidden state before and after the layer, over held-out windows
(ShortGPT, Men et al. 2024, arXiv:2403.03853). The layers of lowest influence are skipped, as many
as bring the dense model's inference FLOPs to the budget. Nothing trains: `adadepth fit` only
calibrates (`after_training`), and a skipped layer writes no K/V, since no token ever reads it.
docs/methods/static-skip.md says which choices are ShortGPT's and which are ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth.dispatch import PLAIN, Call, Tally
from adadepth.depth.method import Evaluate, Knob, Method, MethodSpec
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.model import KVCache, LayerStack, Output


class StaticSkipConfig(Strict):
    """Static layer skipping; defaults are ShortGPT's or ours (docs/methods/static-skip.md)."""

    budget_of: Literal["stack", "model"] = Field(
        "stack", description="what the budget is a fraction of: the layer stack's FLOPs (what "
        "is skipped), or the whole model's, LM head included (which no skip removes)")
    budget: float = Field(0.75, gt=0, le=1, description="inference FLOPs as a fraction of the "
                          "dense model's")
    selection: Literal["one_shot", "iterative"] = Field(
        "one_shot", description="rank layers once on the dense model (ShortGPT), or drop one at "
        "a time, re-measuring the influences of the rest after each")
    rounding: Literal["nearest", "at_most"] = Field(
        "nearest", description="skip the number of layers whose FLOPs come nearest the budget, "
        "or the fewest that bring them to at most the budget")
    keep: list[int] = Field(default_factory=list, description="layers never skipped")
    calibration_windows: PositiveInt = Field(64, description="held-out windows the influences "
                                             "are measured on")


class StaticSkip(Method):
    """A backbone run without the layers that change its hidden states least."""

    name = "static-skip"
    knob = Knob("budget", (1.0, 0.75, 0.5, 0.25), low=0.0, high=1.0)
    depth_unit = "layers run"

    options: StaticSkipConfig

    def __init__(self, backbone: LayerStack, cfg: StaticSkipConfig) -> None:
        super().__init__(backbone, cfg)
        n = backbone.n_layers
        if n < 2:
            raise UserError(f"static layer skipping needs a backbone of 2 or more layers, this "
                            f"one has {n}")
        if any(not 0 <= i < n for i in cfg.keep):
            raise UserError(f"static-skip.keep {cfg.keep} must name layers in 0..{n - 1}")
        self.budget = cfg.budget  # the knob's value, with the layers it chose (`skipped`)
        self.register_buffer("influence", torch.full((n,), float("nan")))
        self.register_buffer("skipped", torch.zeros(n, dtype=torch.bool))
        self.kept = list(range(n))  # the layers a forward runs (a host list: no sync per call)

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        bb = self.backbone
        kept = range(bb.n_layers) if call.force is True else self.kept
        x, ctx = bb.prepare(idx, cache, start, positions=positions)
        for i in kept:
            x = bb.run_layer(i, x, ctx)
        call.count("tokens", idx.numel())
        call.count("layers", idx.numel() * len(kept))
        if call.depth is not None:
            call.note_depth(torch.full(idx.shape, len(kept)))
        return Output(hidden=x, head=bb.head)

    def set_skipped(self, layers: list[int]) -> None:
        self.skipped.zero_()
        self.skipped[layers] = True
        self.kept = [i for i in range(self.backbone.n_layers) if i not in set(layers)]

    def skipped_layers(self) -> list[int]:
        return [i for i in range(self.backbone.n_layers) if i not in self.kept]

    # -- saving and training ---------------------------------------------------------------------
    def method_buffers(self) -> dict[str, Tensor]:
        return {"influence": self.influence, "skipped": self.skipped}

    def load_method_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_method_state(tensors)
        self.set_skipped(self.skipped.nonzero().flatten().tolist())

    def set_trainable(self, from_scratch: bool) -> None:
        if from_scratch:
            raise UserError("static-skip drops layers of a trained model; pass --backbone "
                            "(it trains nothing)")
        self.requires_grad_(False)
        self.trains_backbone = False

    # -- choosing the layers ---------------------------------------------------------------------
    @torch.no_grad()
    def block_influence(self, windows: Tensor, chunk: int = 32) -> Tensor:
        """1 - mean cosine(hidden before, hidden after) of each layer the model runs, over the
        tokens of `windows`; NaN for layers already skipped."""
        bb = self.backbone
        total = torch.zeros(bb.n_layers, dtype=torch.float64)
        count = 0
        for part in windows.split(chunk):
            x, ctx = bb.prepare(part)
            for i in self.kept:
                out = bb.run_layer(i, x, ctx)
                total[i] += F.cosine_similarity(x.float(), out.float(), dim=-1).sum().item()
                x = out
            count += part.numel()
        influence = 1 - total / count
        influence[self.skipped.cpu()] = float("nan")
        return influence.float()

    def skip_count(self, budget: float, context: float) -> int:
        """How many layers to skip so the FLOPs per token meet `budget` of the dense layer
        stack's (`budget_of: stack`) or the dense model's, head included."""
        dense = fl.forward_per_token(self.cfg, context)
        total = sum(dense.values())
        per_layer = (total - dense["lm_head"]) / self.cfg.n_layers
        if self.options.budget_of == "stack":  # the head is no part of what the budget means
            total -= dense["lm_head"]
        available = self.cfg.n_layers - len(set(self.options.keep))
        wanted = (1 - budget) * total / per_layer
        if self.options.rounding == "nearest":
            return min(available, round(wanted))
        count = math.ceil(wanted - 1e-9)
        if count > available:
            least = (total - available * per_layer) / total
            raise UserError(f"a FLOPs budget of {budget:g} cannot be met: skipping every layer "
                            f"that may be skipped still costs {least:.3f} of the dense "
                            f"{'layer stack' if self.options.budget_of == 'stack' else 'model'}")
        return count

    @torch.no_grad()
    def choose(self, windows: Tensor, budget: float) -> list[int]:
        """Skip the lowest-influence layers for `budget` (influences measured on `windows`
        unless one-shot ones are already known)."""
        was_training = self.training
        self.eval()
        try:
            count = self.skip_count(budget, fl.causal_context(windows.shape[1]))
            self.set_skipped([])
            if torch.isnan(self.influence).all() or self.options.selection == "iterative":
                self.influence.copy_(self.block_influence(windows))
            influence = self.influence.clone()
            influence[self.options.keep] = float("inf")
            chosen: list[int] = []
            while len(chosen) < count:
                layer = int(torch.nan_to_num(influence, nan=float("inf")).argmin())
                chosen.append(layer)
                self.set_skipped(chosen)
                if self.options.selection == "iterative" and len(chosen) < count:
                    influence = self.block_influence(windows)
                    influence[self.options.keep] = float("inf")
                else:
                    influence[layer] = float("inf")
        finally:
            self.train(was_training)
        self.budget = budget
        return sorted(chosen)

    @torch.no_grad()
    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        """Choose the layers on `calibration` windows; the LM loss on `held_out` with and
        without them."""
        windows = calibration[:self.options.calibration_windows]
        chosen = self.choose(windows, self.options.budget)
        x, y = held_out[:, :-1], held_out[:, 1:]
        loss = self(x).loss(y).item()
        dense_loss = self.dense_reference()(x).loss(y).item()
        context = fl.causal_context(x.shape[1])
        return {"skipped_layers": chosen, "block_influence": self.influence.tolist(),
                **self.fractions(context),
                "held_out_loss": loss, "held_out_loss_dense": dense_loss}

    @torch.no_grad()
    def eval_report(self, data, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        context = fl.causal_context(block_size)
        return {"budget": self.budget, "budget_of": self.options.budget_of,
                "skipped_layers": self.skipped_layers(),
                "flops_ratio": self.flops_per_token(context)
                / self.reference_flops_per_token(context), **self.fractions(context)}

    def fractions(self, context: float) -> dict[str, float]:
        """The FLOPs kept, as a fraction of the dense layer stack's and of the whole model's."""
        head = fl.forward_per_token(self.cfg, context)["lm_head"]
        total, dense = self.flops_per_token(context), self.reference_flops_per_token(context)
        return {"flops_fraction_stack": (total - head) / (dense - head),
                "flops_fraction": total / dense}

    # -- cost and the bench ----------------------------------------------------------------------
    def flops_per_token(self, context: float, layers_run: float | None = None) -> float:
        dense = fl.forward_per_token(self.cfg, context)
        per_layer = (sum(dense.values()) - dense["lm_head"]) / self.cfg.n_layers
        run = len(self.kept) if layers_run is None else layers_run
        return dense["lm_head"] + run * per_layer

    def reference_flops_per_token(self, context: float) -> float:
        return sum(fl.forward_per_token(self.cfg, context).values())

    def tally_flops(self, tally: Tally, context: float) -> float:
        """Every token runs the kept layers, each attending to every earlier token."""
        return self.flops_per_token(context, tally.get("layers") / max(tally.tokens, 1))

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        return {"layers skipped": self.tally_flops(tally, context)
                - self.dense_flops_per_token(context)}

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        return {"layers_run": tally.get("layers") / max(tally.tokens, 1),
                "skipped_layers": self.skipped_layers(), "budget": self.budget,
                "tokens": int(tally.tokens)}

    def current_knob_value(self) -> float | None:
        return self.budget

    def current_setting(self) -> Callable[[], None]:
        layers, budget = self.skipped_layers(), self.budget

        def apply() -> None:
            self.set_skipped(layers)
            self.budget = budget
        return apply

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        self.choose(calibration[:self.options.calibration_windows], value)
        return self.current_setting()


register("method", "static-skip")(MethodSpec(
    name="static-skip", config=StaticSkipConfig, build=StaticSkip, kind="static-skip",
    summary="static layer skipping: the layers of least block influence are dropped for all"))
