"""Self-speculative decoding of SmolLM2-135M, side by side with transformers' own, in one process.

    python benchmarks/bench_selfspec.py [--threads 1] [--reps 3] [--new-tokens 128]
        [--batches 1,8] [--fit-steps 600] [--hf-exits 4,8,15,22] [--out runs/bench-selfspec]

0. writes the self-distillation corpus unless it exists: the model's own greedy continuations
   (--distill-tokens tokens) of --distill-docs 32-token windows of tiny-shakespeare's *train*
   split, the text a drafter meets when this model decodes greedily;
1. makes the two self-spec runs over the packaged backbone on that corpus unless they exist
   (`adadepth fit --method self-spec --backbone smollm2-135m`): the layer-skipping drafter
   (nothing trains; its skip set, threshold and caps are searched after fit) and the early
   exit at layer 6 with an adapter (a block with a 1536-wide FFN) distilled for --fit-steps
   steps of batch 4 x 256 tokens — its training time is in the run's metrics;
2. picks transformers' best `assistant_early_exit=E` among --hf-exits (one prompt, timed);
3. times, in interleaved rounds (the order reversed every other round, the first round a
   warm-up), greedy decoding of --new-tokens tokens after 32-token prompts from
   tiny-shakespeare's *validation* split (new ones each round, the same for every contender
   within it):
   transformers' `generate` (dense), transformers' `generate(assistant_early_exit=E)` (batch 1
   only: it runs at batch 1 alone), adadepth's own dense decoding loop, and self-spec with each
   drafter; at each batch size of --batches;
4. checks every contender's tokens against transformers' dense `generate`, and reports tokens/s
   (medians over rounds), the speedup over dense `generate` (median of the within-round ratios),
   acceptance rate, tokens per verification (per row), and drafted tokens per round.
Writes OUT/bench_selfspec.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adadepth.bench import heldout_windows
from adadepth.cli import run_or_exit
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth import selfspec_search as search
from adadepth.generate import generate
from adadepth.hf import backbones
from adadepth.runs import load_run

PROMPT = 32


def machine_load() -> dict[str, Any]:
    """What else is running: the load average and the busiest processes (not ours)."""
    top = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True,
                         text=True).stdout.splitlines()[1:8]
    mine = str(os.getpid())
    return {"loadavg": os.getloadavg(),
            "busiest": [" ".join(line.split()[:2] + [" ".join(line.split()[2:])[:90]])
                        for line in top if line.split()[0] != mine]}


def distill_corpus(path: Path, docs: int, new_tokens: int, batch: int = 64) -> None:
    """The model's own greedy continuations of 32-token windows of tiny-shakespeare's *train*
    split (the benchmark's prompts come from its validation split), one JSON line per window:
    the text a drafter meets when the model decodes greedily (self-distillation data). The
    windows start every len(train) / docs tokens."""
    loaded = load_run(backbones.ensure_backbone("smollm2-135m"))
    model, tok = loaded.model, loaded.tokenizer
    train = prepare_tokens(load_corpus("tiny-shakespeare"), tok).split("train")
    stride = (len(train) - PROMPT) // docs
    windows = torch.from_numpy(train[:docs * stride].astype("int64")).view(docs, stride)
    t0 = time.perf_counter()
    lines = []
    with torch.inference_mode():
        for part in windows[:, :PROMPT].split(batch):
            out = generate(model, part, new_tokens, temperature=0.0)
            lines += [json.dumps({"text": tok.decode(row)}) for row in out.tolist()]
            print(f"self-distillation corpus: {len(lines)}/{docs} continuations, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    path.write_text("\n".join(lines) + "\n")
    (path.with_suffix(".json")).write_text(json.dumps(
        {"docs": docs, "prompt": PROMPT, "new_tokens": new_tokens, "batch": batch,
         "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}) + "\n")


def ensure_runs(out: Path, fit_steps: int, threads: int, corpus: Path) -> dict[str, Path]:
    common = ["--backbone", "smollm2-135m", "--corpus", str(corpus), "train.batch_size=4",
              "data.block_size=256", "train.eval_interval=100000", "train.eval_batches=4",
              "train.log_interval=5", "train.ckpt_interval=25", f"train.threads={threads}"]
    runs = {"skip": out / "selfspec-skip", "exit": out / "selfspec-exit6"}
    if not (runs["skip"] / "metrics.json").exists():
        # nothing trains: more held-out windows, whose tokens choose the draft vocabulary
        run_or_exit(["fit", "--method", "self-spec", "--out", str(runs["skip"]), *common,
                     "train.eval_batches=16", "self-spec.drafter=skip"])
    if not (runs["exit"] / "metrics.json").exists():
        run_or_exit(["fit", "--method", "self-spec", "--steps", str(fit_steps), "--out",
                     str(runs["exit"]), "--resume", *common, "optim.warmup_steps=20",
                     "optim.lr=2e-3", "self-spec.drafter=exit", "self-spec.exit_layer=6",
                     "self-spec.adapter_ffn=1536"])
    return runs


def hf_generate(model: Any, prompt: Tensor, n: int, early_exit: int | None = None) -> Tensor:
    """transformers' greedy `generate`, exactly n new tokens (no end-of-text stop)."""
    kwargs: dict[str, Any] = {"assistant_early_exit": early_exit} if early_exit else {}
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **kwargs)
    return out[:, prompt.shape[1]:]


