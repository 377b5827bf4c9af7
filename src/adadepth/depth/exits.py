"""What early-exit methods share: the LM head read at every layer, per-layer losses, and the
cost of what ran.

CALM (`calm.py`) and LayerSkip (`layerskip.py`) both read the backbone's one LM head at
intermediate layers (`ExitHeads`: through a norm per exit, or the final norm shared), train with
a weighted sum of per-layer losses (`layer_states`, `exit_loss`), and report their costs from
what really ran (a `Tally`, `depth/dispatch.py`): blocks run in full (`layers`), blocks whose
keys and values alone were written for a copied state (`kv`), and LM-head reads (`heads`),
priced by `UnitCosts`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.depth.dispatch import Call, Tally
from adadepth.depth.method import Method
from adadepth.errors import UserError
from adadepth.model import LayerStack, chunked_lm_loss


def check_backbone(backbone: Any, method: str) -> None:
    """A one-line error for a backbone an early-exit method cannot wrap."""
    if not isinstance(backbone, LayerStack):
        raise UserError(f"{method} needs a backbone with adadepth's layer-stack interface (ours "
                        f"or a transformers adapter); {type(backbone).__name__} is not one")
    if backbone.n_layers < 2:
        raise UserError(f"{method} needs at least 2 layers to exit early from; the backbone has "
                        f"{backbone.n_layers}")


class ExitHeads(nn.Module):
    """Logits after any layer through the backbone's own LM head.

    After the last layer it is the backbone's head exactly (its final norm). After an earlier
    layer the state goes through a norm of its own (`own_norms`, each initialised as the final
    norm: CALM's choice here) or through the final norm itself (LayerSkip's shared exit).
    """

    def __init__(self, backbone: nn.Module, own_norms: bool) -> None:
        super().__init__()
        self.n_layers = backbone.n_layers
        self.norms = (nn.ModuleList(backbone.make_norm() for _ in range(self.n_layers - 1))
                      if own_norms else None)

    def normed(self, backbone: nn.Module, layer: int, h: Tensor) -> Tensor:
        if self.norms is None or layer == self.n_layers - 1:
            return backbone.final_norm(h)
        return self.norms[layer](h)

    def logits(self, backbone: nn.Module, layer: int, h: Tensor) -> Tensor:
        if layer == self.n_layers - 1:
            return backbone.head(h)
        return backbone.unembed(self.normed(backbone, layer, h))


def layer_states(backbone: nn.Module, idx: Tensor,
                 runs: Callable[[int], Tensor | None] | None = None) -> list[Tensor]:
    """The hidden state after every layer of a training forward (no cache).

    `runs(layer)` may name the rows that run the layer (layer dropout: the others pass it
    unchanged); None = every row."""
    x, ctx = backbone.prepare(idx)
    states = []
    for i in range(backbone.n_layers):
        rows = runs(i) if runs is not None else None
        if rows is None:
            x = backbone.run_layer(i, x, ctx)
        elif len(rows):
            out = backbone.run_layer(i, x.index_select(0, rows), ctx.select(rows=rows))
            x = x.index_copy(0, rows, out)
        states.append(x)
    return states


def exit_loss(heads: ExitHeads, backbone: nn.Module, layer: int, h: Tensor,
              targets: Tensor) -> Tensor:
    """LM loss of the logits read after `layer`, computed in pieces of positions whose logits
    are recomputed in the backward pass rather than kept: one (B, T, V) tensor per layer would
    not fit in memory with a real vocabulary."""
    return chunked_lm_loss(lambda state: heads.logits(backbone, layer, state), h, targets)


# -- counting what ran ----------------------------------------------------------------------
@dataclass(frozen=True)
class UnitCosts:
    """Forward FLOPs of one token through each unit a tally counts."""

    layer: float  # one block without its attention scores
    kv: float  # the key and value projections of one block
    head: float
    probe: float

    @classmethod
    def of(cls, cfg: Any, probe: nn.Module | None = None) -> UnitCosts:
        attn = fl.attention(cfg, 1.0)
        kv_out = cfg.kv_heads * cfg.head_dim
        return cls(layer=attn["attn_proj"] + fl.ffn(cfg), kv=2 * fl.linear(cfg.d_model, kv_out),
                   head=fl.linear(cfg.d_model, cfg.vocab_size),
                   probe=fl.module_flops(probe) if probe is not None else 0.0)

    def per_token(self, cfg: Any, tally: Tally, context: float) -> float:
        """FLOPs per token of a tally's `layers`, `kv`, `heads` and `probes` (exit classifier
        reads), per token produced."""
        scores = fl.attention(cfg, context)["attn_scores"]
        total = (tally.get("layers") * (self.layer + scores) + tally.get("kv") * self.kv
                 + tally.get("heads") * self.head + tally.get("probes") * self.probe)
        return total / max(tally.tokens, 1)


class ExitMethod(Method):
    """What CALM and LayerSkip share as methods: a backbone checked for the seams they use, the
    count of what a forward ran, and the dense reference on the same weights (`Call(force=
    True)`: the backbone's own forward, nothing else)."""

    def __init__(self, backbone: LayerStack, options: Any) -> None:
        check_backbone(backbone, self.name)
        super().__init__(backbone, options)

    @staticmethod
    def count_forward(call: Call, tokens: Tensor, blocks: int) -> None:
        """Count a call whose tokens (B, T) all ran `blocks` blocks and read the head once."""
        n = tokens.numel()
        if call.tally is not None:
            for name in ("layers", "depth"):
                call.count(name, n * blocks)
            call.count("heads", n)
            call.count("tokens", n)
        if call.depth is not None:
            call.note_depth(torch.full(tokens.shape, blocks))

    def tally_flops(self, tally: Tally, context: float) -> float:
        return self.costs.per_token(self.cfg, tally, context)

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        """Blocks run against the dense model's L per token (fewer: exits; more: drafts and
        rejected tokens), K/V computed for copied states, head reads beyond one per token,
        exit-classifier reads."""
        tokens, c, L = max(tally.tokens, 1), self.costs, self.backbone.n_layers
        scores = fl.attention(self.cfg, context)["attn_scores"]
        blocks = (tally.get("layers") / tokens - L) * (c.layer + scores)
        return {"blocks skipped" if blocks <= 0 else "blocks run again (drafts, rejections)":
                blocks, "copied states' K/V": tally.get("kv") / tokens * c.kv,
                "extra head reads": (tally.get("heads") / tokens - 1) * c.head,
                "exit classifier": tally.get("probes") / tokens * c.probe}

    def reference_flops_per_token(self, context: float) -> float:
        return sum(fl.forward_per_token(self.cfg, context).values())
