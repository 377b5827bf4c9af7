"""Wall-clock speedup of Mixture-of-Depths and static layer skipping over their dense references.

    python benchmarks/bench_mod_skip.py --preset small [--reps 3] [--threads 1] \
        [--out runs/bench-mod-small]

1. builds a backbone of the preset's width (`adadepth pretrain`, a few steps: timing does not
   depend on how well it is trained; char-level, as in the routing benchmark);
2. Mixture-of-Depths over it (`adadepth fit --method mod`, a few router steps at capacity 0.125,
   every other block routed; thresholds calibrated per capacity on held-out windows) and static
   layer skipping (`adadepth fit --method static-skip`, calibration only);
3. `adadepth bench` on each: prefill (batch 8 x 512) and cached decode (batch 1 and 8, 128 new
   tokens after a 32-token prompt), reference and method interleaved in one process, medians
   over --reps rounds after a warm-up. MoD's reference is capacity 1 (every token runs every
   block, router-scaled), static skipping's the dense backbone.
Prints both tables. `--threads` sets torch's CPU threads (0: torch's default); on a shared
machine one thread per process keeps OpenMP threads from contending.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adadepth.bench import format_table
from adadepth.cli import run_or_exit as run

QUICK = ["train.eval_interval=4", "train.eval_batches=2", "train.batch_size=4"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/bench-mod-{args.preset}")
    backbone, mod, skip = out / "backbone", out / "mod", out / "static-skip"
    if not (backbone / "LATEST").exists():
        run(["pretrain", "--preset", args.preset, "--steps", "4", "--out", str(backbone),
             *QUICK])
    if not (mod / "metrics.json").exists():
        run(["fit", "--method", "mod", "--backbone", str(backbone), "--steps", "4",
             "--out", str(mod), *QUICK])
    if not (skip / "metrics.json").exists():
        run(["fit", "--method", "static-skip", "--backbone", str(backbone), "--out", str(skip),
             *QUICK])
    common = ["--reps", str(args.reps), "--decode-tokens", str(args.decode_tokens)]
    run(["bench", str(mod), "--out", str(out / "bench-mod"), *common])
    run(["bench", str(skip), "--out", str(out / "bench-static-skip"), *common])
    for name in ("mod", "static-skip"):
        rows = json.loads((out / f"bench-{name}" / "bench.json").read_text())["rows"]
        print(f"\n{name}\n{format_table(rows)}")


if __name__ == "__main__":
    main()
