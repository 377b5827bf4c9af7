"""Oracle utility labels and the auxiliary losses that train gates on them.

The oracle utility of token t at controlled layer l is its LM loss when layer l runs cheap minus
when it runs full. Both counterfactuals restart from the hidden state that entered layer l in
the training forward (earlier layers are unchanged), without gradient. Later controlled layers
either all run full (`off_policy`, the paper's) or route under the current gates (`on_policy`,
as they will at deployment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adadepth.depth.routing import RoutedModel
from adadepth.model import causal_lm_loss


@torch.no_grad()
def token_losses_from(model: RoutedModel, layer: int, x: Tensor, ctx, targets: Tensor,
                      force: bool, oracle: str) -> Tensor:
    """Per-token LM loss running layers layer..L-1 from hidden state x, layer forced full/cheap."""
    routers = dict(zip(model.layers, model.routers, strict=True))
    saved = {i: (r.force, r.record) for i, r in routers.items()}
    try:
        for i, r in routers.items():
            if i == layer:
                r.force = force
            elif i > layer:
                r.force = True if oracle == "off_policy" else None
        for i in range(layer, model.backbone.n_layers):
            x = model.backbone.run_layer(i, x, ctx)
        return causal_lm_loss(model.backbone.head(x), targets, reduction="none")
    finally:
        for i, r in routers.items():  # the training forward's records must survive
            r.force, r.record = saved[i]


def oracle_utilities(model: RoutedModel, layer_inputs: dict[int, Tensor], ctx, targets: Tensor,
                     oracle: str) -> dict[int, Tensor]:
    """u_t = loss(cheap at l) - loss(full at l), per labelled layer l: (B, T) each."""
    return {
        layer: token_losses_from(model, layer, x, ctx, targets, False, oracle)
        - token_losses_from(model, layer, x, ctx, targets, True, oracle)
        for layer, x in layer_inputs.items()
    }


def standardise(u: Tensor) -> Tensor:
    return (u - u.mean()) / (u.std() + 1e-6)


def util_loss(score: Tensor, utility: Tensor) -> Tensor:
    """MSE of the score against the standardised oracle utility."""
    return F.mse_loss(score.float(), standardise(utility.float()))


def rank_loss(score: Tensor, utility: Tensor, margin: float = 0.0,
              max_pairs: int = 16384, generator: torch.Generator | None = None) -> Tensor:
    """Pairwise logistic loss -log sigmoid(s_i - s_j) over pairs in a sequence with u_i > u_j + m.

    Long sequences have T^2 pairs; beyond max_pairs per sequence we sample them uniformly.
    """
    B, T = score.shape
    if T * T <= max_pairs:
        i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
        i, j = i.flatten().to(score.device), j.flatten().to(score.device)
        i, j = i.expand(B, -1), j.expand(B, -1)
    else:
        i = torch.randint(0, T, (B, max_pairs), generator=generator).to(score.device)
        j = torch.randint(0, T, (B, max_pairs), generator=generator).to(score.device)
    u = utility.float()
    valid = u.gather(1, i) > u.gather(1, j) + margin
    if not valid.any():
        return score.sum() * 0.0
    s = score.float()
    diff = s.gather(1, i) - s.gather(1, j)
    return -F.logsigmoid(diff[valid]).mean()
