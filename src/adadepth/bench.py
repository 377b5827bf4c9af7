"""`adadepth bench`: any method's measured wall-clock speedup over its dense reference, beside
the ideal speedup from the analytic FLOPs of what really ran.

The reference is the method's own (`Method.dense_reference`: every routed FFN full, every pass
of a looped model, no exit, ...) on the same weights in the same memory. Each round times
the reference and then the method at every setting of its cost knob, in one process, so drift
of a shared machine hits all of them alike; the first round is a warm-up, and also measures
what each setting really ran (untimed, under `Method.measure`). Tokens/s are medians over the
other rounds; the measured speedup is the median over rounds of the reference/method time ratio
within a round. Settings that need calibration (causal thresholds) are calibrated once, up
front, on held-out windows other than the timed text.

Prefill is one forward of (batch, length) held-out tokens. Decode is greedy generation of new
tokens after a 32-token prompt, with the KV cache (and the method's speculator, if it has one):
the prompt's prefill is set-up, the new tokens are timed, logits and sampling included.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adadepth import flops as fl
from adadepth.depth import Method
from adadepth.errors import UserError
from adadepth.generate import Sampler, decode, speculative

DECODE_PROMPT = 32
CALIB_WINDOWS, CALIB_LEN = 16, 256  # 4096 held-out tokens per calibrated setting


@dataclass
class BenchSpec:
    settings: list[float]
    prefill_batch: int = 8
    prefill_len: int = 512
    decode_batches: tuple[int, ...] = (1, 8)
    decode_tokens: int = 256
    reps: int = 3
    compile: bool = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A benchmark job: an untimed set-up, then the timed body.
Job = tuple[Callable[[], object], Callable[[], object]]


def prefill(model: torch.nn.Module, x: Tensor) -> Job:
    return (lambda: None), (lambda: model(x))


def decode_job(model: torch.nn.Module, prompt: Tensor, n: int) -> Job:
    """Prefill the prompt into a fresh cache (set-up), then n greedy new tokens (timed)."""
    speculator = getattr(model, "speculator", None)
    extra = speculator.draft_tokens + 1 if speculator is not None else 0
    state: dict[str, Any] = {}

    def setup() -> None:
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n + extra)
        state["cache"] = cache
        state["logits"] = model(prompt, cache, 0).logits[:, -1]

    def body() -> None:
        if speculator is not None:
            speculative(speculator, state["cache"], state["logits"], prompt.shape[1], n,
                        Sampler())
        else:
            decode(model, state["cache"], state["logits"], prompt.shape[1], n, Sampler())

    return setup, body


def timed(job: Job, device: torch.device) -> float:
    setup, body = job
    setup()
    synchronize(device)
    t0 = time.perf_counter()
    body()
    synchronize(device)
    return time.perf_counter() - t0


def measured(model: Method, make: Callable[[torch.nn.Module], Job]) -> tuple[Any, dict[str, Any]]:
    """Run a job untimed on a counting copy of the method: (its Measurement, its summary)."""
    runner, m = model.measured()
    setup, body = make(runner)
    setup()
    body()
    return m, m.summary()


@dataclass
class Timing:
    reference_s: float
    method_s: dict[float, float]
    speedup: dict[float, float]
    measurements: dict[float, Any]


def interleaved(model: Method, make: Callable[[torch.nn.Module], Job],
                settings: dict[float, Callable[[], None]], reps: int, device: torch.device,
                wrap: Callable[[torch.nn.Module], torch.nn.Module],
                reference: torch.nn.Module | None = None) -> Timing:
    """Timed in rounds after one warm-up round: median seconds of the reference and of each
    setting, and per setting the median over rounds of reference/method within the same round
    (a pair timed seconds apart shares the machine's state, so drift between rounds cancels).
    The reference is the method's dense one unless another model is given."""
    runner = wrap(model)
    dense = wrap(model.dense_reference() if reference is None else reference)
    reference: list[float] = []
    times: dict[float, list[float]] = {v: [] for v in settings}
    measurements: dict[float, Any] = {}
    for rnd in range(reps + 1):
        t = timed(make(dense), device)
        if rnd:
            reference.append(t)
        order = list(settings) if rnd % 2 else list(reversed(settings))
        for value in order:
            settings[value]()
            if rnd == 0:
                measurements[value] = measured(model, make)
            t = timed(make(runner), device)
            if rnd:
                times[value].append(t)
    speedup = {v: statistics.median(r / m for r, m in zip(reference, ts, strict=True))
               for v, ts in times.items()}
    return Timing(statistics.median(reference),
                  {v: statistics.median(ts) for v, ts in times.items()}, speedup, measurements)


def run_bench(model: Method, text: Tensor, calib: Tensor, spec: BenchSpec,
              device: torch.device, log: Callable[[str], None] = print,
              reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """Rows of {phase, batch, knob setting, tokens/s of reference and method, ideal and measured
    speedup, what the method realised}. `reference`: the model timed against, when not the
    method's own dense reference (the leaderboard times every method against the backbone);
    the ideal speedups are then against the dense backbone's FLOPs."""
    if model.knob is None:
        raise UserError(f"method {model.name!r} has no cost knob to bench")
    model.eval()
    restore = model.current_setting()
    rows: list[dict[str, Any]] = []
    try:
        with torch.inference_mode():
            settings = {v: model.knob_setter(v, calib) for v in spec.settings}
            for compiled in [False, True] if spec.compile else [False]:
                wrap = compile_model if compiled else (lambda m: m)
                x = text[:spec.prefill_batch, :spec.prefill_len]
                log(f"prefill {tuple(x.shape)}{' compiled' if compiled else ''}")
                timing = interleaved(model, lambda m, x=x: prefill(m, x), settings, spec.reps,
                                     device, wrap, reference)
                rows += make_rows(model, "prefill", x.numel(), x.shape[0],
                                  fl.causal_context(spec.prefill_len), timing, compiled,
                                  reference is not None)
                for batch in spec.decode_batches:
                    log(f"decode batch {batch}{' compiled' if compiled else ''}")
                    prompt = text[:batch, :DECODE_PROMPT]
                    timing = interleaved(model, lambda m, p=prompt: decode_job(
                        m, p, spec.decode_tokens), settings, spec.reps, device, wrap,
                        reference)
                    context = DECODE_PROMPT + (spec.decode_tokens + 1) / 2
                    rows += make_rows(model, "decode", batch * spec.decode_tokens, batch,
                                      context, timing, compiled, reference is not None)
    finally:
        restore()
    return {"method": model.name, "knob": model.knob.name, "rows": rows,
            "device": device_name(device), "threads": torch.get_num_threads(),
            "reps": spec.reps, "decode_prompt": DECODE_PROMPT,
            "decode_tokens": spec.decode_tokens}


def make_rows(model: Method, phase: str, tokens: int, batch: int, context: float,
              timing: Timing, compiled: bool, against_backbone: bool = False,
              ) -> list[dict[str, Any]]:
    reference_flops = (model.dense_flops_per_token(context) if against_backbone
                       else model.reference_flops_per_token(context))
    rows = []
    for value, seconds in timing.method_s.items():
        measurement, summary = timing.measurements[value]
        ideal = reference_flops / measurement.flops_per_token(context)
        measured_speedup = timing.speedup[value]
        rows.append({"phase": phase, "batch": batch, "knob": model.knob.name, "setting": value,
                     model.knob.name: value, "compiled": compiled,
                     "tokens_per_s_dense": tokens / timing.reference_s,
                     "tokens_per_s_method": tokens / seconds,
                     "ideal_speedup": ideal, "measured_speedup": measured_speedup,
                     "measured_over_ideal": measured_speedup / ideal, "realised": summary})
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


# -- output ---------------------------------------------------------------------------------
def headline(row: dict[str, Any]) -> str:
    """The realised figure a method reports first (full fraction, passes, exit layer, ...)."""
    realised = row["realised"]
    key = next((k for k in realised if not isinstance(realised[k], list | dict)), None)
    return f"{key}={realised[key]:.3g}" if key else ""


def format_table(rows: list[dict[str, Any]]) -> str:
    knob = rows[0]["knob"] if rows else "setting"
    head = (f"{'phase':8} {'batch':>5} {knob:>12} {'comp':>4} {'tok/s dense':>12} "
            f"{'tok/s method':>12} {'ideal':>6} {'measured':>8} {'meas/ideal':>10}  realised")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['phase']:8} {r['batch']:>5} {r['setting']:>12.4g} "
                     f"{'yes' if r['compiled'] else 'no':>4} "
                     f"{r['tokens_per_s_dense']:>12.1f} {r['tokens_per_s_method']:>12.1f} "
                     f"{r['ideal_speedup']:>6.2f} {r['measured_speedup']:>8.2f} "
                     f"{r['measured_over_ideal']:>10.2f}  {headline(r)}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = sorted({(r["phase"], r["batch"], r["compiled"]) for r in rows})
    for n, (phase, batch, compiled) in enumerate(groups):
        sel = sorted((r for r in rows if (r["phase"], r["batch"], r["compiled"])
                      == (phase, batch, compiled)), key=lambda r: r["setting"])
        label = f"{phase} b={batch}{' compiled' if compiled else ''}"
        color = f"C{n}"
        ax.plot([r["setting"] for r in sel], [r["measured_speedup"] for r in sel], "o-",
                color=color, label=f"{label} measured")
        ax.plot([r["setting"] for r in sel], [r["ideal_speedup"] for r in sel], "--",
                color=color, alpha=0.6, label=f"{label} ideal")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(rows[0]["knob"] if rows else "setting")
    ax.set_ylabel("speedup over the dense reference")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict[str, Any], out: Path, title: str) -> None:
    from adadepth.train.checkpoint import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench.json", result)
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
    """Timed text (odd windows of the validation split) and calibration windows (even ones):
    different text from the same distribution."""
    need = 2 * max(rows * length, calib_rows * calib_len)
    calib, text = data.halves("val", max(length, calib_len), max(rows, calib_rows))
    if len(text) < rows or len(calib) < calib_rows:
        raise UserError(f"the validation split has {len(data.split('val'))} tokens; the "
                        f"benchmark needs about {need} (lower --prefill-batch or --prefill-len)")
    return text[:rows, :length], calib[:calib_rows, :calib_len]


