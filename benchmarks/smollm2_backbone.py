"""SmolLM2-135M as a backbone: its size, its loss on tiny-shakespeare, time per routing step.

    python benchmarks/smollm2_backbone.py [--eval-batches N] [--steps S] [--out DIR]

1. converts the packaged GGUF once (`adadepth backbone smollm2-135m`), timing it when not cached;
2. `adadepth eval` on the converted folder: validation split of tiny-shakespeare, its own
   tokenizer, blocks of 256, batches of 8 (the whole split unless --eval-batches);
3. `adadepth route` for S steps in each recipe below, batch 4 x 128 tokens, on this machine's
   CPU threads; the time per step is the median over the steps after the first.
Writes DIR/smollm2_backbone.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adadepth.eval import evaluate_run
from adadepth.hf import backbones
from adadepth.jobs.fit import fit, fit_config
from adadepth.runs import load_transformers
from adadepth.train import checkpoint as ck

RECIPES = {  # name -> routing options
    "lm only (aux none)": {"aux": []},
    "util+rank, 1 labelled layer/step": {"aux": ["util", "rank"], "oracle_layers": 1},
    "util+rank, all 28 layers labelled": {"aux": ["util", "rank"], "oracle_layers": 0},
}
BATCH, BLOCK = 4, 128


def step_times(run: Path) -> list[float]:
    history = ck.load_train_state(ck.latest_checkpoint(run))["history"]
    return [BATCH * BLOCK / row["tokens_per_s"] for row in history]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-batches", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-smollm2")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"threads": torch.get_num_threads(), "batch": BATCH, "block": BLOCK}

    cached = (backbones.backbone_dir("smollm2-135m") / backbones.MARKER).is_file()
    t0 = time.perf_counter()
    folder = backbones.ensure_backbone("smollm2-135m")
    result["convert_s"] = None if cached else time.perf_counter() - t0
    info = json.loads((folder / backbones.MARKER).read_text())
    result["parameters"] = info["parameters"]
    result["safetensors_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    t0 = time.perf_counter()
    load_transformers("smollm2-135m")
    result["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ev = evaluate_run(folder, corpus="tiny-shakespeare", block_size=256, batch_size=8,
                      max_batches=args.eval_batches, device="cpu", out=out / "eval")
    result["eval"] = {k: ev[k] for k in ("val_loss", "perplexity", "bits_per_token",
                                         "tokens_evaluated")}
    result["eval"]["wall_s"] = time.perf_counter() - t0

    result["route"] = {}
    for name, options in RECIPES.items():
        run = out / ("route-" + "".join(c if c.isalnum() else "-" for c in name))
        cfg = fit_config({
            "method": "routing", "backbone": "smollm2-135m", "routing": options,
            "data": {"corpus": "tiny-shakespeare", "block_size": BLOCK},
            "train": {"steps": args.steps, "batch_size": BATCH, "eval_batches": 2,
                      "eval_interval": 10_000, "ckpt_interval": 10_000, "device": "cpu"}})
        t0 = time.perf_counter()
        metrics = fit(cfg, run, show_progress=False)
        times = step_times(run)
        result["route"][name] = {
            "step_s_median": statistics.median(times[1:] or times), "step_s_all": times,
            "flops_proxy": metrics["flops_proxy"], "command_wall_s": time.perf_counter() - t0,
            "reference_dense_loss": metrics["reference_dense_loss"]}
    (out / "smollm2_backbone.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
