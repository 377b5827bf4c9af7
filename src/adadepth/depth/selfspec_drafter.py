"""Self-spec's draft and verify for one decoding session (`adadepth.generate.speculative`
drives them, over one shared cache).

The draft runs the model's kept layers (the skip drafter) or its first E layers and the
adapter (the exit drafter), reads the head over the draft vocabulary, and stops a round once
every row has drafted a token whose draft probability is below the threshold, or at the cap.
The verify pass is the shared one of `drafting.py`: it reuses the draft's exact prefix of
layers. Everything a round needs travels in `Round` and `Draft`; what ran is counted into the
session's `Call`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adadepth.depth.dispatch import Call
from adadepth.depth.drafting import prepare, verify_reusing
from adadepth.generate import Draft, Round
from adadepth.model import Context, KVCache

if TYPE_CHECKING:
    from adadepth.depth.selfspec import SelfSpec


class SelfSpecSpeculator:
    """Drafts with part of a `SelfSpec` model and verifies with all of it, counting into
    `call`'s tally."""

    def __init__(self, model: SelfSpec, call: Call) -> None:
        self.model, self.call = model, call

    @property
    def draft_tokens(self) -> int:
        """The most tokens a round may draft (the cache keeps room for them)."""
        return max(self.model.cap, self.model.batched_cap)

    def draft(self, rnd: Round, cache: KVCache) -> Draft:
        """Up to the cap, stopping once every row has drafted a token whose draft probability
        is below the threshold (that token is still verified; a row past its own stop keeps
        drafting while others go on, for free in a batch, and its drafts are verified too)."""
        model = self.model
        B, V = rnd.last.shape[0], model.backbone.cfg.vocab_size
        # The policy of the batch the generation started with (rows leave as they finish,
        # but the cache keeps its batch).
        threshold, cap = ((model.batched_threshold, model.batched_cap) if cache.batch > 1
                          else (model.threshold, model.cap))
        n = min(cap, rnd.most)
        token = rnd.last
        drafts, probs, states = [], [], []
        going = torch.ones(B, dtype=torch.bool, device=token.device)
        for k in range(n):
            x, ctx = prepare(model.backbone, token, cache, rnd.positions.unsqueeze(1) + k,
                             rnd.rows)
            x, exact = model.draft_path(x, ctx)
            states.append(exact)
            logits = model.draft_head(x)[:, -1]
            pick, q = rnd.sample(logits)
            token = pick if model.full_vocab else model.vocab[pick]
            if q is None:
                confidence = logits.float().softmax(-1).max(-1).values
            else:
                confidence = q.gather(1, pick).squeeze(1)
                if not model.full_vocab:  # the verifier compares over the whole vocabulary
                    q = torch.zeros(B, V, dtype=q.dtype, device=q.device).index_copy_(
                        1, model.vocab, q)
                probs.append(q)
            drafts.append(token)
            going &= confidence >= threshold
            if k + 1 < n and not bool(going.any()):
                n = k + 1
                break
        count = self.call.count
        count("layers", B * n * len(model.kept))
        count("adapter", B * n if model.adapter is not None else 0)
        count("draft_heads", B * n)
        count("drafted", B * n)
        reuse = torch.cat(states, 1) if model.exact > 0 else None
        return Draft(torch.cat(drafts, 1), torch.stack(probs, 1) if probs else None, reuse)

    def verify(self, rnd: Round, draft: Draft, cache: KVCache) -> Tensor:
        """The full model on [last, drafts], reusing the draft's exact prefix of layers; the
        last drafted token's adapter K/V are written too (the draft never fed it)."""
        model = self.model
        at_exit = None
        if model.adapter is not None:
            adapter = model.adapter

            def at_exit(x: Tensor, ctx: Context) -> None:
                adapter.write_kv(x, ctx, model.slot)
                self.call.count("adapter", x.shape[0])  # K/V only, counted as a run
        h, blocks = verify_reusing(model.backbone, rnd, draft.tokens, draft.carry, model.exact,
                                   cache, at_exit)
        self.call.count("layers", blocks)
        self.call.count("heads", h.shape[0] * h.shape[1])
        return model.backbone.head(h)

    def observe(self, accepted: Tensor, active: Tensor) -> None:
        """What a round kept: drafted tokens accepted per row, and which rows still generate."""
        if self.call.tally is None:
            return
        rows = int(active.sum())
        kept = int(accepted[active].sum())
        count = self.call.count
        count("tokens", kept + rows)  # the accepted drafts and the verifier's next token
        count("depth", (kept + rows) * self.model.backbone.n_layers)
        count("accepted", kept)
        count("row_rounds", rows)
        count("rounds", 1)
