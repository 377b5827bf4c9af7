"""The one command-line entry point. Each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from adadepth.config import apply_overrides, load_yaml, merge
from adadepth.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def config_dict(args: argparse.Namespace, base: dict, flags: dict | None = None) -> dict:
    """Defaults < --config YAML < explicit flags < key=value overrides."""
    if getattr(args, "config", None):
        base = merge(base, load_yaml(args.config))
    return apply_overrides(merge(base, flags or {}), args.overrides)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from adadepth.config import PretrainConfig, preset, validate
    from adadepth.jobs.pretrain import pretrain

    # The preset (flag, else the YAML's, else tiny) gives the model shape the YAML then adjusts.
    name = args.preset or str((load_yaml(args.config) if args.config else {}).get("preset", "tiny"))
    base = {"preset": name, "model": preset(name).model_dump()}
    given = (("corpus", args.corpus), ("tokenizer", args.tokenizer), ("steps", args.steps),
             ("parallel", args.parallel))
    given = {k: v for k, v in given if v is not None}
    flags = {"preset": name,
             "data": {k: v for k, v in given.items() if k in ("corpus", "tokenizer")},
             "train": {k: v for k, v in given.items() if k in ("steps", "parallel")}}
    cfg = validate(PretrainConfig, config_dict(args, base, flags))
    result = pretrain(cfg, Path(args.out), resume=args.resume)
    print(json.dumps({"out": args.out, "steps": result.step, "val_loss": result.val_loss,
                      "wall_s": round(result.wall_s, 1)}))


# The options of one kind of `eval` only: given to the other, refused rather than ignored.
TEXT_EVAL_OPTIONS, TASK_EVAL_OPTIONS = ("corpus", "block_size", "batches"), (
    "include_path", "limit", "num_fewshot")


def cmd_eval(args: argparse.Namespace) -> None:
    from adadepth.eval import evaluate_run, evaluate_tasks

    unread = TEXT_EVAL_OPTIONS if args.tasks else TASK_EVAL_OPTIONS
    for option in unread:
        if getattr(args, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} "
                            f"{'is not read with --tasks' if args.tasks else 'needs --tasks'}")
    out = Path(args.out) if args.out else None
    if not args.tasks:
        result = evaluate_run(Path(args.run), corpus=args.corpus, block_size=args.block_size,
                              batch_size=args.batch_size, max_batches=args.batches,
                              device=args.device, out=out)
        print(json.dumps(result, indent=2))
        return
    include = Path(args.include_path) if args.include_path else None
    result = evaluate_tasks(args.run, args.tasks, include, args.limit, args.num_fewshot,
                            args.batch_size, args.device, out)
    print(json.dumps(rounded(result), indent=2))


def task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no task named")
    return names


def limit_value(text: str) -> int | float:
    """lm-eval's --limit: a count of examples per task, or a fraction of each below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text} is neither a count >= 1 nor a fraction in (0, 1)")


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from adadepth.depth import Method
    from adadepth.depth.dispatch import Call
    from adadepth.generate import generate
    from adadepth.runs import load_model
    from adadepth.train.loop import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.run, str(device))
    ids = loaded.tokenizer.encode(args.prompt)
    if not ids:
        raise UserError("the prompt is empty after tokenization")
    if loaded.tokenizer.bos_id is not None:  # as the model's tokenizer starts a document
        ids = [loaded.tokenizer.bos_id, *ids]
    if len(ids) + args.max_new_tokens > loaded.model.cfg.max_seq_len:
        raise UserError(f"prompt ({len(ids)} tokens) plus --max-new-tokens exceeds the model's "
                        f"context of {loaded.model.cfg.max_seq_len}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, device=device)
    model = loaded.model
    adaptive = isinstance(model, Method)
    if args.show_depth and not adaptive:
        raise UserError(f"{args.run} is a dense model: every token gets every layer, there is "
                        "no depth to show")
    depth: list = []
    runner, measurement = (model.measured(Call(depth=depth if args.show_depth else None))
                           if adaptive else (model, None))
    t0 = time.perf_counter()
    out = generate(runner, idx, args.max_new_tokens, args.temperature, args.top_k,
                   generator=gen)
    seconds = time.perf_counter() - t0
    for b, row in enumerate(out.tolist()):
        if depth:
            print(show_depth(model, loaded.tokenizer, row, depth, b, not args.no_color))
        else:
            print(loaded.tokenizer.decode(row))
        print("---")
    new_tokens = args.max_new_tokens * args.num_samples
    speed = {"new_tokens": new_tokens, "seconds": seconds,  # the prompt's prefill included
             "tokens_per_s": new_tokens / max(seconds, 1e-9)}
    print(f"speed: {json.dumps(rounded(speed))}", file=sys.stderr)
    if measurement is not None:  # what the adaptive model really ran (prompt included); last,
        # so that readers of the `compute:` line can take the rest of stderr
        print(f"compute: {json.dumps(rounded(measurement.summary()))}", file=sys.stderr)


def show_depth(model, tokenizer, ids: list[int], depth: list, row: int, colour: bool) -> str:
    """One generated row as text coloured by the compute each token received."""
    import os

    import torch

    from adadepth.depthmap import DepthText, terminal

    values = torch.cat([d[row] for d in depth]).tolist()
    values += [None] * (len(ids) - len(values))  # the last new token was never fed
    text = DepthText("", [tokenizer.decode([i]) for i in ids], values, model.depth_unit,
                     model.most_token_depth())
    return terminal(text, colour and sys.stdout.isatty() and "NO_COLOR" not in os.environ)


def aux_list(text: str) -> list[str]:
    items = [a.strip() for a in text.split(",") if a.strip() and a.strip() != "none"]
    unknown = [a for a in items if a not in ("util", "rank", "jepa")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown auxiliary loss {unknown[0]!r} "
                                         "(use util, rank, jepa or none)")
    return items


def cmd_route(args: argparse.Namespace) -> None:
    """`adadepth route`: fit with the method fixed to routing (its flags go to its section)."""
    args.method = "routing"
    args.preset = args.corpus = args.tokenizer = None
    cmd_fit(args, {k: v for k, v in (("gate", args.gate), ("budget", args.budget),
                                     ("aux", args.aux), ("oracle", args.oracle))
                   if v is not None},
            shown=("gate", "budget", "avg_lm", "best_lm", "endpoint_lm", "val_lm_causal",
                   "full_fraction_causal", "flops_proxy", "wall_s"))


def cmd_fit(args: argparse.Namespace, method_flags: dict | None = None,
            shown: tuple[str, ...] | None = None) -> None:
    """Train; print the run's figures as one JSON line (`shown`: these, else every number)."""
    from adadepth.jobs.fit import fit, fit_config, fit_defaults

    base = fit_defaults(args.method)  # the job's training defaults, and the method's own
    given = (("backbone", args.backbone), ("preset", args.preset))
    flags: dict = {"method": args.method, **{k: v for k, v in given if v is not None}}
    data = {k: v for k, v in (("corpus", args.corpus), ("tokenizer", args.tokenizer))
            if v is not None}
    train = {k: v for k, v in (("steps", args.steps), ("seed", args.seed),
                               ("parallel", args.parallel)) if v is not None}
    if data:
        flags["data"] = data
    if train:
        flags["train"] = train
    if method_flags:  # a method's own command: its flags go to its section
        flags[args.method] = method_flags
    cfg = fit_config(config_dict(args, base, flags))
    metrics = fit(cfg, Path(args.out), resume=args.resume)
    if shown is not None:
        print(json.dumps({k: metrics.get(k) for k in shown}))
    else:
        print(json.dumps(rounded({k: v for k, v in metrics.items()
                                  if isinstance(v, int | float | str) or v is None})))


TUNE_METHODS = ("ensemble", "lora", "ensemble+lora", "full")


def cmd_tune(args: argparse.Namespace) -> None:
    """`adadepth fit` over a pretrained backbone with a tuning method (docs/methods/ensemble.md)."""
    args.preset = args.tokenizer = None
    cmd_fit(args)


def cmd_ponder(args: argparse.Namespace) -> None:
    """`adadepth ponder`: fit with the method fixed to ponder (AdaPonderLM)."""
    args.method = "ponder"
    cmd_fit(args, {k: v for k, v in (("passes", args.passes), ("halting", args.halting))
                   if v is not None})


def cmd_bench(args: argparse.Namespace) -> None:
    from adadepth.bench import run_cli

    run_cli(args)


def cmd_backbone(args: argparse.Namespace) -> None:
    from adadepth.hf import backbone_cli

    backbone_cli(args)


def cmd_study(args: argparse.Namespace) -> None:
    from adadepth.bench import parse_list
    from adadepth.studies import StudyOptions, run_study

    options = StudyOptions(
        preset=args.preset, seeds=args.seeds, out=Path(args.out) if args.out else None,
        device=args.device, workers=args.workers, report_only=args.report_only,
        steps=args.steps, ablations=args.ablations, corpus=args.corpus,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if args.methods else None,
        budgets=tuple(parse_list(args.budgets, float, "budgets")) if args.budgets else None,
        compare=tuple(args.compare))
    print(json.dumps(run_study(args.name, options)))


def fit_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `fit` and of the commands that are fit with the method fixed."""
    p.add_argument("--backbone", help="a pretrained run folder, a transformers model directory, "
                   "or a known backbone such as smollm2-135m; omit to train from scratch")
    p.add_argument("--preset", help="from scratch: tiny (default), small or paper")
    p.add_argument("--corpus", help="default: the backbone's corpus (from scratch: "
                   "tiny-shakespeare)")
    p.add_argument("--tokenizer", help="from scratch: char (default), gpt2 or a folder")
    run_arguments(p, "key=value, e.g. METHOD.option=... train.batch_size=8")


def run_arguments(p: argparse.ArgumentParser, example: str) -> None:
    """The options every training command shares."""
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="YAML file with any config fields")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], help="under torchrun")
    p.add_argument("overrides", nargs="*", help=example)


def build_parser() -> Parser:
    parser = Parser(prog="adadepth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("pretrain", help="pretrain a dense backbone")
    p.add_argument("--preset", help="tiny (default), small or paper")
    p.add_argument("--corpus", help="default tiny-shakespeare")
    p.add_argument("--tokenizer", help="char (default), gpt2 or a tokenizer folder")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--config", help="YAML file with any config fields")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], help="under torchrun")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 train.batch_size=8")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="validation loss, perplexity, bits per token/char; or "
                       "lm-eval tasks (--tasks)")
    p.add_argument("run", help="a run folder, a transformers model directory, or a known "
                   "backbone such as smollm2-135m")
    p.add_argument("--corpus")
    p.add_argument("--block-size", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--batches", type=positive_int, help="at most this many batches")
    p.add_argument("--device", default="auto")
    p.add_argument("--tasks", type=task_list, help="lm-evaluation-harness tasks instead, comma "
                   "list (hellaswag,arc_easy; globs and task YAML files too): writes lm-eval's "
                   "results JSON to lm_eval.json")
    p.add_argument("--include-path", help="with --tasks: a folder of local task YAMLs")
    p.add_argument("--limit", type=limit_value, help="with --tasks: at most N examples per "
                   "task (a fraction below 1: that share of each)")
    p.add_argument("--num-fewshot", type=non_negative_int,
                   help="with --tasks: examples in each prompt (default: each task's own)")
    p.add_argument("--out", help="where eval.json / lm_eval.json go (default: the run folder; "
                   "for a transformers directory or known backbone, runs/eval-NAME)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text with the KV cache")
    p.add_argument("run")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=positive_int, default=200)
    p.add_argument("--num-samples", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--show-depth", action="store_true",
                   help="colour each token by the compute it received (adaptive models)")
    p.add_argument("--no-color", action="store_true",
                   help="with --show-depth: numbers under the tokens instead of colour")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("route", help="train a conditional depth-routing controller")
    p.add_argument("--backbone", required=True, help="a pretrained run folder, a transformers "
                   "model directory, or a known backbone such as smollm2-135m")
    p.add_argument("--gate", help="g1, g3, random, static, all-full, all-cheap")
    p.add_argument("--budget", type=float, help="full-path fraction in (0, 1]")
    p.add_argument("--aux", type=aux_list, help="comma list of util,rank,jepa, or none")
    p.add_argument("--oracle", choices=["off_policy", "on_policy"])
    run_arguments(p, "key=value, e.g. routing.d_z=32")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("fit", help="train any registered method, over a backbone or from "
                       "scratch")
    p.add_argument("--method", required=True, help="a registered method (see docs/methods.md)")
    fit_arguments(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("tune", help="tune a pretrained backbone on new text: late-layer "
                       "ensemble, LoRA, both, or in full (adadepth fit with these methods)")
    p.add_argument("--backbone", required=True, help="a pretrained run folder, a transformers "
                   "model directory, or a known backbone such as smollm2-135m")
    p.add_argument("--method", required=True, choices=TUNE_METHODS)
    p.add_argument("--corpus", help="the text to tune on (default: the backbone's corpus)")
    run_arguments(p, "key=value, e.g. ensemble.layers=4 lora.r=16 optim.lr=1e-3")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("ponder", help="train AdaPonderLM (gated pondering, token-wise halting) "
                       "over a backbone or from scratch")
    p.add_argument("--passes", type=positive_int, help="K, passes of the backbone (default 4)")
    p.add_argument("--halting", choices=["learned", "none", "uniform", "geometric"],
                   help="learned gates (default), none (PonderLM), or a fixed schedule")
    fit_arguments(p)
    p.set_defaults(func=cmd_ponder)

    p = sub.add_parser("bench", help="measured vs ideal speedup of an adaptive model")
    p.add_argument("run", help="the run folder of an adaptive method")
    p.add_argument("--settings", "--budgets", dest="settings",
                   help="comma list of the method's cost-knob values (routing: budgets); "
                   "default: the method's own sweep")
    p.add_argument("--prefill-batch", type=positive_int, default=8)
    p.add_argument("--prefill-len", type=positive_int, default=512)
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--decode-tokens", type=positive_int, default=256)
    p.add_argument("--reps", type=positive_int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="where bench.json/bench.png go (default: the run folder)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("backbone", help="convert a packaged pretrained backbone once")
    p.add_argument("name", help="e.g. smollm2-135m")
    p.set_defaults(func=cmd_backbone)

    p = sub.add_parser("study", help="run a study: its runs, results.json, report.md, plots")
    p.add_argument("name", nargs="?", default="aux-losses",
                   help="aux-losses (default), ensemble, leaderboard or ponder")
    p.add_argument("--preset", default="tiny", help="tiny (default), small or paper")
    p.add_argument("--seeds", type=positive_int,
                   help="seeds per arm (default: 3; 1 for the smollm2 presets, sized for a CPU)")
    p.add_argument("--steps", type=positive_int, help="training steps per run (aux-losses: "
                   "controller; ensemble: tuning; ponder: every arm)")
    p.add_argument("--ablations", action="store_true",
                   help="aux-losses: add A1, A4, 25%% budget, on-policy; ensemble: add "
                   "the ensemble arms without distillation")
    p.add_argument("--corpus", help="aux-losses: instead of the preset's (tiny-shakespeare; "
                   "paper: fineweb-edu, streamed): a built-in name, a local file or folder, a "
                   "dataset")
    p.add_argument("--methods", help="leaderboard: comma list of entries (default: all)")
    p.add_argument("--budgets", help="leaderboard: comma list of FLOPs budgets in (0, 1] "
                   "(default 0.5,0.75)")
    p.add_argument("--out", help="the study's folder (default runs/study-NAME)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=positive_int, help="runs at a time, each in a worker "
                   "process of one thread (default: 2 on a CPU for ponder, else 1)")
    p.add_argument("--compare", action="append", default=[], metavar="RESULTS",
                   help="aux-losses: another scale's study folder or results.json for the "
                   "across-scales table (repeatable; from a clone, e.g. "
                   "docs/studies/aux-losses-small)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite OUT/report.md and the plots from OUT/results.json, running "
                   "nothing")
    p.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        print(f"adadepth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adadepth: interrupted; the last checkpoint is intact (--resume continues)",
              file=sys.stderr)
        return 130
    return 0


def run_or_exit(argv: list[str]) -> None:
    """`adadepth ARGV` from a script (the benchmarks), stopping the script if it fails."""
    if main(argv) != 0:
        raise SystemExit(f"adadepth {' '.join(argv)} failed")
