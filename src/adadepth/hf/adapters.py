"""A `transformers` causal LM behind adadepth's layer-stack interface, without copying its code.

The adapter calls the loaded model's own modules: its embedding, its decoder layers (fed the
masks of transformers' mask utilities and its own rotary tables, as its `forward` does), its
final norm and LM head. Families differ only in where those modules live and in the keyword a
decoder layer takes its cache under; `FAMILIES` records that. Each decoder layer's MLP module is
the FFN that routing replaces (`get_ffn`/`set_ffn`): it is called on the already normalised
input, as our own blocks' FFNs are (GPT-NeoX's parallel residual and Gemma 3's post-FFN norm stay
inside the layer's own forward).

The cache is transformers' `DynamicCache`, passed through the context; it only appends, so
`start` must equal the number of positions it holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from adadepth.errors import UserError
from adadepth.model import Output


@dataclass(frozen=True)
class Family:
    label: str
    base: str  # attribute of the *ForCausalLM model holding the decoder stack
    layers: str
    embed: str
    final_norm: str
    cache_arg: str = "past_key_values"  # keyword under which a decoder layer takes the cache
    positions: str | None = None  # learned absolute position table (GPT-2)
    dropout: str | None = None  # dropout after the embedding
    rope: Literal["none", "shared", "per_type"] = "shared"


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama (SmolLM2)", "model", "layers", "embed_tokens", "norm"),
    "gpt2": Family("GPT-2", "transformer", "h", "wte", "ln_f", positions="wpe", dropout="drop",
                   rope="none"),
    "gpt_neox": Family("GPT-NeoX (Pythia)", "gpt_neox", "layers", "embed_in", "final_layer_norm",
                       cache_arg="layer_past", dropout="emb_dropout"),
    "gemma3_text": Family("Gemma 3", "model", "layers", "embed_tokens", "norm", rope="per_type"),
}
SUPPORTED = ", ".join(f"{k} ({f.label})" for k, f in FAMILIES.items())
MASKS = {"full_attention": create_causal_mask,
         "sliding_attention": create_sliding_window_causal_mask}


def family_of(config: Any) -> Family:
    """The family of a transformers config, or a UserError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":
        raise UserError("Gemma 3 multimodal checkpoints are not supported; use the text-only "
                        f"model (gemma3_text). Supported families: {SUPPORTED}")
    if model_type not in FAMILIES:
        raise UserError(f"unsupported model family {model_type!r}; supported: {SUPPORTED}")
    if getattr(config, "add_cross_attention", False) or getattr(
            config, "use_bidirectional_attention", False):
        raise UserError(f"{model_type} with cross or bidirectional attention is not a causal LM")
    return FAMILIES[model_type]


@dataclass(frozen=True)
class HFModelConfig:
    """The shape figures adadepth reads from a model config (FLOPs, cheap FFN width, limits)."""

    model_type: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads

    def model_dump(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, config: Any) -> HFModelConfig:
        d, heads = config.hidden_size, config.num_attention_heads
        d_ff = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                or 4 * d)
        return cls(model_type=config.model_type, vocab_size=config.vocab_size, d_model=d,
                   n_layers=config.num_hidden_layers, n_heads=heads,
                   n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or d // heads, d_ff=d_ff,
                   max_seq_len=config.max_position_embeddings)


@dataclass
class HFContext:
    """What every layer of one forward call shares; per-layer masks and rotary tables."""

    start: int
    cache: DynamicCache | None
    position_ids: Tensor
    masks: list[Any]
    rope: list[tuple[Tensor, Tensor] | None]


