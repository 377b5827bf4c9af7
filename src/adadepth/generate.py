"""Sampling with the KV cache (temperature, top-k), for any model the run loaders return.

A model with a `speculator` (self-speculative decoding) drafts several tokens cheaply and
verifies them with one forward of the full model over the same cache. Rows of a batch accept
different numbers of drafted tokens, so each row keeps its own position; rejected positions
are invalidated in the cache. With greedy sampling the output is exactly the full model's; with
temperature > 0 acceptance follows speculative sampling (accept a drafted token with probability
min(1, p/q), else resample from max(0, p - q)), which keeps the full model's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from adadepth.errors import UserError
from adadepth.model import KVCache


@dataclass
class Sampler:
    """Temperature and top-k sampling; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: Tensor) -> Tensor:
        """The distribution sampled from, for logits (..., V)."""
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(-1)

    def draw(self, probs: Tensor) -> Tensor:
        return torch.multinomial(probs, 1, generator=self.generator)

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """Next token per row (B, 1) from logits (B, V), and its distribution (None if greedy)."""
        if self.greedy:
            return logits.argmax(-1, keepdim=True), None
        probs = self.probs(logits)
        return self.draw(probs), probs


@dataclass
class Round:
    """One draft-and-verify round, as the loop hands it to a speculator: per-call state that
    travels in the call, never on the module."""

    last: Tensor  # (B', 1) the token each row feeds next, at `positions`, not yet in the cache
    positions: Tensor  # (B',) where `last` sits, per row
    rows: Tensor | None  # (B',) the cache rows of this round; None = every row, in order
    most: int  # draft at most this many tokens, >= 1 (the cap, the room left in the cache)
    sample: Sampler


@dataclass
class Draft:
    """What a speculator drafted in a round, handed back to its own `verify`."""

    tokens: Tensor  # (B', k) drafted tokens, k >= 0 (the speculator chooses k <= round.most)
    probs: Tensor | None  # (B', k, V) the distributions they were drawn from; None when greedy
    carry: Any = None  # what the speculator's verify may reuse (states, K/V it already wrote)


class Speculator(Protocol):
    """Drafts with part of a model and verifies with all of it, over one shared cache."""

    draft_tokens: int  # the most tokens a round drafts (the cache keeps room for them)

    def draft(self, rnd: Round, cache: KVCache) -> Draft:
        """Tokens after `rnd.last`, each row at its own position. May write K/V in the cache at
        the positions it feeds; the verify pass must leave every layer's K/V at the positions
        it keeps exactly as the full model computes them."""
        ...

    def verify(self, rnd: Round, draft: Draft, cache: KVCache) -> Tensor:
        """Full-model logits (B', k+1, V) of [last, drafted tokens] at positions
        `rnd.positions + 0..k`, writing every layer's K/V there."""
        ...

    # Optional: `observe(accepted (B,), active (B,) bool)` is called after every round with the
    # drafted tokens each row kept, so a speculator can count acceptance and tokens produced.


