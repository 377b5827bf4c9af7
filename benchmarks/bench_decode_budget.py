"""Does the full-path budget hold where a routed model is used? Why did it drift?

    python benchmarks/bench_decode_budget.py RUN [RUN ...] [--tokens 256] [--out FILE]

For each routed run and budget, the realised full fraction (mean over controlled layers, and the
worst layer) under fixed calibrated thresholds and under the online controller, in three
conditions that separate the suspected causes of drift:
- `prefill`: held-out text, whole windows from position 0 (what calibration sees);
- `decode natural`: the same kind of text fed token by token at positions 32..32+N, after a
  32-token prompt (teacher-forced decoding: position and caching, not generated text);
- `decode generated`: greedy generation of N tokens after the same prompt (the model's own
  text). Batch 1 and batch 8 for both decoding conditions. No timing: fractions only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adadepth.bench import CALIB_LEN, CALIB_WINDOWS, DECODE_PROMPT, heldout_windows
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth.routing import RoutedModel, ThresholdController
from adadepth.generate import Sampler, decode
from adadepth.runs import load_run

BUDGETS = (0.75, 0.5, 0.25)


def measured(model: RoutedModel, setup, body) -> list[float]:
    """Full fraction per controlled layer over what `body` runs (after an unmeasured setup)."""
    with torch.no_grad():
        state = setup()
        with model.measure() as m:
            body(state)
    return m.summary()["full_fraction_per_layer"]


def conditions(model: RoutedModel, text: torch.Tensor, tokens: int) -> dict[str, list[float]]:
    out = {"prefill b8": measured(model, lambda: None,
                                  lambda _: model(text[:8, :DECODE_PROMPT + tokens]))}
    for batch in (1, 8):
        rows = text[:batch, :DECODE_PROMPT + tokens]

        def prompt(rows: torch.Tensor = rows):  # the 32-token prompt, prefilled, not counted
            cache = model.new_cache(rows.shape[0], rows.shape[1] + 1)
            return cache, model(rows[:, :DECODE_PROMPT], cache, 0).logits[:, -1]

        def natural(state, rows: torch.Tensor = rows) -> None:
            for t in range(DECODE_PROMPT, rows.shape[1]):
                model(rows[:, t:t + 1], state[0], t)

        def generated(state) -> None:
            decode(model, state[0], state[1], DECODE_PROMPT, tokens, Sampler())

        out[f"decode natural b{batch}"] = measured(model, prompt, natural)
        out[f"decode generated b{batch}"] = measured(model, prompt, generated)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", default="runs/bench-decode-budget.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for run in args.runs:
        loaded = load_run(Path(run))
        model = loaded.model
        d = loaded.meta["data"]
        data = prepare_tokens(load_corpus(d["corpus"], val_fraction=d.get("val_fraction", 0.1)),
                              loaded.tokenizer)
        text, calib = heldout_windows(data, 8, DECODE_PROMPT + args.tokens, CALIB_WINDOWS,
                                      min(CALIB_LEN, model.cfg.max_seq_len))
        controllers = [r.control for r in model.routers]
        for budget in BUDGETS:
            model.knob_setter(budget, calib)()
            for control in ("fixed", "online"):
                for r, c in zip(model.routers, controllers, strict=True):
                    r.control = c if control == "online" else None
                    if isinstance(c, ThresholdController):
                        c.budget = budget
                for name, per_layer in conditions(model, text, args.tokens).items():
                    results[f"{run} | b={budget} | {control} | {name}"] = {
                        "mean": sum(per_layer) / len(per_layer),
                        "worst_layer_error": max(abs(f - budget) for f in per_layer)}
                    row = results[f"{run} | b={budget} | {control} | {name}"]
                    print(f"{run} b={budget} {control:6} {name:18} mean {row['mean']:.3f} "
                          f"worst layer off by {row['worst_layer_error']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
