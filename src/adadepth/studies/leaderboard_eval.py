"""The leaderboard's measurements of a trained run: its cost knob set to each FLOPs budget as
realised on held-out text fed as generation feeds it, the loss there, and its speed against the
dense model (the one bench)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adadepth.bench import BenchSpec, run_bench
from adadepth.depth import Method
from adadepth.errors import UserError
from adadepth.eval import decode_eval
from adadepth.runs import load_run
from adadepth.studies.shape import Arm
from adadepth.train import checkpoint as ck

if TYPE_CHECKING:
    from adadepth.studies.leaderboard import Preset

BUDGETED, OWN, FLOOR = "budgeted", "own setting", "floor"  # the entries' groups


def realised(model: Method, value: float | None, calibration: torch.Tensor,
             held_out: torch.Tensor) -> dict[str, Any]:
    """Loss and realised FLOPs fraction at one knob setting (None: as the run was left), and
    the compute each token of the first held-out window received."""
    if value is not None:
        model.knob_setter(value, calibration)()
    loss, fraction, summary, depth = decode_eval(model, held_out)
    return {"setting": value, "val_loss": loss, "flops_fraction": fraction,
            "realised": summary, "passage_depth": depth[0][0].tolist() if depth else None}


def search(model: Method, budget: float, calibration: torch.Tensor, held_out: torch.Tensor,
           steps: int = 7) -> dict[str, Any]:
    """The knob setting whose realised FLOPs fraction is closest to `budget`: every value of a
    whole-number knob, else bisection (the fraction grows or shrinks with the knob; which, is
    read from the ends). `reached` says whether the closest is within 0.02 of the budget."""
    knob = model.knob
    assert knob is not None
    if knob.integer:
        tried = [realised(model, float(v), calibration, held_out)
                 for v in range(int(knob.low) + 1, int(knob.high) + 1)]
    else:
        lo, hi = knob.low + (knob.high - knob.low) * 1e-3, knob.high
        tried = [realised(model, lo, calibration, held_out),
                 realised(model, hi, calibration, held_out)]
        rising = tried[1]["flops_fraction"] >= tried[0]["flops_fraction"]
        for _ in range(steps):
            mid = (lo + hi) / 2
            point = realised(model, mid, calibration, held_out)
            tried.append(point)
            if (point["flops_fraction"] < budget) == rising:
                lo = mid
            else:
                hi = mid
    best = min(tried, key=lambda p: abs(p["flops_fraction"] - budget))
    return {**best, "budget": budget, "reached": abs(best["flops_fraction"] - budget) <= 0.02,
            "tried": [(p["setting"], p["flops_fraction"]) for p in tried]}


def speed(model: Method, setting: float | None, text: torch.Tensor, calibration: torch.Tensor,
          preset: Preset, device: torch.device) -> dict[str, Any]:
    """Bench rows at one setting: prefill and greedy decode at batch 1 and 8 against dense."""
    value = setting if setting is not None else knob_value_now(model)
    spec = BenchSpec(settings=[value], prefill_batch=8, prefill_len=text.shape[1],
                     decode_batches=(1, 8), decode_tokens=preset.decode_tokens, reps=preset.reps)
    rows = run_bench(model, text, calibration, spec, device, log=lambda _: None)["rows"]
    return {r["phase"] if r["phase"] == "prefill" else f"decode_b{r['batch']}": {k: r[k] for k in (
        "tokens_per_s_dense", "tokens_per_s_method", "ideal_speedup", "measured_speedup",
        "measured_over_ideal")} for r in rows}


def knob_value_now(model: Method) -> float:
    """The knob's value as the run left it, for methods benched at their own setting."""
    value = model.current_knob_value()
    if value is None:
        raise UserError(f"method {model.name!r} cannot say its own knob setting")
    return value


def heldout(data, windows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows (even) and evaluation windows (odd) from the validation split."""
    calibration, held_out = data.halves("val", length + 1, windows)
    if len(held_out) < windows:
        raise UserError(f"the validation split holds {len(data.split('val')) // (length + 1)} "
                        f"windows of {length + 1} tokens; the leaderboard needs {2 * windows}")
    return calibration[:, :length], held_out


def evaluate_entry(entry: Arm, run_dir: Path, preset: Preset, budgets: list[float],
                   device: torch.device, cache: Path) -> list[dict[str, Any]]:
    """Rows for one trained entry: one per budget (or one at its own setting), cached."""
    from adadepth.data import load_corpus, prepare_tokens

    rows = []
    todo = budgets if entry.group == BUDGETED else [None]
    if all((cache / f"{run_dir.name}-{b}.json").is_file() for b in todo):
        return [json.loads((cache / f"{run_dir.name}-{b}.json").read_text()) for b in todo]
    loaded = load_run(run_dir, str(device))
    model = loaded.model
    d = loaded.meta["data"]
    data = prepare_tokens(load_corpus(d["corpus"], val_fraction=d.get("val_fraction", 0.1)),
                          loaded.tokenizer)
    calibration, held_out = heldout(data, preset.windows, preset.window_len)
    calibration, held_out = calibration.to(device), held_out.to(device)
    text = held_out[:8, :preset.window_len]
    for budget in todo:
        path = cache / f"{run_dir.name}-{budget}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            continue
        if budget is None:
            point = {**realised(model, None, calibration, held_out), "budget": None,
                     "reached": None}
        else:
            point = search(model, budget, calibration, held_out)
            model.knob_setter(point["setting"], calibration)()
        if entry.group != FLOOR:  # the floor is a loss, not a speed
            point["speed"] = speed(model, point["setting"], text, calibration, preset, device)
        point["entry"] = entry.name
        point["knob"] = model.knob.name if model.knob else None
        point["passage"] = {"tokens": [loaded.tokenizer.decode([t]) for t in
                                       held_out[0, :-1].tolist()],
                            "unit": model.depth_unit, "most": model.most_token_depth()}
        ck.write_json_atomic(path, point)
        rows.append(point)
    return rows


def dense_row(backbone: Path, preset: Preset, device: torch.device) -> dict[str, Any]:
    """The dense backbone's own loss on the same held-out text, fed the same way."""
    from adadepth.data import load_corpus, prepare_tokens

    loaded = load_run(backbone, str(device))
    d = loaded.meta["data"]
    data = prepare_tokens(load_corpus(d["corpus"], val_fraction=d.get("val_fraction", 0.1)),
                          loaded.tokenizer)
    _, held_out = heldout(data, preset.windows, preset.window_len)
    loss, fraction, _, _ = decode_eval(loaded.model, held_out.to(device))
    return {"entry": "dense", "budget": 1.0, "val_loss": loss, "flops_fraction": fraction}
