"""Self-speculative decoding for any pretrained model: the model drafts tokens with part of its
own layers and verifies them with all of them, over one shared KV cache, so that the output is
exactly the full model's (greedy) or has exactly its distribution (sampling).
docs/methods/selfspec.md explains the method, its options, and which choices are whose.

Two drafters share one verify pass (`depth/drafting.py`) and the one draft/verify loop
(`adadepth.generate.speculative`):

- `drafter: skip` (Draft & Verify, Zhang et al. 2024; SWIFT, Xia et al. 2025): the draft is
  the model with a set of layers skipped, nothing trained. The set is searched after `fit`
  (`after_training`) on held-out windows for the most accepted tokens per second: the
  acceptance each set gets is measured on the windows, the time a round takes is measured on
  this machine, and the best candidates are then timed decoding held-out prompts against the
  dense model; the winner is stored in the run.
- `drafter: exit` (Kangaroo, Liu et al. 2024): the draft is the first E layers and a small
  adapter (attention and a small FFN, its own norm) read through the model's shared head; only
  the adapter trains, by distillation to the full model's next-token distribution, with the
  backbone frozen. The first E layers are exactly the full model's, so the draft's K/V and
  states there are reused by the verify pass; the adapter keeps its own K/V in one extra cache
  layer.

Both stop drafting in a round when the drafted token's probability under the draft falls below
a threshold (for a batch: when it has for every row), with a cap (`draft_tokens`, the bench's
knob); both draft through the head restricted to the `draft_vocab` most frequent tokens of
the text they were fitted on (the verifier always reads the whole vocabulary, so this costs
acceptance, never exactness). Threshold and cap are calibrated after `fit` the same way as the
skip set.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adadepth import flops as fl
from adadepth.config import ModelConfig, Strict
from adadepth.depth.drafting import prepare, verify_reusing
from adadepth.depth.exits import check_backbone
from adadepth.depth.method import Knob, Measurement, Method, MethodSpec, attribute_set
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.generate import Draft, Round, Sampler, decode, speculative
from adadepth.model import Block, Context, KVCache, Output
from adadepth.model.transformer import rope_tables

CAPS = (1, 2, 3, 4, 6, 8)  # draft caps the calibration tries
THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)  # confidence thresholds it tries


class SelfSpecConfig(Strict):
    """Self-speculative decoding; defaults are ours unless docs/methods/selfspec.md says."""

    drafter: Literal["skip", "exit"] = Field(
        "skip", description="skip: the model less a searched set of layers, nothing trains; "
        "exit: the first exit_layer layers and a trained adapter (Kangaroo)")
    skip: list[int] | None = Field(None, description="skip drafter: the layers it leaves out; "
                                   "None = searched after fit")
    exit_layer: PositiveInt | None = Field(None, description="exit drafter: E, layers it runs "
                                           "before the adapter; None = a fifth of the layers")
    adapter: Literal["block", "attention", "none"] = Field(
        "block", description="exit drafter's adapter: attention and a small FFN (block), "
        "attention alone (Kangaroo's), or none (a plain early exit through the shared head)")
    adapter_ffn: PositiveInt | None = Field(None, description="the block adapter's FFN width; "
                                            "None = a quarter of the backbone's")
    draft_tokens: PositiveInt | None = Field(None, le=32, description="the most tokens a round "
                                             "drafts; None = calibrated after fit")
    threshold: float | None = Field(None, ge=0, le=1, description="drafting stops after a "
                                    "token whose draft probability is below it; None = "
                                    "calibrated after fit")
    draft_vocab: NonNegativeInt = Field(8192, description="the draft reads its head over the "
                                        "N most frequent tokens only; 0 = the whole vocabulary")
    search_windows: PositiveInt = Field(8, description="held-out windows the search and the "
                                        "calibration measure acceptance on")
    search_len: PositiveInt = Field(128, description="tokens of each of those windows")
    search_width: PositiveInt = Field(6, description="skip search: candidate layers re-measured "
                                      "at each step of the greedy search")
    max_skipped: float = Field(0.8, gt=0, lt=1, description="skip search: at most this "
                               "fraction of the layers is skipped")
    timed_prompts: NonNegativeInt = Field(2, description="held-out prompts the finalists are "
                                          "timed on, decoding against the dense model; 0 = "
                                          "choose on the estimate alone")
    timed_tokens: PositiveInt = Field(48, description="new tokens per timed prompt")
    finalists: PositiveInt = Field(4, description="candidates (draft, threshold, cap) timed "
                                   "by real decoding")
    distill_chunk: PositiveInt = Field(1024, description="positions per chunk of the "
                                       "distillation loss (never a whole batch's logits)")


# -- the adapter --------------------------------------------------------------------------------
def adapter_shape(cfg: Any, ffn: int | None) -> ModelConfig:
    """Our block's shape for an adapter over a backbone of shape `cfg`: its width, heads of an
    even size that divide it, and its kv heads where they divide the heads."""
    d = cfg.d_model
    heads = cfg.n_heads if d % cfg.n_heads == 0 and (d // cfg.n_heads) % 2 == 0 else None
    if heads is None:
        heads = next(h for h in range(max(1, d // 64), d + 1) if d % h == 0 and (d // h) % 2 == 0)
    kv = cfg.kv_heads if heads % cfg.kv_heads == 0 else heads
    return ModelConfig(vocab_size=1, d_model=d, n_layers=1, n_heads=heads, n_kv_heads=kv,
                       d_ff=ffn or max(8, cfg.d_ff // 4), max_seq_len=cfg.max_seq_len)


class DraftAdapter(nn.Module):
    """Kangaroo's adapter over the state after layer E: our own decoder block (attention with its
    own rotary positions and K/V, then a small SwiGLU FFN unless `attention_only`) and a norm of
    its own, initialised as the backbone's final norm, before the shared LM head. The output
    projections start at zero, so the untrained adapter is a plain early exit."""

    def __init__(self, backbone: nn.Module, ffn: int | None, attention_only: bool) -> None:
        super().__init__()
        self.shape = adapter_shape(backbone.cfg, ffn)
        self.block = Block(self.shape)
        if attention_only:
            self.block.ffn_norm = nn.Identity()
            self.block.ffn = _Zero()
        for name, p in self.block.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.zeros_(p)
        self.norm = backbone.make_norm()
        cos, sin = rope_tables(self.shape.head_dim, self.shape.max_seq_len, 10000.0)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope(self, ctx: Context) -> tuple[Tensor, Tensor]:
        if ctx.start is not None and ctx.positions.shape[0] == 1 and ctx.pad is None:
            end = ctx.start + ctx.length
            return (self.rope_cos[ctx.start:end].unsqueeze(0),
                    self.rope_sin[ctx.start:end].unsqueeze(0))
        return self.rope_cos[ctx.positions], self.rope_sin[ctx.positions]

    def forward(self, x: Tensor, ctx: Context, slot: int) -> Tensor:
        """The adapter's output state (before its norm); with a cache it reads and writes its
        K/V at cache layer `slot`."""
        cos, sin = self.rope(ctx)
        return self.block(x, cos, sin, _memo_free(ctx), slot - ctx.kv_offset)

    def write_kv(self, x: Tensor, ctx: Context, slot: int) -> None:
        """Only the adapter's K/V for the tokens of ctx (states at layer E)."""
        ctx = _memo_free(ctx)
        attn = self.block.attn
        k, v = attn.keys_values(self.block.attn_norm(x), *self.rope(ctx), ctx)
        ctx.cache.mark(slot, ctx)
        ctx.cache.store(slot, k, v, ctx)


