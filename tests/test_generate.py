"""Generation: the draft/verify loop over one shared cache, rows at their own positions."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from adadepth.config import ModelConfig
from adadepth.depth.drafting import prepare
from adadepth.generate import Draft, Round, generate, generate_many
from adadepth.model import KVCache, Transformer

V = 30


class ModelDrafter(nn.Module):
    """A stand-in speculator: drafts with the model itself, then spoils the drafts of some rows
    (those rows reject and fall behind, so rows end up at different positions)."""

    def __init__(self, model: Transformer, spoil: list[int], draft_tokens: int = 3) -> None:
        super().__init__()
        self.model, self.spoil, self.draft_tokens = model, spoil, draft_tokens
        self.gen = torch.Generator().manual_seed(0)
        self.rounds = 0

    @property
    def cfg(self):
        return self.model.cfg

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return self.model.new_cache(batch, max_len)

    def forward(self, idx: Tensor, cache=None, start: int = 0, **kw):
        return self.model(idx, cache, start, **kw)

    @property
    def speculator(self) -> ModelDrafter:
        return self

    def draft(self, rnd: Round, cache: KVCache) -> Draft:
        out, probs, token = [], [], rnd.last
        for k in range(min(self.draft_tokens, rnd.most)):
            pos = rnd.positions.unsqueeze(1) + k
            logits = self.logits(token, cache, pos, rnd)[:, -1]
            token, p = rnd.sample(logits)
            if self.spoil:
                spoil = [j for j, b in enumerate(self.rows(rnd)) if b in self.spoil]
                noise = torch.randint(0, V, (len(spoil), 1), generator=self.gen)
                token = token.clone()
                token[spoil] = noise
            out.append(token)
            if p is not None:
                probs.append(p)
        return Draft(torch.cat(out, 1), torch.stack(probs, 1) if probs else None)

    def verify(self, rnd: Round, draft: Draft, cache: KVCache) -> Tensor:
        self.rounds += 1
        tokens = torch.cat([rnd.last, draft.tokens], 1)
        positions = rnd.positions.unsqueeze(1) + torch.arange(tokens.shape[1])
        return self.logits(tokens, cache, positions, rnd)

    @staticmethod
    def rows(rnd: Round) -> list[int]:
        return list(range(rnd.last.shape[0])) if rnd.rows is None else rnd.rows.tolist()

    def logits(self, tokens: Tensor, cache: KVCache, positions: Tensor, rnd: Round) -> Tensor:
        """The whole model on the round's rows (which may be fewer than the cache's)."""
        x, ctx = prepare(self.model, tokens, cache, positions, rnd.rows)
        for i in range(self.model.n_layers):
            x = self.model.run_layer(i, x, ctx)
        return self.model.head(x)


def model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                                   max_seq_len=96)).eval()


@pytest.mark.parametrize("spoil", [[], [1], [0, 2]])
def test_greedy_speculative_decoding_equals_plain_greedy(spoil: list[int]) -> None:
    base = model()
    prompt = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(1))
    expected = generate(base, prompt, 40, temperature=0.0)
    drafter = ModelDrafter(base, spoil)
    got = generate(drafter, prompt, 40, temperature=0.0)
    assert torch.equal(got, expected)
    if not spoil:  # every draft accepted: 3 drafted + 1 verified token per round
        assert drafter.rounds == 10
    else:  # spoiled rows advance one token per round, so rounds ~ new tokens
        assert drafter.rounds >= 39


def test_speculative_sampling_keeps_tokens_in_range_and_lengths() -> None:
    base = model()
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(2))
    out = generate(ModelDrafter(base, [1]), prompt, 25, temperature=0.9, top_k=10,
                   generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, 29) and torch.equal(out[:, :4], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < V


def test_speculative_tells_the_speculator_what_each_round_kept() -> None:
    """`observe(accepted, active)` after every round: drafts kept per row, rows still going."""
    base = model()
    prompt = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(1))
    drafter = ModelDrafter(base, spoil=[1])
    seen: list[tuple[list[int], list[bool]]] = []
    drafter.observe = lambda accepted, active: seen.append((accepted.tolist(), active.tolist()))
    generate(drafter, prompt, 12, temperature=0.0)
    assert len(seen) == drafter.rounds
    first_accepted, first_active = seen[0]
    assert first_active == [True, True, True]
    assert first_accepted[0] == first_accepted[2] == 3  # unspoiled rows keep every draft
    # rows 0 and 2 finish early; they are then inactive and keep nothing
    assert any(active == [False, True, False] and accepted[0] == accepted[2] == 0
               for accepted, active in seen)


@pytest.mark.parametrize("speculate", [False, True])
def test_prompts_of_different_lengths_decode_as_each_alone(speculate: bool) -> None:
    """`generate_many`: right-padded prefill, the padding invalidated, each row at its own
    positions; plain decoding and the draft/verify loop both give each prompt's own output."""
    base = model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    expected = [generate(base, torch.tensor([p]), 20, temperature=0.0)[0].tolist()
                for p in prompts]
    runner = ModelDrafter(base, spoil=[1]) if speculate else base
    assert generate_many(runner, prompts, 20, temperature=0.0) == expected
