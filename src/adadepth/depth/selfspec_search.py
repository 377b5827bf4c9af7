"""How self-spec chooses its draft after `fit`: the skip set, the confidence threshold and the
draft cap, for the most accepted tokens per second on this machine.

The choice is made in three steps (`calibrate`):
1. acceptance, measured on held-out windows: at every position, whether the draft's first
   token is the full model's, and the draft's probability of it, exactly as a round drafts it
   (`agreement`);
2. an estimate of the speedup of each (draft, threshold, cap) from those and the time a draft
   step and a verify pass take here (`timings`, `simulate`); for the skip drafter a greedy
   search over skip sets ranks the drafts (`search_skip`);
3. the best few candidates timed by real greedy decoding of held-out prompts against the dense
   model (`timed_speedup`), at batch 1, then the cap and threshold again for batches.
The estimate ranks settings but errs in level both ways, which is why step 3 exists.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adadepth.generate import Sampler, decode, speculative
from adadepth.model import Context, KVCache

if TYPE_CHECKING:
    from adadepth.depth.selfspec import SelfSpec

CAPS = (1, 2, 3, 4, 6, 8)  # draft caps the calibration tries
THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)  # confidence thresholds it tries

Candidate = dict[str, Any]  # a draft and policy with its estimated (and measured) speed


@dataclass
class Reference:
    """The full model on held-out windows, computed once for many candidate drafts."""

    states: list[Tensor]  # the input of layer 0, ..., of layer L-1, then the final state
    ctx: Context  # the windows' call, without a cache
    target: Tensor  # (B, T) the full model's top token per position
    cache: KVCache | None  # every layer's K/V of the windows, when asked for


# -- acceptance on held-out windows ---------------------------------------------------------
@torch.no_grad()
def reference(model: SelfSpec, windows: Tensor, cache: bool = False) -> Reference:
    """The full model on `windows` (B, T): its states before every layer and after the last,
    its top token per position, and (with `cache`) every layer's K/V."""
    bb = model.backbone
    kv = bb.new_cache(*windows.shape) if cache else None
    x, ctx = bb.prepare(windows, kv, 0)
    states = [x]
    for i in range(bb.n_layers):
        x = bb.run_layer(i, x, ctx)
        states.append(x)
    plain = bb.prepare(windows)[1] if cache else ctx  # drafts run on it without a cache
    return Reference(states, plain, bb.head(x).argmax(-1), kv)


def agreement(model: SelfSpec, windows: Tensor,
              ref: Reference | None = None) -> tuple[Tensor, Tensor]:
    """Per position of `windows`: whether the draft's first token there is the full model's,
    and its draft probability, as a round's first draft sees it (the exit drafter: exactly,
    teacher-forced; the skip drafter: with the full model's K/V as context)."""
    if model.options.drafter == "exit":
        return teacher_forced(model, windows, ref)
    return first_draft(model, windows, ref)


@torch.no_grad()
def teacher_forced(model: SelfSpec, windows: Tensor,
                   ref: Reference | None = None) -> tuple[Tensor, Tensor]:
    """Per position of `windows` (B, T): whether the draft's top token is the full model's,
    and the draft's probability of it, with the whole true prefix as context and no cache.
    For the exit drafter this is exactly what a round's draft sees (its first E layers and
    the adapter's K/V of true tokens are the full pass's); for the skip drafter the kept
    layers then read the draft's own states of earlier tokens, not the full model's K/V,
    which made acceptance look lower than it is (0.66 against 0.86 decoding, SmolLM2)."""
    bb = model.backbone
    ref = ref or reference(model, windows)
    x = ref.states[model.exact]
    for i in model.kept:
        if i >= model.exact:
            x = bb.run_layer(i, x, ref.ctx)
    if model.adapter is not None:
        x = model.adapter(x, ref.ctx, model.slot)
    return judge(model, x, ref.target)


