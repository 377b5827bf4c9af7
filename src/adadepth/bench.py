"""`adadepth bench`: the routed model's measured wall-clock speedup over its dense backbone,
beside the ideal speedup from the analytic FLOPs (DESIGN.md section 5).

The dense baseline is the same backbone with its original FFN modules put back (shared weights,
so both sit in the same memory). Each round times the dense model and then the routed model at
every budget, in one process, so drift of a shared machine hits all of them alike; the first
round is a warm-up. Tokens/s are medians over the other rounds; the measured speedup is the
median over rounds of the dense/routed time ratio within a round. Thresholds are re-calibrated per
budget on held-out windows, and the ideal speedup uses the full fractions the routed model
actually realised on the timed inputs.

Decode is teacher-forced on held-out text: the prompt fills the KV cache (not timed), then each
of the new tokens is one forward of a (batch, 1) input through the cache, logits included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adadepth import flops as fl
from adadepth.depth.routing import RoutedModel
from adadepth.errors import UserError

DECODE_PROMPT = 32
CALIB_WINDOWS, CALIB_LEN = 16, 256  # 4096 held-out tokens per threshold set


@dataclass
class BenchSpec:
    budgets: list[float]
    prefill_batch: int = 8
    prefill_len: int = 512
    decode_batches: tuple[int, ...] = (1, 8)
    decode_tokens: int = 128
    reps: int = 3
    compile: bool = False


@contextlib.contextmanager
def dense_view(model: RoutedModel) -> Iterator[None]:
    """The backbone with its original FFNs at the controlled layers, for the duration."""
    for layer, r in zip(model.layers, model.routers, strict=True):
        model.backbone.set_ffn(layer, r.full)
    try:
        yield
    finally:
        for layer, r in zip(model.layers, model.routers, strict=True):
            model.backbone.set_ffn(layer, r)


def set_routing(model: RoutedModel, budget: float, thresholds: list[float]) -> None:
    for r, t in zip(model.routers, thresholds, strict=True):
        r.budget = budget
        r.threshold.fill_(t)


def calibrate_budgets(model: RoutedModel, windows: Tensor,
                      budgets: list[float]) -> dict[float, list[float]]:
    """Causal thresholds per budget, each from its own pass over the held-out windows."""
    thresholds = {}
    for b in budgets:
        set_routing(model, b, [float("nan")] * len(model.routers))
        thresholds[b] = model.calibrate([windows])
    return thresholds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A benchmark job: an untimed set-up, then the timed body.
Job = tuple[Callable[[], object], Callable[[], object]]


def prefill(model: torch.nn.Module, x: Tensor) -> Job:
    return (lambda: None), (lambda: model(x))


def decode(model: torch.nn.Module, text: Tensor, n: int, cache: list) -> Job:
    """Fill the cache with the prompt (set-up), then n cached single-token steps (timed)."""

    def steps() -> None:
        for t in range(DECODE_PROMPT, DECODE_PROMPT + n):
            model(text[:, t:t + 1], cache, t)

    return (lambda: model(text[:, :DECODE_PROMPT], cache, 0)), steps


def timed(job: Job, device: torch.device) -> float:
    setup, body = job
    setup()
    synchronize(device)
    t0 = time.perf_counter()
    body()
    synchronize(device)
    return time.perf_counter() - t0


def realised_fractions(model: RoutedModel, job: Job) -> list[float]:
    """Full fraction per controlled layer over the tokens the timed body routes (untimed run)."""
    setup, body = job
    setup()
    totals = torch.zeros(len(model.routers))
    count = [0]
    hooks = []
    for j, r in enumerate(model.routers):
        def hook(module, args, out, j=j) -> None:
            totals[j] += module.record.mask.float().sum().item()
            count[0] += module.record.mask.numel() if j == 0 else 0
        hooks.append(r.register_forward_hook(hook))
    try:
        body()
    finally:
        for h in hooks:
            h.remove()
    return (totals / max(count[0], 1)).tolist()


def interleaved(model: RoutedModel, make: Callable[[torch.nn.Module], Job],
                thresholds: dict[float, list[float]], reps: int,
                device: torch.device, wrap: Callable[[torch.nn.Module], torch.nn.Module],
                ) -> tuple[float, dict[float, float], dict[float, float], dict[float, list[float]]]:
    """Timed in rounds after one warm-up round: median seconds of dense and of each budget, and
    per budget the median over rounds of dense/routed within the same round (the speedup: a
    pair timed seconds apart shares the machine's state, so drift between rounds cancels)."""
    runner = wrap(model)
    dense_times: list[float] = []
    routed_times: dict[float, list[float]] = {b: [] for b in thresholds}
    fractions: dict[float, list[float]] = {}
    for rnd in range(reps + 1):
        with dense_view(model):
            t = timed(make(runner), device)
        if rnd:
            dense_times.append(t)
        order = list(thresholds) if rnd % 2 else list(reversed(thresholds))
        for b in order:
            set_routing(model, b, thresholds[b])
            if rnd == 0:
                fractions[b] = realised_fractions(model, make(model))
            t = timed(make(runner), device)
            if rnd:
                routed_times[b].append(t)
    speedups = {b: statistics.median(d / r for d, r in zip(dense_times, ts, strict=True))
                for b, ts in routed_times.items()}
    return (statistics.median(dense_times),
            {b: statistics.median(ts) for b, ts in routed_times.items()}, speedups, fractions)


def run_bench(model: RoutedModel, text: Tensor, calib: Tensor, spec: BenchSpec,
              device: torch.device, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rows of {phase, budget, batch, tokens/s dense and routed, ideal and measured speedup}."""
    model.eval()
    saved = [(r.budget, r.threshold.item()) for r in model.routers]
    rows: list[dict[str, Any]] = []
    try:
        with torch.inference_mode():
            thresholds = calibrate_budgets(model, calib, spec.budgets)
            for compiled in [False, True] if spec.compile else [False]:
                wrap = compile_model if compiled else (lambda m: m)
                x = text[:spec.prefill_batch, :spec.prefill_len]
                log(f"prefill {tuple(x.shape)}{' compiled' if compiled else ''}")
                result = interleaved(model, lambda m, x=x: prefill(m, x), thresholds, spec.reps,
                                     device, wrap)
                rows += make_rows(model, "prefill", x.numel(), x.shape[0],
                                  fl.causal_context(spec.prefill_len), result, compiled)
                for batch in spec.decode_batches:
                    log(f"decode batch {batch}{' compiled' if compiled else ''}")
                    cache = model.new_cache(batch, DECODE_PROMPT + spec.decode_tokens)
                    seq = text[:batch, :DECODE_PROMPT + spec.decode_tokens]
                    result = interleaved(model, lambda m, s=seq, c=cache: decode(
                        m, s, spec.decode_tokens, c), thresholds, spec.reps, device, wrap)
                    context = DECODE_PROMPT + (spec.decode_tokens + 1) / 2
                    rows += make_rows(model, "decode", batch * spec.decode_tokens, batch,
                                      context, result, compiled)
    finally:
        for r, (b, t) in zip(model.routers, saved, strict=True):
            r.budget = b
            r.threshold.fill_(t)
    return {"rows": rows, "device": device_name(device), "threads": torch.get_num_threads(),
            "reps": spec.reps, "decode_prompt": DECODE_PROMPT}


def make_rows(model: RoutedModel, phase: str, tokens: int, batch: int, context: float,
              result: tuple[float, dict[float, float], dict[float, float],
                            dict[float, list[float]]],
              compiled: bool) -> list[dict[str, Any]]:
    dense_s, routed_s, speedups, fractions = result
    dense_flops = sum(fl.forward_per_token(model.cfg, context).values())
    rows = []
    for b, seconds in routed_s.items():
        ideal = dense_flops / model.inference_flops_per_token(context, fractions[b], b)
        measured = speedups[b]
        rows.append({"phase": phase, "budget": b, "batch": batch, "compiled": compiled,
                     "tokens_per_s_dense": tokens / dense_s,
                     "tokens_per_s_routed": tokens / seconds,
                     "ideal_speedup": ideal, "measured_speedup": measured,
                     "measured_over_ideal": measured / ideal,
                     "full_fraction": sum(fractions[b]) / len(fractions[b])})
    return rows


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    # Decode positions change every step: let dynamo treat shapes as dynamic from the start
    # instead of recompiling per position.
    return torch.compile(model, dynamic=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# -- training step: sparse dispatch + ratio estimator vs dense mixture + straight-through -------
def bench_training(model: RoutedModel, x: Tensor, y: Tensor, reps: int,
                   device: torch.device) -> dict[str, Any]:
    """Median seconds of one controller training step (top-k, forward, backward, AdamW) under
    each estimator/dispatch pair, interleaved on the same model."""
    from adadepth.model import causal_lm_loss

    modes = {"dense_straight_through": ("straight_through", "dense"),
             "sparse_ratio": ("ratio", "sparse")}
    saved = [(r.estimator, r.dispatch) for r in model.routers]
    params = model.controller_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    times: dict[str, list[float]] = {m: [] for m in modes}
    model.train()
    try:
        for rnd in range(reps + 1):
            for name, (estimator, dispatch) in modes.items():
                for r in model.routers:
                    r.estimator, r.dispatch = estimator, dispatch
                synchronize(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                causal_lm_loss(model(x).logits, y).backward()
                opt.step()
                synchronize(device)
                if rnd:
                    times[name].append(time.perf_counter() - t0)
    finally:
        for r, (estimator, dispatch) in zip(model.routers, saved, strict=True):
            r.estimator, r.dispatch = estimator, dispatch
        model.eval()
    med = {m: statistics.median(ts) for m, ts in times.items()}
    return {"batch": x.shape[0], "seq_len": x.shape[1],
            "budget": model.routers[0].budget,
            "seconds_per_step": med,
            "speedup_sparse_over_dense": med["dense_straight_through"] / med["sparse_ratio"]}


# -- output ---------------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'phase':8} {'batch':>5} {'budget':>6} {'full':>5} {'comp':>4} {'tok/s dense':>12} "
            f"{'tok/s routed':>12} {'ideal':>6} {'measured':>8} {'meas/ideal':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['phase']:8} {r['batch']:>5} {r['budget']:>6.2f} "
                     f"{r['full_fraction']:>5.2f} {'yes' if r['compiled'] else 'no':>4} "
                     f"{r['tokens_per_s_dense']:>12.1f} {r['tokens_per_s_routed']:>12.1f} "
                     f"{r['ideal_speedup']:>6.2f} {r['measured_speedup']:>8.2f} "
                     f"{r['measured_over_ideal']:>10.2f}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = sorted({(r["phase"], r["batch"], r["compiled"]) for r in rows})
    for n, (phase, batch, compiled) in enumerate(groups):
        sel = sorted((r for r in rows if (r["phase"], r["batch"], r["compiled"])
                      == (phase, batch, compiled)), key=lambda r: r["budget"])
        label = f"{phase} b={batch}{' compiled' if compiled else ''}"
        color = f"C{n}"
        ax.plot([r["budget"] for r in sel], [r["measured_speedup"] for r in sel], "o-",
                color=color, label=f"{label} measured")
        ax.plot([r["budget"] for r in sel], [r["ideal_speedup"] for r in sel], "--",
                color=color, alpha=0.6, label=f"{label} ideal")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("full-path budget")
    ax.set_ylabel("speedup over dense")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict[str, Any], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    plot(result["rows"], out / "bench.png", title)


# -- the CLI ----------------------------------------------------------------------------------
def parse_list(text: str, kind: type, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{name} must be a comma list of numbers, got {text!r}") from None
    if not values:
        raise UserError(f"--{name} is empty")
    return values


def heldout_windows(data, rows: int, length: int, calib_rows: int,
                    calib_len: int) -> tuple[Tensor, Tensor]:
    """Timed text from the start of the validation split, calibration windows from its end."""
    val = data.split("val")
    need = rows * length + calib_rows * calib_len
    if len(val) < need:
        raise UserError(f"the validation split has {len(val)} tokens; the benchmark needs "
                        f"{need} (lower --prefill-batch or --prefill-len)")
    text = torch.from_numpy(val[:rows * length].astype("int64")).view(rows, length)
    calib = val[len(val) - calib_rows * calib_len:].astype("int64")
    return text, torch.from_numpy(calib).view(calib_rows, calib_len)


def run_cli(args: argparse.Namespace) -> None:
    from adadepth.data import load_corpus, prepare_tokens
    from adadepth.runs import load_run
    from adadepth.train.loop import resolve_device

    budgets = parse_list(args.budgets, float, "budgets")
    if any(not 0 < b <= 1 for b in budgets):
        raise UserError(f"budgets must lie in (0, 1], got {args.budgets}")
    decode_batches = tuple(parse_list(args.decode_batches, int, "decode-batches"))
    if any(b <= 0 for b in decode_batches):
        raise UserError("--decode-batches must be positive")
    device = resolve_device(args.device)
    run_dir = Path(args.run)
    loaded = load_run(run_dir, str(device))
    model = loaded.model
    if not isinstance(model, RoutedModel):
        raise UserError(f"{run_dir} is a {loaded.meta.get('kind')!r} run; bench needs a routed "
                        "run (adadepth route)")
    max_len = model.cfg.max_seq_len
    if args.prefill_len > max_len or DECODE_PROMPT + args.decode_tokens > max_len:
        raise UserError(f"--prefill-len and {DECODE_PROMPT} + --decode-tokens must fit the "
                        f"model's context of {max_len}")
    d = loaded.meta["data"]
    corpus = load_corpus(d["corpus"], val_fraction=d["val_fraction"], max_docs=d["max_docs"],
                         text_field=d["text_field"])
    data = prepare_tokens(corpus, loaded.tokenizer)
    length = max(args.prefill_len, DECODE_PROMPT + args.decode_tokens)
    text, calib = heldout_windows(data, max(args.prefill_batch, *decode_batches), length,
                                  CALIB_WINDOWS, min(CALIB_LEN, max_len))
    text, calib = text.to(device), calib.to(device)
    spec = BenchSpec(budgets=budgets, prefill_batch=args.prefill_batch,
                     prefill_len=args.prefill_len, decode_batches=decode_batches,
                     decode_tokens=args.decode_tokens, reps=args.reps, compile=args.compile)
    result = run_bench(model, text, calib, spec, device,
                       log=lambda s: print(f"timing {s} ...", flush=True))
    result["run"] = str(run_dir)
    out = Path(args.out) if args.out else run_dir
    write_results(result, out, f"{run_dir.name} on {result['device']}")
    print(format_table(result["rows"]))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
