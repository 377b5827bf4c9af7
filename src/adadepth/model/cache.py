"""The KV store every method writes, and the per-call context that says which tokens run.

`KVCache` holds, for each layer, keys and values per row and *absolute position*, and which of
those slots hold valid K/V. Methods that leave tokens out of a layer (skipped by Mixture-of-Depths
routing, exited early, halted while pondering) simply do not write their slot, or write it from a
copied state with `write_kv`; layers may fall out of step with one another, and rows with each
other (speculative decoding accepts a different number of tokens per row). Attention masks are
built from positions and validity, never from "the queries are the last T positions".

`Context` describes one call of the layer stack: the rows of the batch (a subset of the cache's
rows, or all), the absolute position of every token, the cache, and the adaptive method's
per-call instructions (`call`, opaque to the core: it only carries them to the modules a method
installed inside the stack). `Context.select` gives the context of a subset of those tokens
(gathered with their own positions), so a block can run on the tokens a method chose.

A context may also only read (`Context.reading`): its queries attend to K/V already in the cache
at other layers and write none (recursive KV sharing: later recursions of a shared block read the
first recursion's K/V).

Writes are in place at inference; when autograd is recording (a looped model keeping the K/V of
halted tokens while training), they are out of place, so earlier reads stay valid for backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer: (batch, kv_heads, max_len + 1, head_dim) per layer.

    The extra last slot is scratch: padding entries of a ragged selection write there, and it is
    never valid, so no query ever reads it. `state` keeps a method's per-sequence decoding state
    (threshold controllers, halting masks) beside the K/V it belongs with.
    """

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (batch, kv_heads, max_len + 1, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.valid = torch.zeros(n_layers, batch, max_len + 1, dtype=torch.bool, device=device)
        self.max_len, self.batch = max_len, batch
        self.extent = [0] * n_layers  # 1 + the highest position written, per layer
        self.complete = [True] * n_layers  # every slot below the extent valid in every row
        self.state: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.k)

    @property
    def scratch(self) -> int:
        return self.max_len

    def reset(self) -> None:
        """Forget everything: a new sequence starts (a prefill from position 0 does this)."""
        self.valid.zero_()
        self.extent = [0] * len(self)
        self.complete = [True] * len(self)
        self.state.clear()

    def truncate(self, lengths: Tensor) -> None:
        """Invalidate every position >= lengths[row] in every layer (rejected draft tokens)."""
        keep = torch.arange(self.max_len + 1, device=self.valid.device) < lengths.view(1, -1, 1)
        self.valid &= keep
        longest = int(lengths.max())
        uniform = bool((lengths == lengths[0]).all())
        for layer in range(len(self)):
            self.extent[layer] = min(self.extent[layer], longest)
            self.complete[layer] = self.complete[layer] and uniform

    # -- writing ------------------------------------------------------------------------------
    def mark(self, layer: int, ctx: Context) -> int:
        """Mark the slots this call writes as valid; returns the layer's extent after it."""
        if not ctx.writes:
            return self.extent[layer]
        if ctx.contiguous:
            self.valid[layer, :, ctx.start:ctx.end] = True
            if ctx.start > self.extent[layer]:  # a gap below the new block
                self.complete[layer] = False
        else:
            self.valid[layer, ctx.row_index(), ctx.write_positions()] = True
            self.complete[layer] = False
            self.valid[layer, :, self.scratch] = False
        self.extent[layer] = max(self.extent[layer], ctx.end)
        return self.extent[layer]

    def store(self, layer: int, k: Tensor, v: Tensor, ctx: Context) -> None:
        """Write K/V (B', H, T, hd) of this call's tokens into their slots."""
        if not ctx.writes:
            return
        functional = torch.is_grad_enabled() and (
            k.requires_grad or v.requires_grad or self.k[layer].requires_grad)
        k, v = k.to(self.k[layer].dtype), v.to(self.v[layer].dtype)
        if ctx.contiguous:
            if functional:
                self.k[layer] = self.k[layer].slice_scatter(k, 2, ctx.start, ctx.end)
                self.v[layer] = self.v[layer].slice_scatter(v, 2, ctx.start, ctx.end)
            else:
                self.k[layer][:, :, ctx.start:ctx.end] = k
                self.v[layer][:, :, ctx.start:ctx.end] = v
            return
        heads = torch.arange(k.shape[1], device=k.device).view(1, -1, 1)
        index = (ctx.row_index().unsqueeze(1), heads, ctx.write_positions().unsqueeze(1))
        if functional:
            self.k[layer] = self.k[layer].index_put(index, k)
            self.v[layer] = self.v[layer].index_put(index, v)
        else:
            self.k[layer].index_put_(index, k)
            self.v[layer].index_put_(index, v)

    def carry(self, source: int, target: int, ctx: Context) -> None:
        """Copy the K/V of ctx's tokens from cache layer `source` to `target` (a looped model's
        halted tokens keep their last pass's K/V in the sets of the passes after it)."""
        if ctx.contiguous:
            k = self.k[source][:, :, ctx.start:ctx.end]
            v = self.v[source][:, :, ctx.start:ctx.end]
        else:
            heads = torch.arange(self.k[source].shape[1], device=self.valid.device).view(1, -1, 1)
            index = (ctx.row_index().unsqueeze(1), heads, ctx.write_positions().unsqueeze(1))
            k, v = self.k[source][index], self.v[source][index]
        self.mark(target, ctx)
        self.store(target, k, v, ctx)

    def view(self, layer: int, ctx: Context) -> tuple[Tensor, Tensor]:
        """Keys and values the queries of this call may read: their rows, positions < extent."""
        n = self.extent[layer]
        k, v = self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        if ctx.rows is not None:
            k, v = k.index_select(0, ctx.rows), v.index_select(0, ctx.rows)
        return k, v


