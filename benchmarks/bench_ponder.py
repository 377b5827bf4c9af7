"""Wall-clock speedup of AdaPonderLM over fixed-K pondering (PonderLM) on the same weights.

    python benchmarks/bench_ponder.py --preset tiny  [--steps 300] [--reps 5] [--out DIR]
    python benchmarks/bench_ponder.py --preset small [--steps 200] [--reps 3]

1. trains AdaPonderLM from scratch at the preset's width (`adadepth ponder`, char-level
   tiny-shakespeare; `tiny` is the ponder study's recipe: width 64, 2 layers, tau 0.05), long
   enough for the gates to spread (the halting pattern, unlike the speed, depends on them);
2. `adadepth bench` on the run: the knob is the gate threshold tau, so each setting halts a
   different share of the tokens after each pass; the reference is fixed-K pondering with every
   gate open. Prefill (batch 8) and greedy decode with the K/V cache (batch 1 and 8), reference
   and AdaPonderLM interleaved in one process, medians over --reps rounds after a warm-up.
Prints the table (bench.json and bench.png in --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adadepth.bench import format_table
from adadepth.cli import run_or_exit as run

RECIPES = {
    "tiny": ["--preset", "tiny", "model.d_model=64", "model.n_layers=2", "model.d_ff=176",
             "ponder.tau=0.05", "optim.lr=2e-3", "optim.min_lr=2e-4", "optim.warmup_steps=30"],
    "small": ["--preset", "small", "ponder.tau=0.05", "ponder.ce_steps=50",
              "ponder.k_warmup_steps=50", "optim.warmup_steps=20"],
}
COMMON = ["data.block_size=64", "train.batch_size=16", "train.eval_batches=4",
          "train.threads=2", "ponder.ce_steps=100", "ponder.k_warmup_steps=100"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(RECIPES), default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--settings", default="0.05,0.1,0.3,0.5")
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--out", help="default runs/bench-ponder-PRESET")
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-ponder-{args.preset}")
    model = out / "run"
    if not (model / "metrics.json").is_file():
        run(["ponder", "--out", str(model), "--steps", str(args.steps), "--resume",
             *COMMON, *RECIPES[args.preset], f"train.ckpt_interval={args.steps}",
             f"train.eval_interval={args.steps}"])
    run(["bench", str(model), "--settings", args.settings, "--prefill-len",
         str(args.prefill_len), "--decode-tokens", str(args.decode_tokens), "--reps",
         str(args.reps), "--out", str(out)])
    result = json.loads((out / "bench.json").read_text())
    print(f"\n{args.preset}: {result['device']}, {result['threads']} threads")
    print(format_table(result["rows"]))


if __name__ == "__main__":
    main()