class HFAdapter(nn.Module):
    """A transformers causal LM with `prepare` / `run_layer` / `head` / `get_ffn` / `set_ffn`.

    `source` names where the weights came from (a directory, a known backbone or a hub id), so
    an adapted model can be saved as a reference to them; `tokenizer` is the transformers
    tokenizer when one was loaded beside the weights.
    """

    def __init__(self, model: PreTrainedModel, source: str | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__()
        self.family = family_of(model.config)
        if not hasattr(model, self.family.base) or model.get_output_embeddings() is None:
            raise UserError(f"{type(model).__name__} is not a causal LM with an LM head")
        self.hf = model
        self.cfg = HFModelConfig.of(model.config)
        self.source, self.tokenizer = source, tokenizer
        # Keep the backbone's dropout off even while a controller trains: the controller should
        # learn against the function it will be deployed on (our own Transformer has none). A
        # hook rather than a `train` override, because whoever holds a wrapped MLP (a RoutedFFN)
        # sets its mode too. Set `backbone_dropout = True` to train with it (joint training).
        self.backbone_dropout = False
        for module in model.modules():
            module.register_forward_pre_hook(self._backbone_mode)
        self._mlps = [layer.mlp for layer in self.layers]
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * self.n_layers
        unknown = set(types) - set(MASKS)
        if unknown:
            raise UserError(f"attention type {sorted(unknown)[0]!r} is not supported")
        self.layer_types: list[str] = list(types)

    # -- where the family keeps things ---------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return getattr(self.hf, self.family.base)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.decoder, self.family.layers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def get_ffn(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def set_ffn(self, layer: int, module: nn.Module) -> None:
        self.layers[layer].mlp = module

    def _backbone_mode(self, module: nn.Module, _args: Any) -> None:
        if not self.backbone_dropout:
            module.training = False

    # -- the layer-stack interface -------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int | None = None) -> DynamicCache:
        if max_len is not None and max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache of {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        return DynamicCache(config=self.hf.config)

    def prepare(self, idx: Tensor, cache: DynamicCache | None = None,
                start: int = 0) -> tuple[Tensor, HFContext]:
        T = idx.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} exceeds max_seq_len {self.cfg.max_seq_len}")
        if cache is not None and cache.get_seq_length() != start:
            raise ValueError(f"the cache holds {cache.get_seq_length()} positions; a transformers "
                             f"cache only appends, so start must equal that, not {start}")
        dec, fam, config = self.decoder, self.family, self.hf.config
        pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        x = getattr(dec, fam.embed)(idx)
        masks = {t: MASKS[t](config=config, inputs_embeds=x, attention_mask=None,
                             past_key_values=cache, position_ids=pos)
                 for t in set(self.layer_types)}
        if fam.positions:
            x = x + getattr(dec, fam.positions)(pos)
        if fam.dropout:
            x = getattr(dec, fam.dropout)(x)
        rope: dict[str, tuple[Tensor, Tensor] | None] = {t: None for t in masks}
        if fam.rope == "shared":
            shared = dec.rotary_emb(x, position_ids=pos)
            rope = {t: shared for t in masks}
        elif fam.rope == "per_type":
            rope = {t: dec.rotary_emb(x, pos, t) for t in masks}
        ctx = HFContext(start, cache, pos, [masks[t] for t in self.layer_types],
                        [rope[t] for t in self.layer_types])
        return x, ctx

    def run_layer(self, layer: int, x: Tensor, ctx: HFContext) -> Tensor:
        kwargs: dict[str, Any] = {"attention_mask": ctx.masks[layer],
                                  "position_ids": ctx.position_ids,
                                  self.family.cache_arg: ctx.cache}
        if ctx.rope[layer] is not None:
            kwargs["position_embeddings"] = ctx.rope[layer]
        out = self.layers[layer](x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: Tensor) -> Tensor:
        norm = getattr(self.decoder, self.family.final_norm)
        logits = self.hf.get_output_embeddings()(norm(hidden))
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        if cap:  # Gemma's soft cap, as its ForCausalLM applies it
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, idx: Tensor, cache: DynamicCache | None = None, start: int = 0) -> Output:
        x, ctx = self.prepare(idx, cache, start)
        for i in range(self.n_layers):
            x = self.run_layer(i, x, ctx)
        return Output(logits=self.head(x), hidden=x)

    # -- the backbone's own weights ------------------------------------------------------------
    @contextmanager
    def original_ffns(self) -> Iterator[None]:
        """Temporarily put the model's own MLPs back (to save or fingerprint the backbone)."""
        current = [layer.mlp for layer in self.layers]
        try:
            for layer, mlp in zip(self.layers, self._mlps, strict=True):
                layer.mlp = mlp
            yield
        finally:
            for layer, mlp in zip(self.layers, current, strict=True):
                layer.mlp = mlp

    def backbone_state(self) -> dict[str, Tensor]:
        """The transformers model's state dict under its own names, whatever is installed."""
        with self.original_ffns():
            return self.hf.state_dict()

    def checksum(self) -> str:
        """SHA-256 of every backbone tensor (names, dtypes, shapes, bytes)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.backbone_state().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        return digest.hexdigest()

    def save_pretrained(self, directory: str | Path, store_backbone: bool | None = None) -> None:
        from adadepth.hf.pretrained import save_pretrained

        save_pretrained(self, directory, store_backbone=store_backbone)
