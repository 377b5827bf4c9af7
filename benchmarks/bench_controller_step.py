"""Routing at a real model's scale: a controller step on SmolLM2-135M, its cheap-path start, and
the memory of the LM loss over a large vocabulary.

    python benchmarks/bench_controller_step.py [--steps N] [--reps R] [--out DIR]

Each figure comes from a fresh process (its peak resident memory is its own), one at a time:

1. `step`: one training step on 4 x 256 tokens of tiny-shakespeare, median seconds over R steps
   after a warm-up: the dense model trained in full (forward + backward, the yardstick), and a
   controller-only routing step (G1, util + rank, budget 0.5) with the default labelling and
   with every controlled layer labelled; FLOPs proxy and peak memory of each.
2. `start`: `adadepth route` for N steps at budget 0.5 with a zero-initialised cheap path
   (`low_rank`, cheap = skip at step 0) and with `pruned` (the full FFN's most important
   neurons, refitted): the training LM loss at step 0 and at the end, beside the backbone's.
3. `memory`: the peak memory of one LM-loss forward + backward at 4 x 256 on SmolLM2 and on a
   randomly initialised model with a 262,144-token vocabulary (width 640, 18 layers), with the
   loss computed in pieces (now) and over the whole batch at once (`--whole`, as before).
Writes DIR/controller_step.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BATCH, BLOCK = 4, 256
SMOL = "smollm2-135m"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(tokenizer: Any, n: int) -> list[Any]:
    from adadepth.data import load_corpus, prepare_tokens

    data = prepare_tokens(load_corpus("tiny-shakespeare"), tokenizer)
    windows = data.windows("train", BLOCK + 1, n * BATCH)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(BATCH)]


def one_step(kind: str, reps: int) -> dict[str, Any]:
    """Seconds per training step of `kind` (dense | routing | routing-all), its FLOPs proxy."""

    from adadepth import flops as fl
    from adadepth.depth.method import TrainingPlan
    from adadepth.depth.routing import RoutedModel, RoutingConfig
    from adadepth.runs import load_backbone

    loaded = load_backbone(SMOL)
    model = loaded.model
    data = batches(loaded.tokenizer, reps + 1)
    if kind == "dense":
        model.requires_grad_(True)
        proxy, step = 1.0, lambda x, y: model(x).loss(y)
    else:
        labels = {"oracle_layers": 0} if kind == "routing-all" else {}
        routed = RoutedModel(model, RoutingConfig(gate="g1", budget=0.5, **labels))
        routed.set_trainable(from_scratch=False)
        routed.begin_training(TrainingPlan(reps + 1, 0))
        routed.train()
        out: dict[str, Any] = {}

        def step(x: Any, y: Any) -> Any:
            result = routed.training_loss(x, y, 0)
            out["proxy"] = result.metrics["flops_proxy"]
            out["labelled"] = result.metrics["oracle_labels"]
            return result.loss
        proxy = None
    times = []
    for x, y in data:
        t0 = time.perf_counter()
        step(x, y).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    result = {"kind": kind, "step_s": statistics.median(times[1:]), "times": times,
              "peak_mb": peak_mb(), "tokens": BATCH * BLOCK,
              "dense_train_flops_per_token": fl.train_per_token(model.cfg,
                                                                fl.causal_context(BLOCK))}
    if kind != "dense":
        result.update(flops_proxy=out["proxy"], labelled_layers=out["labelled"])
    else:
        result["flops_proxy"] = proxy
    return result


def one_memory(kind: str, whole: bool) -> dict[str, Any]:
    """Peak memory of an LM-loss forward + backward at 4 x 256 (everything trains)."""
    import torch

    from adadepth.config import ModelConfig
    from adadepth.model import Transformer, transformer

    if whole:  # one piece for any batch: the logits of the whole batch at once
        transformer.CHUNK_LOGITS = 2**62
    torch.manual_seed(0)
    if kind == "smollm2":
        from adadepth.runs import load_backbone

        model = load_backbone(SMOL).model
        model.requires_grad_(True)
        vocab = model.cfg.vocab_size
    else:
        vocab = 262_144
        model = Transformer(ModelConfig(vocab_size=vocab, d_model=640, n_layers=18, n_heads=4,
                                        d_ff=2048, max_seq_len=BLOCK))
    base = peak_mb()
    idx = torch.randint(0, vocab, (BATCH, BLOCK + 1))
    t0 = time.perf_counter()
    model(idx[:, :-1]).loss(idx[:, 1:]).backward()
    return {"kind": kind, "whole_batch_logits": whole, "peak_mb": peak_mb(),
            "peak_mb_before_step": base, "step_s": time.perf_counter() - t0,
            "logits_mb_whole_batch": BATCH * BLOCK * vocab * 4 / 2**20}


def start_run(cheap: str, steps: int, out: Path) -> dict[str, Any]:
    from adadepth.cli import run_or_exit

    run = out / f"route-{cheap}"
    run_or_exit(["route", "--backbone", SMOL, "--gate", "g1", "--budget", "0.5", "--steps",
                 str(steps), "--out", str(run), f"routing.cheap={cheap}",
                 f"train.batch_size={BATCH}", f"data.block_size={BLOCK}",
                 "train.eval_batches=4", "train.log_interval=1",
                 "routing.calibration_windows=16", "train.eval_interval=100000"])
    metrics = json.loads((run / "metrics.json").read_text())
    return {"cheap": cheap, "steps": steps, "lm_step0": metrics["lm_curve"][0],
            "lm_curve": metrics["lm_curve"], "lm_end": metrics["lm_curve"][-1],
            "reference_dense_loss": metrics["reference_dense_loss"],
            "val_lm_causal": metrics["val_lm_causal"], "flops_proxy": metrics["flops_proxy"],
            "wall_s": metrics["wall_s"], "cheap_init": metrics.get("cheap_init")}


def child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-controller")
    parser.add_argument("--only", choices=["step", "start", "memory"])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "step":
            result = one_step(rest[0], args.reps)
        elif what == "memory":
            result = one_memory(rest[0], rest[1] == "whole")
        else:
            result = start_run(rest[0], args.steps, Path(args.out))
        print(json.dumps(result))
        return
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": BATCH,
                              "block": BLOCK}
    if args.only in (None, "step"):
        result["step"] = [child(["step", k, "--reps", str(args.reps)])
                          for k in ("dense", "routing", "routing-all")]
    if args.only in (None, "memory"):
        result["memory"] = [child(["memory", k, w]) for k in ("smollm2", "vocab262k")
                            for w in ("pieces", "whole")]
    if args.only in (None, "start"):
        result["start"] = [child(["start", c, "--steps", str(args.steps), "--out", str(out)])
                           for c in ("low_rank", "pruned")]
    (out / "controller_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