@torch.no_grad()
def sample_next(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token per row from the last position's logits (B, V). temperature 0 = greedy."""
    return Sampler(temperature, top_k, generator)(logits)[0]


@torch.no_grad()
def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> Tensor:
    """Extend idx (B, T) by max_new_tokens. Without the cache every step recomputes the prefix.

    `model` is any model the run loaders return, or an adaptive one bound to a call
    (`Method.measured(Call(depth=...))` counts what it ran and the depth each token got)."""
    total = idx.shape[1] + max_new_tokens
    max_len = model.cfg.max_seq_len
    if total > max_len:
        raise ValueError(f"prompt plus new tokens ({total}) exceed max_seq_len {max_len}")
    sample = Sampler(temperature, top_k, generator)
    speculator = getattr(model, "speculator", None)
    if not use_cache:
        for _ in range(max_new_tokens):
            idx = torch.cat([idx, sample(model(idx).logits[:, -1])[0]], dim=1)
        return idx
    extra = speculator.draft_tokens + 1 if speculator is not None else 0
    cache = model.new_cache(idx.shape[0], min(max_len, total + extra))
    logits = model(idx, cache, 0).logits[:, -1]
    if speculator is not None:
        new = speculative(speculator, cache, logits, idx.shape[1], max_new_tokens, sample)
    else:
        new = decode(model, cache, logits, idx.shape[1], max_new_tokens, sample)
    return torch.cat([idx, new], dim=1)


@torch.no_grad()
def generate_many(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """Each prompt extended by max_new_tokens, prompts of different lengths in one batch: they
    are prefilled together (right-padded; the padding's K/V are then invalidated) and every row
    decodes at its own positions, speculatively if the model has a speculator."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise UserError("every prompt needs at least one token")
    longest, max_len = max(lengths), model.cfg.max_seq_len
    if longest + max_new_tokens > max_len:
        raise UserError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds "
                        f"the model's context of {max_len}")
    device = next(model.parameters()).device
    idx = torch.tensor([p + p[-1:] * (longest - len(p)) for p in prompts], device=device)
    at = torch.tensor(lengths, device=device)
    sample = Sampler(temperature, top_k, generator)
    speculator = getattr(model, "speculator", None)
    extra = speculator.draft_tokens + 1 if speculator is not None else 0
    cache = model.new_cache(len(prompts), min(max_len, longest + max_new_tokens + extra))
    logits = model(idx, cache, 0).logits
    cache.truncate(at)  # the padding's positions hold nothing any row may attend to
    logits = logits[torch.arange(len(prompts), device=device), at - 1]
    if speculator is not None:
        new = speculative(speculator, cache, logits, at, max_new_tokens, sample)
    else:
        new = decode(model, cache, logits, at, max_new_tokens, sample)
    return [p + row for p, row in zip(prompts, new.tolist(), strict=True)]


def decode(model: nn.Module, cache: KVCache, logits: Tensor, start: int | Tensor, n: int,
           sample: Sampler) -> Tensor:
    """n tokens, one cached forward each, after a prefill that ended at position start - 1
    (an int, or (B,) for rows of different lengths)."""
    out = []
    for step in range(n):
        token = sample(logits)[0]
        out.append(token)
        if step + 1 < n:
            at = ({"start": start + step} if isinstance(start, int)
                  else {"positions": (start + step).unsqueeze(1)})
            logits = model(token, cache, **at).logits[:, -1]
    return torch.cat(out, dim=1)


def speculative(spec: Speculator, cache: KVCache, logits: Tensor, start: int | Tensor, n: int,
                sample: Sampler) -> Tensor:
    """n tokens per row by draft-and-verify rounds, every row at its own position.

    `start` is where each row's first new token goes (an int, or (B,) for prompts of different
    lengths). Rows that have their n tokens leave the rounds: later drafts and verify passes run
    on the other rows alone (`Round.rows`)."""
    batch, device = logits.shape[0], logits.device
    last = sample(logits)[0]  # (B, 1): the next token, at `pos`, not yet in the cache
    pos = torch.as_tensor(start, dtype=torch.long, device=device).expand(batch).clone()
    out: list[list[int]] = [[t] for t in last[:, 0].tolist()]
    end = [int(p) + n - 1 for p in pos.tolist()]  # the position of a row's last new token
    while True:
        active = [b for b in range(batch) if len(out[b]) < n]
        if not active:
            break
        rows = None if len(active) == batch else torch.tensor(active, device=device)
        # A round of k drafts makes up to k + 1 tokens: no row needs more drafts than it has
        # tokens left to make, less one; nor may a row write past the cache (the verify pass
        # writes one position beyond the drafts).
        here = pos.tolist()
        most = min(spec.draft_tokens, max(end[b] - here[b] - 1 for b in active),
                   min(cache.max_len - 1 - here[b] for b in active))
        rnd = Round(last if rows is None else last.index_select(0, rows),
                    pos if rows is None else pos.index_select(0, rows), rows, max(most, 0),
                    sample)
        # With no room to draft, the round is one plain step of the full model.
        draft = spec.draft(rnd, cache) if rnd.most else Draft(rnd.last[:, :0], None)
        p_logits = spec.verify(rnd, draft, cache)
        kept, nxt = accept(draft.tokens, draft.probs, p_logits, sample)
        accepted = torch.zeros(batch, dtype=torch.long, device=device)
        index = torch.tensor(active, device=device)
        accepted[index] = kept
        observe = getattr(spec, "observe", None)
        if observe is not None:
            flags = torch.zeros(batch, dtype=torch.bool, device=device)
            flags[index] = True
            observe(accepted, flags)
        drafted, kept_list, nxt_list = draft.tokens.tolist(), kept.tolist(), nxt.tolist()
        for j, b in enumerate(active):
            out[b].extend(drafted[j][:kept_list[j]] + [nxt_list[j]])
        pos[index] += kept + 1
        last[index] = nxt.unsqueeze(1)
        cache.truncate(pos)  # positions >= pos held rejected drafts (or nothing yet)
    return torch.tensor([row[:n] for row in out], dtype=torch.long, device=device)


def accept(draft: Tensor, q: Tensor | None, p_logits: Tensor,
           sample: Sampler) -> tuple[Tensor, Tensor]:
    """How many drafted tokens each row keeps (B,), and the token that follows them (B,).

    Greedy: the longest prefix the full model's argmax agrees with, then its argmax. Otherwise
    speculative sampling with the sampler's own temperature and top-k (q is None only when
    nothing was drafted)."""
    k = draft.shape[1]
    if sample.greedy:
        target = p_logits.argmax(-1)  # (B, k+1)
        ok = (draft == target[:, :k]).long().cumprod(1)
        accepted = ok.sum(1)
        return accepted, target.gather(1, accepted.unsqueeze(1)).squeeze(1)
    batch = draft.shape[0]
    p = sample.probs(p_logits)  # (B, k+1, V)
    if q is None:
        q = torch.zeros_like(p[:, :k])
    p_draft = p[:, :k].gather(2, draft.unsqueeze(-1)).squeeze(-1)
    q_draft = q.gather(2, draft.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(batch, k, device=draft.device, generator=sample.generator)
    keep = u < (p_draft / q_draft.clamp_min(1e-12))
    accepted = keep.long().cumprod(1).sum(1)
    # At the first rejected position, resample from what the draft under-weighted,
    # max(0, p - q) normalised; where every draft was kept, a bonus token from p itself.
    at = accepted.view(batch, 1, 1).expand(batch, 1, p.shape[-1])
    p_at = p.gather(1, at).squeeze(1)  # (B, V)
    if k:
        residual = (p_at - q.gather(1, at.clamp_max(k - 1)).squeeze(1)).clamp_min(0)
    else:
        residual = p_at
    mass = residual.sum(-1, keepdim=True)
    rejected = (accepted < k).unsqueeze(1) & (mass > 0)
    dist = torch.where(rejected, residual / mass.clamp_min(1e-30), p_at)
    nxt = sample.draw(dist).squeeze(1)
    return accepted, nxt
