"""`adadepth eval`: validation loss, perplexity and bits per token/char of a run folder, or
lm-eval's tasks on it (`--tasks`, through the lm-eval model in `adadepth.hf.harness`).

Results go beside the run: `eval.json` and `lm_eval.json` in an adadepth run folder. A
transformers model directory or a known backbone name is someone else's model, never written
into: its results go to `--out`, by default `runs/eval-NAME`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from adadepth import flops as fl
from adadepth import hf, runs
from adadepth.data import load_corpus, prepare_tokens
from adadepth.depth import Method
from adadepth.depth.dispatch import Call
from adadepth.errors import UserError
from adadepth.model import causal_lm_loss
from adadepth.train import checkpoint as ck
from adadepth.train.loop import evaluate, resolve_device


@dataclass
class Target:
    """A model to evaluate and the folder its results go to."""

    loaded: runs.LoadedRun
    out: Path
    foreign: bool  # a transformers directory or known backbone: not ours to write into


def load_target(spec: str | Path, out: Path | None = None, device: str = "auto") -> Target:
    """An adadepth run folder, a transformers model directory, or a known backbone name
    (smollm2-135m), loaded with its tokenizer; `out` overrides where results go."""
    dev = str(resolve_device(device))
    text = str(spec)
    loaded = runs.load_model(text, dev)
    # smollm2-135m (or a GGUF file's name), else the folder's own name
    name = Path(text).stem.lower() if hf.is_known(text) else Path(text).resolve().name
    foreign = loaded.meta.get("kind") == "hf"
    if out is None:
        out = Path(f"runs/eval-{name}") if foreign else Path(text)
    return Target(loaded, Path(out), foreign)


def where(target: Target, path: Path) -> dict[str, str]:
    """The output's account of where the results went (and why, when not beside the model)."""
    said = {"out": str(path)}
    if target.foreign:
        said["note"] = (f"{target.loaded.meta.get('ref')} is a transformers model, not an "
                        f"adadepth run: results go to {path.parent}, never into its folder")
    return said


def evaluate_run(run_dir: Path | str, corpus: str | None = None, block_size: int | None = None,
                 batch_size: int = 8, max_batches: int | None = None,
                 device: str = "auto", out: Path | None = None) -> dict[str, Any]:
    """Validation loss and the method's own figures, written to `eval.json` (see the module's
    docstring for where); the result says where when it is not the run folder."""
    target = load_target(run_dir, out, device)
    loaded, dev = target.loaded, resolve_device(device)
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
    val_loss, tokens = evaluate(lambda x, y: model(x).loss(y), data, "val",
                                batch_size, block, dev, max_batches)
    result: dict[str, Any] = {
        "run": str(run_dir), "kind": loaded.meta.get("kind"), "corpus": corpus_name,
        "block_size": block, "val_loss": val_loss, "perplexity": math.exp(val_loss),
        "bits_per_token": val_loss / math.log(2), "tokens_evaluated": tokens,
        # how every window started: as the model's tokenizer starts a document
        "window_start": ("no special token (the tokenizer adds none)"
                         if data.bos is None else f"bos token {data.bos}"),
    }
    if loaded.tokenizer.is_char:
        result["bits_per_char"] = result["bits_per_token"]
    extra = getattr(model, "eval_report", None)
    if callable(extra):  # adaptive models add their own figures (full fraction, FLOPs ratio)
        with torch.no_grad():
            result.update(extra(data, block, batch_size, max_batches))
    target.out.mkdir(parents=True, exist_ok=True)
    ck.write_json_atomic(target.out / "eval.json", result)
    if target.out.resolve() == Path(str(run_dir)).resolve():
        return result  # what eval.json holds, as ever
    return {**result, **where(target, target.out / "eval.json")}


