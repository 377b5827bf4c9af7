"""Dense pretraining quality and speed: nanoGPT's small CPU recipe, char-level tiny-shakespeare.

    python benchmarks/bench_pretrain.py [--out runs/bench-pretrain] [--steps 2000]

The recipe (4 layers, width 128, 4 heads, context 64, batch 12, 2000 iterations, learning rate
1e-3 with warm-up and cosine decay to 1e-4, no dropout) is the `tiny` preset with the default
training config, so this is exactly `adadepth pretrain --preset tiny --steps 2000`. Target:
validation loss <= 1.92 (what nanoGPT reaches with this recipe on the same nine-play file).
Writes DIR/bench_pretrain.json: the full-split validation loss, the median tokens/s and
utilisation over the logged steps, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from adadepth.config import PretrainConfig, preset, validate
from adadepth.eval import evaluate_run
from adadepth.jobs.pretrain import pretrain
from adadepth.runs import load_run

TARGET_VAL_LOSS = 1.92


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench-pretrain")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    out = Path(args.out)
    cfg = validate(PretrainConfig, {"preset": "tiny", "model": preset("tiny").model_dump(),
                                    "train": {"steps": args.steps}})
    result = pretrain(cfg, out)
    evaluation = evaluate_run(out, block_size=cfg.data.block_size)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in logged if "tokens_per_s" in r][1:]  # the first includes warm-up
    summary = {
        "command": f"python benchmarks/bench_pretrain.py --steps {args.steps}",
        "steps": result.step, "wall_s": round(result.wall_s, 1),
        "val_loss_full_split": evaluation["val_loss"],
        "val_loss_target": TARGET_VAL_LOSS,
        "meets_target": evaluation["val_loss"] <= TARGET_VAL_LOSS,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train_rows),
        "utilisation_median": statistics.median(r.get("utilisation", float("nan"))
                                                for r in train_rows),
        "parameters": sum(p.numel() for p in load_run(out).model.parameters()),
    }
    (out / "bench_pretrain.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
