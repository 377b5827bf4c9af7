"""Cheap paths: what a token gets at a controlled layer when it does not run the full FFN."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adadepth.depth.registry import register
from adadepth.model.transformer import SwiGLU


class LowRankFFN(nn.Module):
    """d -> r -> d with a GELU; the output starts at zero, so at step 0 cheap means skip."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, u: Tensor) -> Tensor:
        return self.up(nn.functional.gelu(self.down(u)))


class Skip(nn.Module):
    is_skip = True

    def forward(self, u: Tensor) -> Tensor:
        return torch.zeros_like(u)


@register("cheap", "low_rank")
def low_rank(d_model: int, d_ff: int, rank: int | None = None) -> nn.Module:
    return LowRankFFN(d_model, rank or max(1, d_model // 8))


@register("cheap", "skip")
def skip(**_: object) -> nn.Module:
    return Skip()


@register("cheap", "narrow")
def narrow(d_model: int, d_ff: int, rank: int | None = None) -> nn.Module:
    """A small dense SwiGLU (width d_ff/8 unless rank is given), output zero-initialised."""
    ffn = SwiGLU(d_model, rank or max(1, d_ff // 8))
    nn.init.zeros_(ffn.down_proj.weight)
    return ffn