def timed(fn: Callable[[], Tensor]) -> tuple[float, Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--fit-steps", type=int, default=600)
    parser.add_argument("--hf-exits", default="4,8,15,22")
    parser.add_argument("--distill-docs", type=int, default=1536)
    parser.add_argument("--distill-tokens", type=int, default=160)
    parser.add_argument("--out", default="runs/bench-selfspec")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = machine_load()
    corpus = out / "self-distill.jsonl"
    if not corpus.exists():
        distill_corpus(corpus, args.distill_docs, args.distill_tokens)
    runs = ensure_runs(out, args.fit_steps, args.threads, corpus)

    from transformers import LlamaForCausalLM

    folder = backbones.ensure_backbone("smollm2-135m")
    hf = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = {name: load_run(path).model for name, path in runs.items()}
    dense = ours["skip"].backbone  # the same weights behind adadepth's layer-stack interface
    loaded = load_run(runs["skip"])
    batches = [int(b) for b in args.batches.split(",")]
    # the benchmark's prompts: tiny-shakespeare's validation split (the drafters were fitted on
    # continuations of its train split)
    data = prepare_tokens(load_corpus("tiny-shakespeare"), loaded.tokenizer)
    prompts, _ = heldout_windows(data, max(batches) * (args.reps + 1), PROMPT, 1, PROMPT)
    n = args.new_tokens
    result: dict[str, Any] = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "torch": torch.__version__, "new_tokens": n, "prompt": PROMPT, "reps": args.reps,
        "runs": {k: json.loads((v / "metrics.json").read_text()) for k, v in runs.items()},
        "load_before": load_before}

    with torch.inference_mode():
        # transformers' best early exit, on one prompt (it decodes at batch 1 only)
        sweep = {}
        for e in (int(v) for v in args.hf_exits.split(",")):
            seconds, _ = timed(lambda e=e: hf_generate(hf, prompts[:1], 32, e))
            sweep[e] = 32 / seconds
        best_exit = max(sweep, key=sweep.get)
        result["hf_early_exit_sweep"] = {"tokens_per_s": sweep, "best": best_exit}
        print(f"transformers assistant_early_exit sweep (tokens/s): {sweep}; best E={best_exit}",
              flush=True)

        rows = []
        measured: dict[str, Any] = {}  # contender -> its model bound to a fresh tally
        for batch in batches:
            contenders: dict[str, Callable[[Tensor], Tensor]] = {
                "transformers generate": lambda p: hf_generate(hf, p, n),
                "adadepth dense": lambda p: generate(dense, p, n, temperature=0.0)[:, PROMPT:],
                # self-spec decodes through a measured copy of each run's model (`measured`,
                # bound before each timed call), which counts what ran
                "self-spec skip": lambda p: generate(measured["self-spec skip"], p, n,
                                                     temperature=0.0)[:, PROMPT:],
                "self-spec exit+adapter": lambda p: generate(
                    measured["self-spec exit+adapter"], p, n, temperature=0.0)[:, PROMPT:],
            }
            if batch == 1:
                contenders[f"transformers assistant_early_exit={best_exit}"] = (
                    lambda p: hf_generate(hf, p, n, best_exit))
            seconds: dict[str, list[float]] = {k: [] for k in contenders}
            ratios: dict[str, list[float]] = {k: [] for k in contenders}
            realised: dict[str, list[dict[str, Any]]] = {k: [] for k in contenders}
            identical = {k: True for k in contenders}
            for rnd in range(args.reps + 1):
                prompt = prompts[rnd * batch:(rnd + 1) * batch]
                order = list(contenders) if rnd % 2 else list(reversed(contenders))
                times, outs = {}, {}
                for name in order:
                    # "self-spec skip" -> "skip", "self-spec exit+adapter" -> "exit"
                    ours_name = name.split()[-1].split("+")[0]
                    model = ours.get(ours_name) if name.startswith("self-spec") else None

                    def run(f: Callable[[Tensor], Tensor] = contenders[name],
                            p: Tensor = prompt) -> Tensor:
                        return f(p)

                    if model is not None:
                        runner, m = model.measured()
                        measured[name] = runner
                        times[name], outs[name] = timed(run)
                        realised[name].append(m.summary())
                    else:
                        times[name], outs[name] = timed(run)
                reference = outs["transformers generate"]
                for name in contenders:
                    identical[name] &= bool(torch.equal(outs[name], reference))
                    if rnd:  # the first round warms up
                        seconds[name].append(times[name])
                        ratios[name].append(times["transformers generate"] / times[name])
                print(f"batch {batch} round {rnd}: " + ", ".join(
                    f"{k} {batch * n / v:.1f} tok/s" for k, v in times.items()), flush=True)
            for name in contenders:
                row = {"batch": batch, "contender": name,
                       "tokens_per_s": batch * n / statistics.median(seconds[name]),
                       "speedup_vs_transformers": statistics.median(ratios[name]),
                       "identical_to_transformers_greedy": identical[name]}
                if realised[name]:
                    timed_rounds = realised[name][1:]
                    for key in ("acceptance_rate", "tokens_per_round", "drafted_per_round"):
                        row[key] = statistics.median(r[key] for r in timed_rounds)
                    row["setting"] = {k: timed_rounds[0][k] for k in
                                      ("skip", "exit_layer", "threshold", "draft_tokens")}
                rows.append(row)
        # where a round's time goes: one draft step, and a verify pass of k+1 tokens per row,
        # each against one dense decoding step (a verify pass of 1 token), at each batch size
        costs = {}
        for name, model in ours.items():
            for batch in batches:
                t = search.timings(model, prompts[:batch])
                step = search.draft_step_s(model, t)
                costs[f"{name} batch {batch}"] = {
                    "dense_step_s": t["verify_s"][0], "draft_step_s": step,
                    "draft_layers": len(model.kept), "verify_s": t["verify_s"],
                    "draft_step_over_dense": step / t["verify_s"][0],
                    "verify_over_dense": [v / t["verify_s"][0] for v in t["verify_s"]]}
                print(f"{name} batch {batch}: draft step {1e3 * step:.1f} ms, "
                      f"dense step {1e3 * t['verify_s'][0]:.1f} ms, verify of 2..9 tokens/row "
                      + ", ".join(f"{1e3 * v:.0f}" for v in t["verify_s"][1:]) + " ms",
                      flush=True)
        result["costs"] = costs
    result["rows"] = rows
    result["load_after"] = machine_load()
    (out / "bench_selfspec.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {out / 'bench_selfspec.json'}")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | contender | tokens/s | vs transformers generate | identical greedy | "
             "acceptance | tokens / verification | drafted / round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.2f}" if key in r else "—"
        lines.append(f"| {r['batch']} | {r['contender']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_transformers']:.2f}x | "
                     f"{'yes' if r['identical_to_transformers_greedy'] else 'NO'} | "
                     f"{f('acceptance_rate')} | {f('tokens_per_round')} | "
                     f"{f('drafted_per_round')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
