"""Wall-clock speedup of routed models over their dense backbone, inference and training.

    python benchmarks/bench_routing.py --preset small [--reps 5] [--out runs/bench-routing-small]
    python benchmarks/bench_routing.py --preset paper --reps 3

1. builds a backbone of the preset's width (`adadepth pretrain`, a few steps: timing does not
   depend on how well it is trained; char-level for tiny/small as in the study, the GPT-2
   vocabulary for paper) and a G1 controller on it (`adadepth route`, a few steps);
2. `adadepth bench` on the routed run: prefill (batch 8 x 512) and decode (batch 1 and 8, 128
   new tokens) at budgets 1.0, 0.75, 0.5, 0.25, dense and routed interleaved in one process,
   medians over --reps rounds after a warm-up (bench.json, bench.png);
3. one controller training step at budget 0.5 (batch 8 x 256): dense mixture with the
   straight-through estimator against sparse dispatch with the ratio estimator, interleaved,
   median over --reps rounds (bench_training.json).
Prints the speed targets (benchmarks/README.md) and whether each was met.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adadepth.bench import synchronize
from adadepth.cli import run_or_exit as run
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth.routing import RoutedModel
from adadepth.model import causal_lm_loss
from adadepth.runs import load_run

TRAIN_BATCH, TRAIN_LEN = 8, 256


def bench_training(model: RoutedModel, x: Tensor, y: Tensor, reps: int,
                   device: torch.device) -> dict[str, Any]:
    """Median seconds of one controller training step (top-k, forward, backward, AdamW) under
    each estimator/dispatch pair, interleaved on the same model."""
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


def training_step(routed: Path, reps: int) -> dict:
    loaded = load_run(routed)
    model = loaded.model
    for r in model.routers:
        r.budget = 0.5
    d = loaded.meta["data"]
    data = prepare_tokens(load_corpus(d["corpus"], val_fraction=d["val_fraction"]),
                          loaded.tokenizer)
    tokens = torch.from_numpy(data.split("train")[:TRAIN_BATCH * (TRAIN_LEN + 1)]
                              .astype("int64")).view(TRAIN_BATCH, TRAIN_LEN + 1)
    return bench_training(model, tokens[:, :-1], tokens[:, 1:], reps, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--tokenizer", help="default: char for tiny/small, gpt2 for paper")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-routing-{args.preset}")
    tokenizer = args.tokenizer or ("gpt2" if args.preset == "paper" else "char")
    backbone, routed = out / "backbone", out / "routed"
    if not (backbone / "LATEST").exists():
        run(["pretrain", "--preset", args.preset, "--tokenizer", tokenizer, "--steps", "4",
             "--out", str(backbone), "train.eval_interval=4", "train.eval_batches=1",
             "train.batch_size=4"])
    if not (routed / "LATEST").exists():
        run(["route", "--backbone", str(backbone), "--gate", "g1", "--steps", "4",
             "--out", str(routed), "train.eval_interval=4", "train.eval_batches=1",
             "train.batch_size=4", "routing.calibration_windows=16"])
    run(["bench", str(routed), "--reps", str(args.reps), "--out", str(out)])
    training = training_step(routed, args.reps)
    (out / "bench_training.json").write_text(json.dumps(training, indent=2))
    print(json.dumps(training, indent=2))

    rows = json.loads((out / "bench.json").read_text())["rows"]

    def ratio(phase: str, batch: int, budget: float) -> float:
        row = next(r for r in rows if (r["phase"], r["batch"], r["budget"], r["compiled"])
                   == (phase, batch, budget, False))
        return row["measured_speedup"] / (row["ideal_speedup"] if budget < 1 else 1.0)

    targets = [
        ("prefill b=0.5 measured/ideal >= 0.85", ratio("prefill", 8, 0.5), 0.85),
        ("decode batch 8 b=0.5 measured/ideal >= 0.7", ratio("decode", 8, 0.5), 0.7),
        ("prefill b=1.0 routed/dense speed >= 0.97", ratio("prefill", 8, 1.0), 0.97),
        ("decode batch 8 b=1.0 routed/dense speed >= 0.97", ratio("decode", 8, 1.0), 0.97),
        ("sparse training step faster than dense mixture",
         training["speedup_sparse_over_dense"], 1.0),
    ]
    for name, value, bound in targets:
        print(f"{'met ' if value >= bound else 'MISSED'} {name}: {value:.3f}")


if __name__ == "__main__":
    main()