@torch.no_grad()
def first_draft(model: SelfSpec, windows: Tensor, ref: Reference | None = None,
                chunk: int = 32) -> tuple[Tensor, Tensor]:
    """The skip draft's first token at every position of `windows` (B, T) exactly as a
    round drafts it: its kept layers attend to the full model's K/V of every earlier
    position and to its own at the position itself. Each position is a row of its own
    (`chunk` at a time), over a cache holding the full model's K/V below it."""
    bb = model.backbone
    if ref is None or ref.cache is None:
        ref = reference(model, windows, cache=True)
    B, T = windows.shape
    above = [i for i in model.kept if i >= model.exact]
    agree = torch.zeros(B, T, dtype=torch.bool, device=windows.device)
    conf = torch.zeros(B, T, device=windows.device)
    caches: dict[int, KVCache] = {}
    slots = torch.arange(T + 1, device=windows.device)
    for w in range(B):
        for a in range(0, T, chunk):
            rows = torch.arange(a, min(T, a + chunk), device=windows.device)
            n = len(rows)
            cache = caches.get(n) or caches.setdefault(n, bb.new_cache(n, T))
            for i in above:
                cache.k[i].copy_(ref.cache.k[i][w:w + 1].expand_as(cache.k[i]))
                cache.v[i].copy_(ref.cache.v[i][w:w + 1].expand_as(cache.v[i]))
                cache.valid[i] = slots < rows.unsqueeze(1)  # the true prefix only
                cache.extent[i], cache.complete[i] = T, False
            x = ref.states[model.exact][w, rows].unsqueeze(1)
            ctx = Context.at(rows.unsqueeze(1), cache)
            for i in above:
                x = bb.run_layer(i, x, ctx)
            agree[w, rows], conf[w, rows] = (
                t.squeeze(1) for t in judge(model, x, ref.target[w, rows].unsqueeze(1)))
    return agree, conf


