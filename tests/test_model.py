"""The dense transformer: shapes, tied embeddings, KV cache, causality, RoPE, FLOPs count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adadepth import flops
from adadepth.config import ModelConfig
from adadepth.generate import generate
from adadepth.model import Transformer

VOCAB = 50


def small(**kw) -> ModelConfig:
    shape = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=64)
    return ModelConfig(**{**shape, **kw})


def build(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small(**kw)).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_layer_stack_interface() -> None:
    model = build()
    idx = tokens(3, 10)
    out = model(idx)
    assert out.logits.shape == (3, 10, VOCAB)
    assert out.hidden.shape == (3, 10, 32)
    x, ctx = model.prepare(idx)
    for i in range(model.n_layers):
        x = model.run_layer(i, x, ctx)
    torch.testing.assert_close(model.head(x), out.logits)
    cache = model.new_cache(3, 20)  # one slot more than asked for: scratch for padding
    assert len(cache) == 3 and cache.k[0].shape == (3, 4, 21, 8)


def test_grouped_query_attention_shapes() -> None:
    model = build(n_kv_heads=2)
    assert model.blocks[0].attn.k_proj.weight.shape == (2 * 8, 32)
    assert model(tokens(2, 7)).logits.shape == (2, 7, VOCAB)
    assert model.new_cache(2).k[0].shape == (2, 2, 65, 8)


def test_sequence_longer_than_context_is_refused() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        build()(tokens(1, 65))


def test_tied_embeddings_share_one_tensor() -> None:
    tied, untied = build(), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    assert untied.lm_head.weight is not untied.tok_embeddings.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == VOCAB * 32
    # A gradient step through the head moves the embedding too.
    tied.lm_head.weight.data.add_(1.0)
    assert torch.equal(tied.tok_embeddings.weight, tied.lm_head.weight)


def test_ffn_is_replaceable_per_layer() -> None:
    model = build()
    idx = tokens(1, 5)
    before = model(idx).logits
    zero = nn.Linear(32, 32, bias=False)
    nn.init.zeros_(zero.weight)
    model.set_ffn(1, zero)
    assert model.get_ffn(1) is zero
    assert not torch.allclose(model(idx).logits, before)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_greedy_generation_with_cache_equals_recomputation(kv_heads: int | None) -> None:
    model = build(n_kv_heads=kv_heads)
    prompt = tokens(2, 6)
    cached = generate(model, prompt, 20, temperature=0.0, use_cache=True)
    recomputed = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 26)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :6], prompt)


def test_chunk_into_non_empty_cache_matches_full_forward() -> None:
    model = build()
    idx = tokens(2, 17)
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(2, 17)
        parts = [model(idx[:, :5], cache, 0).logits,  # prefill
                 model(idx[:, 5:6], cache, 5).logits,  # one token
                 model(idx[:, 6:17], cache, 6).logits]  # a multi-token chunk after the prefix
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_respects_top_k_and_seed() -> None:
    model = build()
    prompt = tokens(2, 3)

    def sample(seed: int) -> torch.Tensor:
        return generate(model, prompt, 10, temperature=1.0, top_k=1,
                        generator=torch.Generator().manual_seed(seed))

    greedy = generate(model, prompt, 10, temperature=0.0)
    assert torch.equal(sample(0), greedy)  # top-1 sampling is greedy whatever the seed
    assert torch.equal(sample(1), greedy)


def test_future_tokens_do_not_change_earlier_logits() -> None:
    model = build()
    idx = tokens(1, 12)
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rope_makes_attention_depend_on_relative_position_only() -> None:
    # The same tokens placed at absolute offset 0 or 20 (no cache) see the same relative
    # distances, so the logits agree; a model that ignored positions would pass this too,
    # hence the second check that reordering tokens does change them.
    model = build()
    idx = tokens(2, 9)
    with torch.no_grad():
        at_zero = model(idx, start=0).logits
        shifted = model(idx, start=20).logits
        swapped = model(idx.flip(1)).logits.flip(1)
    torch.testing.assert_close(shifted, at_zero, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(swapped[:, -1], at_zero[:, -1], atol=1e-3)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2, "tie_embeddings": False}])
def test_forward_flops_match_a_count_of_linear_weights(kw: dict) -> None:
    model = build(**kw)
    cfg = model.cfg
    # Every Linear is applied once per token; a multiply-add is 2 FLOPs. Tied weights still run
    # twice (lookup is free, the head is a matmul): count modules, not parameters.
    linear_flops = sum(2 * m.in_features * m.out_features
                       for m in model.modules() if isinstance(m, nn.Linear))
    counted = flops.forward_per_token(cfg, context=10.0)
    assert counted["attn_proj"] + counted["ffn"] + counted["lm_head"] == linear_flops
    assert counted["lm_head"] == 2 * cfg.d_model * VOCAB
    # Scores and the value sum: 2 matmuls of head_dim per key per head, per layer.
    assert counted["attn_scores"] == cfg.n_layers * 2 * 2 * 10.0 * cfg.n_heads * cfg.head_dim
    assert flops.module_flops(model) == linear_flops
    assert flops.train_per_token(cfg, 10.0) == 3 * sum(counted.values())
    assert flops.causal_context(64) == 32.5


def test_chunked_lm_loss_equals_the_plain_loss_and_its_gradient() -> None:
    """Pieces of 7 positions (the head is never called on more), forward and backward, and
    per-token losses; a call that fits one piece is the plain loss to the bit."""
    from adadepth.model import causal_lm_loss, chunked_lm_loss

    torch.manual_seed(0)
    weight = torch.randn(300, 16)
    seen: list[int] = []

    def head(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[0] if h.dim() == 2 else h.shape[0] * h.shape[1])
        return h @ weight.T

    hidden = torch.randn(3, 50, 16, requires_grad=True)
    targets = torch.randint(0, 300, (3, 50))
    chunked = chunked_lm_loss(head, hidden, targets, chunk=7)
    (grad_chunked,) = torch.autograd.grad(chunked, hidden)
    assert max(seen) <= 7 and len(seen) >= 2 * 22  # forward pieces, then their recomputation
    plain = causal_lm_loss(hidden @ weight.T, targets)
    (grad_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(grad_chunked, grad_plain)
    per_token = chunked_lm_loss(head, hidden.detach(), targets, "none", chunk=7)
    torch.testing.assert_close(per_token, causal_lm_loss(hidden.detach() @ weight.T, targets,
                                                         "none"))
    whole = chunked_lm_loss(head, hidden, targets, chunk=150)
    assert torch.equal(whole, plain)


def test_a_large_vocabulary_loss_never_holds_the_batch_logits() -> None:
    """A model whose head would give 4 x 256 x 262,144 logits (1 GiB in fp32): its loss never
    calls the head on more than CHUNK_LOGITS worth of positions."""
    from adadepth.model import transformer

    cfg = ModelConfig(vocab_size=262_144, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                      max_seq_len=256)
    model = Transformer(cfg)
    calls: list[int] = []
    unembed = model.unembed
    model.unembed = lambda h: (calls.append(h.numel() // h.shape[-1]), unembed(h))[1]
    idx = torch.randint(0, cfg.vocab_size, (4, 256))
    loss = model(idx).loss(idx)
    loss.backward()
    limit = transformer.CHUNK_LOGITS // cfg.vocab_size
    assert len(calls) > 4 and max(calls) <= limit
