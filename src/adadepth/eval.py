"""`adadepth eval`: validation loss, perplexity and bits per token/char of a run folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from adadepth import flops as fl
from adadepth import runs
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth import Method
from adadepth.depth.dispatch import Call
from adadepth.model import causal_lm_loss
from adadepth.train import checkpoint as ck
from adadepth.train.loop import evaluate, resolve_device


def evaluate_run(run_dir: Path, corpus: str | None = None, block_size: int | None = None,
                 batch_size: int = 8, max_batches: int | None = None,
                 device: str = "auto") -> dict[str, Any]:
    dev = resolve_device(device)
    loaded = runs.load_run(run_dir, str(dev))
    data_cfg = loaded.meta.get("data", {})
    corpus_name = corpus or data_cfg.get("corpus", "tiny-shakespeare")
    block = block_size or data_cfg.get("block_size", 256)
    block = min(block, loaded.model.cfg.max_seq_len)
    text = load_corpus(corpus_name, val_fraction=data_cfg.get("val_fraction", 0.1),
                       max_docs=data_cfg.get("max_docs"),
                       text_field=data_cfg.get("text_field", "text"))
    data = prepare_tokens(text, loaded.tokenizer)
    data.check_block(block)
    model = loaded.model
    val_loss, tokens = evaluate(lambda x, y: causal_lm_loss(model(x).logits, y), data, "val",
                                batch_size, block, dev, max_batches)
    result: dict[str, Any] = {
        "run": str(run_dir), "kind": loaded.meta.get("kind"), "corpus": corpus_name,
        "block_size": block, "val_loss": val_loss, "perplexity": math.exp(val_loss),
        "bits_per_token": val_loss / math.log(2), "tokens_evaluated": tokens,
    }
    if loaded.tokenizer.is_char:
        result["bits_per_char"] = result["bits_per_token"]
    extra = getattr(model, "eval_report", None)
    if callable(extra):  # adaptive models add their own figures (full fraction, FLOPs ratio)
        with torch.no_grad():
            result.update(extra(data, block, batch_size, max_batches))
    ck.write_json_atomic(run_dir / "eval.json", result)
    return result



@torch.no_grad()
def decode_eval(model: Any, windows: torch.Tensor, batch_size: int = 16, prompt: int = 1,
                call: Call | None = None,
                ) -> tuple[float, float, dict[str, Any], list[torch.Tensor]]:
    """Held-out windows fed as generation feeds them: a prompt of `prompt` tokens, then one
    token per cached forward. Returns the mean next-token loss (nats), the FLOPs per token the
    method realised relative to its dense backbone, its measurement summary, and the per-token
    depth of every fed token (when the method records one). This is the deployed setting, so
    methods that adapt only while decoding are measured as they run. `call` gives an adaptive
    model other instructions (a forced pattern)."""
    total, count, depth = 0.0, 0, []
    T = windows.shape[1] - 1
    adaptive = isinstance(model, Method)
    parts: list[torch.Tensor] = []
    runner, m = (model.measured((call or Call()).but(depth=parts)) if adaptive
                 else (model, None))
    for rows in windows.split(batch_size):
        cache = runner.new_cache(rows.shape[0], T)
        logits = [runner(rows[:, :prompt], cache, 0).logits]
        for t in range(prompt, T):
            logits.append(runner(rows[:, t:t + 1], cache, t).logits)
        targets = rows[:, 1:T + 1]
        total += causal_lm_loss(torch.cat(logits, 1), targets, "none").sum().item()
        count += targets.numel()
        if parts:
            depth.append(torch.cat(parts, 1))
            parts.clear()
    if m is None:  # a dense model runs every layer on every token
        return total / count, 1.0, {}, depth
    context = fl.causal_context(T)
    dense = sum(fl.forward_per_token(model.cfg, context).values())
    return total / count, m.flops_per_token(context) / dense, m.summary(), depth
