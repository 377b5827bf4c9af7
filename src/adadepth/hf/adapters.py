"""A `transformers` causal LM behind adadepth's layer-stack interface, without copying its code.

The adapter calls the loaded model's own modules: its embedding, its decoder layers (fed the
masks of transformers' mask utilities and its own rotary tables, as its `forward` does), its
final norm and LM head. Families differ only in where those modules live and in the keyword a
decoder layer takes its cache under (read from its signature: transformers has renamed it twice);
`FAMILIES` records the rest. Each decoder layer's MLP module is
the FFN that routing replaces (`get_ffn`/`set_ffn`): it is called on the already normalised
input, as our own blocks' FFNs are (GPT-NeoX's parallel residual and Gemma 3's post-FFN norm stay
inside the layer's own forward). For Llama and Gemma 3 the adapter also runs a layer's attention
and FFN sub-blocks apart (`run_attention`, `run_ffn`), calling the layer's own norms, attention
and MLP in the order its forward does, so their composition is the layer to the bit.

The cache is adadepth's own position-indexed `KVCache`, not transformers' append-only one: a
decoder layer calls `update(k, v, layer_idx)` on whatever it is given as its cache, and the
adapter hands it a view that writes at the call's rows and positions and returns the keys the
call may read; the mask passed beside it is built from positions and validity. `write_kv`
computes only a layer's K/V by giving the layer a view that stops it once they are written.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from adadepth.errors import UserError
from adadepth.model import Context, KVCache, Output, attention_mask


@dataclass(frozen=True)
class Family:
    label: str
    base: str  # attribute of the *ForCausalLM model holding the decoder stack
    layers: str
    embed: str
    final_norm: str
    positions: str | None = None  # learned absolute position table (GPT-2)
    dropout: str | None = None  # dropout after the embedding
    rope: Literal["none", "shared", "per_type"] = "shared"
    # How a decoder layer splits into its attention and FFN sub-blocks, each with its residual
    # (`run_attention`, `run_ffn`): "pre" norms before each (Llama), "sandwich" norms before and
    # after each (Gemma 3), "none" where the adapter does not split the layer (GPT-2's and
    # GPT-NeoX's layers: not supported).
    sublayers: Literal["none", "pre", "sandwich"] = "none"


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama (SmolLM2)", "model", "layers", "embed_tokens", "norm",
                    sublayers="pre"),
    "gpt2": Family("GPT-2", "transformer", "h", "wte", "ln_f", positions="wpe", dropout="drop",
                   rope="none"),
    "gpt_neox": Family("GPT-NeoX (Pythia)", "gpt_neox", "layers", "embed_in", "final_layer_norm",
                       dropout="emb_dropout"),
    "gemma3_text": Family("Gemma 3", "model", "layers", "embed_tokens", "norm", rope="per_type",
                          sublayers="sandwich"),
}
SUPPORTED = ", ".join(f"{k} ({f.label})" for k, f in FAMILIES.items())
ATTENTION_TYPES = ("full_attention", "sliding_attention")


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

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices of one FFN: 3 for gated (SwiGLU/GeGLU), 2 for a plain MLP."""
        return 2 if self.model_type in ("gpt2", "gpt_neox") else 3

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


# Newest first: transformers 5 names it `cache` (the older names warn, then go), 4.x
# `past_key_values` or `past_key_value`, GPT-NeoX `layer_past`.
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")


@functools.cache
def cache_keyword(module_class: type[nn.Module]) -> str:
    """The keyword under which a decoder layer or attention module of this class takes its
    cache, read from its forward's signature."""
    taken = inspect.signature(module_class.forward).parameters
    return next((k for k in CACHE_KEYWORDS if k in taken), "past_key_values")


class _KVWritten(Exception):
    """Raised by a write-only cache view once a layer's K/V are stored: the rest is not needed."""


