"""Cheap paths: what a token gets at a controlled layer when it does not run the full FFN.

`low_rank` (the default of the study presets), `skip` and `narrow` start at zero output, so at
step 0 "cheap" means "skip" (our reading of the paper). `pruned` starts as a reduced copy of the
full FFN itself: its most important intermediate neurons on calibration text (structured
pruning), with the output projection refitted by least squares to the full FFN's outputs, so
that over a pretrained model "cheap" at step 0 is already close to "full" (ours).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adadepth.depth.registry import register
from adadepth.errors import UserError
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


def gated(full: nn.Module | None) -> bool:
    """True for a gated FFN down(act(gate(u)) * up(u)) with plain projections: ours (SwiGLU),
    Llama's and Gemma's MLPs; the FFNs `pruned` can copy neurons of."""
    return full is not None and all(
        isinstance(getattr(full, name, None), nn.Linear)
        for name in ("gate_proj", "up_proj", "down_proj"))


def activation(full: nn.Module) -> nn.Module:
    """The gate activation of a gated FFN, as a module (ours applies SiLU as a function)."""
    act = getattr(full, "act_fn", None)
    return act if isinstance(act, nn.Module) else nn.SiLU()


class PrunedFFN(nn.Module):
    """A gated FFN of `width` intermediate neurons, d -> width -> d, copied from the full FFN
    by `init_from` (until then its output is zero: cheap means skip)."""

    def __init__(self, d_model: int, width: int, act: nn.Module, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, width, bias=bias)
        self.up_proj = nn.Linear(d_model, width, bias=bias)
        self.down_proj = nn.Linear(width, d_model, bias=bias)
        nn.init.zeros_(self.down_proj.weight)
        if bias:
            nn.init.zeros_(self.down_proj.bias)
        self.act = act

    def hidden(self, u: Tensor) -> Tensor:
        return self.act(self.gate_proj(u)) * self.up_proj(u)

    def forward(self, u: Tensor) -> Tensor:
        return self.down_proj(self.hidden(u))

    @torch.no_grad()
    def init_from(self, full: nn.Module, inputs: list[Tensor], ridge: float = 1e-3) -> Tensor:
        """Keep the full FFN's `width` neurons of largest mean |act(gate) * up| x |down column|
        on `inputs` (its normalised inputs on calibration text), then refit the output
        projection by ridge regression to the full FFN's outputs on them (the dropped neurons'
        mean contribution goes into it); keeping every neuron copies the FFN exactly. Returns
        the kept neurons."""
        act = activation(full)
        width, d_ff = self.down_proj.in_features, full.down_proj.in_features
        score = torch.zeros(d_ff, dtype=torch.float64)
        for u in inputs:
            h = act(full.gate_proj(u)) * full.up_proj(u)
            score += h.abs().flatten(0, -2).double().sum(0).cpu()
        score *= full.down_proj.weight.double().norm(dim=0).cpu()
        kept = score.topk(width).indices.sort().values.to(full.down_proj.weight.device)
        for name in ("gate_proj", "up_proj"):
            source, target = getattr(full, name), getattr(self, name)
            target.weight.copy_(source.weight[kept])
            if target.bias is not None:
                target.bias.copy_(source.bias[kept])
        self.down_proj.weight.copy_(full.down_proj.weight[:, kept])
        if self.down_proj.bias is not None:
            self.down_proj.bias.copy_(full.down_proj.bias)
        if width < d_ff:
            self.refit(full, inputs, ridge)
        return kept

    def refit(self, full: nn.Module, inputs: list[Tensor], ridge: float) -> None:
        """down_proj = argmin sum ||down(h_kept) - full(u)||^2 + ridge * tr(H^T H)/k ||down||^2
        over the calibration inputs (normal equations in float64)."""
        k = self.down_proj.in_features
        gram = torch.zeros(k, k, dtype=torch.float64)
        cross = torch.zeros(k, self.down_proj.out_features, dtype=torch.float64)
        for u in inputs:
            h = self.hidden(u).flatten(0, -2).double().cpu()
            target = full(u).flatten(0, -2).double().cpu()
            if self.down_proj.bias is not None:
                target = target - self.down_proj.bias.double().cpu()
            gram += h.T @ h
            cross += h.T @ target
        gram += torch.eye(k, dtype=torch.float64) * ridge * gram.diagonal().mean()
        weight = torch.linalg.solve(gram, cross).T
        self.down_proj.weight.copy_(weight.to(self.down_proj.weight))


@register("cheap", "low_rank")
def low_rank(d_model: int, d_ff: int, rank: int | None = None, **_: object) -> nn.Module:
    return LowRankFFN(d_model, rank or max(1, d_model // 8))


@register("cheap", "skip")
def skip(**_: object) -> nn.Module:
    return Skip()


@register("cheap", "pruned")
def pruned(d_model: int, d_ff: int, rank: int | None = None, full: nn.Module | None = None,
           **_: object) -> nn.Module:
    """The full FFN's most important neurons (d_ff/8 of them unless rank is given)."""
    if not gated(full):
        raise UserError("cheap path `pruned` copies neurons of a gated FFN (ours, Llama, "
                        f"Gemma); this backbone's FFN is a {type(full).__name__}: use low_rank")
    assert full is not None
    return PrunedFFN(d_model, min(d_ff, rank or max(1, d_ff // 8)), activation(full),
                     bias=full.down_proj.bias is not None)


@register("cheap", "narrow")
def narrow(d_model: int, d_ff: int, rank: int | None = None, **_: object) -> nn.Module:
    """A small dense SwiGLU (width d_ff/8 unless rank is given), output zero-initialised."""
    ffn = SwiGLU(d_model, rank or max(1, d_ff // 8))
    nn.init.zeros_(ffn.down_proj.weight)
    return ffn
