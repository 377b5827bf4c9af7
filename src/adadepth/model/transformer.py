"""A decoder-only transformer: pre-norm RMSNorm, RoPE, SwiGLU, optional tied embeddings.

The core knows nothing of training, data or parallelism. Every adaptive-depth method is built on
the *layer-stack interface* below (`LayerStack`, `model/stack.py`), which the Hugging Face
adapters (`adadepth.hf.adapters`) implement too, so a method written once runs on both:

- `embed(idx)` / `embed_soft(probs)`: token embeddings, and the embedding of a distribution over
  the vocabulary (a looped model's pondering input);
- `prepare(idx | embeds=..., cache, start | positions=..., call=...)`: the hidden states a pass
  starts from and the `Context` of the call (rows, absolute positions, cache, and the method's
  per-call instructions `call`; see `model/cache.py`);
- `run_layer(i, x, ctx)`: one block on the tokens of `ctx`, which may be a subset chosen with
  `ctx.select(...)` (whole-block skipping), attending to what the cache holds for them;
- `run_attention(i, x, ctx)` / `run_ffn(i, h, ctx)`: the block's two sub-blocks, each with its
  residual, whose composition is `run_layer` exactly (skipping attention alone per token);
- `write_kv(i, x, ctx)`: only the block's keys and values, for tokens whose state is copied up
  past the layer (early exit, halted tokens);
- `get_ffn(i)` / `set_ffn(i, module)`: each block's FFN is its own module, called on the
  normalised input, so routing can swap in a per-token choice; a module with
  `takes_context = True` is called as `ffn(u, ctx)` and reads the call's instructions there;
- `final_norm(h)`, `unembed(normed)`, `head(h)`: the unembedding is its own seam, so late-layer
  heads can share it with their own norms (`make_norm()` copies the final one);
- `new_cache(batch, max_len, sets)`: a `KVCache` for all layers (times `sets`: a looped model
  keeps one set per pass and runs pass i with `ctx.with_kv_offset(i * n_layers)`).
`forward` is just the chain prepare -> run_layer* -> head.

Where a method goes: `adadepth/depth/` (docs/adding-a-method.md).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adadepth.config import ModelConfig
from adadepth.model.cache import Context, KVCache, attention_mask

# The fused forward that also returns 1/rms (torch >= 2.8); older releases take F.rms_norm.
_fused_rms_norm = getattr(torch, "_fused_rms_norm", None)


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm with a hand-written backward, for float32 on the CPU.

    On the CPU `F.rms_norm` has a fused forward but autograd differentiates its composite
    definition, about twenty elementwise kernels per norm in the backward pass; at the `tiny`
    width that was a visible share of a training step. Same math: y = x * rstd * w with
    rstd = 1 / sqrt(mean(x^2) + eps), so dx = rstd * (g*w - xhat * mean(g*w * xhat)).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = _fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        xhat = x * rstd
        grad_w = (grad * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad * weight
            mean = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(x.shape[-1])
            grad_x = torch.addcmul(g, xhat, mean, value=-1).mul_(rstd)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        # Under torch.compile the composite is traced instead: inductor fuses its backward.
        if (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
                and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
                and _fused_rms_norm is not None and not torch.compiler.is_compiling()):
            return _RMSNormCPU.apply(x, w, self.eps)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate halves (the Llama convention). x: (B, H, T, hd); cos/sin: (B or 1, T, hd/2).

    The reference form; the blocks run the same rotation through `rotate`, in fewer kernels.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


@dataclass
class Rotation:
    """RoPE tables laid out for `rotate` on (B, T, heads, hd) tensors.

    `cos2` is (cos, cos), (B or 1, T, 1, hd); `sin1` is sin, (B or 1, T, 1, hd/2); `cos` and `sin`
    are the (B or 1, T, hd/2) tables they were built from.
    """

    cos: Tensor
    sin: Tensor
    cos2: Tensor
    sin1: Tensor

    @classmethod
    def of(cls, cos: Tensor, sin: Tensor) -> Rotation:
        c = cos.unsqueeze(2)
        return cls(cos, sin, torch.cat((c, c), -1), sin.unsqueeze(2))


def _rotated(x: Tensor, rot: Rotation, sign: float) -> Tensor:
    """(x1, x2) -> (x1 cos - s x2 sin, x2 cos + s x1 sin) in float32, s = sign (-1: the
    transpose, for the backward pass). Each half is updated in place from the other half of x:
    no swapped copy of x is built (on a strided slice of the q/k/v output, such a copy cost
    several times the whole rotation)."""
    xf = x.float()
    half = x.shape[-1] // 2
    out = xf * rot.cos2
    out[..., :half].addcmul_(xf[..., half:], rot.sin1, value=-sign)
    out[..., half:].addcmul_(xf[..., :half], rot.sin1, value=sign)
    return out


class _Rotate(torch.autograd.Function):
    """RoPE with its transpose as the backward: three kernels each way, where autograd through
    `apply_rope`'s chunk/mul/cat form runs about a dozen."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rot: Rotation) -> Tensor:
        ctx.rot, ctx.dtype = rot, x.dtype
        return _rotated(x, rot, 1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _rotated(grad, ctx.rot, -1.0).to(ctx.dtype), None


def rotate(x: Tensor, rot: Rotation) -> Tensor:
    """RoPE on x: (B, T, heads, hd), the same rotation as `apply_rope` (which is (B, H, T, hd))."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotate.apply(x, rot)
    return _rotated(x, rot, 1.0).to(x.dtype)


def rotation(ctx: Context, cos: Tensor, sin: Tensor) -> Rotation:
    """The call's `Rotation`, built once and shared by its layers (the memo lives with ctx)."""
    rot = ctx.memo.get("rotation")
    if rot is None or rot.cos is not cos or rot.sin is not sin:
        rot = ctx.memo["rotation"] = Rotation.of(cos, sin)
    return rot


def _bare(*layers: nn.Module) -> bool:
    """True when these are plain bias-free `nn.Linear`s with no hooks, so one matmul over their
    stacked weights computes exactly what calling each would (a subclass, an adapter or a hook
    must still be called)."""
    return all(type(m) is nn.Linear and m.bias is None and not m._forward_hooks
               and not m._forward_pre_hooks for m in layers)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def keys_values(self, x: Tensor, cos: Tensor, sin: Tensor,
                    ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        rot = rotation(ctx, cos, sin) if ctx is not None else Rotation.of(cos, sin)
        k = rotate(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), rot)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: Context, layer: int) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        rot = rotation(ctx, cos, sin)
        if _bare(self.q_proj, self.k_proj, self.v_proj):
            # One matmul for q, k and v, and one rotation for q and k together: at small widths
            # a step is dominated by the number of kernels, not by their FLOPs.
            w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
            # split, not slicing: its backward is one concatenation, where each slice's
            # backward fills a zero tensor of the whole size and the pieces are then added.
            qk, v = F.linear(x, w).view(B, T, H + 2 * Hkv, hd).split((H + Hkv, Hkv), dim=2)
            q, k = rotate(qk, rot).split((H, Hkv), dim=2)
        else:
            q = rotate(self.q_proj(x).view(B, T, H, hd), rot)
            k = rotate(self.k_proj(x).view(B, T, Hkv, hd), rot)
            v = self.v_proj(x).view(B, T, Hkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        n, slot = T, ctx.kv_offset + layer
        if ctx.cache is not None:
            n = ctx.cache.mark(slot, ctx)
            ctx.cache.store(slot, k, v, ctx)
            k, v = ctx.cache.view(slot, ctx)
        mask, causal = attention_mask(ctx, slot, n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """The dense FFN; its own module so adaptive methods can replace it per token."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if _bare(self.gate_proj, self.up_proj):  # one matmul for both (see Attention.forward)
            gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))
                                ).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: Context, layer: int) -> Tensor:
        return self.feed(self.attend(x, cos, sin, ctx, layer), ctx)

    def attend(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: Context, layer: int) -> Tensor:
        """The attention sub-block with its residual: x + attn(norm(x))."""
        return x + self.attn(self.attn_norm(x), cos, sin, ctx, layer)

    def feed(self, h: Tensor, ctx: Context) -> Tensor:
        """The FFN sub-block with its residual: h + ffn(norm(h))."""
        u = self.ffn_norm(h)
        return h + (self.ffn(u, ctx) if getattr(self.ffn, "takes_context", False)
                    else self.ffn(u))


class Output:
    """A forward's result: the final hidden state (before the last norm) and the logits, given,
    or computed from the hidden state by `head` when first read. `loss` never needs them all at
    once: with a head it computes the LM loss position chunk by position chunk."""

    def __init__(self, logits: Tensor | None = None, hidden: Tensor | None = None, *,
                 head: Callable[[Tensor], Tensor] | None = None) -> None:
        if logits is None and (head is None or hidden is None):
            raise ValueError("an Output needs its logits, or a hidden state and a head")
        self._logits, self.hidden, self.head = logits, hidden, head

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            assert self.head is not None and self.hidden is not None
            self._logits = self.head(self.hidden)
        return self._logits

    def loss(self, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the next tokens `targets` (B, T), in nats, computed in fp32."""
        if self._logits is not None or self.head is None:
            return causal_lm_loss(self.logits, targets, reduction)
        assert self.hidden is not None
        return chunked_lm_loss(self.head, self.hidden, targets, reduction)


class Transformer(nn.Module):
    """The dense model, implementing the layer-stack interface of the module docstring."""

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

    def new_cache(self, batch: int, max_len: int | None = None, sets: int = 1) -> KVCache:
        """K/V for `sets` copies of the layer stack (a looped model keeps one per pass)."""
        p = self.lm_head.weight
        return KVCache(self.n_layers * sets, batch, self.cfg.kv_heads,
                       max_len or self.cfg.max_seq_len, self.cfg.head_dim, device=p.device,
                       dtype=p.dtype)

    # -- embedding --------------------------------------------------------------------------------
    def embed(self, idx: Tensor) -> Tensor:
        return self.tok_embeddings(idx)

    def embed_soft(self, probs: Tensor) -> Tensor:
        """The embedding of a distribution over the vocabulary: sum_v p_v * E_v."""
        return probs.to(self.tok_embeddings.weight.dtype) @ self.tok_embeddings.weight

    def prepare(self, idx: Tensor | None = None, cache: KVCache | None = None, start: int = 0, *,
                embeds: Tensor | None = None, positions: Tensor | None = None,
                call: Any = None) -> tuple[Tensor, Context]:
        """The hidden states a pass starts from (token ids embedded, or `embeds` as given) and the
        context of the call: positions start..start+T for every row, or `positions` (B, T)."""
        x = self.embed(idx) if embeds is None else embeds
        B, T = x.shape[:2]
        if positions is None:
            ctx = Context.block(start, T, x.device, cache, call)
        else:
            ctx = Context.at(positions.to(x.device), cache, call)
        if ctx.end > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {ctx.end} exceeds max_seq_len {self.cfg.max_seq_len}")
        return x, ctx

    def rope(self, ctx: Context) -> tuple[Tensor, Tensor]:
        """Rotary tables of the call's positions, (B' or 1, T, head_dim/2), built once per call."""
        if "rope" not in ctx.memo:
            if ctx.start is not None and ctx.positions.shape[0] == 1 and ctx.pad is None:
                end = ctx.start + ctx.length
                ctx.memo["rope"] = (self.rope_cos[ctx.start:end].unsqueeze(0),
                                    self.rope_sin[ctx.start:end].unsqueeze(0))
            else:
                ctx.memo["rope"] = (self.rope_cos[ctx.positions], self.rope_sin[ctx.positions])
        return ctx.memo["rope"]

    # -- the blocks -------------------------------------------------------------------------------
    def run_layer(self, layer: int, x: Tensor, ctx: Context) -> Tensor:
        cos, sin = self.rope(ctx)
        return self.blocks[layer](x, cos, sin, ctx, layer)

    def run_attention(self, layer: int, x: Tensor, ctx: Context) -> Tensor:
        """Only block `layer`'s attention sub-block (with its residual); `run_ffn` of its
        output is `run_layer`, exactly."""
        cos, sin = self.rope(ctx)
        return self.blocks[layer].attend(x, cos, sin, ctx, layer)

    def run_ffn(self, layer: int, h: Tensor, ctx: Context) -> Tensor:
        """Only block `layer`'s FFN sub-block (with its residual), on any tokens: it is
        position-wise."""
        return self.blocks[layer].feed(h, ctx)

    def write_kv(self, layer: int, x: Tensor, ctx: Context) -> None:
        """Only the K/V of block `layer` for the tokens of ctx, written to ctx.cache."""
        if ctx.cache is None:
            raise ValueError("write_kv needs a cache to write to")
        block = self.blocks[layer]
        k, v = block.attn.keys_values(block.attn_norm(x), *self.rope(ctx), ctx)
        ctx.cache.mark(ctx.kv_offset + layer, ctx)
        ctx.cache.store(ctx.kv_offset + layer, k, v, ctx)

    # -- the head ---------------------------------------------------------------------------------
    def unembed(self, normed: Tensor) -> Tensor:
        return self.lm_head(normed)

    def head(self, hidden: Tensor) -> Tensor:
        return self.unembed(self.final_norm(hidden))

    def make_norm(self) -> nn.Module:
        """A new norm initialised as the final one, for a head read at another layer."""
        return copy.deepcopy(self.final_norm)

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Any = None) -> Output:
        x, ctx = self.prepare(idx, cache, start, positions=positions, call=call)
        for i in range(self.n_layers):
            x = self.run_layer(i, x, ctx)
        return Output(hidden=x, head=self.head)


def causal_lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy in nats per token, computed in fp32."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
    return loss if reduction == "mean" else loss.view(targets.shape)


# Logits computed at once in one piece of a chunked loss: 2^24 floats, 64 MiB in fp32 (341
# positions of SmolLM2's 49,152-token vocabulary, 64 of a 262k one).
CHUNK_LOGITS = 2**24


def chunked_lm_loss(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor,
                    reduction: str = "mean", chunk: int | None = None) -> Tensor:
    """`causal_lm_loss(head(hidden), targets)` without ever holding the logits of more than
    `chunk` positions (default: CHUNK_LOGITS logits' worth): each piece's logits are computed,
    reduced to its losses and dropped; in the backward pass they are recomputed (activation
    checkpointing), so peak memory is one piece's logits whatever the batch and vocabulary.
    When the whole call fits in one piece, it is the plain loss, to the bit."""
    flat_h, flat_t = hidden.flatten(0, -2), targets.flatten()
    n = flat_t.numel()
    if chunk is None:
        with torch.no_grad():  # the vocabulary size, from one position's logits
            vocab = head(flat_h[:1]).shape[-1]
        chunk = max(1, CHUNK_LOGITS // vocab)
    if n <= chunk:
        return causal_lm_loss(head(hidden), targets, reduction)

    def piece(h: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="none")

    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts = [checkpoint(piece, flat_h[i:i + chunk], flat_t[i:i + chunk], use_reentrant=False)
             if grad else piece(flat_h[i:i + chunk], flat_t[i:i + chunk])
             for i in range(0, n, chunk)]
    losses = torch.cat(parts)
    return losses.mean() if reduction == "mean" else losses.view(targets.shape)
