"""What early-exit methods share: the LM head read at every layer, per-layer losses, running a
block on a chosen subset of tokens, and the count of what ran.

CALM (`calm.py`) and LayerSkip (`layerskip.py`) both read the backbone's one LM head at
intermediate layers (`ExitHeads`: through a norm per exit, or the final norm shared), train with
a weighted sum of per-layer losses (`layer_states`, `exit_loss`), and report their costs from
what really ran (`Tally`): blocks run in full, blocks whose keys and values alone were written
for a copied state, and LM-head reads. `Subset` gathers the tokens a block runs on (whole rows
when decoding one token per row, pieces of rows otherwise) and scatters the block's output
back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adadepth import flops as fl
from adadepth.depth.method import Measurement, Method, attribute_set
from adadepth.errors import UserError
from adadepth.model import Context, causal_lm_loss

SEAMS = ("prepare", "run_layer", "write_kv", "unembed", "head", "final_norm", "make_norm",
         "new_cache")


def check_backbone(backbone: Any, method: str) -> None:
    """A one-line error for a backbone an early-exit method cannot wrap."""
    missing = [s for s in SEAMS if not hasattr(backbone, s)]
    if missing:
        raise UserError(f"{method} needs a backbone with adadepth's layer-stack interface (ours "
                        f"or a transformers adapter); {type(backbone).__name__} lacks "
                        f"{', '.join(missing)}")
    if getattr(backbone, "n_layers", 0) < 2:
        raise UserError(f"{method} needs at least 2 layers to exit early from; the backbone has "
                        f"{getattr(backbone, 'n_layers', 0)}")


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
    """LM loss of the logits read after `layer`. While training, the logits are recomputed in
    the backward pass rather than kept: one (B, T, V) tensor per layer would not fit in memory
    with a real vocabulary."""
    def loss(state: Tensor) -> Tensor:
        return causal_lm_loss(heads.logits(backbone, layer, state), targets)

    if torch.is_grad_enabled():
        return checkpoint(loss, h, use_reentrant=False)
    return loss(h)


# -- running a block on a subset of tokens ----------------------------------------------------
@dataclass
class Subset:
    """Tokens of a (B, T) call chosen by a mask, gathered so a block runs on them alone.

    One token per row (decoding): whole rows are selected (`ctx.select(rows=...)`). Several:
    each row's chosen tokens are cut into pieces of one width, in position order, the last piece
    of a row filled with padding entries that run but write nothing and are discarded. Running
    a block on pieces needs a cache: the tokens of a row attend to each other through it.
    """

    ctx: Context
    rows: Tensor | None  # (B',) the call's row of each entry row (repeated for pieces), None = all
    index: Tensor | None  # (B', k) token index within each row, None = every token
    pad: Tensor | None  # (B', k) padding entries
    count: int  # entries that run (padding included): what the block really computes

    @classmethod
    def of(cls, ctx: Context, mask: Tensor, total: int | None = None) -> Subset | None:
        """The subset of `mask` (B, T); None when it is empty. `total`, the number of chosen
        tokens when the caller knows it, spares a read-back from the device."""
        B, T = mask.shape
        if total is None:
            total = int(mask.sum())
        if total == 0:
            return None
        if total == B * T:
            return cls(ctx, None, None, None, B * T)
        if T == 1:
            rows = mask[:, 0].nonzero().squeeze(1)
            return cls(ctx.select(rows=rows), rows, None, None, len(rows))
        counts = mask.sum(1)
        # Pieces of a common width, as many per row as its tokens need: padding every row to
        # the longest would run mostly padding when one row keeps many tokens and the rest few.
        # Pieces of one row see each other through the cache, where the call writes K/V first.
        width = piece_width(counts.tolist())
        pieces = (counts + width - 1) // width
        rows = torch.repeat_interleave(torch.arange(B, device=mask.device), pieces)
        first = torch.cumsum(pieces, 0) - pieces
        b, t = mask.nonzero(as_tuple=True)  # by row, then by position
        rank = (mask.cumsum(1) - 1)[b, t]
        n = len(rows)
        index = torch.zeros(n, width, dtype=torch.long, device=mask.device)
        pad = torch.ones(n, width, dtype=torch.bool, device=mask.device)
        index[first[b] + rank // width, rank % width] = t
        pad[first[b] + rank // width, rank % width] = False
        last = index.gather(1, (~pad).sum(1, keepdim=True) - 1)
        index = torch.where(pad, last, index)  # padding repeats the piece's last position
        return cls(ctx.select(rows=rows, index=index, pad=pad), rows, index, pad, n * width)

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> the subset's entries (B', k, ...)."""
        if self.rows is not None:
            x = x.index_select(0, self.rows)
        if self.index is not None:
            shape = (*self.index.shape, *x.shape[2:])
            x = x.gather(1, self.index.view(*self.index.shape, *[1] * (x.dim() - 2))
                         .expand(shape))
        return x

    def flat(self, B: int, T: int) -> Tensor:
        """Flat (row * T + token) index of every real entry, in the order of `real`."""
        device = self.ctx.positions.device
        rows = self.rows if self.rows is not None else torch.arange(B, device=device)
        if self.index is None:  # whole rows
            return (rows.unsqueeze(1) * T + torch.arange(T, device=device)).reshape(-1)
        return (rows.unsqueeze(1) * T + self.index)[~self.pad]

    def real(self, y: Tensor) -> Tensor:
        """The entries of a subset-shaped tensor (B', k, ...) that are real tokens, flattened."""
        if self.pad is not None:
            return y[~self.pad]
        return y.reshape(-1, *y.shape[2:])

    def scatter(self, x: Tensor, y: Tensor) -> Tensor:
        """x (B, T, d) with the subset's real entries replaced by y (B', k, d)."""
        if self.rows is None and self.index is None:
            return y
        B, T = x.shape[:2]
        flat = x.reshape(B * T, *x.shape[2:]).index_copy(0, self.flat(B, T), self.real(y))
        return flat.view_as(x)


