"""Kangaroo's draft adapter (Liu et al. 2024) and the distillation that trains it.

The exit drafter of self-spec (`selfspec.py`) reads the state after the backbone's first E
layers through a small adapter, our own decoder block with its own K/V and norm, and then
the backbone's shared LM head. Only the adapter trains, by distillation to the full model's
next-token distribution with the backbone frozen (`distill`). The adapter keeps its K/V in one
extra cache layer (`extend_cache`), after the backbone's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adadepth.config import ModelConfig
from adadepth.model import Block, Context, KVCache
from adadepth.model.transformer import rope_tables


def adapter_shape(cfg: Any, ffn: int | None) -> ModelConfig:
    """Our block's shape for an adapter over a backbone of shape `cfg`: its width, heads of an
    even size that divide it, and its kv heads where they divide the heads."""
    d = cfg.d_model
    heads = cfg.n_heads if d % cfg.n_heads == 0 and (d // cfg.n_heads) % 2 == 0 else None
    if heads is None:
        heads = next(h for h in range(max(1, d // 64), d + 1) if d % h == 0 and (d // h) % 2 == 0)
    kv = cfg.kv_heads if heads % cfg.kv_heads == 0 else heads
    return ModelConfig(vocab_size=1, d_model=d, n_layers=1, n_heads=heads, n_kv_heads=kv,
                       d_ff=ffn or max(8, cfg.d_ff // 4), max_seq_len=cfg.max_seq_len)


class DraftAdapter(nn.Module):
    """Kangaroo's adapter over the state after layer E: our own decoder block (attention with its
    own rotary positions and K/V, then a small SwiGLU FFN unless `attention_only`) and a norm of
    its own, initialised as the backbone's final norm, before the shared LM head. The output
    projections start at zero, so the untrained adapter is a plain early exit."""

    def __init__(self, backbone: nn.Module, ffn: int | None, attention_only: bool) -> None:
        super().__init__()
        self.shape = adapter_shape(backbone.cfg, ffn)
        self.block = Block(self.shape)
        if attention_only:
            self.block.ffn_norm = nn.Identity()
            self.block.ffn = ZeroFFN()
        for name, p in self.block.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.zeros_(p)
        self.norm = backbone.make_norm()
        cos, sin = rope_tables(self.shape.head_dim, self.shape.max_seq_len, 10000.0)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope(self, ctx: Context) -> tuple[Tensor, Tensor]:
        if ctx.start is not None and ctx.positions.shape[0] == 1 and ctx.pad is None:
            end = ctx.start + ctx.length
            return (self.rope_cos[ctx.start:end].unsqueeze(0),
                    self.rope_sin[ctx.start:end].unsqueeze(0))
        return self.rope_cos[ctx.positions], self.rope_sin[ctx.positions]

    def forward(self, x: Tensor, ctx: Context, slot: int) -> Tensor:
        """The adapter's output state (before its norm); with a cache it reads and writes its
        K/V at cache layer `slot`."""
        cos, sin = self.rope(ctx)
        return self.block(x, cos, sin, memo_free(ctx), slot - ctx.kv_offset)

    def write_kv(self, x: Tensor, ctx: Context, slot: int) -> None:
        """Only the adapter's K/V for the tokens of ctx (states at layer E)."""
        ctx = memo_free(ctx)
        attn = self.block.attn
        k, v = attn.keys_values(self.block.attn_norm(x), *self.rope(ctx), ctx)
        ctx.cache.mark(slot, ctx)
        ctx.cache.store(slot, k, v, ctx)


class ZeroFFN(nn.Module):
    """The FFN of an attention-only adapter (Kangaroo's): adds nothing to the residual."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def memo_free(ctx: Context) -> Context:
    """The same call without the backbone's memo: the rotary tables cached there are the
    backbone's, not the adapter's (its heads may differ in size)."""
    return replace(ctx, memo={})


def extend_cache(cache: KVCache, kv_heads: int, head_dim: int) -> KVCache:
    """`cache` with one more layer of its own shape (the adapter's K/V)."""
    ref = cache.k[0]
    shape = (cache.batch, kv_heads, cache.max_len + 1, head_dim)
    cache.k.append(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
    cache.v.append(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
    cache.valid = torch.cat([cache.valid, torch.zeros_like(cache.valid[:1])])
    cache.extent.append(0)
    cache.complete.append(True)
    return cache


def output_layer(backbone: nn.Module) -> nn.Linear | None:
    """The backbone's unembedding as a plain linear layer, when it is one (then the draft can
    read it over a subset of the vocabulary, and distillation can fuse it with its loss)."""
    hf = getattr(backbone, "hf", None)
    layer = hf.get_output_embeddings() if hf is not None else getattr(backbone, "lm_head", None)
    if type(layer) is not nn.Linear:
        return None
    if hf is not None and getattr(hf.config, "final_logit_softcapping", None):
        return None
    return layer


# -- distillation -----------------------------------------------------------------------------
class FusedDistill(torch.autograd.Function):
    """KL(p_teacher || q_student) summed over positions, through one linear head, chunk by
    chunk: each chunk's logits exist only while it is processed, and the gradient with respect
    to the student's normed states ((q - p) W per position) is computed there too, so the
    backward pass needs no logits at all. Also returns, per position, the argmax of each."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, weight: Tensor,
                chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        grad = torch.empty_like(student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        t_arg = torch.empty(student.shape[0], dtype=torch.long, device=student.device)
        s_arg = torch.empty_like(t_arg)
        for a in range(0, student.shape[0], chunk):
            s_logits = F.linear(student[a:a + chunk], weight).float()
            t_logits = F.linear(teacher[a:a + chunk], weight).float()
            t_logp, s_logp = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
            p = t_logp.exp()
            total += (p * (t_logp - s_logp)).sum()
            grad[a:a + chunk] = ((s_logp.exp() - p) @ weight.float()).to(grad.dtype)
            t_arg[a:a + chunk], s_arg[a:a + chunk] = t_logits.argmax(-1), s_logits.argmax(-1)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(t_arg, s_arg)
        return total, t_arg, s_arg

    @staticmethod
    def backward(ctx: Any, g: Tensor, *_: Any) -> tuple[Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def distill(student: Tensor, teacher: Tensor, unembed: Callable[[Tensor], Tensor],
            layer: nn.Linear | None, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Summed KL(p || q) of normed states (N, d) read through the head, and the argmax of each
    per position; chunked either way (fused with a plain linear head, else recomputed in the
    backward pass by checkpointing each chunk)."""
    if layer is not None and layer.bias is None:
        return FusedDistill.apply(student, teacher.detach(), layer.weight.detach(), chunk)

    def piece(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s_logits = unembed(s).float()
        with torch.no_grad():
            t_logits = unembed(t).float()
            t_logp = t_logits.log_softmax(-1)
        s_logp = s_logits.log_softmax(-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum()
        return kl, t_logits.argmax(-1), s_logits.detach().argmax(-1)

    total = student.new_zeros((), dtype=torch.float32)
    t_args, s_args = [], []
    for a in range(0, student.shape[0], chunk):
        kl, ta, sa = checkpoint(piece, student[a:a + chunk], teacher[a:a + chunk].detach(),
                                use_reentrant=False)
        total = total + kl
        t_args.append(ta)
        s_args.append(sa)
    return total, torch.cat(t_args), torch.cat(s_args)
