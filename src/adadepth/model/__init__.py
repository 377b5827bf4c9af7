from adadepth.model.transformer import (
    Block,
    Context,
    KVCache,
    Output,
    RMSNorm,
    SwiGLU,
    Transformer,
    causal_lm_loss,
)

__all__ = [
    "Block",
    "Context",
    "KVCache",
    "Output",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "causal_lm_loss",
]
