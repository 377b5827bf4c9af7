"""Sampling with the KV cache (temperature, top-k), for any model the run loaders return."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def sample_next(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token per row from the last position's logits (B, V). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> Tensor:
    """Extend idx (B, T) by max_new_tokens. Without the cache every step recomputes the prefix."""
    total = idx.shape[1] + max_new_tokens
    max_len = model.cfg.max_seq_len
    if total > max_len:
        raise ValueError(f"prompt plus new tokens ({total}) exceed max_seq_len {max_len}")
    cache = model.new_cache(idx.shape[0], total) if use_cache else None
    logits = model(idx, cache, 0).logits[:, -1]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)
        start = idx.shape[1]
        idx = torch.cat([idx, nxt], dim=1)
        if use_cache:
            logits = model(nxt, cache, start).logits[:, -1]
        else:
            logits = model(idx).logits[:, -1]
    return idx