@dataclass
class Context:
    """One call of the layer stack: which rows, which positions, which cache.

    `positions` is (B', T) or (1, T) when every row shares them. `start` is set when every row's
    tokens sit at start..start+T-1, the common case that needs no index tensors; `rows` picks
    cache rows (None: all, in order); `pad` marks padding entries of a ragged selection, which
    run but write nothing and must be discarded. `memo` holds tables a backbone derives from the
    positions (rotary tables, masks), built once per call and shared by the layers. `call` is
    the adaptive method's instructions for this call (`adadepth.depth.dispatch.Call`): the core
    never reads it, and hands it on to every context derived from this one.
    """

    positions: Tensor
    cache: KVCache | None = None
    start: int | None = None
    rows: Tensor | None = None
    pad: Tensor | None = None
    end: int = 0  # 1 + the highest real position (a host int: cache extents need no sync)
    kv_offset: int = 0
    memo: dict[str, Any] = field(default_factory=dict)
    call: Any = None
    writes: bool = True

    @classmethod
    def block(cls, start: int, length: int, device: torch.device | str,
              cache: KVCache | None = None, call: Any = None) -> Context:
        positions = torch.arange(start, start + length, device=device).unsqueeze(0)
        return cls(positions, cache, start, end=start + length, call=call)

    @classmethod
    def at(cls, positions: Tensor, cache: KVCache | None = None, call: Any = None) -> Context:
        """Arbitrary per-row positions (B, T), e.g. rows of a batch at different lengths."""
        return cls(positions, cache, None, end=int(positions.max()) + 1, call=call)

    @property
    def contiguous(self) -> bool:
        """All rows, each at start..start+T-1: slice writes and the plain causal mask apply."""
        return self.start is not None and self.rows is None and self.pad is None

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def row_index(self) -> Tensor:
        """(B', 1) cache row of each row of this call."""
        if self.rows is not None:
            return self.rows.unsqueeze(1)
        n = self.cache.batch if self.cache is not None else self.positions.shape[0]
        return torch.arange(n, device=self.positions.device).unsqueeze(1)

    def write_positions(self) -> Tensor:
        """Positions to write K/V at: padding entries go to the cache's scratch slot."""
        pos = self.positions
        if self.rows is not None or self.pad is not None:
            pos = pos.expand(self.row_index().shape[0], -1)
        if self.pad is not None and self.cache is not None:
            pos = pos.masked_fill(self.pad, self.cache.scratch)
        return pos

    def select(self, index: Tensor | None = None, rows: Tensor | None = None,
               pad: Tensor | None = None) -> Context:
        """The context of a subset: `rows` (B',) picks rows of this call, then `index` (B', k)
        picks tokens within each of them (in increasing position), `pad` (B', k) marks entries
        that only fill a ragged selection. Gather the hidden states the same way."""
        positions, start, cache_rows, end = self.positions, self.start, self.rows, self.end
        if rows is not None:
            if positions.shape[0] > 1:
                positions = positions.index_select(0, rows)
            cache_rows = rows if self.rows is None else self.rows.index_select(0, rows)
        if index is not None:
            batch = index.shape[0]
            positions = positions.expand(batch, -1).gather(1, index)
            start = None
        old_pad = self.pad
        if old_pad is not None:
            if rows is not None:
                old_pad = old_pad.index_select(0, rows)
            if index is not None:
                old_pad = old_pad.gather(1, index)
            pad = old_pad if pad is None else pad | old_pad
        if pad is not None:
            start = None
        return Context(positions, self.cache, start, cache_rows, pad, end, self.kv_offset,
                       call=self.call, writes=self.writes)

    def with_kv_offset(self, offset: int) -> Context:
        """The same tokens writing the cache's layers offset.. (masks and tables shared)."""
        return replace(self, kv_offset=offset)

    def reading(self, offset: int) -> Context:
        """The same tokens attending to the K/V the cache holds at layers offset.., writing none
        of their own (their slots there must already hold K/V, e.g. from an earlier pass)."""
        return replace(self, kv_offset=offset, writes=False)

    def with_call(self, call: Any) -> Context:
        """The same tokens under other instructions (masks and tables shared)."""
        return replace(self, call=call)