class _LayerCache:
    """What a transformers decoder layer sees as its cache: writes go to the rows and positions
    of the call, reads return the keys and values its queries may attend to."""

    def __init__(self, cache: KVCache, ctx: Context, layer: int, write_only: bool = False) -> None:
        self.cache, self.ctx, self.layer, self.write_only = cache, ctx, layer, write_only

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *_: Any, **__: Any,
               ) -> tuple[Tensor, Tensor]:
        self.cache.store(self.layer, k, v, self.ctx)
        if self.write_only:
            raise _KVWritten
        return self.cache.view(self.layer, self.ctx)


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
        unknown = set(types) - set(ATTENTION_TYPES)
        if unknown:
            raise UserError(f"attention type {sorted(unknown)[0]!r} is not supported")
        self.layer_types: list[str] = list(types)
        # sdpa reads boolean masks; the other kernels add a float mask to the scores.
        self.boolean_masks = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"

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
        mlp = self.layers[layer].mlp
        return mlp.inner if isinstance(mlp, _ContextFFN) else mlp

    def set_ffn(self, layer: int, module: nn.Module) -> None:
        """A module that takes the call's context (`takes_context`) is installed behind a shim:
        a transformers layer calls its MLP on the hidden states alone."""
        self.layers[layer].mlp = (_ContextFFN(module) if getattr(module, "takes_context", False)
                                  else module)

    def _backbone_mode(self, module: nn.Module, _args: Any) -> None:
        if not self.backbone_dropout:
            module.training = False

    # -- the layer-stack interface (see adadepth.model.transformer) ---------------------------
    def new_cache(self, batch: int, max_len: int | None = None, sets: int = 1) -> KVCache:
        if max_len is not None and max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache of {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        p = self.hf.get_output_embeddings().weight
        return KVCache(self.n_layers * sets, batch, self.cfg.n_kv_heads,
                       max_len or self.cfg.max_seq_len, self.cfg.head_dim, device=p.device,
                       dtype=p.dtype)

    def embed(self, idx: Tensor) -> Tensor:
        return getattr(self.decoder, self.family.embed)(idx)

    def embed_soft(self, probs: Tensor) -> Tensor:
        """The embedding of a distribution over the vocabulary, scaled as the family scales
        token embeddings (Gemma multiplies them by sqrt(d))."""
        table = getattr(self.decoder, self.family.embed)
        out = probs.to(table.weight.dtype) @ table.weight
        scale = getattr(table, "embed_scale", None)
        return out * scale.to(out.dtype) if scale is not None else out

    def prepare(self, idx: Tensor | None = None, cache: KVCache | None = None, start: int = 0, *,
                embeds: Tensor | None = None, positions: Tensor | None = None,
                call: Any = None) -> tuple[Tensor, Context]:
        x = self.embed(idx) if embeds is None else embeds
        T = x.shape[1]
        if positions is None:
            ctx = Context.block(start, T, x.device, cache, call)
        else:
            ctx = Context.at(positions.to(x.device), cache, call)
        if ctx.end > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {ctx.end} exceeds max_seq_len {self.cfg.max_seq_len}")
        dec, fam = self.decoder, self.family
        if fam.positions:  # learned absolute positions are part of a pass's input
            x = x + getattr(dec, fam.positions)(ctx.positions)
        if fam.dropout:
            x = getattr(dec, fam.dropout)(x)
        return x, ctx

    def _rope(self, x: Tensor, ctx: Context, layer: int) -> tuple[Tensor, Tensor] | None:
        kind = self.family.rope
        if kind == "none":
            return None
        key = ("rope", self.layer_types[layer] if kind == "per_type" else None)
        if key not in ctx.memo:
            rotary = self.decoder.rotary_emb
            pos = ctx.positions
            ctx.memo[key] = (rotary(x, pos, self.layer_types[layer]) if kind == "per_type"
                             else rotary(x, position_ids=pos))
        return ctx.memo[key]

    def _mask(self, ctx: Context, layer: int, n_keys: int, x: Tensor) -> Tensor | None:
        window = (self.hf.config.sliding_window
                  if self.layer_types[layer] == "sliding_attention" else None)
        mask, causal = attention_mask(ctx, ctx.kv_offset + layer, n_keys, window)
        if mask is None:
            if not causal or self.boolean_masks:  # sdpa infers a plain causal block itself
                return None
            mask = _causal(ctx.length, n_keys, x.device)
        if not self.boolean_masks:
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~mask, torch.finfo(x.dtype).min)
        return mask

    def _attention_kwargs(self, module: nn.Module, layer: int, x: Tensor, ctx: Context,
                          ) -> dict[str, Any]:
        """What `module`, a decoder layer or its attention, is called with: the mask, the
        positions, the cache view and the rotary tables of the call. Marks the cache slots it
        writes."""
        view, n, slot = None, x.shape[1], ctx.kv_offset + layer
        if ctx.cache is not None:
            n = ctx.cache.mark(slot, ctx)
            view = _LayerCache(ctx.cache, ctx, slot)
        kwargs: dict[str, Any] = {"attention_mask": self._mask(ctx, layer, n, x),
                                  "position_ids": ctx.positions,
                                  cache_keyword(type(module)): view}
        rope = self._rope(x, ctx, layer)
        if rope is not None:
            kwargs["position_embeddings"] = rope
        return kwargs

    def run_layer(self, layer: int, x: Tensor, ctx: Context) -> Tensor:
        kwargs = self._attention_kwargs(self.layers[layer], layer, x, ctx)
        token = _CURRENT.set(ctx)  # for a context-taking FFN behind its shim
        try:
            out = self.layers[layer](x, **kwargs)
        finally:
            _CURRENT.reset(token)
        return out[0] if isinstance(out, tuple) else out

    def _split(self, layer: int) -> nn.Module:
        if self.family.sublayers == "none":
            raise UserError(f"{self.family.label} layers are not split into attention and FFN "
                            "sub-blocks here; skipping attention alone needs a Llama or Gemma 3 "
                            "backbone")
        return self.layers[layer]

    def run_attention(self, layer: int, x: Tensor, ctx: Context) -> Tensor:
        """The layer's attention sub-block with its residual, from the layer's own modules in
        the order its forward calls them; `run_ffn` of the result is `run_layer`, exactly."""
        mod = self._split(layer)
        out = mod.self_attn(hidden_states=mod.input_layernorm(x),
                            **self._attention_kwargs(mod.self_attn, layer, x, ctx))
        out = out[0] if isinstance(out, tuple) else out
        if self.family.sublayers == "sandwich":
            out = mod.post_attention_layernorm(out)
        return x + out

    def run_ffn(self, layer: int, h: Tensor, ctx: Context) -> Tensor:
        """The layer's FFN sub-block with its residual (position-wise: any tokens)."""
        mod = self._split(layer)
        sandwich = self.family.sublayers == "sandwich"
        u = mod.pre_feedforward_layernorm(h) if sandwich else mod.post_attention_layernorm(h)
        token = _CURRENT.set(ctx)  # for a context-taking FFN behind its shim
        try:
            out = mod.mlp(u)
        finally:
            _CURRENT.reset(token)
        return h + (mod.post_feedforward_layernorm(out) if sandwich else out)

    def write_kv(self, layer: int, x: Tensor, ctx: Context) -> None:
        """Only the layer's K/V: the layer runs until its attention stores them, then stops.
        Where the attention has a query projection of its own (Llama, Gemma 3) it is stubbed
        for the call: the queries are never used, so only K/V projections run."""
        if ctx.cache is None:
            raise ValueError("write_kv needs a cache to write to")
        slot = ctx.kv_offset + layer
        ctx.cache.mark(slot, ctx)
        kwargs: dict[str, Any] = {"attention_mask": None, "position_ids": ctx.positions,
                                  cache_keyword(type(self.layers[layer])):
                                      _LayerCache(ctx.cache, ctx, slot, True)}
        rope = self._rope(x, ctx, layer)
        if rope is not None:
            kwargs["position_embeddings"] = rope
        attn = getattr(self.layers[layer], "self_attn", None)
        query = getattr(attn, "q_proj", None)
        try:
            if query is not None:
                attn.q_proj = _NoQuery(self.cfg.head_dim)
            self.layers[layer](x, **kwargs)
        except _KVWritten:
            return
        finally:
            if query is not None:
                attn.q_proj = query
        raise RuntimeError(f"layer {layer} of {self.family.label} never wrote its cache")

    def final_norm(self, hidden: Tensor) -> Tensor:
        return getattr(self.decoder, self.family.final_norm)(hidden)

    def make_norm(self) -> nn.Module:
        """A new norm initialised as the final one, for a head read at another layer."""
        return copy.deepcopy(getattr(self.decoder, self.family.final_norm))

    def unembed(self, normed: Tensor) -> Tensor:
        logits = self.hf.get_output_embeddings()(normed)
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        if cap:  # Gemma's soft cap, as its ForCausalLM applies it
            logits = torch.tanh(logits / cap) * cap
        return logits

    def head(self, hidden: Tensor) -> Tensor:
        return self.unembed(self.final_norm(hidden))

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Any = None) -> Output:
        x, ctx = self.prepare(idx, cache, start, positions=positions, call=call)
        for i in range(self.n_layers):
            x = self.run_layer(i, x, ctx)
        return Output(hidden=x, head=self.head)

    # -- the backbone's own weights ------------------------------------------------------------
    @contextmanager
    def original_ffns(self) -> Iterator[None]:
        """The model's own MLPs back in place for the block (to save or fingerprint the
        backbone as it was loaded, whatever a method installed)."""
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


# The context of the layer running now: how a transformers layer, which calls its MLP on the
# hidden states alone, reaches a context-taking FFN (`_ContextFFN`). Set only for the duration of
# `run_layer`, in the thread that runs it.
_CURRENT: ContextVar[Context | None] = ContextVar("adadepth_layer_context", default=None)


class _ContextFFN(nn.Module):
    """A context-taking FFN as a transformers layer calls its MLP: `mlp(hidden)`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, u: Tensor) -> Tensor:
        return self.inner(u, _CURRENT.get())


class _NoQuery(nn.Module):
    """Stands in for a query projection whose output is never read (`write_kv`): zeros of one
    head, which the attention reshapes and rotates at no matmul cost before storing K/V."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, h: Tensor) -> Tensor:
        return h.new_zeros(*h.shape[:-1], self.head_dim)


def _causal(T: int, n_keys: int, device: torch.device) -> Tensor:
    """Queries at the last T of n_keys positions, each seeing keys up to its own."""
    return torch.ones(T, n_keys, dtype=torch.bool, device=device).tril(n_keys - T)
