"""Quality at matched FLOPs: Mixture-of-Depths retrofits and static layer skipping on one
pretrained `tiny` backbone, each set to 50 % and 75 % of the dense model's inference FLOPs.

    python benchmarks/quality_mod_skip.py [--backbone runs/tiny] [--steps 160] \\
        [--out runs/quality-mod-skip]

1. the backbone: `--backbone` (a dense run folder), else `adadepth pretrain --preset tiny`
   (2000 steps, char-level tiny-shakespeare);
2. each recipe below trained on it with `adadepth fit` (`--steps` steps, batch 12), static
   skipping calibrated;
3. each run's knob searched, as the leaderboard does it
   (`adadepth.studies.leaderboard_eval.search`),
   for the setting whose FLOPs, realised on held-out windows fed one token at a time, come
   nearest each budget; the validation loss there, and the dense backbone's on the same text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adadepth.cli import run_or_exit as run
from adadepth.data import load_corpus, prepare_tokens
from adadepth.eval import decode_eval
from adadepth.runs import load_run
from adadepth.studies.leaderboard_eval import heldout, search

RECIPES = {  # name: the method's options
    "mod every other, C 0.5, joint": ["mod.capacity=0.5"],
    "mod every other, C 0.5, routers only": ["mod.capacity=0.5", "mod.regime=routers"],
    "mod every other, C 0.5, aux BCE": ["mod.capacity=0.5", "mod.causal=aux_loss"],
    "mod all but first, C 0.35": ["mod.layers=all_but_first", "mod.capacity=0.35"],
    "mod all but first, C 0.35, aux BCE": ["mod.layers=all_but_first", "mod.capacity=0.35",
                                           "mod.causal=aux_loss"],
    "static-skip": [],
}
WINDOWS, LENGTH = 16, 128


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--out", default="runs/quality-mod-skip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    backbone = Path(args.backbone) if args.backbone else out / "backbone"
    if not (backbone / "LATEST").exists():
        run(["pretrain", "--preset", "tiny", "--out", str(backbone)])
    loaded = load_run(backbone)
    d = loaded.meta["data"]
    data = prepare_tokens(load_corpus(d["corpus"], val_fraction=d.get("val_fraction", 0.1)),
                          loaded.tokenizer)
    calibration, held_out = heldout(data, WINDOWS, LENGTH)
    dense_loss = decode_eval(loaded.model, held_out).loss
    rows = [{"recipe": "dense backbone", "budget": 1.0, "flops": 1.0, "val_loss": dense_loss}]
    for i, (name, options) in enumerate(RECIPES.items()):
        run_dir = out / f"recipe-{i}"
        method = "static-skip" if name == "static-skip" else "mod"
        if not (run_dir / "metrics.json").exists():
            steps = [] if method == "static-skip" else ["--steps", str(args.steps)]
            run(["fit", "--method", method, "--backbone", str(backbone), *steps,
                 "--out", str(run_dir), "train.batch_size=12", *options])
        model = load_run(run_dir).model
        for budget in (0.5, 0.75):
            point = search(model, budget, calibration, held_out)
            rows.append({"recipe": name, "budget": budget, "setting": point["setting"],
                         "flops": point["flops_fraction"], "reached": point["reached"],
                         "val_loss": point["val_loss"]})
            print(json.dumps(rows[-1]), flush=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    print("| recipe | budget | knob | FLOPs / dense | validation loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        knob = f"{r['setting']:.3g}" if "setting" in r else "-"
        print(f"| {r['recipe']} | {r['budget']} | {knob} | {r['flops']:.3f} | "
              f"{r['val_loss']:.3f} |")


if __name__ == "__main__":
    main()
