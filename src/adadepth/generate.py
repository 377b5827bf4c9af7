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
from typing import Protocol

import torch
from torch import Tensor, nn

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


class Speculator(Protocol):
    """Drafts with part of a model and verifies with all of it, over one shared cache."""

    draft_tokens: int  # tokens drafted per round

    def draft(self, last: Tensor, cache: KVCache, positions: Tensor, n: int,
              sample: Sampler) -> tuple[Tensor, Tensor | None]:
        """n tokens after `last` (B, 1), which sits at `positions` (B,): (B, n) tokens and their
        draft probabilities (B, n, V) (None when greedy). May write K/V of the early layers."""
        ...

    def verify(self, tokens: Tensor, cache: KVCache, positions: Tensor) -> Tensor:
        """Full-model logits (B, n+1, V) of `tokens` (B, n+1) at `positions` (B, n+1), writing
        every layer's K/V at those positions."""
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


def decode(model: nn.Module, cache: KVCache, logits: Tensor, start: int, n: int,
           sample: Sampler) -> Tensor:
    """n tokens, one cached forward each, after a prefill that ended at position start - 1."""
    out = []
    for step in range(n):
        token = sample(logits)[0]
        out.append(token)
        if step + 1 < n:
            logits = model(token, cache, start + step).logits[:, -1]
    return torch.cat(out, dim=1)


def speculative(spec: Speculator, cache: KVCache, logits: Tensor, start: int, n: int,
                sample: Sampler) -> Tensor:
    """n tokens per row by draft-and-verify rounds, every row at its own position."""
    batch, device = logits.shape[0], logits.device
    last = sample(logits)[0]  # (B, 1): the next token, at position `pos`, not yet in the cache
    pos = torch.full((batch,), start, dtype=torch.long, device=device)
    out: list[list[int]] = [[t] for t in last[:, 0].tolist()]
    limit = cache.max_len - spec.draft_tokens - 1  # a row never writes past the cache
    while min(len(row) for row in out) < n:
        k = spec.draft_tokens
        draft, q = spec.draft(last, cache, pos, k, sample)
        tokens = torch.cat([last, draft], dim=1)
        positions = pos.unsqueeze(1) + torch.arange(k + 1, device=device)
        p_logits = spec.verify(tokens, cache, positions)
        accepted, nxt = accept(draft, q, p_logits, sample)
        done = torch.tensor([len(row) >= n for row in out], device=device)
        accepted = accepted.masked_fill(done, 0)
        observe = getattr(spec, "observe", None)
        if observe is not None:
            observe(accepted, ~done)
        for b in range(batch):
            if done[b]:
                continue
            a = int(accepted[b])
            out[b].extend(draft[b, :a].tolist() + [int(nxt[b])])
        advance = torch.where(done, torch.zeros_like(pos), accepted + 1)
        pos = torch.minimum(pos + advance, torch.full_like(pos, limit))
        last = torch.where(done.unsqueeze(1), last, nxt.unsqueeze(1))
        cache.truncate(pos)  # positions >= pos held rejected drafts (or nothing yet)
    return torch.tensor([row[:n] for row in out], dtype=torch.long, device=device)


def accept(draft: Tensor, q: Tensor | None, p_logits: Tensor,
           sample: Sampler) -> tuple[Tensor, Tensor]:
    """How many drafted tokens each row keeps (B,), and the token that follows them (B,).

    Greedy (q is None): the longest prefix the full model's argmax agrees with, then its argmax.
    Otherwise speculative sampling with the sampler's own temperature and top-k."""
    k = draft.shape[1]
    if q is None:
        target = p_logits.argmax(-1)  # (B, k+1)
        ok = (draft == target[:, :k]).long().cumprod(1)
        accepted = ok.sum(1)
        return accepted, target.gather(1, accepted.unsqueeze(1)).squeeze(1)
    batch = draft.shape[0]
    p = sample.probs(p_logits)  # (B, k+1, V)
    p_draft = p[:, :k].gather(2, draft.unsqueeze(-1)).squeeze(-1)
    q_draft = q.gather(2, draft.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(batch, k, device=draft.device, generator=sample.generator)
    keep = u < (p_draft / q_draft.clamp_min(1e-12))
    accepted = keep.long().cumprod(1).sum(1)
    nxt = torch.empty(batch, dtype=torch.long, device=draft.device)
    for b in range(batch):
        a = int(accepted[b])
        if a == k:  # every draft kept: a bonus token from the full model
            dist = p[b, k]
        else:  # the first rejected position: resample from what the draft under-weighted
            residual = (p[b, a] - q[b, a]).clamp_min(0)
            dist = residual / residual.sum() if residual.sum() > 0 else p[b, a]
        nxt[b] = sample.draw(dist.unsqueeze(0)).squeeze()
    return accepted, nxt