def judge(model: SelfSpec, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """From draft states x (..., d): whether the draft's top token is `target`, and its
    probability under the draft."""
    conf, pick = model.draft_head(x).float().softmax(-1).max(-1)
    token = pick if model.full_vocab else model.vocab[pick]
    return token == target, conf


# -- time on this machine -------------------------------------------------------------------
@torch.no_grad()
def timings(model: SelfSpec, prompt: Tensor, reps: int = 5) -> dict[str, Any]:
    """Seconds, on this machine at the batch of `prompt` (B, T) and the present thread count,
    of: a draft step per layer it runs, of its head and adapter, and of a verify pass of
    1..CAPS[-1]+1 tokens per row (the full model on them, head included): what the search's
    estimate is built from (at batch 1)."""
    bb = model.backbone
    B, T = prompt.shape
    width = max(CAPS) + 1
    cache = model.new_cache(B, T + width + 1)
    model(prompt, cache, 0)

    def median(fn: Callable[[], object]) -> float:
        fn()  # warm-up
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
    draft_head = median(lambda: model.draft_head(bb.prepare(one, cache, T)[0]))
    adapter = 0.0
    if model.adapter is not None:
        def run_adapter() -> None:
            x, ctx = bb.prepare(one, cache, T)
            model.adapter(x, ctx, model.slot)
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


def draft_step_s(model: SelfSpec, t: dict[str, Any]) -> float:
    return len(model.kept) * t["layer_s"] + t["adapter_s"] + t["draft_head_s"]


# -- the estimate ---------------------------------------------------------------------------
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


def policies(model: SelfSpec, agree: Tensor, conf: Tensor,
             t: dict[str, Any]) -> list[dict[str, float]]:
    """For every cap (or the configured one), the threshold (or the configured one) of the
    highest estimated speedup; best first."""
    options = model.options
    caps = [options.draft_tokens] if options.draft_tokens else list(CAPS)
    thresholds = [options.threshold] if options.threshold is not None else THRESHOLDS
    step = draft_step_s(model, t)
    best = [max((simulate(agree, conf, th, c, step, t["verify_s"]) for th in thresholds),
                key=lambda r: r["estimated_speedup"]) for c in caps]
    return sorted(best, key=lambda r: -r["estimated_speedup"])


def search_skip(model: SelfSpec, windows: Tensor, t: dict[str, Any]) -> list[dict[str, Any]]:
    """Greedy: from no layer skipped, add at each step the layer whose removal keeps the
    draft's agreement with the full model highest (re-measuring the `search_width` best
    candidates of the last step: a full re-measure is L times slower and rarely reorders
    them), and record at every size the best policy's estimated speedup. Returns the path,
    one entry per size."""
    L = model.backbone.n_layers
    ref = reference(model, windows, cache=True)
    score: dict[int, float] = {i: 1.0 for i in range(L)}
    chosen: list[int] = []
    path = []
    most = max(1, min(L - 1, math.floor(model.options.max_skipped * L)))
    while len(chosen) < most:
        candidates = sorted((i for i in range(L) if i not in chosen), key=lambda i: -score[i])
        measure = candidates if not chosen else candidates[:model.options.search_width]
        results = {}
        for layer in measure:
            model.set_skip([*chosen, layer])
            agree, conf = agreement(model, windows, ref)
            score[layer] = float(agree.float().mean())
            results[layer] = (agree, conf)
        layer = max(measure, key=lambda i: score[i])
        chosen.append(layer)
        agree, conf = results[layer]
        model.set_skip(chosen)
        path.append({"skip": sorted(chosen), "agreement": score[layer],
                     "policies": policies(model, agree, conf, t)})
    return path


def finalists(path: list[dict[str, Any]], count: int) -> list[Candidate]:
    """The candidates to time: the best-estimated policy of each of the best drafts (up to
    count - 1 of them), then the best remaining (draft, cap) pairs. The estimate ranks settings
    but errs in level, in both directions (on SmolLM2 it was pessimistic for skipped layers,
    whose drafts see the full model's context while decoding, and optimistic about long
    drafts), so the timed ones span drafts and caps."""
    candidates = [{"skip": entry["skip"], "agreement": entry["agreement"], **policy}
                  for entry in path for policy in entry["policies"]]
    candidates.sort(key=lambda r: -r["estimated_speedup"])
    chosen: list[Candidate] = []
    for r in candidates:
        if len(chosen) < max(1, count - 1) and all(c["skip"] != r["skip"] for c in chosen):
            chosen.append(r)
    for r in candidates:
        if len(chosen) < count and r not in chosen:
            chosen.append(r)
    return chosen


# -- timed decoding -------------------------------------------------------------------------
@torch.no_grad()
def timed_speedup(model: SelfSpec, prompts: Tensor, new: int, reps: int = 3,
                  batch: int = 1) -> tuple[float, float]:
    """Measured: median over interleaved repetitions of dense / speculative greedy decoding
    time of `new` tokens per prompt (`batch` prompts at a time), and the acceptance rate;
    refuses to go on if the outputs differ (that would be a bug, not a slow setting)."""
    ratios: list[float] = []
    runner, measurement = model.measured()
    speculator = runner.speculator
    bb, room = model.backbone, speculator.draft_tokens + 1
    for rep in range(reps + 1):  # repetition 0 warms up and is not kept
        dense_s = spec_s = 0.0
        for prompt in prompts.split(batch):
            outputs = {}
            for speculate in ((False, True) if rep % 2 else (True, False)):
                rows, length = prompt.shape[0], prompt.shape[1] + new + room
                cache = (model.new_cache(rows, length) if speculate
                         else bb.new_cache(rows, length))
                t0 = time.perf_counter()
                if speculate:
                    logits = runner(prompt, cache, 0).logits[:, -1]
                    outputs[True] = speculative(speculator, cache, logits, prompt.shape[1],
                                                new, Sampler())
                    spec_s += time.perf_counter() - t0
                else:
                    logits = bb(prompt, cache, 0).logits[:, -1]
                    outputs[False] = decode(bb, cache, logits, prompt.shape[1], new, Sampler())
                    dense_s += time.perf_counter() - t0
            if not torch.equal(outputs[True], outputs[False]):
                raise RuntimeError("self-speculative greedy output differs from the dense "
                                   "model's: a bug")
        if rep:
            ratios.append(dense_s / spec_s)
    tally = measurement.tally
    return statistics.median(ratios), tally.get("accepted") / max(tally.get("drafted"), 1)


def apply(model: SelfSpec, entry: Candidate) -> None:
    if model.options.drafter == "skip":
        model.set_skip(entry["skip"])
    model.set_policy(entry["threshold"], int(entry["draft_tokens"]))


def calibrate_batched(model: SelfSpec, best: Candidate, path: list[dict[str, Any]],
                      held_out: Tensor, new: int) -> list[dict[str, Any]]:
    """The cap (each with its best threshold at batch 1) for batches: timed decoding of
    `timed_prompts` x 4 held-out prompts, up to 8 at a time, against the dense model. A
    verify pass of a batch grows faster with the draft length than one of a single row."""
    options = model.options
    rows = min(8, options.timed_prompts * 4, held_out.shape[0])
    if rows < 2 or options.draft_tokens is not None:
        return []
    entry = next(e for e in path if e["skip"] == best["skip"])
    results = []
    for policy in entry["policies"]:
        model.set_policy(policy["threshold"], int(policy["draft_tokens"]), batched=True)
        speedup, acceptance = timed_speedup(model, held_out[:rows, :32], new, reps=2,
                                            batch=rows)
        results.append({"threshold": policy["threshold"],
                        "draft_tokens": policy["draft_tokens"], "batch": rows,
                        "measured_speedup": speedup, "measured_acceptance": acceptance})
    chosen = max(results, key=lambda r: r["measured_speedup"])
    model.set_policy(chosen["threshold"], int(chosen["draft_tokens"]), batched=True)
    return results


@torch.no_grad()
def calibrate(model: SelfSpec, calibration: Tensor, held_out: Tensor) -> dict[str, Any]:
    """Choose the draft vocabulary, then the skip set (skip drafter, unless given) and the
    threshold and cap (unless given) for the most accepted tokens per second at batch 1,
    then the batched policy; returns the figures of every step for metrics.json."""
    options = model.options
    t0 = time.perf_counter()
    windows = calibration[:options.search_windows, :options.search_len]
    model.choose_vocab(calibration[:, :options.search_len])
    prompts = held_out[:options.timed_prompts, :32]
    room = model.cfg.max_seq_len - prompts.shape[1] - max(CAPS) - 2
    new = max(1, min(options.timed_tokens, room))
    t = timings(model, held_out[:1, :32])
    if options.drafter == "skip" and options.skip is None:
        path = search_skip(model, windows, t)
    else:
        agree, conf = agreement(model, windows)
        path = [{"skip": model.skipped(), "agreement": float(agree.float().mean()),
                 "policies": policies(model, agree, conf, t)}]
    ranked = finalists(path, options.finalists)
    for entry in ranked:
        if options.timed_prompts:
            apply(model, entry)
            entry["measured_speedup"], entry["measured_acceptance"] = timed_speedup(
                model, prompts, new)
    key = "measured_speedup" if options.timed_prompts else "estimated_speedup"
    best = max(ranked, key=lambda r: r[key])
    apply(model, best)
    batched = calibrate_batched(model, best, path, held_out, new)
    agree, _ = agreement(model, held_out[:options.search_windows, :options.search_len])
    return {**model.setting(), "draft_vocab": len(model.vocab), "batched_finalists": batched,
            "chosen": best, "finalists": ranked, "search_path": path, "timings": t,
            "held_out_agreement": float(agree.float().mean()),
            "calibration_s": time.perf_counter() - t0}