def attention_mask(ctx: Context, layer: int, n_keys: int, window: int | None = None,
                   ) -> tuple[Tensor | None, bool]:
    """The mask of one layer's attention: (mask or None, use the kernel's causal flag).

    `layer` is the cache layer (the block index plus ctx.kv_offset).
    True = may attend. Key j is visible to query i when it sits at a position no later than the
    query's, within the sliding window if any, and (with a cache) its slot holds valid K/V.
    The common cases return no mask: a plain causal block, or cached decoding of one token per
    row at the end of a complete cache.
    """
    cache, T = ctx.cache, ctx.length
    if ctx.contiguous and window is None:
        if cache is None or (cache.complete[layer] and ctx.end == n_keys):
            if n_keys == T:
                return None, T > 1
            if T == 1:
                return None, False
    key = ("mask", window, layer if cache is not None and not cache.complete[layer] else None,
           n_keys)
    if key in ctx.memo:
        return ctx.memo[key], False
    q_pos = ctx.positions.unsqueeze(-1)  # (B' or 1, T, 1)
    if cache is None:  # the keys are this call's own tokens
        k_pos = ctx.positions.unsqueeze(-2)
        if ctx.pad is not None:  # real queries never see padding
            k_pos = k_pos.masked_fill(ctx.pad.unsqueeze(-2), torch.iinfo(k_pos.dtype).max)
        visible = k_pos <= q_pos
    else:
        k_pos = torch.arange(n_keys, device=q_pos.device).view(1, 1, -1)
        visible = k_pos <= q_pos
        if not cache.complete[layer]:
            valid = cache.valid[layer, :, :n_keys]
            if ctx.rows is not None:
                valid = valid.index_select(0, ctx.rows)
            visible = visible & valid.unsqueeze(1)
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    if ctx.pad is not None:  # padding queries are discarded; any key keeps their softmax finite
        visible = visible | ctx.pad.unsqueeze(-1)
    mask = visible.unsqueeze(1)  # (B', 1, T, n): broadcast over heads
    ctx.memo[key] = mask
    return mask, False
