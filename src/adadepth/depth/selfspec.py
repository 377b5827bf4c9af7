"""Self-speculative decoding for any pretrained model: the model drafts tokens with part of its
own layers and verifies them with all of them, over one shared KV cache, so that the output is
exactly the full model's (greedy) or has exactly its distribution (sampling).
docs/methods/selfspec.md explains the method, its options, and which choices are whose.

Two drafters share one verify pass (`depth/drafting.py`) and the one draft/verify loop
(`adadepth.generate.speculative`); this module is the method (options, what it stores, its
forward and costs), `selfspec_drafter.py` the draft and verify of a decoding session,
`selfspec_search.py` the choice of draft and policy after fit, `kangaroo.py` the adapter and
its distillation:

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

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.depth import selfspec_search as search
from adadepth.depth.dispatch import PLAIN, Call, Tally
from adadepth.depth.exits import check_backbone
from adadepth.depth.kangaroo import DraftAdapter, distill, extend_cache, output_layer
from adadepth.depth.method import Evaluate, Knob, Method, MethodSpec, StepLoss
from adadepth.depth.registry import register
from adadepth.depth.selfspec_drafter import SelfSpecSpeculator
from adadepth.errors import UserError
from adadepth.model import Context, KVCache, LayerStack, Output


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


class SelfSpec(Method):
    """A pretrained model decoding self-speculatively: drafts from part of it, verified by all.
    Its forward is always the full model; only generation (its speculator) differs."""

    name = "self-spec"
    depth_unit = "layers run"
    options: SelfSpecConfig

    def __init__(self, backbone: LayerStack, options: SelfSpecConfig) -> None:
        check_backbone(backbone, self.name)
        super().__init__(backbone, options)
        L = backbone.n_layers
        if options.skip is not None:
            bad = [i for i in options.skip if not 0 <= i < L]
            if bad:
                raise UserError(f"self-spec.skip names layer {bad[0]}; the backbone has layers "
                                f"0..{L - 1}")
            if not options.skip:
                raise UserError("self-spec.skip is empty: the draft would be the whole model")
            if len(set(options.skip)) == L:
                raise UserError("self-spec.skip names every layer: the draft would run none")
        if options.exit_layer is not None and not 1 <= options.exit_layer <= L - 1:
            raise UserError(f"self-spec.exit_layer must be in [1, {L - 1}] for a backbone of {L} "
                            f"layers, got {options.exit_layer}")
        self.exit_layer = options.exit_layer or max(1, round(L / 5))
        self.adapter: DraftAdapter | None = None
        if options.drafter == "exit" and options.adapter != "none":
            self.adapter = DraftAdapter(backbone, options.adapter_ffn,
                                        options.adapter == "attention")
            p = next(backbone.parameters())
            self.adapter.to(device=p.device, dtype=p.dtype)
        V = backbone.cfg.vocab_size
        self.head_layer = output_layer(backbone)
        n_vocab = (V if options.draft_vocab == 0 or self.head_layer is None
                   else min(options.draft_vocab, V))
        # What calibration decides, kept as buffers so a run folder restores them.
        self.register_buffer("skip_mask", torch.zeros(L, dtype=torch.bool))
        self.register_buffer("vocab", torch.arange(n_vocab))
        self.register_buffer("counts", torch.zeros(V, dtype=torch.float64))
        # (threshold, cap) at batch 1 and for larger batches, whose verify passes cost more
        self.register_buffer("policy", torch.tensor([
            options.threshold if options.threshold is not None else 0.5,
            float(options.draft_tokens or 4)]).repeat(2, 1))
        if options.skip is not None:
            self.skip_mask[options.skip] = True
        elif options.drafter == "skip":  # until the search: every other layer of the middle half
            self.skip_mask[list(range(L // 4, L - L // 4, 2)) or [L // 2]] = True
        self.refresh()
        self.costs = self.unit_costs()
        self.knob = Knob("draft_tokens", (1.0, 2.0, 4.0, 8.0), low=0, high=32, integer=True)
        self._head_cache: tuple[Any, Tensor] | None = None

    # -- what calibration set, read into plain Python once ----------------------------------------
    def refresh(self) -> None:
        """Host copies of the buffers (no device sync per drafted token)."""
        L = self.backbone.n_layers
        if self.options.drafter == "skip":
            skipped = set(self.skip_mask.nonzero().flatten().tolist())
            self.kept = [i for i in range(L) if i not in skipped]
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
        if self.options.drafter != "skip":
            return []
        kept = set(self.kept)
        return [i for i in range(self.backbone.n_layers) if i not in kept]

    def setting(self) -> dict[str, Any]:
        """The draft and policy in force, as reports show them."""
        exit_drafter = self.options.drafter == "exit"
        return {"drafter": self.options.drafter, "skip": self.skipped(),
                "exit_layer": self.exit_layer if exit_drafter else None,
                "threshold": self.threshold, "draft_tokens": self.cap,
                "batched_threshold": self.batched_threshold,
                "batched_draft_tokens": self.batched_cap}

    # -- saving ---------------------------------------------------------------------------------
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
        if self.adapter is not None:
            shape = self.adapter.shape
            extend_cache(cache, shape.kv_heads, shape.head_dim)
        return cache

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        """The full model. With a cache that has the adapter's layer, the adapter's K/V of
        these tokens are written too (the prompt's, so later drafts can attend to them),
        except for the dense reference (`call.force`), which is the backbone alone."""
        bb = self.backbone
        x, ctx = bb.prepare(idx, cache, start, positions=positions)
        with_adapter = (self.adapter is not None and call.force is not True
                        and cache is not None and len(cache) > self.slot)
        at_exit = None
        for i in range(bb.n_layers):
            x = bb.run_layer(i, x, ctx)
            if with_adapter and i == self.exit_layer - 1:
                at_exit = x
        n = idx.numel()
        if at_exit is not None:
            self.adapter.write_kv(at_exit, ctx, self.slot)
            call.count("adapter", n)
        call.count("layers", n * bb.n_layers)
        call.count("depth", n * bb.n_layers)
        call.count("heads", n)
        call.count("tokens", n)
        if call.depth is not None:
            call.note_depth(torch.full(idx.shape, bb.n_layers))
        return Output(hidden=x, head=bb.head)

    def speculator_for(self, call: Call) -> SelfSpecSpeculator | None:
        return None if call.force is True else SelfSpecSpeculator(self, call)

    def draft_head(self, x: Tensor) -> Tensor:
        """Logits of the draft over the draft vocabulary, from its last state (B, T, d)."""
        normed = self.adapter.norm(x) if self.adapter is not None else self.backbone.final_norm(x)
        if self.full_vocab:
            return self.backbone.unembed(normed)
        weight = self.head_layer.weight
        # The rows of the draft vocabulary, copied once per weight and vocabulary version.
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

    # -- training (the exit drafter's adapter) ---------------------------------------------------
    def set_trainable(self, from_scratch: bool) -> None:
        """Only the adapter trains; the backbone stays frozen (Kangaroo's recipe)."""
        if from_scratch:
            raise UserError("self-spec speeds up a trained model: pass --backbone")
        self.trains_backbone = False
        self.requires_grad_(False)
        if self.adapter is not None:
            self.adapter.requires_grad_(True)

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        """KL from the full model's next-token distribution to the draft's, per position,
        chunked over positions. The frozen layers run forward only."""
        if self.adapter is None:
            raise UserError("self-spec trains only the exit drafter's adapter "
                            "(self-spec.drafter=exit); the skip drafter needs --steps 0")
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
                                   self.head_layer, self.options.distill_chunk)
        with torch.no_grad():  # what the teacher predicts is what the draft vocabulary needs
            self.counts.index_add_(0, t_arg, torch.ones_like(t_arg, dtype=self.counts.dtype))
            self.counts.index_add_(0, y.flatten(), torch.ones(y.numel(), dtype=self.counts.dtype,
                                                              device=y.device))
        loss = kl / t_arg.numel()
        return StepLoss(loss, {"kl": loss.item(),
                               "draft_agreement": float((t_arg == s_arg).float().mean())})

    def training_flops_per_token(self, seq_len: int) -> float:
        """The frozen model's forward (teacher, and the draft's first E layers with it), the
        adapter's forward and backward, and the head read three times (teacher, student, the
        student's gradient): the frozen layers below the adapter are never differentiated."""
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

    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        """The draft vocabulary, the skip set and the policies, chosen for the most accepted
        tokens per second on this machine (`selfspec_search.calibrate`)."""
        return search.calibrate(self, calibration, held_out)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        """What the draft is and how often its top token is the full model's (as a round's
        first draft sees it) on validation windows; the output itself is the full model's, so
        the loss is dense."""
        hits = total = windows = 0
        for x, _ in data.eval_batches("val", batch_size, block_size, max_batches):
            # the skip drafter's faithful measure runs a row per position: a few windows
            x = x[:max(0, self.options.search_windows - windows)]
            if not len(x):
                break
            agree, _ = search.agreement(self, x.to(self.vocab.device))
            hits += int(agree.sum())
            total += agree.numel()
            windows += len(x)
        return {**self.setting(), "draft_layers": len(self.kept),
                "draft_vocab": len(self.vocab), "draft_agreement": hits / max(total, 1),
                "flops_ratio": 1.0}

    # -- cost, the bench ------------------------------------------------------------------------
    def unit_costs(self) -> dict[str, float]:
        cfg = self.cfg
        attn = fl.attention(cfg, 1.0)
        adapter = 0.0
        if self.adapter is not None:
            shape = self.adapter.shape
            adapter = fl.attention(shape, 1.0)["attn_proj"] + (
                0.0 if self.options.adapter == "attention" else fl.ffn(shape))
        return {"layer": attn["attn_proj"] + fl.ffn(cfg), "adapter": adapter,
                "head": fl.linear(cfg.d_model, cfg.vocab_size)}

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        """Against the dense model's L blocks and one head read per token: the blocks run
        beyond those (drafts, rejected tokens, verify passes), the adapter, the draft's reads
        of its smaller head, and head reads beyond one per token (rejected tokens)."""
        c, tokens, L = self.costs, max(tally.tokens, 1), self.backbone.n_layers
        scores = fl.attention(self.cfg, context)["attn_scores"]
        draft_head = c["head"] * len(self.vocab) / self.cfg.vocab_size
        return {"blocks run again (drafts, rejections)":
                (tally.get("layers") / tokens - L) * (c["layer"] + scores),
                "adapter": tally.get("adapter") / tokens * (c["adapter"] + scores),
                "draft head reads": tally.get("draft_heads") / tokens * draft_head,
                "extra head reads": (tally.get("heads") / tokens - 1) * c["head"]}

    def tally_flops(self, tally: Tally, context: float) -> float:
        return self.dense_flops_per_token(context) + sum(
            self.tally_breakdown(tally, context).values())

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        """What ran (drafts, rejected ones included, verify passes, prefill) per token made,
        and the acceptance of the drafts."""
        out: dict[str, Any] = {}
        row_rounds = tally.get("row_rounds")
        if row_rounds:
            out["acceptance_rate"] = tally.get("accepted") / max(tally.get("drafted"), 1)
            out["tokens_per_round"] = (tally.get("accepted") + row_rounds) / row_rounds
            out["drafted_per_round"] = tally.get("drafted") / row_rounds
        out.update({"blocks_run_per_token": tally.get("layers") / max(tally.tokens, 1),
                    "tokens": int(tally.tokens), **self.setting()})
        return out

    def reference_flops_per_token(self, context: float) -> float:
        return self.dense_flops_per_token(context)

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        cap = int(value)
        if value != cap or not 1 <= cap <= 32:
            raise UserError(f"draft_tokens must be a whole number in [1, 32], got {value:g}")
        policy = self.policy.clone()
        policy[:, 1] = cap
        return self._restore(policy)

    def current_knob_value(self) -> float | None:
        return float(self.cap)

    def current_setting(self) -> Callable[[], None]:
        return self._restore(self.policy.clone())

    def _restore(self, policy: Tensor) -> Callable[[], None]:
        def apply() -> None:
            self.policy.copy_(policy)
            self.refresh()
        return apply


register("method", SelfSpec.name)(MethodSpec(
    name=SelfSpec.name, config=SelfSpecConfig, build=SelfSpec, kind="self-spec",
    summary="self-speculative decoding of any pretrained model: a layer-skipping draft "
    "(searched, no training) or an early exit with a distilled adapter; lossless"))
