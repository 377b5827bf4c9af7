"""The seams every method stands on: blocks on a subset of tokens at their own positions, K/V
written alone, a cache indexed by row and position that stays correct when layers and rows fall
out of step, and writes that autograd can differentiate through. Each test runs on our
transformer and on the Hugging Face families, through the layer-stack interface only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from adadepth.config import ModelConfig
from adadepth.hf.adapters import HFAdapter
from adadepth.model import Transformer
from adadepth.model.transformer import apply_rope

V = 40
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=64)
BACKBONES = ["ours", "llama", "gpt2", "gpt_neox", "gemma3"]


def backbone(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name == "ours":
        return Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4,
                                       n_kv_heads=2, d_ff=48, max_seq_len=64)).eval()
    if name == "llama":
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, num_key_value_heads=2, **SHAPE))
    elif name == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4,
                                        n_positions=64))
    elif name == "gpt_neox":
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, **SHAPE))
    else:  # a window of 3 keeps the sliding layers' masks honest
        hf = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=V, num_key_value_heads=2, head_dim=8, sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **SHAPE))
    return HFAdapter(hf.eval()).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_routers(model, seed: int):
    """A capacity-routed model (Mixture-of-Depths, Router-Tuning) with random router weights,
    its thresholds calibrated to its capacity unless it deploys the paper's fixed rule."""
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for router in model.routers:
            router.linear.weight.copy_(torch.randn(router.linear.weight.shape, generator=gen))
    if model.options.threshold == "calibrated" and model.capacity < 1:
        model.calibrate(tokens(16, 24, seed=seed + 5))
    return model


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", BACKBONES)
def test_selecting_tokens_equals_the_plain_call(name: str) -> None:
    """Every token selected (the gathered path) equals the contiguous path, and a selected
    prefix equals running the prefix alone."""
    bb = backbone(name)
    idx = tokens(2, 9)
    with torch.no_grad():
        x, ctx = bb.prepare(idx)
        plain = bb.run_layer(0, x, ctx)
        every = torch.arange(9).expand(2, -1)
        close(bb.run_layer(0, x, ctx.select(index=every)), plain)
        prefix = torch.arange(4).expand(2, -1)
        xp, ctxp = bb.prepare(idx[:, :4])
        close(bb.run_layer(0, x[:, :4], ctx.select(index=prefix)), bb.run_layer(0, xp, ctxp))


def reference_subset_block(model: Transformer, layer: int, x: torch.Tensor,
                           positions: torch.Tensor) -> torch.Tensor:
    """Our block written out by hand: RoPE at the given positions, causal by position."""
    block, cfg = model.blocks[layer], model.cfg
    attn = block.attn
    B, T, _ = x.shape
    u = block.attn_norm(x)
    q = attn.q_proj(u).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = attn.k_proj(u).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
    v = attn.v_proj(u).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = cfg.n_heads // cfg.kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    allowed = positions.unsqueeze(-1) >= positions.unsqueeze(-2)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    out = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, -1)
    h = x + attn.o_proj(out)
    return h + block.ffn(block.ffn_norm(h))