class _Zero(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def _memo_free(ctx: Context) -> Context:
    """The same call without the backbone's memo (its rotary tables are not the adapter's)."""
    return Context(ctx.positions, ctx.cache, ctx.start, ctx.rows, ctx.pad, ctx.end,
                   ctx.kv_offset)


def extend_cache(cache: KVCache, kv_heads: int, head_dim: int) -> KVCache:
    """`cache` with one more layer of its own shape (the adapter's K/V)."""
    ref = cache.k[0]
    shape = (cache.batch, kv_heads, cache.max_len + 1, head_dim)
    cache.k.append(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
    cache.v.append(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
    cache.valid = torch.cat([cache.valid, torch.zeros_like(cache.valid[:1])])
    cache.extent.append(0)
    cache.complete.append(True)
    return cache


def output_layer(backbone: nn.Module) -> nn.Linear | None:
    """The backbone's unembedding as a plain linear layer, when it is one (then the draft can
    read it over a subset of the vocabulary, and distillation can fuse it with its loss)."""
    hf = getattr(backbone, "hf", None)
    layer = hf.get_output_embeddings() if hf is not None else getattr(backbone, "lm_head", None)
    if type(layer) is not nn.Linear:
        return None
    if hf is not None and getattr(hf.config, "final_logit_softcapping", None):
        return None
    return layer


# -- distillation -----------------------------------------------------------------------------
class _FusedDistill(torch.autograd.Function):
    """KL(p_teacher || q_student) summed over positions, through one linear head, chunk by
    chunk: each chunk's logits exist only while it is processed, and the gradient with respect
    to the student's normed states ((q - p) W per position) is computed there too, so the
    backward pass needs no logits at all. Also returns, per position, the argmax of each."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, weight: Tensor,
                chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        grad = torch.empty_like(student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        t_arg = torch.empty(student.shape[0], dtype=torch.long, device=student.device)
        s_arg = torch.empty_like(t_arg)
        for a in range(0, student.shape[0], chunk):
            s_logits = F.linear(student[a:a + chunk], weight).float()
            t_logits = F.linear(teacher[a:a + chunk], weight).float()
            t_logp, s_logp = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
            p = t_logp.exp()
            total += (p * (t_logp - s_logp)).sum()
            grad[a:a + chunk] = ((s_logp.exp() - p) @ weight.float()).to(grad.dtype)
            t_arg[a:a + chunk], s_arg[a:a + chunk] = t_logits.argmax(-1), s_logits.argmax(-1)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(t_arg, s_arg)
        return total, t_arg, s_arg

    @staticmethod
    def backward(ctx: Any, g: Tensor, *_: Any) -> tuple[Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def distill(student: Tensor, teacher: Tensor, unembed: Callable[[Tensor], Tensor],
            layer: nn.Linear | None, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Summed KL(p || q) of normed states (N, d) read through the head, and the argmax of each
    per position; chunked either way (fused with a plain linear head, else recomputed in the
    backward pass by checkpointing each chunk)."""
    if layer is not None and layer.bias is None:
        return _FusedDistill.apply(student, teacher.detach(), layer.weight.detach(), chunk)

    def piece(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s_logits = unembed(s).float()
        with torch.no_grad():
            t_logits = unembed(t).float()
            t_logp = t_logits.log_softmax(-1)
        s_logp = s_logits.log_softmax(-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum()
        return kl, t_logits.argmax(-1), s_logits.detach().argmax(-1)

    total = student.new_zeros((), dtype=torch.float32)
    t_args, s_args = [], []
    for a in range(0, student.shape[0], chunk):
        kl, ta, sa = checkpoint(piece, student[a:a + chunk], teacher[a:a + chunk].detach(),
                                use_reentrant=False)
        total = total + kl
        t_args.append(ta)
        s_args.append(sa)
    return total, torch.cat(t_args), torch.cat(s_args)


def finalists(path: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The candidates to time: the best-estimated policy of each of the best drafts (up to
    count - 1 of them), then the best remaining (draft, cap) pairs. The estimate ranks settings
    but errs in level, in both directions (on SmolLM2 it was pessimistic for skipped layers,
    whose drafts see the full model's context while decoding, and optimistic about long
    drafts), so the timed ones span drafts and caps."""
    candidates = [{"skip": entry["skip"], "agreement": entry["agreement"], **policy}
                  for entry in path for policy in entry["policies"]]
    candidates.sort(key=lambda r: -r["estimated_speedup"])
    chosen: list[dict[str, Any]] = []
    for r in candidates:
        if len(chosen) < max(1, count - 1) and all(c["skip"] != r["skip"] for c in chosen):
            chosen.append(r)
    for r in candidates:
        if len(chosen) < count and r not in chosen:
            chosen.append(r)
    return chosen


@dataclass
class Reference:
    """The full model on held-out windows, computed once for many candidate drafts."""

    states: list[Tensor]  # the input of layer 0, ..., of layer L-1, then the final state
    ctx: Context  # the windows' call, without a cache
    target: Tensor  # (B, T) the full model's top token per position
    cache: KVCache | None  # every layer's K/V of the windows, when asked for


# -- counting what ran ------------------------------------------------------------------------
@dataclass
class SpecTally:
    """Work done and tokens made, summed over calls (rows of a batch counted one by one)."""

    layers: int = 0  # token-blocks run (drafts, verify passes, prefill)
    adapter: int = 0  # token runs of the adapter (its K/V alone counted as a run)
    heads: int = 0  # token reads of the whole LM head
    draft_heads: int = 0  # token reads of the draft's head over the draft vocabulary
    tokens: int = 0  # tokens made: the FLOPs-per-token denominator (prompt tokens included)
    drafted: int = 0  # tokens drafted for rows still generating
    accepted: int = 0  # ... of which the verify pass kept
    row_rounds: int = 0  # rows that took part in a round, summed over rounds
    rounds: int = 0

    def minus(self, other: SpecTally) -> SpecTally:
        return SpecTally(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                            for f in fields(self)})

    def copy(self) -> SpecTally:
        return SpecTally(**asdict(self))


# -- the method -------------------------------------------------------------------------------
class SelfSpec(Method):
    """A pretrained model decoding self-speculatively: drafts from part of it, verified by all."""

    name = "self-spec"
    depth_unit = "layers run"

    def __init__(self, backbone: nn.Module, cfg: SelfSpecConfig) -> None:
        check_backbone(backbone, self.name)
        super().__init__(backbone)
        L = backbone.n_layers
        self.scfg = cfg
        if cfg.skip is not None:
            bad = [i for i in cfg.skip if not 0 <= i < L]
            if bad:
                raise UserError(f"self-spec.skip names layer {bad[0]}; the backbone has layers "
                                f"0..{L - 1}")
            if not cfg.skip:
                raise UserError("self-spec.skip is empty: the draft would be the whole model")
            if len(set(cfg.skip)) == L:
                raise UserError("self-spec.skip names every layer: the draft would run none")
        if cfg.exit_layer is not None and not 1 <= cfg.exit_layer <= L - 1:
            raise UserError(f"self-spec.exit_layer must be in [1, {L - 1}] for a backbone of {L} "
                            f"layers, got {cfg.exit_layer}")
        self.exit_layer = cfg.exit_layer or max(1, round(L / 5))
        self.adapter: DraftAdapter | None = None
        if cfg.drafter == "exit" and cfg.adapter != "none":
            self.adapter = DraftAdapter(backbone, cfg.adapter_ffn, cfg.adapter == "attention")
            p = next(backbone.parameters())
            self.adapter.to(device=p.device, dtype=p.dtype)
        V = backbone.cfg.vocab_size
        self.head_layer = output_layer(backbone)
        n_vocab = V if cfg.draft_vocab == 0 or self.head_layer is None else min(cfg.draft_vocab, V)
        # What calibration decides, kept as buffers so a run folder restores them.
        self.register_buffer("skip_mask", torch.zeros(L, dtype=torch.bool))
        self.register_buffer("vocab", torch.arange(n_vocab))
        self.register_buffer("counts", torch.zeros(V, dtype=torch.float64))
        # (threshold, cap) at batch 1 and for larger batches, whose verify passes cost more
        self.register_buffer("policy", torch.tensor([
            cfg.threshold if cfg.threshold is not None else 0.5,
            float(cfg.draft_tokens or 4)]).repeat(2, 1))
        if cfg.skip is not None:
            self.skip_mask[cfg.skip] = True
        elif cfg.drafter == "skip":  # until the search: every other layer of the middle half
            self.skip_mask[list(range(L // 4, L - L // 4, 2)) or [L // 2]] = True
        self.refresh()
        self.dense = False  # the dense reference: the backbone alone, plain decoding
        self.tally = SpecTally()
        self.last_depth: Tensor | None = None
        self.costs = self.unit_costs()
        self.knob = Knob("draft_tokens", (1.0, 2.0, 4.0, 8.0), low=0, high=32, integer=True)
        self._head_cache: tuple[Any, Tensor] | None = None

    # -- what calibration set, read into plain Python once ----------------------------------------
    def refresh(self) -> None:
        """Host copies of the buffers (no device sync per drafted token)."""
        L = self.backbone.n_layers
        if self.scfg.drafter == "skip":
            skipped = self.skip_mask.nonzero().flatten().tolist()
            self.kept = [i for i in range(L) if i not in set(skipped)]
            self.exact = min(skipped) if skipped else L  # layers 0..exact-1 are the model's own
        else:
            self.kept = list(range(self.exit_layer))
            self.exact = self.exit_layer
        (self.threshold, cap), (self.batched_threshold, batched_cap) = self.policy.tolist()
        self.cap, self.batched_cap = int(cap), int(batched_cap)
        self.full_vocab = len(self.vocab) == self.backbone.cfg.vocab_size

    def set_policy(self, threshold: float, cap: int, batched: bool | None = None) -> None:
        """The threshold and cap at batch 1 (batched False), for larger batches (True), or both
        (None)."""
        rows = [0, 1] if batched is None else [int(batched)]
        self.policy[rows] = torch.tensor([threshold, float(cap)], dtype=self.policy.dtype,
                                         device=self.policy.device)
        self.refresh()

    def set_skip(self, layers: list[int]) -> None:
        self.skip_mask.zero_()
        self.skip_mask[layers] = True
        self.refresh()

    def skipped(self) -> list[int]:
        return [i for i in range(self.backbone.n_layers) if i not in set(self.kept)] \
            if self.scfg.drafter == "skip" else []

    # -- saving ---------------------------------------------------------------------------------
    def method_config(self) -> dict[str, Any]:
        return self.scfg.model_dump()

    def method_modules(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter} if self.adapter is not None else {}

    def method_buffers(self) -> dict[str, Tensor]:
        return {"skip_mask": self.skip_mask, "vocab": self.vocab, "counts": self.counts,
                "policy": self.policy}

    def load_method_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_method_state(tensors)
        self.refresh()

    # -- inference --------------------------------------------------------------------------------
    @property
    def slot(self) -> int:
        """The cache layer of the adapter's K/V."""
        return self.backbone.n_layers

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cache = self.backbone.new_cache(batch, max_len)
        if self.adapter is not None and not self.dense:
            shape = self.adapter.shape
            extend_cache(cache, shape.kv_heads, shape.head_dim)
        return cache

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None) -> Output:
        """The full model. With a cache that has the adapter's layer, the adapter's K/V of
        these tokens are written too (the prompt's, so later drafts can attend to them)."""
        bb = self.backbone
        x, ctx = bb.prepare(idx, cache, start, positions=positions)
        with_adapter = self.adapter is not None and cache is not None and len(cache) > self.slot
        at_exit = None
        for i in range(bb.n_layers):
            x = bb.run_layer(i, x, ctx)
            if with_adapter and i == self.exit_layer - 1:
                at_exit = x
        if at_exit is not None:
            self.adapter.write_kv(at_exit, ctx, self.slot)
            self.tally.adapter += idx.numel()
        n = idx.numel()
        self.tally.layers += n * bb.n_layers
        self.tally.heads += n
        self.tally.tokens += n
        self.last_depth = torch.full(idx.shape, bb.n_layers, device=idx.device)
        return Output(logits=bb.head(x), hidden=x)

    @property
    def speculator(self) -> SelfSpec | None:  # type: ignore[override]
        return None if self.dense else self

    @property
    def draft_tokens(self) -> int:
        return max(self.cap, self.batched_cap)

    def draft_head(self, x: Tensor) -> Tensor:
        """Logits of the draft over the draft vocabulary, from its last state (B, T, d)."""
        normed = self.adapter.norm(x) if self.adapter is not None else self.backbone.final_norm(x)
        if self.full_vocab:
            return self.backbone.unembed(normed)
        weight = self.head_layer.weight
        key = (weight.data_ptr(), weight._version, self.vocab.data_ptr(), self.vocab._version)
        if self._head_cache is None or self._head_cache[0] != key:
            with torch.no_grad():
                self._head_cache = (key, weight.detach().index_select(0, self.vocab))
        return F.linear(normed, self._head_cache[1])

    def draft_path(self, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """The draft's layers on states x: (its last state, its state after the exact prefix).
        With a cache, the adapter reads and writes its own K/V there."""
        bb = self.backbone
        exact = x
        for i in self.kept:
            x = bb.run_layer(i, x, ctx)
            if i == self.exact - 1:
                exact = x
        if self.adapter is not None:
            x = self.adapter(x, ctx, self.slot)
        return x, exact

    def draft(self, rnd: Round, cache: KVCache) -> Draft:
        """Up to the cap, stopping once every row has drafted a token whose draft probability
        is below the threshold (that token is still verified; a row past its own stop keeps
        drafting while others go on, for free in a batch, and its drafts are verified too)."""
        B, V = rnd.last.shape[0], self.backbone.cfg.vocab_size
        # the policy of the batch the generation started with (rows leave as they finish)
        threshold, cap = ((self.batched_threshold, self.batched_cap) if cache.batch > 1
                          else (self.threshold, self.cap))
        n = min(cap, rnd.most)
        token = rnd.last
        drafts, probs, states = [], [], []
        going = torch.ones(B, dtype=torch.bool, device=token.device)
        for k in range(n):
            x, ctx = prepare(self.backbone, token, cache, rnd.positions.unsqueeze(1) + k,
                             rnd.rows)
            x, exact = self.draft_path(x, ctx)
            states.append(exact)
            logits = self.draft_head(x)[:, -1]
            pick, q = rnd.sample(logits)
            token = pick if self.full_vocab else self.vocab[pick]
            if q is None:
                confidence = logits.float().softmax(-1).max(-1).values
            else:
                confidence = q.gather(1, pick).squeeze(1)
                if not self.full_vocab:
                    q = torch.zeros(B, V, dtype=q.dtype, device=q.device).index_copy_(
                        1, self.vocab, q)
                probs.append(q)
            drafts.append(token)
            going &= confidence >= threshold
            if k + 1 < n and not bool(going.any()):
                n = k + 1
                break
        self.tally.layers += B * n * len(self.kept)
        self.tally.adapter += B * n if self.adapter is not None else 0
        self.tally.draft_heads += B * n
        self.tally.drafted += B * n
        reuse = torch.cat(states, 1) if self.exact > 0 else None
        return Draft(torch.cat(drafts, 1), torch.stack(probs, 1) if probs else None, reuse)

    def verify(self, rnd: Round, draft: Draft, cache: KVCache) -> Tensor:
        """The full model on [last, drafts], reusing the draft's exact prefix of layers; the
        last drafted token's adapter K/V are written too (the draft never fed it)."""
        at_exit = None
        if self.adapter is not None:
            def at_exit(x: Tensor, ctx: Context) -> None:
                self.adapter.write_kv(x, ctx, self.slot)
                self.tally.adapter += x.shape[0]
        h, blocks = verify_reusing(self.backbone, rnd, draft.tokens, draft.carry, self.exact,
                                   cache, at_exit)
        self.tally.layers += blocks
        self.tally.heads += h.shape[0] * h.shape[1]
        return self.backbone.head(h)

    def observe(self, accepted: Tensor, active: Tensor) -> None:
        rows = int(active.sum())
        kept = int(accepted[active].sum())
        self.tally.tokens += kept + rows
        self.tally.accepted += kept
        self.tally.row_rounds += rows
        self.tally.rounds += 1

    def token_depth(self) -> Tensor | None:
        return self.last_depth

    # -- training (the exit drafter's adapter) ---------------------------------------------------
    def set_trainable(self, from_scratch: bool) -> None:
        """Only the adapter trains; the backbone stays frozen (Kangaroo's recipe)."""
        if from_scratch:
            raise UserError("self-spec speeds up a trained model: pass --backbone")
        self.trains_backbone = False
        self.requires_grad_(False)
        if self.adapter is not None:
            self.adapter.requires_grad_(True)

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """KL from the full model's next-token distribution to the draft's, per position,
        chunked over positions. The frozen layers run forward only."""
        if self.adapter is None:
            raise UserError("self-spec trains only the exit drafter's adapter")
        bb, E = self.backbone, self.exit_layer
        with torch.no_grad():
            h, ctx = bb.prepare(x)
            for i in range(bb.n_layers):
                h = bb.run_layer(i, h, ctx)
                if i == E - 1:
                    exit_state = h
            teacher = bb.final_norm(h)
        student = self.adapter.norm(self.adapter(exit_state, ctx, self.slot))
        d = student.shape[-1]
        kl, t_arg, s_arg = distill(student.reshape(-1, d), teacher.reshape(-1, d), bb.unembed,
                                   self.head_layer, self.scfg.distill_chunk)
        with torch.no_grad():  # what the teacher predicts is what the draft vocabulary needs
            self.counts.index_add_(0, t_arg, torch.ones_like(t_arg, dtype=self.counts.dtype))
            self.counts.index_add_(0, y.flatten(), torch.ones(y.numel(), dtype=self.counts.dtype,
                                                              device=y.device))
        loss = kl / t_arg.numel()
        return loss, {"kl": loss.item(), "draft_agreement": float((t_arg == s_arg).float().mean())}

    def training_flops_per_token(self, seq_len: int) -> float:
        """The frozen model's forward (teacher, and the draft's first E layers with it), the
        adapter's forward and backward, and the head read three times (teacher, student, the
        student's gradient) — the frozen layers below the adapter are never differentiated."""
        scores = fl.attention(self.cfg, (seq_len + 1) / 2)["attn_scores"]
        c = self.costs
        return (self.cfg.n_layers * (c["layer"] + scores) + 3 * (c["adapter"] + scores)
                + 3 * c["head"])

    # -- calibration ------------------------------------------------------------------------------
    @torch.no_grad()
    def choose_vocab(self, windows: Tensor) -> None:
        """The draft vocabulary: the tokens the full model predicts and the text holds most
        often (counted while training and on `windows`), ties to the lower id."""
        if self.full_vocab:
            return
        for part in windows.split(4):  # the logits of a few windows at a time
            target = self.backbone(part).logits.argmax(-1)
            for t in (target, part):
                self.counts.index_add_(0, t.flatten(), torch.ones(
                    t.numel(), dtype=self.counts.dtype, device=t.device))
        order = torch.sort(-self.counts, stable=True).indices
        self.vocab.copy_(order[:len(self.vocab)].sort().values)
        self.refresh()

    @torch.no_grad()
    def reference(self, windows: Tensor, cache: bool = False) -> Reference:
        """The full model on `windows` (B, T): its states before every layer and after the last,
        its top token per position, and (with `cache`) every layer's K/V."""
        bb = self.backbone
        kv = bb.new_cache(*windows.shape) if cache else None
        x, ctx = bb.prepare(windows, kv, 0)
        states = [x]
        for i in range(bb.n_layers):
            x = bb.run_layer(i, x, ctx)
            states.append(x)
        plain = bb.prepare(windows)[1] if cache else ctx  # drafts run on it without a cache
        return Reference(states, plain, bb.head(x).argmax(-1), kv)

    def agreement(self, windows: Tensor, ref: Reference | None = None) -> tuple[Tensor, Tensor]:
        """Per position of `windows`: whether the draft's first token there is the full model's,
        and its draft probability, as a round's first draft sees it (the exit drafter: exactly,
        teacher-forced; the skip drafter: with the full model's K/V as context)."""
        if self.scfg.drafter == "exit":
            return self.teacher_forced(windows, ref)
        return self.first_draft(windows, ref)

    @torch.no_grad()
    def teacher_forced(self, windows: Tensor, ref: Reference | None = None,
                       ) -> tuple[Tensor, Tensor]:
        """Per position of `windows` (B, T): whether the draft's top token is the full model's,
        and the draft's probability of it, with the whole true prefix as context and no cache.
        For the exit drafter this is exactly what a round's draft sees (its first E layers and
        the adapter's K/V of true tokens are the full pass's); for the skip drafter the kept
        layers then read the draft's own states of earlier tokens, not the full model's K/V,
        which made acceptance look lower than it is (0.66 against 0.86 decoding, SmolLM2)."""
        bb = self.backbone
        ref = ref or self.reference(windows)
        x = ref.states[self.exact]
        for i in self.kept:
            if i >= self.exact:
                x = bb.run_layer(i, x, ref.ctx)
        if self.adapter is not None:
            x = self.adapter(x, ref.ctx, self.slot)
        return self.judge(x, ref.target)

    @torch.no_grad()
    def first_draft(self, windows: Tensor, ref: Reference | None = None,
                    chunk: int = 32) -> tuple[Tensor, Tensor]:
        """The skip draft's first token at every position of `windows` (B, T) exactly as a
        round drafts it: its kept layers attend to the full model's K/V of every earlier
        position and to its own at the position itself. Each position is a row of its own
        (`chunk` at a time), over a cache holding the full model's K/V below it."""
        bb = self.backbone
        ref = ref if ref is not None and ref.cache is not None else self.reference(windows, True)
        B, T = windows.shape
        above = [i for i in self.kept if i >= self.exact]
        agree = torch.zeros(B, T, dtype=torch.bool, device=windows.device)
        conf = torch.zeros(B, T, device=windows.device)
        caches: dict[int, KVCache] = {}
        for w in range(B):
            for a in range(0, T, chunk):
                rows = torch.arange(a, min(T, a + chunk), device=windows.device)
                n = len(rows)
                cache = caches.get(n) or caches.setdefault(n, bb.new_cache(n, T))
                slots = torch.arange(T + 1, device=windows.device)
                for i in above:
                    cache.k[i].copy_(ref.cache.k[i][w:w + 1].expand_as(cache.k[i]))
                    cache.v[i].copy_(ref.cache.v[i][w:w + 1].expand_as(cache.v[i]))
                    cache.valid[i] = slots < rows.unsqueeze(1)  # the true prefix only
                    cache.extent[i], cache.complete[i] = T, False
                x = ref.states[self.exact][w, rows].unsqueeze(1)
                ctx = Context.at(rows.unsqueeze(1), cache)
                for i in above:
                    x = bb.run_layer(i, x, ctx)
                agree[w, rows], conf[w, rows] = (
                    t.squeeze(1) for t in self.judge(x, ref.target[w, rows].unsqueeze(1)))
        return agree, conf

    def judge(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """From draft states x (..., d): whether the draft's top token is `target`, and its
        probability under the draft."""
        conf, pick = self.draft_head(x).float().softmax(-1).max(-1)
        token = pick if self.full_vocab else self.vocab[pick]
        return token == target, conf

    @torch.no_grad()
    def timings(self, prompt: Tensor, reps: int = 5) -> dict[str, Any]:
        """Seconds, on this machine at the batch of `prompt` (B, T) and the present thread count,
        of: a draft step per layer it runs, of its head and adapter, and of a verify pass of
        1..CAPS[-1]+1 tokens per row (the full model on them, head included): what the search's
        estimate is built from (at batch 1)."""
        bb = self.backbone
        B, T = prompt.shape
        width = max(CAPS) + 1
        cache = self.new_cache(B, T + width + 1)
        self(prompt, cache, 0)

        def median(fn: Callable[[], object]) -> float:
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        def layers(n_tokens: int, which: list[int]) -> Callable[[], object]:
            def run() -> None:
                x, ctx = bb.prepare(prompt[:, :n_tokens], cache, T)
                for i in which:
                    x = bb.run_layer(i, x, ctx)
            return run

        one = prompt[:, :1]
        per_layer = median(layers(1, list(range(bb.n_layers)))) / bb.n_layers
        draft_head = median(lambda: self.draft_head(bb.prepare(one, cache, T)[0]))
        adapter = 0.0
        if self.adapter is not None:
            def run_adapter() -> None:
                x, ctx = bb.prepare(one, cache, T)
                self.adapter(x, ctx, self.slot)
            adapter = median(run_adapter)
        verify = []
        for n in range(1, width + 1):
            tokens = prompt[:, :n] if n <= T else prompt[:, :1].expand(B, n)

            def run_verify(tokens: Tensor = tokens) -> None:
                x, ctx = bb.prepare(tokens, cache, T)
                for i in range(bb.n_layers):
                    x = bb.run_layer(i, x, ctx)
                bb.head(x)
            verify.append(median(run_verify))
        return {"layer_s": per_layer, "draft_head_s": draft_head, "adapter_s": adapter,
                "verify_s": verify}

    def draft_step_s(self, t: dict[str, Any]) -> float:
        return len(self.kept) * t["layer_s"] + t["adapter_s"] + t["draft_head_s"]

    @staticmethod
    def simulate(agree: Tensor, conf: Tensor, threshold: float, cap: int,
                 step_s: float, verify_s: list[float]) -> dict[str, float]:
        """Rounds of drafting over held-out rows as the policy would run them, from each
        position's agreement and draft probability: tokens per round, acceptance, and the
        estimated speedup over dense decoding (whose step is verify_s[0])."""
        made = drafted = kept = rounds = 0
        seconds = 0.0
        for row_agree, row_conf in zip(agree.tolist(), conf.tolist(), strict=True):
            t, T = 0, len(row_agree)
            while t < T:
                k = 0
                while k < cap and t + k < T:
                    k += 1
                    if row_conf[t + k - 1] < threshold:
                        break
                a = 0
                while a < k and row_agree[t + a]:
                    a += 1
                made += a + 1
                drafted += k
                kept += a
                rounds += 1
                seconds += k * step_s + verify_s[k]
                t += a + 1
        dense = made * verify_s[0]
        return {"threshold": threshold, "draft_tokens": cap, "tokens_per_round": made / rounds,
                "acceptance_rate": kept / max(drafted, 1), "estimated_speedup": dense / seconds}

    def policies(self, agree: Tensor, conf: Tensor, t: dict[str, Any]) -> list[dict[str, float]]:
        """For every cap (or the configured one), the threshold (or the configured one) of the
        highest estimated speedup; best first."""
        caps = [self.scfg.draft_tokens] if self.scfg.draft_tokens else list(CAPS)
        thresholds = [self.scfg.threshold] if self.scfg.threshold is not None else THRESHOLDS
        step = self.draft_step_s(t)
        best = [max((self.simulate(agree, conf, th, c, step, t["verify_s"]) for th in thresholds),
                    key=lambda r: r["estimated_speedup"]) for c in caps]
        return sorted(best, key=lambda r: -r["estimated_speedup"])

    def search_skip(self, windows: Tensor, t: dict[str, Any]) -> list[dict[str, Any]]:
        """Greedy: from no layer skipped, add at each step the layer whose removal keeps the
        draft's agreement with the full model highest (re-measuring the `search_width` best
        candidates of the last step), and record at every size the best policy's estimated
        speedup. Returns the path, one entry per size."""
        L = self.backbone.n_layers
        ref = self.reference(windows, cache=True)
        score: dict[int, float] = {i: 1.0 for i in range(L)}
        chosen: list[int] = []
        path = []
        most = max(1, min(L - 1, math.floor(self.scfg.max_skipped * L)))
        while len(chosen) < most:
            candidates = sorted((i for i in range(L) if i not in chosen),
                                key=lambda i: -score[i])
            measure = candidates if not chosen else candidates[:self.scfg.search_width]
            results = {}
            for layer in measure:
                self.set_skip([*chosen, layer])
                agree, conf = self.agreement(windows, ref)
                score[layer] = float(agree.float().mean())
                results[layer] = (agree, conf)
            layer = max(measure, key=lambda i: score[i])
            chosen.append(layer)
            agree, conf = results[layer]
            self.set_skip(chosen)
            path.append({"skip": sorted(chosen), "agreement": score[layer],
                         "policies": self.policies(agree, conf, t)})
        return path

    def timed_speedup(self, prompts: Tensor, new: int, reps: int = 3,
                      batch: int = 1) -> tuple[float, float]:
        """Measured: median over interleaved rounds of dense / speculative greedy decoding time
        of `new` tokens per prompt (`batch` prompts at a time), and the acceptance rate; refuses
        to go on if the outputs differ (that would be a bug, not a slow setting)."""
        ratios, accepted, drafted = [], 0, 0
        room = self.draft_tokens + 1
        for rep in range(reps + 1):
            dense_s = spec_s = 0.0
            for prompt in prompts.split(batch):
                for speculate in ((False, True) if rep % 2 else (True, False)):
                    rows, length = prompt.shape[0], prompt.shape[1] + new + room
                    cache = (self.new_cache(rows, length) if speculate
                             else self.backbone.new_cache(rows, length))
                    before = self.tally.copy()
                    t0 = time.perf_counter()
                    if speculate:
                        logits = self(prompt, cache, 0).logits[:, -1]
                        out = speculative(self, cache, logits, prompt.shape[1], new, Sampler())
                        spec_s += time.perf_counter() - t0
                        done = self.tally.minus(before)
                        accepted += done.accepted
                        drafted += done.drafted
                        spec_out = out
                    else:
                        logits = self.backbone(prompt, cache, 0).logits[:, -1]
                        out = decode(self.backbone, cache, logits, prompt.shape[1], new,
                                     Sampler())
                        dense_s += time.perf_counter() - t0
                        dense_out = out
                if not torch.equal(spec_out, dense_out):
                    raise RuntimeError("self-speculative greedy output differs from the dense "
                                       "model's: a bug")
            if rep:
                ratios.append(dense_s / spec_s)
        return statistics.median(ratios), accepted / max(drafted, 1)

    @torch.no_grad()
    def after_training(self, calibration: Tensor, held_out: Tensor) -> dict[str, Any]:
        """Choose the draft vocabulary, then the skip set (skip drafter, unless given) and the
        threshold and cap (unless given) for the most accepted tokens per second at batch 1:
        estimated from acceptance measured on held-out windows and round times measured here,
        then the best few timed decoding held-out prompts against the dense model."""
        cfg = self.scfg
        t0 = time.perf_counter()
        windows = calibration[:cfg.search_windows, :cfg.search_len]
        self.choose_vocab(calibration[:, :cfg.search_len])
        prompts = held_out[:cfg.timed_prompts, :32]
        room = self.cfg.max_seq_len - prompts.shape[1] - max(CAPS) - 2
        new = max(1, min(cfg.timed_tokens, room))
        t = self.timings(held_out[:1, :32])
        if cfg.drafter == "skip" and cfg.skip is None:
            path = self.search_skip(windows, t)
        else:
            agree, conf = self.agreement(windows)
            path = [{"skip": self.skipped(), "agreement": float(agree.float().mean()),
                     "policies": self.policies(agree, conf, t)}]
        ranked = finalists(path, cfg.finalists)
        for entry in ranked:
            if cfg.timed_prompts:
                self.apply(entry)
                entry["measured_speedup"], entry["measured_acceptance"] = self.timed_speedup(
                    prompts, new)
        key = "measured_speedup" if cfg.timed_prompts else "estimated_speedup"
        best = max(ranked, key=lambda r: r[key])
        self.apply(best)
        batched = self.calibrate_batched(best, path, held_out, new)
        agree, _ = self.agreement(held_out[:cfg.search_windows, :cfg.search_len])
        return {"drafter": cfg.drafter, "skip": self.skipped(), "exit_layer": self.exit_layer
                if cfg.drafter == "exit" else None, "threshold": self.threshold,
                "draft_tokens": self.cap, "draft_vocab": len(self.vocab),
                "batched_threshold": self.batched_threshold,
                "batched_draft_tokens": self.batched_cap, "batched_finalists": batched,
                "chosen": best, "finalists": ranked, "search_path": path, "timings": t,
                "held_out_agreement": float(agree.float().mean()),
                "calibration_s": time.perf_counter() - t0}

    def apply(self, entry: dict[str, Any]) -> None:
        if self.scfg.drafter == "skip":
            self.set_skip(entry["skip"])
        self.set_policy(entry["threshold"], int(entry["draft_tokens"]))

    def calibrate_batched(self, best: dict[str, Any], path: list[dict[str, Any]],
                          held_out: Tensor, new: int) -> list[dict[str, Any]]:
        """The cap (each with its best threshold at batch 1) for batches: timed decoding of
        `timed_prompts` x 4 held-out prompts, up to 8 at a time, against the dense model. A
        verify pass of a batch grows faster with the draft length than one of a single row."""
        cfg = self.scfg
        rows = min(8, cfg.timed_prompts * 4, held_out.shape[0])
        if rows < 2 or cfg.draft_tokens is not None:
            return []
        entry = next(e for e in path if e["skip"] == best["skip"])
        results = []
        for policy in entry["policies"]:
            self.set_policy(policy["threshold"], int(policy["draft_tokens"]), batched=True)
            speedup, acceptance = self.timed_speedup(held_out[:rows, :32], new, reps=2,
                                                     batch=rows)
            results.append({"threshold": policy["threshold"],
                            "draft_tokens": policy["draft_tokens"], "batch": rows,
                            "measured_speedup": speedup, "measured_acceptance": acceptance})
        chosen = max(results, key=lambda r: r["measured_speedup"])
        self.set_policy(chosen["threshold"], int(chosen["draft_tokens"]), batched=True)
        return results

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        """What the draft is and how often its top token is the full model's (teacher-forced on
        validation windows); the output itself is the full model's, so the loss is dense."""
        hits = total = 0
        windows = 0
        for x, _ in data.eval_batches("val", batch_size, block_size, max_batches):
            # the skip drafter's faithful measure runs a row per position: a few windows
            x = x[:max(0, self.scfg.search_windows - windows)]
            if not len(x):
                break
            agree, _ = self.agreement(x.to(self.vocab.device))
            hits += int(agree.sum())
            total += agree.numel()
            windows += len(x)
        return {"drafter": self.scfg.drafter, "skip": self.skipped(),
                "exit_layer": self.exit_layer if self.scfg.drafter == "exit" else None,
                "draft_layers": len(self.kept), "threshold": self.threshold,
                "draft_tokens": self.cap, "batched_threshold": self.batched_threshold,
                "batched_draft_tokens": self.batched_cap, "draft_vocab": len(self.vocab),
                "draft_agreement": hits / max(total, 1), "flops_ratio": 1.0}

    # -- cost, the bench ------------------------------------------------------------------------
    def unit_costs(self) -> dict[str, float]:
        cfg = self.cfg
        attn = fl.attention(cfg, 1.0)
        adapter = 0.0
        if self.adapter is not None:
            shape = self.adapter.shape
            adapter = fl.attention(shape, 1.0)["attn_proj"] + (
                0.0 if self.scfg.adapter == "attention" else fl.ffn(shape))
        return {"layer": attn["attn_proj"] + fl.ffn(cfg), "adapter": adapter,
                "head": fl.linear(cfg.d_model, cfg.vocab_size)}

    def flops_per_token(self, t: SpecTally, context: float) -> float:
        c, scores = self.costs, fl.attention(self.cfg, context)["attn_scores"]
        draft_head = c["head"] * len(self.vocab) / self.cfg.vocab_size
        total = (t.layers * (c["layer"] + scores) + t.adapter * (c["adapter"] + scores)
                 + t.heads * c["head"] + t.draft_heads * draft_head)
        return total / max(t.tokens, 1)

    def reference_flops_per_token(self, context: float) -> float:
        return sum(fl.forward_per_token(self.cfg, context).values())

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """What ran inside the block (drafts, rejected ones included, verify passes, prefill)
        per token made, the acceptance of the drafts, and the wall-clock tokens per second."""
        start, end, t0 = self.tally.copy(), [], time.perf_counter()
        setting = {"drafter": self.scfg.drafter, "skip": self.skipped(),
                   "exit_layer": self.exit_layer if self.scfg.drafter == "exit" else None,
                   "threshold": self.threshold, "draft_tokens": self.cap,
                   "batched_threshold": self.batched_threshold,
                   "batched_draft_tokens": self.batched_cap}

        def done() -> SpecTally:
            return (end[0][0] if end else self.tally).minus(start)

        def summary() -> dict[str, Any]:
            t = done()
            seconds = (end[0][1] if end else time.perf_counter()) - t0
            out: dict[str, Any] = {}
            if t.rounds:
                out["acceptance_rate"] = t.accepted / max(t.drafted, 1)
                out["tokens_per_round"] = (t.accepted + t.row_rounds) / t.row_rounds
                out["drafted_per_round"] = t.drafted / t.row_rounds
            out.update({"blocks_run_per_token": t.layers / max(t.tokens, 1),
                        "tokens_per_s": t.tokens / max(seconds, 1e-9), "tokens": t.tokens,
                        **setting})
            return out

        try:
            yield Measurement(lambda context: self.flops_per_token(done(), context), summary)
        finally:
            end.append((self.tally.copy(), time.perf_counter()))

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        cap = int(value)
        if value != cap or not 1 <= cap <= 32:
            raise UserError(f"draft_tokens must be a whole number in [1, 32], got {value:g}")
        policy = self.policy.clone()
        policy[:, 1] = cap

        def apply() -> None:
            self.policy.copy_(policy)
            self.refresh()
        return apply

    def current_knob_value(self) -> float | None:
        return float(self.cap)

    def current_setting(self) -> Callable[[], None]:
        policy = self.policy.clone()

        def apply() -> None:
            self.policy.copy_(policy)
            self.refresh()
        return apply

    def dense_reference(self) -> contextlib.AbstractContextManager[None]:
        return attribute_set(self, "dense", True)


register("method", SelfSpec.name)(MethodSpec(
    name=SelfSpec.name, config=SelfSpecConfig, build=SelfSpec, kind="self-spec",
    summary="self-speculative decoding of any pretrained model: a layer-skipping draft "
    "(searched, no training) or an early exit with a distilled adapter; lossless"))