PIECE_COST = 16  # a piece reads its row's whole cache: counted as this many entries (ours)


def piece_width(counts: list[int], splits: int = 8) -> int:
    """The width of the cheapest cut: the longest row whole, or in 2, 3, ... `splits` parts;
    a cut costs its entries (padding included) and PIECE_COST per piece."""
    longest = max(counts)
    best, width = None, longest
    for parts in range(1, splits + 1):
        w = -(-longest // parts)
        pieces = sum(-(-c // w) for c in counts)
        cost = pieces * (w + PIECE_COST)
        if best is None or cost < best:
            best, width = cost, w
    return width


# -- counting what ran ----------------------------------------------------------------------
@dataclass
class Tally:
    """Work done, in token units, summed over calls (padding entries included: they run)."""

    layers: int = 0  # token-blocks run in full
    kv: int = 0  # token-blocks whose keys and values alone were computed (a copied state)
    heads: int = 0  # token reads of the LM head (norm and unembedding)
    probes: int = 0  # token reads of a small exit classifier
    tokens: int = 0  # tokens the calls produced: the FLOPs-per-token denominator
    depth: int = 0  # blocks run by real tokens (padding left out): depth per token = depth/tokens
    drafted: int = 0  # speculative decoding: tokens drafted for rows still generating
    accepted: int = 0  # ... and accepted by the verify pass
    rounds: int = 0  # ... draft-and-verify rounds

    def minus(self, other: Tally) -> Tally:
        return Tally(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                        for f in fields(self)})

    def copy(self) -> Tally:
        return Tally(**asdict(self))


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
        scores = fl.attention(cfg, context)["attn_scores"]
        total = (tally.layers * (self.layer + scores) + tally.kv * self.kv
                 + tally.heads * self.head + tally.probes * self.probe)
        return total / max(tally.tokens, 1)


@contextlib.contextmanager
def tally_measurement(cfg: Any, costs: UnitCosts, tally: Callable[[], Tally],
                      summary: Callable[[Tally], dict[str, Any]]) -> Iterator[Measurement]:
    """A `Measurement` of the work tallied inside the block (the tally only grows)."""
    start, end = tally().copy(), []

    def done() -> Tally:  # what ran inside the block, whatever runs after it
        return (end[0] if end else tally()).minus(start)

    try:
        yield Measurement(lambda context: costs.per_token(cfg, done(), context),
                          lambda: summary(done()))
    finally:
        end.append(tally().copy())


class ExitMethod(Method):
    """What CALM and LayerSkip share as methods: a backbone checked for the seams they use, a
    tally of the work that ran, and the dense reference on the same weights."""

    def __init__(self, backbone: nn.Module) -> None:
        check_backbone(backbone, self.name)
        super().__init__(backbone)
        self.tally = Tally()
        self.dense = False  # the dense reference: the backbone's own forward, nothing else
        self.last_depth: Tensor | None = None  # blocks each token of the last call ran

    def count_forward(self, tokens: Tensor, blocks: int) -> None:
        """Tally a call whose tokens (B, T) all ran `blocks` blocks and read the head once."""
        n = tokens.numel()
        self.tally.layers += n * blocks
        self.tally.depth += n * blocks
        self.tally.heads += n
        self.tally.tokens += n
        self.last_depth = torch.full(tokens.shape, blocks, device=tokens.device)

    def token_depth(self) -> Tensor | None:
        return self.last_depth

    def dense_reference(self) -> contextlib.AbstractContextManager[None]:
        return attribute_set(self, "dense", True)

    def reference_flops_per_token(self, context: float) -> float:
        return sum(fl.forward_per_token(self.cfg, context).values())
