"""Checks every adaptive method's per-token decisions must pass, whatever the method.

A *decision reader* runs the model on token ids (optionally into a cache, from a position) and
returns what it decided for each token, (B, T, ...): routing's full/cheap masks, Mixture-of-
Depths' run/skip masks, an early exit's exit layer. `method_decisions` reads any method through
the per-token depth its forward reports (`Call(depth=...)`); a method with richer records passes
its own reader.

- `assert_causal`: changing the tokens from some position on never changes a decision before it
  (decisions may depend on earlier tokens only, as decoding requires);
- `assert_cached_decisions_match`: decoding with the KV cache (a prefill, then one token at a
  time) decides exactly as one forward over the whole text;
- `assert_decodable`: both of the above (`fed_in_steps` feeds a model so);
- `assert_round_trip`: `save_pretrained` then `from_pretrained` gives back exactly the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import adadepth
from adadepth.depth.dispatch import Call

# (token ids (B, T), cache or None, start position) -> decisions (B, T, ...)
Decide = Callable[..., Tensor]


def method_decisions(model: nn.Module, **call) -> Decide:
    """Per-token decisions of any method: the compute each token received (its depth)."""

    def decide(idx: Tensor, cache=None, start: int = 0) -> Tensor:
        depth: list[Tensor] = []
        with torch.no_grad():
            model(idx, cache, start, call=Call(depth=depth, **call))
        assert depth, f"{type(model).__name__} recorded no per-token depth"
        return depth[-1]

    return decide


def assert_causal(decide: Decide, tokens: Tensor, vocab: int,
                  cuts: int | Iterable[int] | None = None, seed: int = 0) -> list[Tensor]:
    """Change every token from each cut on (every position when `cuts` is None): the decisions
    before the cut must not move.

    Returns the decisions of every changed sequence, so a test can also check that the change
    reached the later decisions (a check that cannot fail proves nothing)."""
    gen = torch.Generator().manual_seed(seed)
    T = tokens.shape[1]
    before = decide(tokens)
    assert before.shape[:2] == tokens.shape, "a decision reader returns (B, T, ...)"
    if cuts is None:
        cuts = range(1, T)
    elif isinstance(cuts, int):
        cuts = [cuts]
    seen = []
    for cut in cuts:
        changed = tokens.clone()
        shift = torch.randint(1, vocab, (tokens.shape[0], T - cut), generator=gen)
        changed[:, cut:] = (tokens[:, cut:] + shift.to(tokens.device)) % vocab
        after = decide(changed)
        moved = (before[:, :cut] != after[:, :cut]).reshape(tokens.shape[0], cut, -1).any(-1)
        assert not moved.any(), f"decisions before position {cut} depend on later tokens: " \
            f"(row, position) {moved.nonzero().tolist()[:4]}"
        seen.append(after)
    return seen


def assert_cached_decisions_match(model: nn.Module, decide: Decide, tokens: Tensor,
                                  prefill: int) -> None:
    """A prefill of `prefill` tokens then one token per call decides as one full forward."""
    full = decide(tokens)
    B, T = tokens.shape
    cache = model.new_cache(B, T)
    steps = [decide(tokens[:, :prefill], cache, 0)]
    steps += [decide(tokens[:, t:t + 1], cache, t) for t in range(prefill, T)]
    cached = torch.cat(steps, 1)
    assert torch.equal(cached, full), "cached decoding decided otherwise than the full forward"


def fed_in_steps(model: nn.Module, tokens: Tensor, prefill: int) -> tuple[Tensor, Any]:
    """Feed `tokens` as decoding does: a prefill of `prefill` tokens into a fresh cache, then
    one token per call. Returns the logits of every position and the cache."""
    B, T = tokens.shape
    cache = model.new_cache(B, T)
    with torch.no_grad():
        steps = [model(tokens[:, :prefill], cache, 0).logits]
        steps += [model(tokens[:, t:t + 1], cache, t).logits for t in range(prefill, T)]
    return torch.cat(steps, 1), cache


def assert_decodable(model: nn.Module, decide: Decide, tokens: Tensor, vocab: int,
                     cuts: Iterable[int], prefill: int) -> None:
    """Both checks a decoding method must pass: decisions causal at every cut, and the same
    under cached decoding (a prefill of `prefill` tokens, then one at a time)."""
    for cut in cuts:
        assert_causal(decide, tokens, vocab, cut)
    assert_cached_decisions_match(model, decide, tokens, prefill)


def assert_round_trip(model: nn.Module, idx: Tensor, folder: Path) -> nn.Module:
    """Save with `save_pretrained`, load with `from_pretrained`: the loaded model's logits on
    idx equal the saved one's exactly. Returns the loaded model."""
    with torch.no_grad():
        before = model(idx).logits
    adadepth.save_pretrained(model, folder)
    loaded = adadepth.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, before)
    return loaded
