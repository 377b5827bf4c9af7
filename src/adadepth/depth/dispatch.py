"""What adaptive-depth methods share: the call, token subsets, decisions, and the tally.

Every method is a module over a layer stack (`model/stack.py`) that, per token, chooses how much
computation to spend. The per-token machinery they have in common lives here, once:

- `Call`: what one forward is asked to do (decide top-k or causally, force every choice one way,
  a per-site override for counterfactuals) and where it records what it did (a `Tally` of the
  work that ran, records a training loss reads, the depth each token got). A method's forward
  takes it as an argument and hands it to the modules it installed inside the stack through
  `Context.call`; nothing is set on a module around a call. `Bound` is a method with a call
  fixed, for code that only knows `model(idx, cache, start)` (generation, the bench).
- `Subset`: a chosen set of a call's tokens gathered with their own positions, so a block runs on
  them alone (packed per row, or cut into pieces), and scattered back; `split_tokens` for
  position-wise modules (an FFN), which need no context.
- Decisions: top-k per sequence (`topk_count`, `topk_route`), causal thresholds calibrated to a
  fraction (`quantile_threshold`), steered per row online (`ThresholdController`) and kept with
  their state in the cache (`CausalRule`), and causal predictors of top-k membership
  (`CausalPredictor`).
- `Tally` and `Measurement`: counts of the work that ran, by name and site, turned into FLOPs per
  token and a summary by the method that counted them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adadepth.model import Context

if TYPE_CHECKING:
    from adadepth.depth.method import Method

Rule = Literal["auto", "topk", "causal"]


# -- the call ---------------------------------------------------------------------------------
class Tally:
    """Work a method's forwards ran, in token units, summed over calls: `add(name, amount, at)`
    counts `amount` of `name` at site `at` (a layer, a pass; None for the whole call). `tokens`
    counts the tokens the calls produced, the FLOPs-per-token denominator."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, int | None], float] = defaultdict(float)

    def add(self, name: str, amount: float, at: int | None = None) -> None:
        self.counts[name, at] += float(amount)

    def copy(self) -> Tally:
        out = Tally()
        out.counts.update(self.counts)
        return out

    def minus(self, before: Tally) -> Tally:
        """What was counted since `before` (a copy of this tally taken earlier)."""
        out = Tally()
        for key, value in self.counts.items():
            out.counts[key] = value - before.counts.get(key, 0.0)
        return out

    def get(self, name: str, at: int | None = None) -> float:
        return self.counts.get((name, at), 0.0)

    def sites(self, name: str, at: Iterable[int]) -> list[float]:
        return [self.get(name, i) for i in at]

    def per_token(self, name: str, at: Iterable[int]) -> list[float]:
        """`sites(name, at)`, each divided by the tokens counted."""
        return [v / max(self.tokens, 1.0) for v in self.sites(name, at)]

    @property
    def tokens(self) -> float:
        return self.get("tokens")


