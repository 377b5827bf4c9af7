"""A decoder-only transformer: pre-norm RMSNorm, RoPE, SwiGLU, optional tied embeddings, KV cache.

The core knows nothing of training, data or parallelism. Adaptive-depth methods plug in at three
seams, without subclassing:
- each block's `ffn` is its own module, so routing can swap it for a per-token choice;
- `Transformer.blocks` is a plain ModuleList a method may run itself (looping, early exit,
  block skipping), with `embed`, `final_norm`, `logits` and the RoPE tables as building blocks;
- attention takes explicit positions and a per-layer `KVCache`, so a method can write the K/V of
  any subset of tokens (halted, exited or skipped tokens keep a correct cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adadepth.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate halves (the Llama convention). x: (B, H, T, hd); cos/sin: (B or 1, T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, indexed by absolute position."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, *, device=None,
                 dtype=torch.float32) -> None:
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.length = 0

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write K/V for positions start..start+T and return everything up to there."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked for {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = max(self.length, end)
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                start: int = 0) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start)
        mask = None
        if k.shape[2] != T and T > 1:
            # Queries sit at the end of the cached keys: causal with an offset.
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """The dense FFN; its own module so adaptive methods can replace it per token."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module = SwiGLU(cfg.d_model, cfg.d_ff)

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                  start: int = 0) -> Tensor:
        """The attention half: h = x + Attn(Norm(x))."""
        return x + self.attn(self.attn_norm(x), cos, sin, cache, start)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                start: int = 0) -> Tensor:
        h = self.attention(x, cos, sin, cache, start)
        return h + self.ffn(self.ffn_norm(h))


@dataclass
class Output:
    logits: Tensor
    hidden: Tensor  # final hidden state before the last norm


@dataclass
class Context:
    """What every layer of one forward call shares: RoPE tables, start position, the cache."""

    cos: Tensor
    sin: Tensor
    start: int = 0
    cache: list[KVCache] | None = None


class Transformer(nn.Module):
    """The dense model. `prepare`, `run_layer` and `head` are the layer-stack interface that
    adaptive methods (and the Hugging Face adapters) share; `forward` is just their chain."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Scaled init of residual projections (GPT-2) keeps the stream's variance depth-free.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def get_ffn(self, layer: int) -> nn.Module:
        return self.blocks[layer].ffn

    def set_ffn(self, layer: int, module: nn.Module) -> None:
        self.blocks[layer].ffn = module

    def new_cache(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        p = self.lm_head.weight
        return [KVCache(batch, self.cfg.kv_heads, max_len or self.cfg.max_seq_len,
                        self.cfg.head_dim, device=p.device, dtype=p.dtype)
                for _ in self.blocks]

    def prepare(self, idx: Tensor, cache: list[KVCache] | None = None,
                start: int = 0) -> tuple[Tensor, Context]:
        """Embed tokens and build the per-call context for positions start..start+T."""
        T = idx.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} exceeds max_seq_len {self.cfg.max_seq_len}")
        pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        ctx = Context(self.rope_cos[pos], self.rope_sin[pos], start, cache)
        return self.tok_embeddings(idx), ctx

    def run_layer(self, layer: int, x: Tensor, ctx: Context) -> Tensor:
        cache = None if ctx.cache is None else ctx.cache[layer]
        return self.blocks[layer](x, ctx.cos, ctx.sin, cache, ctx.start)

    def head(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.final_norm(hidden))

    def forward(self, idx: Tensor, cache: list[KVCache] | None = None, start: int = 0) -> Output:
        x, ctx = self.prepare(idx, cache, start)
        for i in range(self.n_layers):
            x = self.run_layer(i, x, ctx)
        return Output(logits=self.head(x), hidden=x)


def causal_lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy in nats per token, computed in fp32."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
    return loss if reduction == "mean" else loss.view(targets.shape)
