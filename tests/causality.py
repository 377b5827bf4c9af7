"""A check any causal decision must pass: changing a future token never changes an earlier
decision. Shared by the tests of every method that decides per token (exits, routing, ...).

    from causality import assert_causal
    assert_causal(lambda idx: decisions_of(model, idx), idx, vocab_size)

`decisions(idx)` maps token ids (B, T) to per-token decisions (B, T, ...) of any dtype: exit
layers, full/cheap masks, halting steps. The check changes every token from `cut` on (for every
cut given) and compares the decisions before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def assert_causal(decisions: Callable[[Tensor], Tensor], idx: Tensor, vocab_size: int,
                  cuts: Iterable[int] | None = None, seed: int = 0) -> list[Tensor]:
    """Assert that decisions at positions < cut do not depend on tokens at positions >= cut.

    Returns the decisions of every perturbed sequence, so a test can also check that the
    perturbation reached the later decisions (a check that cannot fail proves nothing)."""
    gen = torch.Generator().manual_seed(seed)
    T = idx.shape[1]
    base = decisions(idx)
    assert base.shape[:2] == idx.shape, "decisions must be per token: (B, T, ...)"
    seen = []
    for cut in (cuts if cuts is not None else range(1, T)):
        changed = idx.clone()
        shift = torch.randint(1, vocab_size, (idx.shape[0], T - cut), generator=gen)
        changed[:, cut:] = (idx[:, cut:] + shift.to(idx.device)) % vocab_size
        other = decisions(changed)
        same = base[:, :cut] == other[:, :cut]
        assert bool(same.all()), (f"a decision before position {cut} changed when only tokens "
                                  f"from {cut} on did: rows {(~same).flatten(1).any(1).nonzero()}")
        seen.append(other)
    return seen
