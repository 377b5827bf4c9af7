"""The ponder study's measurements on trained runs: where AdaPonderLM's passes go (each held-out
token's passes beside its NLL under the backbone, as rank correlations), and the bench of one
AdaPonderLM run against fixed-K pondering on the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from adadepth.studies.ponder import PonderRecipe


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); 0 when either is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def token_analysis(ada_dir: Path, backbone_dir: Path, batches: int, batch_size: int,
                   block: int, sample: int = 1500) -> dict[str, Any]:
    """Passes of every held-out token under AdaPonderLM beside its NLL under the backbone arm
    (and under AdaPonderLM itself): rank correlations, mean NLL per pass count, a sample."""
    from adadepth.data import load_corpus, prepare_tokens
    from adadepth.depth.dispatch import Call
    from adadepth.runs import load_run

    loaded = load_run(ada_dir)
    ada, backbone = loaded.model, load_run(backbone_dir).model
    meta = loaded.meta["data"]
    data = prepare_tokens(load_corpus(meta["corpus"], val_fraction=meta["val_fraction"],
                                      max_docs=meta.get("max_docs")), loaded.tokenizer)
    device = next(ada.parameters()).device
    passes, nll_bb, nll_ada = [], [], []
    for x, y in data.eval_batches("val", batch_size, block, batches):
        x, y = x.to(device), y.to(device)
        depth: list[torch.Tensor] = []
        nll_ada.append(ada(x, call=Call(depth=depth)).loss(y, "none").flatten().cpu())
        passes.append(depth[0].long().flatten())
        nll_bb.append(backbone(x).loss(y, "none").flatten().cpu())
    p = torch.cat(passes).numpy()
    b, a = torch.cat(nll_bb).numpy(), torch.cat(nll_ada).numpy()
    by_passes = {int(k): {"tokens": int((p == k).sum()), "backbone_nll": float(b[p == k].mean()),
                          "ada_nll": float(a[p == k].mean())} for k in np.unique(p)}
    pick = np.random.default_rng(0).permutation(len(p))[:sample]
    return {"tokens": len(p), "spearman_backbone_nll": spearman(p, b),
            "spearman_own_nll": spearman(p, a), "by_passes": by_passes,
            "sample": [[int(p[i]), float(b[i])] for i in pick]}


def bench_run(ada_dir: Path, recipe: PonderRecipe, out: Path) -> dict[str, Any]:
    """AdaPonderLM at its trained tau and the recipe's other taus against fixed-K pondering on
    the same weights (bench.py): prefill and cached greedy decode at batch 1 and 8."""
    from adadepth.bench import BenchSpec, heldout_windows, run_bench, write_results
    from adadepth.data import load_corpus, prepare_tokens
    from adadepth.runs import load_run

    loaded = load_run(ada_dir)
    model = loaded.model
    meta = loaded.meta["data"]
    data = prepare_tokens(load_corpus(meta["corpus"], val_fraction=meta["val_fraction"],
                                      max_docs=meta.get("max_docs")), loaded.tokenizer)
    sizes = {"prefill_batch": 8, "prefill_len": 128, "decode_tokens": 64, "reps": 3,
             **recipe.bench}
    text, calib = heldout_windows(data, 8, sizes["prefill_len"], 2, sizes["prefill_len"])
    taus = sorted({model.tau, *recipe.bench_taus})
    result = run_bench(model, text, calib, BenchSpec(settings=taus, **sizes),
                       next(model.parameters()).device, log=lambda _: None)
    result["run"] = str(ada_dir)
    write_results(result, out, f"{ada_dir.name} (ponder) on {result['device']}")
    return result
