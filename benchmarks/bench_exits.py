"""Measured vs ideal speedup of the early-exit methods: CALM and LayerSkip.

    python benchmarks/bench_exits.py --preset small [--reps 3] [--threads 1]
        [--pretrain-steps 600] [--fit-steps 200] [--out runs/bench-exits-small]

1. pretrains a char-level backbone of the preset's width (`adadepth pretrain`): unlike routing
   at a fixed budget, how much early exit saves depends on how well the model predicts, so the
   backbone must be trained to mean anything;
2. continues training it as each method does (`adadepth fit --method calm` with the weighted
   per-layer loss, then calibration; `adadepth fit --method layerskip` with layer dropout and
   the early-exit loss);
3. `adadepth bench` on each run, dense reference and method interleaved in one process:
   prefill (batch 8 x 512) and cached greedy decode (batch 1 and 8, --decode-tokens new tokens
   after a 32-token prompt); CALM at confidence thresholds 1.0 ... 0.4, LayerSkip's
   self-speculative decoding at exit (draft) layers of a quarter, half and three quarters of
   the depth. Writes bench.json / bench.png per method under --out and prints both tables.
Finished runs are reused and interrupted ones resumed, so a second call only re-times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adadepth.bench import format_table
from adadepth.cli import run_or_exit as run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for training and timing; 0 = torch's default")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/bench-exits-{args.preset}")
    backbone = out / "backbone"
    quick = ["train.eval_interval=100000", "train.eval_batches=4", "train.log_interval=50",
             f"train.threads={args.threads}"]
    # --resume: a finished run is reused as it is, an interrupted one continues
    run(["pretrain", "--preset", args.preset, "--steps", str(args.pretrain_steps),
         "--out", str(backbone), "--resume", *quick])
    fits = {"calm": ["calm.calibration_windows=64"], "layerskip": []}
    for method, options in fits.items():
        folder = out / method
        if not (folder / "metrics.json").exists():
            run(["fit", "--method", method, "--backbone", str(backbone), "--steps",
                 str(args.fit_steps), "--out", str(folder), "--resume", *quick, *options])
        run(["bench", str(folder), "--reps", str(args.reps), "--decode-tokens",
             str(args.decode_tokens), "--out", str(folder)])
    for method in fits:
        result = json.loads((out / method / "bench.json").read_text())
        metrics = json.loads((out / method / "metrics.json").read_text())
        print(f"\n{method}: val loss {metrics['val_loss']:.3f} "
              f"(backbone trained {args.pretrain_steps} steps, method {args.fit_steps})")
        print(format_table(result["rows"]))


if __name__ == "__main__":
    main()
