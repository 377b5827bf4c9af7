"""What the capacity-routed methods share: a set of routed layers of a backbone, each with a
router that lets a fraction C of the tokens (the capacity) run part of the layer, decided
causally by per-layer thresholds calibrated to C on held-out text.

Mixture-of-Depths (`mod.py`: the whole block) and Router-Tuning (`router_tuning.py`: the
attention sub-block) are both this shape; each supplies how a routed layer runs
(`routed_layer`), the causal score a threshold reads (`causal_score`), and the record its
forward leaves per routed layer of which tokens ran it (`RAN`). The forward, the calibration,
the capacity knob and the evaluation report live here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.depth.dispatch import PLAIN, Call, count_tokens
from adadepth.depth.method import Method
from adadepth.errors import UserError
from adadepth.model import Context, KVCache, LayerStack, Output


def resolve_layers(spec: str | list[int], n_layers: int, named: dict[str, list[int]],
                   method: str) -> list[int]:
    """The routed layers: a named set (`named`, besides `all_but_first` and `all`) or a list."""
    sets = {**named, "all_but_first": list(range(1, n_layers)), "all": list(range(n_layers))}
    if isinstance(spec, str):
        layers = sets[spec]
    else:
        layers = sorted(spec)
        if any(not 0 <= i < n_layers for i in layers) or len(set(layers)) != len(layers):
            raise UserError(f"routed layers {spec} must be distinct, in 0..{n_layers - 1}")
    if not layers:
        raise UserError(f"no routed layer: the backbone has {n_layers} layer(s); {method}'s "
                        f"default needs at least 2 (or {method}.layers=all)")
    return layers


class CapacityRouted(Method):
    """A backbone whose routed layers `self.layers` let the tokens their routers choose run
    them; `self.routers[j]` has a `CausalRule` as `.rule`."""

    RAN = "ran"  # the record key (with the routed layer's index) of the tokens that ran it
    layers: list[int]
    routers: nn.ModuleList

    def __init__(self, backbone: LayerStack, options: Any, layers: list[int]) -> None:
        super().__init__(backbone, options)
        self.layers = layers
        self.slot = {layer: j for j, layer in enumerate(layers)}
        self.capacity = options.capacity  # the knob's one value

    def routed_layer(self, j: int, layer: int, x: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    def causal_score(self, j: int, x: Tensor) -> Tensor:
        """The score routed layer j's causal threshold reads, (B, T)."""
        raise NotImplementedError

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        bb = self.backbone
        if call.depth is not None and call.records is None:
            call = call.but(records={})
        x, ctx = bb.prepare(idx, cache, start, positions=positions, call=call)
        if call.tally is not None:
            count_tokens(call.tally, ctx, x.shape[0] * x.shape[1])
        for i in range(bb.n_layers):
            j = self.slot.get(i)
            x = bb.run_layer(i, x, ctx) if j is None else self.routed_layer(j, i, x, ctx)
        if call.depth is not None:
            assert call.records is not None
            ran = torch.stack([call.records[self.RAN, j] for j in range(len(self.layers))])
            call.note_depth(ran.sum(0) + bb.n_layers - len(self.layers))
        return Output(hidden=x, head=bb.head)

    # -- the causal thresholds -------------------------------------------------------------
    def calibrate(self, windows: Tensor, chunk: int = 32) -> list[float]:
        """Each routed layer's threshold: the (1 - C) quantile of its causal scores on held-out
        windows. Layer by layer, so a layer sees inputs routed by the thresholds already set
        below it, as at deployment; the LM head never runs."""
        was_training = self.training
        self.eval()
        bb = self.backbone
        try:
            states = [bb.prepare(part, call=Call(rule="causal")) for part in windows.split(chunk)]
            for i in range(bb.n_layers):
                j = self.slot.get(i)
                if j is not None and self.capacity < 1:
                    scores = torch.cat([self.causal_score(j, h).flatten() for h, _ in states])
                    self.routers[j].rule.calibrate(scores, self.capacity)
                states = [(bb.run_layer(i, h, ctx) if j is None
                           else self.routed_layer(j, i, h, ctx), ctx) for h, ctx in states]
        finally:
            self.train(was_training)
        return self.thresholds()

    def thresholds(self) -> list[float]:
        return [r.rule.threshold.item() for r in self.routers]

    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        batches = (x for x, _ in data.eval_batches("val", batch_size, block_size, max_batches))
        measured = self.measured_over(batches, Call(rule="causal"))
        return {"capacity": self.capacity, "routed_layers": self.layers,
                "realised_capacity_causal": measured.summary()["capacity_per_layer"],
                **self.flops_ratios(measured, fl.causal_context(block_size))}

    # -- the knob: the capacity, thresholds calibrated to it --------------------------------
    def _setting(self, capacity: float, thresholds: list[float],
                 spreads: list[float]) -> Callable[[], None]:
        def apply() -> None:
            self.capacity = capacity
            for router, t, s in zip(self.routers, thresholds, spreads, strict=True):
                router.rule.set(t, s)
        return apply

    def trained_range(self) -> tuple[float, float] | None:
        return (self.options.capacity, self.options.capacity)

    def current_knob_value(self) -> float | None:
        return self.capacity

    def current_setting(self) -> Callable[[], None]:
        return self._setting(self.capacity, self.thresholds(),
                             [r.rule.spread.item() for r in self.routers])

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        """Capacity `value` with the trained routers' thresholds calibrated to let that
        fraction through."""
        n = len(self.routers)
        self._setting(value, [float("nan")] * n, [1.0] * n)()
        self.calibrate(calibration)
        return self.current_setting()


__all__ = ["CapacityRouted", "resolve_layers"]
