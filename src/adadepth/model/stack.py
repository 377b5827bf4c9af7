"""The layer-stack interface: what every backbone offers the adaptive-depth methods.

Our `Transformer` (`model/transformer.py`, whose docstring says what each seam is for) and the
Hugging Face adapters (`hf/adapters.py`) implement it; methods are typed against it and never
reach into a backbone's modules otherwise.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from adadepth.model.cache import Context, KVCache


@runtime_checkable
class LayerStack(Protocol):
    cfg: Any  # the shape: d_model, n_layers, heads, d_ff, vocab_size, max_seq_len, ...

    @property
    def n_layers(self) -> int: ...

    def embed(self, idx: Tensor) -> Tensor: ...

    def embed_soft(self, probs: Tensor) -> Tensor: ...

    def prepare(self, idx: Tensor | None = None, cache: KVCache | None = None, start: int = 0,
                *, embeds: Tensor | None = None, positions: Tensor | None = None,
                call: Any = None) -> tuple[Tensor, Context]: ...

    def run_layer(self, layer: int, x: Tensor, ctx: Context) -> Tensor: ...

    def write_kv(self, layer: int, x: Tensor, ctx: Context) -> None: ...

    def get_ffn(self, layer: int) -> nn.Module: ...

    def set_ffn(self, layer: int, module: nn.Module) -> None: ...

    def final_norm(self, hidden: Tensor) -> Tensor: ...

    def unembed(self, normed: Tensor) -> Tensor: ...

    def head(self, hidden: Tensor) -> Tensor: ...

    def make_norm(self) -> nn.Module: ...

    def new_cache(self, batch: int, max_len: int | None = None, sets: int = 1) -> KVCache: ...

    def __call__(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                 positions: Tensor | None = None, call: Any = None) -> Any: ...