def check_settings(model: Method, values: list[float], text: str) -> None:
    knob = model.knob
    assert knob is not None
    bad = [v for v in values if not knob.low < v <= knob.high
           or (knob.integer and v != int(v))]
    if bad:
        kind = "whole numbers" if knob.integer else "numbers"
        raise UserError(f"{knob.name} settings must be {kind} in ({knob.low:g}, {knob.high:g}] "
                        f"for a {model.name} run, got {text}")


def run_cli(args: argparse.Namespace) -> None:
    from adadepth.data import load_corpus, prepare_tokens
    from adadepth.runs import load_model
    from adadepth.train.loop import resolve_device

    decode_batches = tuple(parse_list(args.decode_batches, int, "decode-batches"))
    if any(b <= 0 for b in decode_batches):
        raise UserError("--decode-batches must be positive")
    device = resolve_device(args.device)
    run_dir = Path(args.run)
    loaded = load_model(run_dir, str(device))
    model = loaded.model
    if not isinstance(model, Method) or model.knob is None:
        raise UserError(f"{run_dir} is a {loaded.meta.get('kind')!r} run; bench needs the run of "
                        "an adaptive method (adadepth route, ponder, ...)")
    text_settings = args.settings or ",".join(f"{v:g}" for v in model.knob.values)
    settings = parse_list(text_settings, float, "settings")
    check_settings(model, settings, text_settings)
    max_len = model.cfg.max_seq_len
    if args.prefill_len > max_len or DECODE_PROMPT + args.decode_tokens > max_len:
        raise UserError(f"--prefill-len and {DECODE_PROMPT} + --decode-tokens must fit the "
                        f"model's context of {max_len}")
    d = loaded.meta["data"]
    corpus = load_corpus(d["corpus"], val_fraction=d.get("val_fraction", 0.1),
                         max_docs=d.get("max_docs"), text_field=d.get("text_field", "text"))
    data = prepare_tokens(corpus, loaded.tokenizer)
    text, calib = heldout_windows(data, max(args.prefill_batch, *decode_batches),
                                  max(args.prefill_len, DECODE_PROMPT),
                                  CALIB_WINDOWS, min(CALIB_LEN, max_len))
    text, calib = text.to(device), calib.to(device)
    spec = BenchSpec(settings=settings, prefill_batch=args.prefill_batch,
                     prefill_len=args.prefill_len, decode_batches=decode_batches,
                     decode_tokens=args.decode_tokens, reps=args.reps, compile=args.compile)
    result = run_bench(model, text, calib, spec, device,
                       log=lambda s: print(f"timing {s} ...", flush=True))
    result["run"] = str(run_dir)
    out = Path(args.out) if args.out else run_dir
    write_results(result, out, f"{run_dir.name} ({model.name}) on {result['device']}")
    print(format_table(result["rows"]))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
