"""Where a training step's time goes: our `tiny` model against nanoGPT's, profiled side by side.

    python benchmarks/profile_step.py --nanogpt DIR [--steps 20] [--threads 1] [key=value ...]

DIR is a checkout of https://github.com/karpathy/nanoGPT; its `model.py` is imported as it is.
Both models are built for nanoGPT's small CPU recipe (4 layers, width 128, 4 heads, context 64,
batch 12, no bias, no dropout; ours is the `tiny` preset, changed by any key=value model
overrides such as model.d_ff=344), each with its trainer's optimizer settings (ours: the fused
AdamW of `adadepth.train.loop`; nanoGPT's: its plain AdamW on the CPU). After 5 warm-up steps
each, STEPS full steps (batch, forward, loss, backward, clipping, optimizer) of each model are
profiled with `torch.profiler`, one model after the other in this one process; the batches are
random token ids (timing does not depend on the text).

Prints, per model, the CPU time per step: in matrix multiplies (`aten::mm`, `aten::addmm`,
`aten::bmm`), in everything else, and the heaviest other operators. Profiling adds overhead, so
read the split, not the totals, and take throughput from `bench_vs_nanogpt.py`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import profile

from adadepth.config import ModelConfig, OptimConfig, apply_overrides, preset
from adadepth.model import Transformer, causal_lm_loss
from adadepth.train.loop import make_optimizer

BLOCK, BATCH, WARMUP = 64, 12, 5
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}


def nanogpt_step(nanogpt: Path, vocab: int) -> Callable[[], None]:
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's own module

    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=BLOCK, bias=False,
                          vocab_size=vocab, dropout=0.0))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

    def step() -> None:
        x, y = batch(vocab)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def our_step(vocab: int, overrides: list[str]) -> Callable[[], None]:
    fields = apply_overrides({"model": preset("tiny").model_dump()}, overrides)["model"]
    model = Transformer(ModelConfig(**{**fields, "vocab_size": vocab}))
    params = list(model.parameters())
    optimizer = make_optimizer(params, OptimConfig(), torch.device("cpu"))

    def step() -> None:
        x, y = batch(vocab)
        causal_lm_loss(model(x).logits, y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (BATCH, BLOCK + 1))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def report(name: str, step: Callable[[], None], steps: int, top: int) -> None:
    for _ in range(WARMUP):
        step()
    with profile() as prof:
        for _ in range(steps):
            step()
    ops = [op for op in prof.key_averages() if not op.key.startswith("ProfilerStep")]
    ms = {op.key: op.self_cpu_time_total / 1e3 / steps for op in ops}
    matmul = sum(v for k, v in ms.items() if k in MATMULS)
    rest = sum(v for k, v in ms.items() if k not in MATMULS)
    print(f"\n{name}: {matmul + rest:.1f} ms per step (profiled): matrix multiplies "
          f"{matmul:.1f} ms, everything else {rest:.1f} ms")
    others = sorted(((v, k) for k, v in ms.items() if k not in MATMULS), reverse=True)
    for v, k in others[:top]:
        print(f"  {v:6.2f} ms  {k[:70]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=66, help="tiny-shakespeare's characters")
    parser.add_argument("--top", type=int, default=10, help="other operators listed")
    parser.add_argument("overrides", nargs="*", help="model.key=value for our model")
    args = parser.parse_args()
    if not (args.nanogpt / "model.py").is_file():
        raise SystemExit(f"{args.nanogpt} has no model.py: pass a nanoGPT checkout")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report("nanoGPT", nanogpt_step(args.nanogpt.resolve(), args.vocab), args.steps, args.top)
    report("ours", our_step(args.vocab, args.overrides), args.steps, args.top)


if __name__ == "__main__":
    main()
