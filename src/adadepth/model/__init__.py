from adadepth.model.cache import Context, KVCache, attention_mask
from adadepth.model.stack import LayerStack
from adadepth.model.transformer import (
    Block,
    Output,
    RMSNorm,
    SwiGLU,
    Transformer,
    causal_lm_loss,
    chunked_lm_loss,
)

__all__ = [
    "Block",
    "Context",
    "KVCache",
    "LayerStack",
    "Output",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "attention_mask",
    "causal_lm_loss",
    "chunked_lm_loss",
]
