"""Module state as safetensors can store it."""

from __future__ import annotations

from torch import Tensor, nn


def unique_state(module: nn.Module) -> dict[str, Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out
