"""What the self-speculative drafters share: running the layer stack on the rows and positions
of a draft-and-verify round, and the verify pass that reuses the part of the draft that is
exact.

A draft whose first P blocks are the full model's own (an early exit at P, LayerSkip's or
self-spec's; a layer-skipping draft whose first skipped block is P) has written the exact K/V
of blocks 0..P-1 for every token it fed, and holds their exact states after block P-1. The
verify pass then runs blocks 0..P-1 only for the last drafted token (the draft never fed it),
and blocks P..L-1 for all of them, rewriting whatever the draft wrote there
(`verify_reusing`). LayerSkip (`layerskip.py`) and self-spec (`selfspec.py`) both verify so;
the loop that calls them is `adadepth.generate.speculative`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from adadepth.generate import Round
from adadepth.model import Context, KVCache


def where(positions: Tensor) -> dict[str, Any]:
    """`prepare`'s position arguments for tokens at `positions` (B, T): a plain start when
    every row is at the same consecutive places (the cache then stays contiguous and attention
    needs no mask, as in plain decoding), else the positions of each row."""
    first = positions[:1]
    steps = torch.arange(first.shape[1], device=first.device)
    if bool((positions == first).all()) and bool((first == first[0, 0] + steps).all()):
        return {"start": int(first[0, 0])}
    return {"positions": positions}


def on_rows(ctx: Context, rows: Tensor | None) -> Context:
    """The context of a call whose B' rows are the cache rows `rows` (None: every row)."""
    return ctx if rows is None else replace(ctx, rows=rows, start=None)


def prepare(backbone: nn.Module, tokens: Tensor, cache: KVCache, positions: Tensor,
            rows: Tensor | None) -> tuple[Tensor, Context]:
    """Embedded `tokens` (B', T) at `positions` (B', T) of cache rows `rows`, and their context."""
    x, ctx = backbone.prepare(tokens, cache, **where(positions))
    return x, on_rows(ctx, rows)


def state_context(positions: Tensor, cache: KVCache, rows: Tensor | None) -> Context:
    """The context of states (no embedding) at `positions` (B', T) of cache rows `rows`."""
    place = where(positions)
    if "start" in place:
        ctx = Context.block(place["start"], positions.shape[1], positions.device, cache)
    else:
        ctx = Context.at(positions, cache)
    return on_rows(ctx, rows)


def round_positions(rnd: Round, width: int) -> Tensor:
    """(B', width) positions of `rnd.last` and the tokens drafted after it."""
    return rnd.positions.unsqueeze(1) + torch.arange(width, device=rnd.positions.device)


def verify_reusing(backbone: nn.Module, rnd: Round, drafted: Tensor, states: Tensor | None,
                   depth: int, cache: KVCache,
                   at_depth: Any = None) -> tuple[Tensor, int]:
    """Full-model hidden states (B', k+1, d) of [rnd.last, drafted] and the token-blocks run.

    `states` (B', k, d) are the exact states after block `depth` - 1 of the k tokens the draft
    fed ([last, drafted[:-1]]), whose K/V of blocks < depth are already in the cache; with
    depth 0 or no states, everything runs from the embedding. `at_depth(x, ctx)`, if given, is
    called on the last token's state at `depth` (a drafter's own K/V to write there)."""
    tokens = torch.cat([rnd.last, drafted], 1)
    B, width = tokens.shape
    positions = round_positions(rnd, width)
    if states is None or depth == 0:
        h, ctx = prepare(backbone, tokens, cache, positions, rnd.rows)
        depth, blocks = 0, 0
    else:
        x, ctx = prepare(backbone, tokens[:, -1:], cache, positions[:, -1:], rnd.rows)
        for i in range(depth):
            x = backbone.run_layer(i, x, ctx)
        if at_depth is not None:
            at_depth(x, ctx)
        h = torch.cat([states, x], 1)
        ctx = state_context(positions, cache, rnd.rows)
        blocks = B * depth
    for i in range(depth, backbone.n_layers):
        h = backbone.run_layer(i, h, ctx)
    return h, blocks + B * width * (backbone.n_layers - depth)
