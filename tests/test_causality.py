"""The method-independent decision checks of tests/causality.py, applied to every method that
decides per token: the future never changes an earlier decision, and cached decoding decides
as one forward does. A new method adds itself to METHODS (or calls the helpers in its own
tests with a richer decision reader)."""

from __future__ import annotations

import pytest
import torch
from causality import (
    assert_causal,
    assert_decodable,
    method_decisions,
)

from adadepth.config import ModelConfig
from adadepth.depth.mod import MixtureOfDepths, MoDConfig
from adadepth.depth.routing import RoutedModel, RoutingConfig
from adadepth.model import Transformer

V = 37
CFG = ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=64)


def text(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def routing() -> RoutedModel:
    model = RoutedModel(Transformer(CFG), RoutingConfig(gate="g1", d_z=16, aux=[])).eval()
    model.calibrate([text(16, 48, 3)])
    return model


def mod() -> MixtureOfDepths:
    model = MixtureOfDepths(Transformer(CFG), MoDConfig(capacity=0.3, layers="all")).eval()
    with torch.no_grad():
        for router in model.routers:
            router.linear.weight.normal_()
    model.calibrate(text(16, 48, 3))
    return model


METHODS = {"routing": routing, "mod": mod}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_decisions_are_causal_and_cached_decoding_decides_alike(name: str) -> None:
    torch.manual_seed(1)
    model = METHODS[name]()
    decide = method_decisions(model)
    idx = text(3, 40, 5)
    assert_decodable(model, decide, idx, V, (1, 17, 39), prefill=9)


def test_the_check_fails_for_decisions_that_look_ahead() -> None:
    """Routing's training decisions (top-k over the sequence) are not causal: the check says so."""
    torch.manual_seed(1)
    model = routing()
    with pytest.raises(AssertionError, match="depend on later tokens"):
        assert_causal(method_decisions(model, rule="topk"), text(3, 40, 5), V, 12)
