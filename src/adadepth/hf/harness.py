"""EleutherAI's lm-evaluation-harness on any adadepth run folder: model `adadepth`.

    import adadepth.hf.harness, lm_eval
    lm_eval.simple_evaluate(model="adadepth", model_args="run=runs/r_g1", tasks=[...])

Any folder `adadepth.runs.load_run` reads works (dense, routed, a transformers directory), with
its own tokenizer. Requests are scored as lm-eval's own HF model does: trailing spaces of a
context move to the continuation; an empty context is preceded by the end-of-text token;
rolling log-likelihoods use lm-eval's disjoint windows. Adaptive models run in their deployed
(causal) mode, so right-padding a batch does not change any real token's score.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from adadepth.errors import UserError
from adadepth.generate import sample_next


@register_model("adadepth")
class AdadepthLM(LM):
    def __init__(self, run: str | None = None, device: str = "cpu", batch_size: int | str = 8,
                 max_length: int | None = None, loaded: Any = None, **_: Any) -> None:
        super().__init__()
        from adadepth import runs
        from adadepth.train.loop import resolve_device

        if loaded is None:
            if run is None:
                raise UserError("the adadepth lm-eval model needs run=<run folder>")
            loaded = runs.load_run(Path(run), str(resolve_device(device)))
        self.model, self.tok = loaded.model.eval(), loaded.tokenizer
        self._device = next(self.model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        limit = self.model.cfg.max_seq_len
        self.max_length = min(int(max_length), limit) if max_length else limit
        self.prefix = self.tok.eos_id  # None for character models: their first token is free

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
            logp = self.model(x.to(self._device)).logits.float().log_softmax(-1).cpu()
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
        cache = self.model.new_cache(1, len(ids) + max_new)
        logits = self.model(torch.tensor([ids], device=self._device), cache, 0).logits[:, -1]
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
                logits = self.model(nxt, cache, len(ids) + step).logits[:, -1]
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
