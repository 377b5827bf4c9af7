"""What reading the late layers as an ensemble costs at inference, head only, where the head is
large: the ensemble's read-out against the base model's own head, on the same hidden states.

    python benchmarks/bench_ensemble_head.py [--vocab 49152 --d-model 576 --layers 4 --reps 7]

Four read-outs of n late hidden states (random: timing does not depend on the weights):
- `base`: the final norm and the LM head (what the pretrained model runs);
- `mix_states` (combine: logits, the default): n norms, the router, the routing-weighted sum of
  the normalised states, the head once, which equals mixing the n layers' logits;
- `mix_logits`: the same combination computed as the paper's formula reads, the head n times;
- `mix_log_probs` (combine: log_probs): the head n times, n log-softmaxes, their weighted sum.
Prefill is 2 x 64 tokens at once; decode is one token per row at batch 1 and 8. In rounds after
one warm-up round, every read-out is timed once per round (order alternating); a read-out's
overhead is the median over rounds of its time over the base's in the same round. The shape
defaults to SmolLM2-135M's (d 576, vocabulary 49,152).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from adadepth.config import ModelConfig
from adadepth.depth.ensemble import EnsembleConfig, EnsembleModel
from adadepth.model import Transformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # A backbone of the head's shape; its layers never run here.
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.d_model // 64, d_ff=64)
    models = {combine: EnsembleModel(Transformer(cfg), EnsembleConfig(
        layers=args.layers, combine=combine)).eval() for combine in ("logits", "log_probs")}
    logits_model = models["logits"]
    with torch.no_grad():  # move the router off its uniform start: per-token weights
        logits_model.late.router.weight.normal_(0, 0.1)
    models["log_probs"].load_state_dict(logits_model.state_dict())
    base = logits_model.backbone

    def explicit(states: list[torch.Tensor]) -> torch.Tensor:
        logits_model.mix_states = False
        try:
            return logits_model.read_out(states)[0]
        finally:
            logits_model.mix_states = True

    readouts = {
        "base": lambda states: base.head(states[-1]),
        "mix_states": lambda states: logits_model.read_out(states)[0],
        "mix_logits": explicit,
        "mix_log_probs": lambda states: models["log_probs"].read_out(states)[0],
    }
    shapes = {"prefill 2x64": (2, 64), "decode b=1": (1, 1), "decode b=8": (8, 1)}
    results = {}
    with torch.inference_mode():
        states = {name: [torch.randn(*shape, args.d_model) for _ in range(args.layers)]
                  for name, shape in shapes.items()}
        torch.testing.assert_close(readouts["mix_states"](states["decode b=8"]),
                                   explicit(states["decode b=8"]), rtol=1e-4, atol=1e-4)
        for name in shapes:
            times: dict[str, list[float]] = {r: [] for r in readouts}
            for rnd in range(args.reps + 1):
                order = list(readouts) if rnd % 2 else list(reversed(readouts))
                for r in order:
                    reps = 10 if name.startswith("decode") else 1  # short calls: time a batch
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        readouts[r](states[name])
                    if rnd:
                        times[r].append((time.perf_counter() - t0) / reps)
            results[name] = {
                r: {"ms": 1e3 * statistics.median(ts),
                    "over_base": statistics.median(t / b for t, b in
                                                   zip(ts, times["base"], strict=True))}
                for r, ts in times.items()}
    flops = {"base": 2 * args.d_model * args.vocab,
             "mix_states": 2 * args.d_model * args.vocab
             + 2 * args.d_model * args.layers * 2,  # router + the weighted sum of states
             "mix_logits": args.layers * 2 * args.d_model * args.vocab
             + 2 * args.d_model * args.layers + 2 * args.layers * args.vocab,
             "mix_log_probs": args.layers * 2 * args.d_model * args.vocab
             + 2 * args.d_model * args.layers + 2 * args.layers * args.vocab}
    print(f"head {args.d_model} x {args.vocab}, {args.layers} late layers, "
          f"{torch.get_num_threads()} threads, median of {args.reps} rounds")
    print(f"{'read-out':14} {'FLOPs/token':>12} " + " ".join(f"{s:>22}" for s in shapes))
    for r in readouts:
        cells = [f"{results[s][r]['ms']:8.3f} ms {results[s][r]['over_base']:6.2f}x"
                 for s in shapes]
        print(f"{r:14} {flops[r] / 1e6:10.1f} M " + " ".join(f"{c:>22}" for c in cells))
    print(json.dumps({"shape": vars(args), "flops_per_token": flops, "results": results}))


if __name__ == "__main__":
    main()