def test_a_subset_attends_only_to_itself_at_its_own_positions() -> None:
    model = backbone("ours")
    idx = tokens(2, 12)
    chosen = torch.tensor([[0, 3, 4, 9, 11], [1, 2, 6, 7, 8]])
    with torch.no_grad():
        x, ctx = model.prepare(idx)
        sub = x.gather(1, chosen.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        got = model.run_layer(1, sub, ctx.select(index=chosen))
        close(got, reference_subset_block(model, 1, sub, chosen))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def skip_pattern(batch: int, length: int, layers: int, seed: int = 3) -> torch.Tensor:
    """(B, T, L) which tokens run which blocks; the first token runs all (it has no past)."""
    runs = torch.rand(batch, length, layers, generator=torch.Generator().manual_seed(seed)) < 0.6
    runs[:, 0] = True
    return runs


def ragged(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) positions of each row's chosen tokens, padded by repeating the last one."""
    width = int(chosen.sum(1).max())
    index = torch.zeros(chosen.shape[0], width, dtype=torch.long)
    pad = torch.ones(chosen.shape[0], width, dtype=torch.bool)
    for b, row in enumerate(chosen):
        pos = row.nonzero().squeeze(1)
        index[b, :len(pos)], pad[b, :len(pos)] = pos, False
        index[b, len(pos):] = pos[-1]
    return index, pad


def subset_forward(bb, idx: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """No cache: each block runs on each row's chosen tokens only (whole-block skipping)."""
    x, ctx = bb.prepare(idx)
    for layer in range(bb.n_layers):
        out = x.clone()
        for b in range(idx.shape[0]):
            chosen = runs[b, :, layer].nonzero().squeeze(1).unsqueeze(0)
            row = ctx.select(rows=torch.tensor([b]), index=chosen)
            sub = gather_rows(x[b:b + 1], chosen)
            out[b:b + 1].scatter_(1, chosen.unsqueeze(-1).expand_as(sub),
                                  bb.run_layer(layer, sub, row))
        x = out
    return x


@pytest.mark.parametrize("name", BACKBONES)
def test_cached_decoding_with_skipped_blocks_equals_the_subset_forward(name: str) -> None:
    """A token that skips a block writes no K/V there; later tokens must not see its slot.
    Prefill runs the chosen tokens of 5 positions as a ragged (padded) selection, then every
    further token decodes alone, each block on the rows that chose it."""
    bb = backbone(name)
    B, T, P = 3, 12, 5
    idx = tokens(B, T)
    runs = skip_pattern(B, T, bb.n_layers)
    with torch.no_grad():
        expected = subset_forward(bb, idx, runs)
        cache = bb.new_cache(B, T)
        x, ctx = bb.prepare(idx[:, :P], cache, 0)
        for layer in range(bb.n_layers):  # prefill: rows pick different numbers of tokens
            index, pad = ragged(runs[:, :P, layer])
            sub = gather_rows(x, index)
            sub[pad] = 100.0  # padding carries garbage: it must not reach any real slot
            out = bb.run_layer(layer, sub, ctx.select(index=index, pad=pad))
            new = x.clone()
            for b in range(B):
                real = ~pad[b]
                new[b, index[b, real]] = out[b, real]
            x = new
        close(x, expected[:, :P])
        for t in range(P, T):
            x, ctx = bb.prepare(idx[:, t:t + 1], cache, t)
            for layer in range(bb.n_layers):
                rows = runs[:, t, layer].nonzero().squeeze(1)
                if len(rows):
                    x = x.clone()
                    x[rows] = bb.run_layer(layer, x[rows], ctx.select(rows=rows))
            close(x[:, 0], expected[:, t])


@pytest.mark.parametrize("name", BACKBONES)
def test_write_kv_copies_exited_states_upward(name: str) -> None:
    """Early exit: an exited token's state is copied up; later tokens still attend to it, at
    every layer, through K/V computed from the copied state alone."""
    bb = backbone(name)
    B, T = 2, 10
    idx = tokens(B, T, seed=4)
    exit_at = torch.randint(0, bb.n_layers + 1, (B, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x, ctx = bb.prepare(idx)
        for layer in range(bb.n_layers):  # reference: every block runs, exited outputs dropped
            out = bb.run_layer(layer, x, ctx)
            x = torch.where((exit_at > layer).unsqueeze(-1), out, x)
        expected = x
        cache = bb.new_cache(B, T)
        for t in range(T):
            x, ctx = bb.prepare(idx[:, t:t + 1], cache, t)
            for layer in range(bb.n_layers):
                active = (exit_at[:, t] > layer).nonzero().squeeze(1)
                exited = (exit_at[:, t] <= layer).nonzero().squeeze(1)
                if len(exited):
                    bb.write_kv(layer, x[exited], ctx.select(rows=exited))
                if len(active):
                    x = x.clone()
                    x[active] = bb.run_layer(layer, x[active], ctx.select(rows=active))
            close(x[:, 0], expected[:, t])


@pytest.mark.parametrize("name", ["ours", "llama"])
def test_writes_under_autograd_match_the_plain_gradients(name: str) -> None:
    """A training forward that writes the cache (slice and index writes, and the same layer
    written again by a second chunk that attends to the first) differentiates like the plain
    forward: writes are out of place while autograd records."""
    grads = []
    idx = tokens(2, 8)
    for mode in ("plain", "slice", "index", "chunks"):
        bb = backbone(name).train()
        if mode == "chunks":
            cache = bb.new_cache(2, 8)
            outs = []
            for start, end in ((0, 5), (5, 8)):
                x, ctx = bb.prepare(idx[:, start:end], cache, start)
                for layer in range(bb.n_layers):
                    x = bb.run_layer(layer, x, ctx)
                outs.append(x)
            x = torch.cat(outs, 1)
        else:
            if mode == "plain":
                x, ctx = bb.prepare(idx)
            else:
                x, ctx = bb.prepare(idx, bb.new_cache(2, 8), 0)
                if mode == "index":
                    ctx = ctx.select(index=torch.arange(8).expand(2, -1))
            for layer in range(bb.n_layers):
                x = bb.run_layer(layer, x, ctx)
        bb.head(x).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for key in grads[0]:
            close(other[key], grads[0][key], 1e-5)


@pytest.mark.parametrize("name", ["ours", "gemma3"])
def test_rows_at_different_positions_and_truncation(name: str) -> None:
    """Rows of one batch decoding at different positions (speculative decoding accepts a
    different number of tokens per row); truncation forgets rejected positions."""
    bb = backbone(name)
    idx = tokens(2, 12, seed=6)
    with torch.no_grad():
        full = bb(idx).logits
        cache = bb.new_cache(2, 12)
        bb(tokens(2, 10, seed=9), cache, 0)  # junk beyond what each row will keep
        lengths = torch.tensor([4, 7])
        for b in range(2):  # the real prefix of each row, written at its rows only
            x, ctx = bb.prepare(idx[b:b + 1, :lengths[b]], cache, 0)
            sub = ctx.select(rows=torch.tensor([b]))
            for layer in range(bb.n_layers):
                x = bb.run_layer(layer, x, sub)
        cache.truncate(lengths)
        for step in range(3):  # then every row advances together, each at its own position
            pos = (lengths + step).unsqueeze(1)
            step_tokens = idx.gather(1, pos)
            logits = bb(step_tokens, cache, positions=pos).logits[:, 0]
            close(logits, full[torch.arange(2), pos[:, 0]])


def test_carry_copies_kv_between_sets() -> None:
    bb = backbone("ours")
    idx = tokens(2, 6)
    with torch.no_grad():
        cache = bb.new_cache(2, 6, sets=2)
        bb(idx, cache, 0)  # set 0 holds every token
        ctx = bb.prepare(idx, cache, 0)[1]
        chosen = torch.tensor([[1, 4], [0, 5]])
        cache.carry(0, bb.n_layers, ctx.select(index=chosen))
        for b in range(2):
            for j in chosen[b].tolist():
                assert torch.equal(cache.k[bb.n_layers][b, :, j], cache.k[0][b, :, j])
                assert cache.valid[bb.n_layers, b, j]
        assert int(cache.valid[bb.n_layers].sum()) == 4


@pytest.mark.parametrize("name", BACKBONES)
def test_attention_then_ffn_is_the_layer(name: str) -> None:
    """`run_ffn(run_attention(x))` is `run_layer(x)` to the bit: on every token, on a ragged
    subset, and decoding into a cache (the K/V written are the layer's). GPT-2 and GPT-NeoX
    layers are not split: a one-line UserError."""
    from adadepth.errors import UserError

    bb = backbone(name)
    idx = tokens(2, 9)
    with torch.no_grad():
        x, ctx = bb.prepare(idx)
        if name in ("gpt2", "gpt_neox"):
            with pytest.raises(UserError, match="not split"):
                bb.run_attention(0, x, ctx)
            return
        for layer in range(bb.n_layers):
            assert torch.equal(bb.run_ffn(layer, bb.run_attention(layer, x, ctx), ctx),
                               bb.run_layer(layer, x, ctx))
        index = torch.tensor([[0, 2, 5, 8], [1, 3, 4, 4]])
        pad = torch.tensor([[False] * 4, [False, False, False, True]])
        sub, sctx = gather_rows(x, index), ctx.select(index=index, pad=pad)
        assert torch.equal(bb.run_ffn(1, bb.run_attention(1, sub, sctx), sctx),
                           bb.run_layer(1, sub, sctx))
        caches = [bb.new_cache(2, 9), bb.new_cache(2, 9)]
        for t in range(9):
            steps = []
            for split, cache in zip((False, True), caches, strict=True):
                h, c = bb.prepare(idx[:, t:t + 1], cache, t)
                for layer in range(bb.n_layers):
                    h = (bb.run_ffn(layer, bb.run_attention(layer, h, c), c) if split
                         else bb.run_layer(layer, h, c))
                steps.append(h)
            assert torch.equal(*steps)
        assert all(torch.equal(a, b) for a, b in zip(caches[0].k, caches[1].k, strict=True))
