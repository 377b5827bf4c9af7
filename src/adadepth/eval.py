"""`adadepth eval`: validation loss, perplexity and bits per token/char of a run folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from adadepth import runs
from adadepth.data import load_corpus, prepare_tokens
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