def evaluate_tasks(run: Path | str, tasks: list[str], include_path: Path | None = None,
                   limit: int | float | None = None, num_fewshot: int | None = None,
                   batch_size: int = 8, device: str = "auto",
                   out: Path | None = None) -> dict[str, Any]:
    """lm-eval's tasks on a run (or a transformers directory, or a known backbone): lm-eval's
    results JSON, with the compute the model really ran, written to `lm_eval.json` beside
    `eval.json`. Returns a summary: each task's metrics, the compute, where the file went."""
    if find_spec("lm_eval") is None:
        raise UserError("lm-eval tasks need lm-eval: pip install -e '.[hf]' (or lm-eval>=0.4.5)")
    from lm_eval.utils import handle_non_serializable

    from adadepth.hf import harness

    if not hf.is_known(str(run)):
        runs.read_run_config(Path(run))  # a missing run fails before lm-eval reads its tasks
    resolved = harness.resolve_tasks(tasks, include_path)  # and bad tasks before loading
    target = load_target(run, out, device)
    lm = harness.AdadepthLM(loaded=target.loaded, batch_size=batch_size)
    results = harness.evaluate(lm, tasks, include_path, limit, num_fewshot, resolved=resolved)
    results["adadepth"] = {"run": str(run), "kind": target.loaded.meta.get("kind")}
    target.out.mkdir(parents=True, exist_ok=True)
    path = target.out / "lm_eval.json"
    # lm-eval's own serialisation of its results (its configs hold callables and numpy values)
    ck.write_json_atomic(path, json.loads(json.dumps(results, default=handle_non_serializable)))
    return {"run": str(run), "results": results["results"], "n-shot": results.get("n-shot"),
            "compute": results["compute"], **where(target, path)}



@dataclass
class Decoded:
    """What `decode_eval` measured: the mean next-token loss (nats); the FLOPs per token the
    method realised as a fraction of its dense backbone's, over the whole model and over the
    layer stack (the LM head, which no method removes, left out of both); those FLOPs by
    component against the dense model (`Method.tally_breakdown`, as fractions of the dense
    model's FLOPs per token); the method's summary; and
    the per-token depth of every fed token, per batch of windows; with `predict`, the greedy
    next token at every scored position (windows, positions)."""

    loss: float
    flops_fraction: float = 1.0
    flops_fraction_stack: float = 1.0
    breakdown: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    depth: list[torch.Tensor] = field(default_factory=list)
    predictions: torch.Tensor | None = None


@torch.no_grad()
def decode_eval(model: Any, windows: torch.Tensor, batch_size: int = 16, prompt: int = 1,
                call: Call | None = None, predict: bool = False) -> Decoded:
    """Held-out windows fed as generation feeds them: a prompt of `prompt` tokens, then one
    token per cached forward (`Decoded` says what is measured). This is the deployed setting,
    so methods that adapt only while decoding are measured as they run. `call` gives an
    adaptive model other instructions (a forced pattern); `predict` keeps the greedy next
    token of every position too (read from the same logits as the loss)."""
    total, count, depth, predicted = 0.0, 0, [], []
    T = windows.shape[1] - 1
    adaptive = isinstance(model, Method)
    parts: list[torch.Tensor] = []
    runner, m = (model.measured((call or Call()).but(depth=parts)) if adaptive
                 else (model, None))
    guesses: list[torch.Tensor] = []

    def scored(out: Any, targets: torch.Tensor) -> torch.Tensor:
        if not predict:
            return out.loss(targets, "none")
        logits = out.logits  # one or a few positions: computed once for both
        guesses.append(logits.argmax(-1))
        return causal_lm_loss(logits, targets, "none")

    for rows in windows.split(batch_size):
        cache = runner.new_cache(rows.shape[0], T)
        # each call's loss at once: the logits of a whole window never sit in memory together
        losses = [scored(runner(rows[:, :prompt], cache, 0), rows[:, 1:prompt + 1])]
        for t in range(prompt, T):
            losses.append(scored(runner(rows[:, t:t + 1], cache, t), rows[:, t + 1:t + 2]))
        if guesses:
            predicted.append(torch.cat(guesses, 1))
            guesses.clear()
        total += torch.cat(losses, 1).sum().item()
        count += rows[:, 1:T + 1].numel()
        if parts:
            depth.append(torch.cat(parts, 1))
            parts.clear()
    predictions = torch.cat(predicted).cpu() if predicted else None
    if m is None:  # a dense model runs every layer on every token
        return Decoded(total / count, depth=depth, predictions=predictions)
    context = fl.causal_context(T)
    dense = fl.forward_per_token(model.cfg, context)
    total_dense, head = sum(dense.values()), dense["lm_head"]
    realised = m.flops_per_token(context)
    parts = {k: v / total_dense for k, v in m.breakdown(context).items()}
    return Decoded(total / count, realised / total_dense,
                   (realised - head) / (total_dense - head), parts, m.summary(), depth,
                   predictions)
