"""The one command-line entry point. Each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adadepth.config import apply_overrides, load_yaml
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


def config_dict(args: argparse.Namespace, base: dict) -> dict:
    """Defaults < --config YAML < explicit flags < key=value overrides."""
    if getattr(args, "config", None):
        base = _merge(base, load_yaml(args.config))
    return apply_overrides(base, args.overrides)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cmd_pretrain(args: argparse.Namespace) -> None:
    from adadepth.config import PretrainConfig, preset, validate
    from adadepth.pretrain import pretrain

    base = {"preset": args.preset, "model": preset(args.preset).model_dump(),
            "data": {"corpus": args.corpus, "tokenizer": args.tokenizer},
            "train": {} if args.steps is None else {"steps": args.steps}}
    cfg = validate(PretrainConfig, config_dict(args, base))
    result = pretrain(cfg, Path(args.out), resume=args.resume)
    print(json.dumps({"out": args.out, "steps": result.step, "val_loss": result.val_loss,
                      "wall_s": round(result.wall_s, 1)}))


def cmd_eval(args: argparse.Namespace) -> None:
    from adadepth.eval import evaluate_run

    result = evaluate_run(Path(args.run), corpus=args.corpus, block_size=args.block_size,
                          batch_size=args.batch_size, max_batches=args.batches,
                          device=args.device)
    print(json.dumps(result, indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from adadepth.generate import generate
    from adadepth.runs import load_run
    from adadepth.train.loop import resolve_device

    device = resolve_device(args.device)
    loaded = load_run(Path(args.run), str(device))
    ids = loaded.tokenizer.encode(args.prompt)
    if not ids:
        raise UserError("the prompt is empty after tokenization")
    if len(ids) + args.max_new_tokens > loaded.model.cfg.max_seq_len:
        raise UserError(f"prompt ({len(ids)} tokens) plus --max-new-tokens exceeds the model's "
                        f"context of {loaded.model.cfg.max_seq_len}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, device=device)
    out = generate(loaded.model, idx, args.max_new_tokens, args.temperature, args.top_k,
                   generator=gen)
    for row in out.tolist():
        print(loaded.tokenizer.decode(row))
        print("---")


def build_parser() -> Parser:
    parser = Parser(prog="adadepth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("pretrain", help="pretrain a dense backbone")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--corpus", default="tiny-shakespeare")
    p.add_argument("--tokenizer", default="char")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--config", help="YAML file with any config fields")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 train.batch_size=8")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="validation loss, perplexity, bits per token/char")
    p.add_argument("run")
    p.add_argument("--corpus")
    p.add_argument("--block-size", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--batches", type=positive_int, help="at most this many batches")
    p.add_argument("--device", default="auto")
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
    p.set_defaults(func=cmd_generate)
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
