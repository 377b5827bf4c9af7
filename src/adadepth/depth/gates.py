"""Gates: per-token scores that decide full or cheap at a controlled layer.

Each gate maps the normalised pre-FFN state u_t = Norm(h_t) to a score s_t (higher = more
worth the full path). G3 also predicts, per action, a latent of the outcome and is trained to
match a fixed projection of what actually happened (JEPA alignment). Baselines are gates too,
so every arm of a study runs through the same routed layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adadepth.depth.registry import register

FULL, CHEAP = 1, 0


class Gate(nn.Module):
    has_predictor = False  # True where the gate can take the jepa loss
    fixed: bool | None = None  # a constant decision (all-full / all-cheap / static), no budget
    needs_grad = True  # False for gates without trainable parameters

    def forward(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def scored(self, u: Tensor) -> tuple[Tensor, Tensor | None]:
        """The score and, for a gate that predicts outcomes, its predictions (the JEPA loss
        reads them from the forward that executed the decision)."""
        return self(u), None

    def alignment_loss(self, predictions: Tensor, mask: Tensor, outcome: Tensor) -> Tensor:
        raise NotImplementedError


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


@register("gate", "g1")
class MLPGate(Gate):
    """G1: s_t = MLP(Norm(h_t)), a scalar utility score."""

    def __init__(self, d_model: int, d_z: int = 64, hidden: int | None = None, **_: object) -> None:
        super().__init__()
        self.net = mlp(d_model, hidden or 4 * d_z, 1)

    def forward(self, u: Tensor) -> Tensor:
        return self.net(u).squeeze(-1)


@register("gate", "g3")
class JEPAGate(Gate):
    """G3: encoder to a d_z latent, action-conditional predictor, fixed target head.

    The score is read from the two predictions: s_t = U(zhat_full - zhat_cheap). The alignment
    loss pulls the prediction for the executed action toward sg(T(outcome)), where T is a random
    projection frozen at initialisation. Our choice: the outcome is the FFN sub-block's output
    (y_t - h_t); h_t is common to both actions, so it carries no information about the choice.
    """

    has_predictor = True

    def __init__(self, d_model: int, d_z: int = 64, hidden: int | None = None, **_: object) -> None:
        super().__init__()
        hidden = hidden or 4 * d_z
        self.encoder = nn.Linear(d_model, d_z)
        self.action_emb = nn.Embedding(2, d_z)
        self.predictor = mlp(2 * d_z, hidden, d_z)
        self.readout = nn.Linear(d_z, 1)
        # The target head is fixed: a buffer, so no optimiser ever moves it.
        target = torch.empty(d_z, d_model)
        nn.init.normal_(target, std=d_model**-0.5)
        self.register_buffer("target_proj", target)

    def predict(self, u: Tensor) -> Tensor:
        """zhat for both actions: (..., 2, d_z), index 0 = cheap, 1 = full."""
        z = self.encoder(u)
        actions = self.action_emb.weight.expand(*z.shape[:-1], 2, -1)
        return self.predictor(torch.cat([z.unsqueeze(-2).expand_as(actions), actions], -1))

    def flops_per_token(self) -> float:
        # The predictor runs once per action; encoder and readout once.
        linear = [self.encoder, *self.predictor[::2], *self.predictor[::2], self.readout]
        return sum(2.0 * m.weight.numel() for m in linear)

    def forward(self, u: Tensor) -> Tensor:
        return self.scored(u)[0]

    def scored(self, u: Tensor) -> tuple[Tensor, Tensor]:
        zhat = self.predict(u)
        return self.readout(zhat[..., FULL, :] - zhat[..., CHEAP, :]).squeeze(-1), zhat

    def alignment_loss(self, predictions: Tensor, mask: Tensor, outcome: Tensor) -> Tensor:
        """Mean over executed (token, action) pairs of ||zhat_{t,a} - sg(T(outcome_t))||^2 / d_z,
        `predictions` being those of the forward that executed `mask` (its RouteRecord)."""
        zhat = predictions
        executed = torch.where(mask.unsqueeze(-1), zhat[..., FULL, :], zhat[..., CHEAP, :])
        target = (outcome.detach().float() @ self.target_proj.t()).to(executed.dtype)
        return (executed - target).pow(2).mean()


@register("gate", "random")
class RandomGate(Gate):
    """Random tokens at the same budget: uniform scores, so top-k and thresholds both apply."""

    needs_grad = False

    def __init__(self, **_: object) -> None:
        super().__init__()

    def forward(self, u: Tensor) -> Tensor:
        return torch.rand(u.shape[:-1], device=u.device)


class ConstantGate(Gate):
    needs_grad = False

    def __init__(self, full: bool) -> None:
        super().__init__()
        self.fixed = full

    def forward(self, u: Tensor) -> Tensor:
        return torch.full(u.shape[:-1], 1.0 if self.fixed else -1.0, device=u.device)


@register("gate", "all-full")
def all_full(**_: object) -> Gate:
    return ConstantGate(True)


@register("gate", "all-cheap")
def all_cheap(**_: object) -> Gate:
    return ConstantGate(False)


# `static` (a fixed set of layers runs full) is a ConstantGate per layer, chosen by the routed
# model from the budget; it is registered so that the name is known and checked in one place.
register("gate", "static")(all_full)
