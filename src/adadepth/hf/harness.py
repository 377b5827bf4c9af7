"""EleutherAI's lm-evaluation-harness on any adadepth run folder: model `adadepth`.

    adadepth eval RUN --tasks hellaswag               # the command line (adadepth.eval)
    python -m adadepth.hf.harness run --model adadepth --model_args run=RUN --tasks hellaswag

    import adadepth.hf.harness, lm_eval
    lm_eval.simple_evaluate(model="adadepth", model_args="run=runs/r_g1", tasks=[...])

`run=` (or `pretrained=`, as for lm-eval's `hf`) takes any folder `adadepth.runs.load_run` reads
(dense, routed, any method's, a transformers directory) or a known backbone name, with its own
tokenizer. Requests are scored as lm-eval's own HF model does: trailing spaces of a
context move to the continuation; an empty context is preceded by the end-of-text token;
rolling log-likelihoods use lm-eval's disjoint windows. Adaptive models run in their deployed
(causal) mode, so right-padding a batch does not change any real token's score.

lm-eval 0.4.13 loads no plugins (no entry points are read): its `lm_eval` command knows only
the models listed in its own source tree, so `lm_eval --model adadepth` cannot find ours. Run as
a module, this file is lm-eval's own command line with `adadepth` registered first (every option
of `lm_eval run` works). `evaluate` adds what `simple_evaluate` cannot see: the compute an
adaptive model really ran while answering the tasks (`adadepth eval --tasks` reports it).
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import lm_eval.models  # before ours: lm-eval lists its own models (see register)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from adadepth import flops as fl
from adadepth.depth import Method
from adadepth.depth.dispatch import Measurement
from adadepth.errors import UserError
from adadepth.generate import sample_next

NAME = "adadepth"


def register() -> None:
    """Make `adadepth` an lm-eval model name, leaving lm-eval's own names reachable.

    lm-eval fills its registry lazily: `get_model` imports `lm_eval.models` (which lists its
    models as "module:Class" placeholders) only while the registry is empty. Registering ours
    into the empty registry therefore hid every lm-eval model ("no model for this name found!
    Supported model names: adadepth"); importing `lm_eval.models` above first lists them, in
    whichever order the two are imported. Ours is a placeholder too, named by its import path,
    so running this file as `__main__` registers the same entry as importing it does.
    """
    if NAME not in model_registry:
        model_registry.register(NAME, target="adadepth.hf.harness:AdadepthLM")


register()


class AdadepthLM(LM):
    def __init__(self, run: str | None = None, device: str | None = "cpu",
                 batch_size: int | str = 8, max_length: int | None = None, loaded: Any = None,
                 pretrained: str | None = None, **_: Any) -> None:
        super().__init__()
        from adadepth import runs
        from adadepth.train.loop import resolve_device

        if device in (None, "cuda:0") and not torch.cuda.is_available():
            # lm-eval's command line passes its --device default, cuda:0, on any machine; its
            # own HF model then runs wherever it can, and so does ours.
            device = "auto"
        # `pretrained=` as lm-eval's `hf` model takes it; lm-eval also names its --output_path
        # subfolder after it (after `run=`, it would pick a random name).
        run = run or pretrained
        if loaded is None:
            if run is None:
                raise UserError("the adadepth lm-eval model needs run=<run folder>")
            dev = str(resolve_device(device))
            loaded = runs.load_model(run, dev)
        self.model, self.tok = loaded.model.eval(), loaded.tokenizer
        # An adaptive model runs counting what it computes (`Method.measured`): `evaluate`
        # reports the count beside the scores.
        self.runner, self.measurement = (self.model.measured() if isinstance(self.model, Method)
                                         else (self.model, None))
        self._device = next(self.model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        limit = self.model.cfg.max_seq_len
        self.max_length = min(int(max_length), limit) if max_length else limit
        self.prefix = self.tok.eos_id  # None for character models: their first token is free
        # What the forwards ran, padding included: tokens fed, and the keys they attended to
        # (the mean context that prices attention in the realised compute, see `evaluate`).
        self.tokens_run = self.keys_attended = 0

    def _forward(self, x: torch.Tensor, cache: Any = None, start: int = 0) -> torch.Tensor:
        rows, width = x.shape
        self.tokens_run += rows * width
        self.keys_attended += rows * (width * start + width * (width + 1) // 2)
        return self.runner(x, cache, start).logits

    # -- scoring ----------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        if not ctx and self.prefix is not None:
            return [self.prefix], whole
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding reproduces it."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = iter(sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i]))))
        while chunk := list(islice(order, self.batch_size)):
            rows = []
            for i in chunk:
                ctx, cont = pairs[i]
                seq = (ctx + cont)[-(self.max_length + 1):]
                n = min(len(cont), len(seq) - 1)  # without context the first token is unscored
                rows.append((i, seq[:-1], seq[len(seq) - n:]))
            rows = [r for r in rows if r[2]]
            if not rows:
                continue
            width = max(len(inp) for _, inp, _ in rows)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for r, (_, inp, _) in enumerate(rows):
                x[r, :len(inp)] = torch.tensor(inp)
            logp = self._forward(x.to(self._device)).float().log_softmax(-1).cpu()
            for r, (i, inp, target) in enumerate(rows):
                lp = logp[r, len(inp) - len(target):len(inp)]
                t = torch.tensor(target)
                results[i] = (lp.gather(-1, t[:, None]).sum().item(),
                              bool((lp.argmax(-1) == t).all()))
        return results

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        results = self._score([self._encode_pair(*req.args) for req in requests])
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        out = []
        for req in requests:
            tokens = self.tok.encode(req.args[0])
            prefix = self.prefix
            if prefix is None and tokens:
                prefix, tokens = tokens[0], tokens[1:]
            if not tokens:
                out.append(0.0)
                continue
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=prefix, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, context: str, kwargs: dict[str, Any]) -> str:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = max(1, min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1))
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        ids = self.tok.encode(context) or ([self.prefix] if self.prefix is not None else [])
        if not ids:
            raise UserError("generation needs a non-empty context for a model without eos")
        ids = ids[-(self.max_length - max_new):]
        cache = self.runner.new_cache(1, len(ids) + max_new)
        logits = self._forward(torch.tensor([ids], device=self._device), cache, 0)[:, -1]
        out: list[int] = []
        for step in range(max_new):
            nxt = sample_next(logits, temperature, None)
            token = int(nxt.item())
            if token == self.tok.eos_id:
                break
            out.append(token)
            text = self.tok.decode(out)
            if any(u in text for u in until):
                break
            if step + 1 < max_new:
                logits = self._forward(nxt, cache, len(ids) + step)[:, -1]
        text = self.tok.decode(out)
        for u in until:
            text = text.split(u)[0]
        return text

    def generate_until(self, requests: list[Any]) -> list[str]:
        out = []
        for req in requests:
            text = self._generate(*req.args)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


# -- tasks and the realised compute ---------------------------------------------------------------
def resolve_tasks(tasks: list[str], include_path: Path | None = None) -> tuple[list[Any], Any]:
    """lm-eval's own reading of `--tasks` (names, globs, comma lists, YAML files) against its
    task index and the folder `include_path`; returns the resolved tasks and the TaskManager
    that holds them. Called before a model is loaded, so a misspelt task fails fast."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    if include_path is not None and not Path(include_path).is_dir():
        # lm-eval silently skips a missing folder, then reports its tasks as unknown.
        raise UserError(f"include path {include_path} is not a folder")
    cfg = EvaluatorConfig(tasks=tasks, include_path=None if include_path is None
                          else str(include_path))
    try:
        manager = cfg.process_tasks()
    except ValueError as e:  # lm-eval's "Tasks not found: x, y"
        missing = str(e).partition(": ")[2] or str(e)
        where = f" nor in {include_path}" if include_path is not None else ""
        raise UserError(f"unknown task {missing}: not lm-eval's{where} (`lm-eval ls tasks` "
                        "lists lm-eval's; a local task's YAML goes in a folder given to "
                        "--include-path)") from e
    return list(cfg.tasks), manager


def evaluate(lm: AdadepthLM, tasks: list[str], include_path: Path | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None,
             resolved: tuple[list[Any], Any] | None = None) -> dict[str, Any]:
    """lm-eval's results for `tasks` on `lm`, as `lm_eval run` computes them, plus `compute`:
    what the model really ran while answering them.

    `compute.flops_ratio` is the FLOPs per token the forwards cost over those of the dense
    backbone, at the mean context of the tokens fed (padding included: it is what ran); an
    adaptive method adds its own record (full fraction, layers or passes per token, ...).
    """
    names, manager = resolved or resolve_tasks(tasks, include_path)
    before = lm.tokens_run, lm.keys_attended
    counted = lm.measurement.tally.copy() if lm.measurement is not None else None
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                          limit=limit, num_fewshot=num_fewshot,
                                          log_samples=False)
    except OSError as e:  # a task's data could not be read or downloaded
        raise UserError(f"lm-eval could not load the data of {', '.join(map(str, tasks))}:"
                        f" {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                        "(without a network, evaluate a local task: --include-path)") from e
    tokens = lm.tokens_run - before[0]
    context = (lm.keys_attended - before[1]) / max(tokens, 1)
    measurement = None
    if lm.measurement is not None and counted is not None:  # what ran for these tasks alone
        model = lm.model
        measurement = Measurement(lm.measurement.tally.minus(counted), model.tally_flops,
                                  model.tally_summary)
    results["compute"] = compute_report(lm.model, measurement, tokens, context)
    return results


def compute_report(model: Any, measurement: Measurement | None, tokens: int,
                   context: float) -> dict[str, Any]:
    report: dict[str, Any] = {"tokens_run": tokens, "mean_context": context}
    if measurement is None:  # a dense model runs every layer on every token
        return {**report, "flops_ratio": 1.0}
    dense = sum(fl.forward_per_token(model.cfg, context).values())
    return {**report, "flops_ratio": measurement.flops_per_token(context) / dense,
            **measurement.summary()}


if __name__ == "__main__":  # lm-eval's own command line, with `adadepth` registered
    import sys

    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except UserError as e:  # ours (a missing run folder, ...): one line, as `adadepth` says it
        print(f"adadepth: error: {e}", file=sys.stderr)
        sys.exit(2)