def count_tokens(tally: Tally, ctx: Context, tokens: int) -> None:
    """Count a call's tokens and the keys their queries would see in a dense layer
    (`dense_keys`, the denominator of a keys fraction): a query at position p sees p + 1 keys
    with a cache, its own prefix without."""
    tally.add("tokens", tokens)
    seen = ctx.positions + 1 if ctx.cache is not None else (
        torch.arange(ctx.length, device=ctx.positions.device) + 1).unsqueeze(0)
    tally.add("dense_keys", float(seen.expand(tokens // ctx.length, -1).sum()))


def attended_keys(ctx: Context, queries: Tensor, layer: int, keys: Tensor | None = None
                  ) -> float:
    """The keys the queries of `queries` (B, T) attend to at cache layer `layer`, summed: the
    call's tokens of `keys` (default: the queries themselves) up to each query, its own
    included, and what the cache holds for that layer below the call's first position."""
    seen = (queries if keys is None else keys).long().cumsum(1)
    if ctx.cache is not None:
        valid = ctx.cache.valid[layer, :, :ctx.cache.max_len].long().cumsum(1)
        first = ctx.positions.expand(queries.shape[0], -1)[:, :1]  # keys before the call
        seen = seen + torch.where(first > 0, valid.gather(1, (first - 1).clamp_min(0)), 0)
    return float(seen[queries].sum())


class Call:
    """One forward's instructions, and what it reports back.

    `rule`: how choices over a sequence are made: "topk" (sees the whole sequence: training),
    "causal" (decodable), "auto" (top-k while training, causal otherwise). `force`: every choice
    one way (True: every token takes all the computation the method could save, the dense
    reference; False: none of it). `forced`: the same per site, winning over `force` (oracle
    counterfactuals force one layer). `tally` counts what ran; `records` keeps what a training
    loss reads, by site; `depth` gets each forward's per-token depth (B, T) appended;
    `collect` gathers the causal scores of the sites it names (calibration), `inputs` the inputs
    those sites receive (initialising what a method adds from the backbone). `setting` is the
    method's knob value for the call, set by its forward for the modules it installed inside the
    stack (routing's FFNs read their budget there: the model holds it once).

    A plain class, not a dataclass: the collectors must be the caller's own objects wherever
    the call travels, and wrappers such as FSDP rebuild the dataclasses and dicts they find in
    a module's arguments.
    """

    __slots__ = ("rule", "force", "forced", "tally", "records", "depth", "collect", "inputs",
                 "setting")

    def __init__(self, rule: Rule = "auto", force: bool | None = None,
                 forced: dict[int, bool | None] | None = None, tally: Tally | None = None,
                 records: dict[Any, Any] | None = None, depth: list[Tensor] | None = None,
                 collect: dict[int, list[Tensor]] | None = None,
                 inputs: dict[int, list[Tensor]] | None = None,
                 setting: float | None = None) -> None:
        self.rule, self.force, self.forced = rule, force, forced
        self.tally, self.records, self.depth = tally, records, depth
        self.collect, self.inputs, self.setting = collect, inputs, setting

    def topk(self, training: bool) -> bool:
        return self.rule == "topk" or (self.rule == "auto" and training)

    def forced_at(self, site: int) -> bool | None:
        if self.forced is not None and site in self.forced:
            return self.forced[site]
        return self.force

    def count(self, name: str, amount: float, at: int | None = None) -> None:
        if self.tally is not None:
            self.tally.add(name, amount, at)

    def record(self, key: Any, value: Any) -> None:
        if self.records is not None:
            self.records[key] = value

    def note_depth(self, depth: Tensor | None) -> None:
        if self.depth is not None and depth is not None:
            self.depth.append(depth.detach().float().cpu())

    def but(self, **changes: Any) -> Call:
        """This call with some fields changed (the collectors are shared, not copied)."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        return Call(**{**fields, **changes})


PLAIN = Call()


class Measurement:
    """A tally read by the method that filled it: FLOPs per token at a mean attention context,
    and a summary of what ran (full fractions, passes, exit layers, acceptance)."""

    def __init__(self, tally: Tally, flops: Callable[[Tally, float], float],
                 summary: Callable[[Tally], dict[str, Any]],
                 breakdown: Callable[[Tally, float], dict[str, float]] | None = None) -> None:
        self.tally, self._flops, self._summary = tally, flops, summary
        self._breakdown = breakdown

    def flops_per_token(self, context: float) -> float:
        return self._flops(self.tally, context)

    def breakdown(self, context: float) -> dict[str, float]:
        """FLOPs per token by component, against the dense backbone's forward: negative where
        the method removed compute, positive where it added some (gates, predictors, extra
        head reads, drafts, ...)."""
        return {} if self._breakdown is None else self._breakdown(self.tally, context)

    def summary(self) -> dict[str, Any]:
        return self._summary(self.tally)


class Bound(nn.Module):
    """A method with one call fixed: `Bound(model, Call(force=True))` is its dense reference,
    `Bound(model, Call(tally=t))` counts into t. Generation and the bench drive it as any model
    (`forward(idx, cache, start)`, `new_cache`, `cfg`, `speculator`)."""

    def __init__(self, method: Method, call: Call) -> None:
        super().__init__()
        self.method, self.call = method, call

    @property
    def cfg(self) -> Any:
        return self.method.cfg

    def new_cache(self, batch: int, max_len: int | None = None) -> Any:
        return self.method.new_cache(batch, max_len)

    @property
    def speculator(self) -> Any:
        return self.method.speculator_for(self.call)

    def forward(self, idx: Tensor, cache: Any = None, start: int = 0, *,
                positions: Tensor | None = None) -> Any:
        return self.method(idx, cache, start, positions=positions, call=self.call)


# -- token subsets ----------------------------------------------------------------------------
@dataclass
class Subset:
    """Tokens of a (B, T) call gathered so a block runs on them alone, each at its own position.

    `rows` (B',) names the call's row of each entry row (None: every row, in order), `index`
    (B', k) the token within it (None: every token), `pad` (B', k) the entries that only fill a
    ragged selection: they run but write nothing, and are discarded. `count` is the number of
    entries, padding included: what the block really computes.
    """

    ctx: Context
    rows: Tensor | None
    index: Tensor | None
    pad: Tensor | None
    count: int
    shape: tuple[int, int]  # (B, T) of the call

    @classmethod
    def whole(cls, ctx: Context, B: int, T: int) -> Subset:
        return cls(ctx, None, None, None, B * T, (B, T))

    @classmethod
    def of_rows(cls, ctx: Context, rows: Tensor, T: int, B: int) -> Subset:
        """Whole rows of the call."""
        return cls(ctx.select(rows=rows), rows, None, None, len(rows) * T, (B, T))

    @classmethod
    def of_index(cls, ctx: Context, index: Tensor) -> Subset:
        """k tokens of every row, by position index (B, k), in increasing order (top-k)."""
        B, k = index.shape
        return cls(ctx.select(index=index), None, index, None, B * k, (B, ctx.length))

    @classmethod
    def of(cls, ctx: Context, mask: Tensor, total: int | None = None,
           layout: Literal["rows", "pieces"] = "rows") -> Subset | None:
        """The tokens of `mask` (B, T); None when there are none. `total`, the number of chosen
        tokens when the caller knows it, spares a read-back from the device.

        One token per row (decoding), or every token of the rows that have any: whole rows.
        Otherwise `rows` packs each row's tokens in order, padded to the longest row, and leaves
        out the rows with none; `pieces` cuts each row's tokens into pieces of one width, as
        many as it needs, which costs less padding when one row keeps many tokens and the rest
        few, but needs a cache: the pieces of a row attend to each other through it."""
        B, T = mask.shape
        if total is None:
            total = int(mask.sum())
        if total == 0:
            return None
        if total == B * T:
            return cls.whole(ctx, B, T)
        if T == 1:
            return cls.of_rows(ctx, mask[:, 0].nonzero().squeeze(1), T, B)
        counts = mask.sum(1)
        if layout == "pieces":
            return cls._pieces(ctx, mask, counts)
        host = counts.tolist()  # the packed shapes depend on them
        active = [b for b, c in enumerate(host) if c]
        width = max(host)
        rows = torch.tensor(active, device=mask.device) if len(active) < B else None
        if width == T and min(host[b] for b in active) == T:  # whole rows
            assert rows is not None
            return cls.of_rows(ctx, rows, T, B)
        sel = mask if rows is None else mask.index_select(0, rows)
        index = torch.sort((~sel).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        kept = [host[b] for b in active]
        pad = None
        if min(kept) < width:
            pad = (torch.arange(width, device=mask.device).unsqueeze(0)
                   >= torch.tensor(kept, device=mask.device).unsqueeze(1))
        return cls(ctx.select(rows=rows, index=index, pad=pad), rows, index, pad,
                   len(kept) * width, (B, T))

    @classmethod
    def _pieces(cls, ctx: Context, mask: Tensor, counts: Tensor) -> Subset:
        B, T = mask.shape
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
        return cls(ctx.select(rows=rows, index=index, pad=pad), rows, index, pad, n * width,
                   (B, T))

    @property
    def is_whole(self) -> bool:
        return self.rows is None and self.index is None

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> the subset's entries (B', k, ...)."""
        if self.rows is not None:
            x = x.index_select(0, self.rows)
        if self.index is not None:
            shape = (*self.index.shape, *x.shape[2:])
            x = x.gather(1, self.index.view(*self.index.shape, *[1] * (x.dim() - 2))
                         .expand(shape))
        return x

    def flat_index(self) -> Tensor:
        """(B', k): the place of every entry among the call's B*T tokens, b*T + t."""
        B, T = self.shape
        device = self.ctx.positions.device
        if self.index is None:
            rows = self.rows if self.rows is not None else torch.arange(B, device=device)
            return rows.unsqueeze(1) * T + torch.arange(T, device=device)
        rows = (self.rows if self.rows is not None
                else torch.arange(self.index.shape[0], device=device))
        return rows.unsqueeze(1) * T + self.index

    def real_mask(self) -> Tensor:
        """(B', k): True on the entries that are real tokens."""
        if self.pad is not None:
            return ~self.pad
        return torch.ones(self.flat_index().shape, dtype=torch.bool,
                          device=self.ctx.positions.device)

    def flat(self) -> Tensor:
        """The flat index (b*T + t) of every real entry, in the order of `real`."""
        flat = self.flat_index()
        return flat[~self.pad] if self.pad is not None else flat.reshape(-1)

    def real(self, y: Tensor) -> Tensor:
        """The real entries of a subset-shaped tensor (B', k, ...), flattened."""
        if self.pad is not None:
            return y[~self.pad]
        return y.reshape(-1, *y.shape[2:])

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        """x (B, T, d) with y (B', k, d) added at the subset's real entries (a residual update
        computed on the subset alone). Each row may appear once: the `rows` layout."""
        if self.is_whole:
            return x + y
        if self.pad is not None:  # padding entries ran but are discarded
            y = y.masked_fill(self.pad.unsqueeze(-1), 0)
        xr = x if self.rows is None else x.index_select(0, self.rows)
        out = xr + y if self.index is None else xr.scatter_add(
            1, self.index.unsqueeze(-1).expand_as(y), y)
        return out if self.rows is None else x.index_copy(0, self.rows, out)

    def scatter(self, x: Tensor, y: Tensor) -> Tensor:
        """x (B, T, d) with the subset's real entries replaced by y (B', k, d)."""
        if self.is_whole:
            return y
        B, T = x.shape[:2]
        if self.index is None:  # whole rows
            return x.index_copy(0, self.rows, y)
        flat = x.reshape(B * T, *x.shape[2:]).index_copy(0, self.flat(), self.real(y))
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


def split_tokens(mask: Tensor, chosen: int) -> tuple[Tensor, Tensor]:
    """Flat indices of the chosen (True) and the other tokens of a (B, T) mask, for a module
    that works token by token. `chosen` is their number (known from top-k, or read back once):
    the sizes are static, so this needs no host sync and compiles."""
    m = mask.reshape(-1)
    n = m.numel()
    return (torch.nonzero_static(m, size=chosen).squeeze(1),
            torch.nonzero_static(~m, size=n - chosen).squeeze(1))


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, d) at index (B, k) -> (B, k, d)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# -- decisions --------------------------------------------------------------------------------
def topk_count(T: int, fraction: float) -> int:
    """k = ceil(f*T), at least one token; the epsilon keeps 0.3*10 from rounding up to 4."""
    return max(1, min(T, math.ceil(fraction * T - 1e-9)))


def topk_route(score: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Exactly k = ceil(f*T) chosen tokens per sequence, and each row's decision boundary,
    (B, 1): midway between the k-th and the (k+1)-th largest score (the k-th itself when every
    token is chosen)."""
    T = score.shape[-1]
    k = topk_count(T, fraction)
    top = score.topk(min(k + 1, T), dim=-1, sorted=True)
    mask = torch.zeros_like(score, dtype=torch.bool).scatter(-1, top.indices[..., :k], True)
    edge = top.values[..., k - 1:k + 1]
    return mask, edge.mean(-1, keepdim=True)


def topk_index(score: Tensor, fraction: float) -> Tensor:
    """Positions of the k = ceil(f*T) highest scores of every row, in increasing order."""
    k = topk_count(score.shape[-1], fraction)
    return score.topk(k, dim=-1).indices.sort(dim=-1).values


def quantile_threshold(scores: Tensor, fraction: float) -> tuple[float, float]:
    """The threshold that lets a fraction `fraction` of held-out scores pass (their (1-f)
    quantile), and the scores' spread for a `ThresholdController` (a robust std: the
    interquartile range / 1.349)."""
    scores = scores.float().flatten().cpu()
    threshold = torch.quantile(scores, 1 - fraction).item()
    q75, q25 = torch.quantile(scores, torch.tensor([0.75, 0.25])).tolist()
    return threshold, max(q75 - q25, 1e-6) / 1.349


class ThresholdController:
    """Keeps each row's running chosen fraction on target, token by token, causally.

    Token t is chosen when its score passes theta_t = theta_0 + eta * surplus_t, where
    surplus_t = sum over earlier tokens of (decision - f) and theta_0 is the calibrated
    threshold: each chosen token beyond the target raises the bar, each other one lowers it (an
    integral controller, i.e. an online (1-f)-quantile tracker). When the surplus reaches
    +-slack tokens the decision is forced back toward the target, so over any T tokens the
    realised fraction is within (slack + 1) / T of f, whatever the text. eta is `gain` times the
    spread of the calibration scores, so the step means the same for every score.
    """

    def __init__(self, gain: float, slack: float) -> None:
        self.gain, self.slack = gain, slack

    def decide(self, scores: Tensor, fraction: float, theta0: float, spread: float,
               surplus: list[float], among: Tensor | None = None) -> tuple[Tensor, list[float]]:
        """Decisions for scores (B, T) in order, from each row's surplus; returns the new ones.
        Tokens outside `among` (B, T), when given, are not chosen and leave the surplus alone:
        the fraction is kept among the others (a choice among the tokens still in play).

        A plain Python loop over host floats: ~0.3 us a token, far cheaper per token than
        tensor ops, and it is inherently sequential."""
        eta, f, slack = self.gain * spread, fraction, self.slack
        rows, out = scores.tolist(), []
        playing = among.tolist() if among is not None else None
        surplus = list(surplus)
        for i, row in enumerate(rows):
            s, decided = surplus[i], []
            for t, value in enumerate(row):
                if playing is not None and not playing[i][t]:
                    decided.append(False)
                    continue
                chosen = value > theta0 + eta * s
                if s <= -slack:
                    chosen = True
                elif s >= slack:
                    chosen = False
                decided.append(chosen)
                s += (1.0 - f) if chosen else -f
            surplus[i] = s
            out.append(decided)
        return torch.tensor(out, dtype=torch.bool, device=scores.device), surplus


class CausalRule(nn.Module):
    """A causal decision on a score: it passes a threshold calibrated on held-out scores to a
    fraction, optionally steered per row by a `ThresholdController` whose state (each row's
    surplus) lives in the cache under `key`, so cached decoding decides exactly as a full
    forward does. A forward from position 0 starts a new sequence, with no surplus."""

    def __init__(self, key: str, control: ThresholdController | None) -> None:
        super().__init__()
        self.key, self.control = key, control
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("spread", torch.tensor(1.0))

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.threshold))

    def calibrate(self, scores: Tensor, fraction: float) -> None:
        threshold, spread = quantile_threshold(scores, fraction)
        self.threshold.fill_(threshold)
        self.spread.fill_(spread)

    def set(self, threshold: float, spread: float = 1.0) -> None:
        self.threshold.fill_(threshold)
        self.spread.fill_(spread)

    def decide(self, score: Tensor, fraction: float, ctx: Context,
               among: Tensor | None = None) -> Tensor:
        """Which tokens of score (B, T) pass; only tokens of `among` may, and the controller
        keeps the fraction among them."""
        if self.control is None:
            passed = score > self.threshold
            return passed if among is None else passed & among
        fresh = ctx.cache is None or ctx.start == 0
        state = {} if ctx.cache is None else ctx.cache.state
        surplus = None if fresh else state.get(self.key)
        rows = score.shape[0]
        if surplus is None or len(surplus) != rows:
            surplus = [0.0] * rows
        mask, state[self.key] = self.control.decide(score, fraction, self.threshold.item(),
                                                    self.spread.item(), surplus, among)
        return mask


class CausalPredictor(nn.Module):
    """A small classifier of top-k membership from a token's own state: decodable where top-k
    is not. It reads its input under a stop-gradient, so its loss never moves the model."""

    def __init__(self, d_model: int, hidden: int | None = None) -> None:
        super().__init__()
        self.net: nn.Module = (nn.Linear(d_model, 1) if hidden is None else nn.Sequential(
            nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, T) of membership."""
        return self.net(x.detach()).squeeze(-1)


def membership_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy of causal logits against top-k membership."""
    return F.binary_cross_entropy_with_logits(logits.float(), mask.float())


__all__ = ["Bound", "Call", "CausalPredictor", "CausalRule", "Measurement", "PLAIN", "Rule",
           "Subset", "Tally", "ThresholdController", "attended_keys", "count_tokens",
           "gather_tokens",
           "membership_loss", "piece_width", "quantile_threshold", "split_tokens",
           "topk_count", "topk_index", "topk_route"]
