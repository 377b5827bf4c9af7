"""The leaderboard's measurements of a trained run: its trained setting and its frontier along
its knob, each point measured on held-out text fed as generation feeds it (loss, realised FLOPs
over the whole model and over the layer stack, and those FLOPs by component), and all of them
timed in one bench against the dense backbone (prefill, and decoding at batch 1 and 8)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adadepth.bench import BenchSpec, run_bench
from adadepth.depth import Method
from adadepth.errors import UserError
from adadepth.eval import decode_eval
from adadepth.runs import load_model, load_run
from adadepth.studies.shape import Arm
from adadepth.train import checkpoint as ck

if TYPE_CHECKING:
    from adadepth.studies.leaderboard import Preset

# The entries' groups: measured along their knob (a frontier), at their own setting only (they
# do not trade quality for compute: the ensemble adds some, speculation keeps the output), or
# the loss floor of routing (every controlled layer cheap), a loss and no speed.
FRONTIER, OWN, FLOOR = "frontier", "own setting", "floor"


def realised(model: Method, value: float | None, calibration: torch.Tensor,
             held_out: torch.Tensor, dense_predictions: torch.Tensor | None = None
             ) -> dict[str, Any]:
    """One measured point at a knob setting (None: as the run was left): loss, realised FLOPs
    (of the model, of the layer stack, by component), what the method ran, and the compute each
    token of the first held-out window received (in the method's unit, and as a fraction of the
    dense layer stack's); given the dense model's greedy next tokens on the same windows, the
    fraction of positions where the method's greedy next token is the same (`agreement`)."""
    if value is not None:
        model.knob_setter(value, calibration)()
    got = decode_eval(model, held_out, predict=dense_predictions is not None)
    depth = got.depth[0][0].tolist() if got.depth else None
    agreement = {}
    if dense_predictions is not None and got.predictions is not None:
        agreement = {"agreement": (got.predictions == dense_predictions).float().mean().item()}
    return {**agreement, "setting": value if value is not None else model.current_knob_value(),
            "val_loss": got.loss, "flops_fraction": got.flops_fraction,
            "flops_fraction_stack": got.flops_fraction_stack, "breakdown": got.breakdown,
            "realised": got.summary, "passage_depth": depth,
            # the same on one scale for every method: the dense layer stack's compute
            "passage_fraction": None if depth is None else [model.depth_fraction(v)
                                                            for v in depth]}


def speeds(model: Method, settings: list[float], text: torch.Tensor,
           calibration: torch.Tensor, preset: Preset, device: torch.device,
           backbone: torch.nn.Module) -> dict[float, dict[str, Any]]:
    """Every setting timed in the same rounds against the dense backbone: prefill and greedy
    decoding at batch 1 and 8, by setting."""
    spec = BenchSpec(settings=settings, prefill_batch=8, prefill_len=text.shape[1],
                     decode_batches=(1, 8), decode_tokens=preset.decode_tokens, reps=preset.reps)
    rows = run_bench(model, text, calibration, spec, device, log=lambda _: None,
                     reference=backbone)["rows"]
    out: dict[float, dict[str, Any]] = {v: {} for v in settings}
    for r in rows:
        phase = r["phase"] if r["phase"] == "prefill" else f"decode_b{r['batch']}"
        out[r["setting"]][phase] = {k: r[k] for k in (
            "tokens_per_s_dense", "tokens_per_s_method", "ideal_speedup", "measured_speedup",
            "measured_over_ideal")}
    return out


def heldout(data, windows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows (even) and evaluation windows (odd) from the validation split."""
    calibration, held_out = data.halves("val", length + 1, windows)
    if len(held_out) < windows:
        raise UserError(f"the validation split holds {len(data.split('val')) // (length + 1)} "
                        f"windows of {length + 1} tokens; the leaderboard needs {2 * windows}")
    return calibration[:, :length], held_out


def in_range(model: Method, value: float | None) -> bool:
    """Whether the method was trained for this setting of its knob."""
    span = model.trained_range()
    return span is None or value is None or span[0] - 1e-9 <= value <= span[1] + 1e-9


def text_of(corpus: str, d: dict[str, Any], tokenizer, preset: Preset
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration and held-out windows of `corpus`, read with the data settings `d` and
    made by the data layer as the model's tokenizer starts a document (its BOS, if it adds
    one)."""
    from adadepth.data import load_corpus, prepare_tokens

    data = prepare_tokens(load_corpus(corpus, val_fraction=d.get("val_fraction", 0.1),
                                      max_docs=d.get("max_docs")), tokenizer)
    return heldout(data, preset.windows, preset.window_len)


def out_of_domain(model: torch.nn.Module, tokenizer, preset: Preset,
                  device: torch.device) -> dict[str, float]:
    """The model's loss on each of the preset's out-of-domain corpora, as it is set."""
    return {corpus: decode_eval(model, text_of(corpus, {}, tokenizer, preset)[1].to(device)).loss
            for corpus in preset.out_of_domain}


def evaluate_entry(entry: Arm, run_dir: Path, preset: Preset, device: torch.device,
                   cache: Path, backbone: torch.nn.Module,
                   dense: dict[str, Any] | None = None) -> dict[str, Any]:
    """The measured points of one trained run: its trained setting always, and for a method
    that trades quality for compute its frontier (`Knob.frontier`: at least `preset.frontier`
    settings from its cheapest to its dense-equivalent end), each measured and timed; points
    are kept on disk as they are measured, so an interrupted evaluation resumes. With the
    dense row's greedy predictions (`dense_row` under `preset.agreement`), each point says how
    often its greedy next token agrees; the trained setting is also scored on the preset's
    out-of-domain corpora."""
    done = cache / f"{run_dir.name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    loaded = load_run(run_dir, str(device))
    model = loaded.model
    d = loaded.meta["data"]
    calibration, held_out = text_of(d["corpus"], d, loaded.tokenizer, preset)
    calibration, held_out = calibration.to(device), held_out.to(device)
    predictions = (torch.tensor(dense["predictions"]) if dense and "predictions" in dense
                   else None)
    trained = model.current_knob_value() if model.knob is not None else None
    restore = model.current_setting()
    values: list[float | None] = [None]
    if entry.group == FRONTIER and model.knob is not None:
        values = [v for v in model.knob.frontier(trained, preset.frontier) if v != trained]
        values.append(None)  # the trained setting last, restored first
    points = []
    for value in values:
        path = cache / f"{run_dir.name}-{value}.json"
        if path.is_file():
            point = json.loads(path.read_text())
        else:
            if value is None:
                restore()
            point = {**realised(model, value, calibration, held_out, predictions),
                     "trained": value is None, "in_trained_range": in_range(model, value)}
            if value is None and preset.out_of_domain:
                point["out_of_domain"] = out_of_domain(model, loaded.tokenizer, preset, device)
            ck.write_json_atomic(path, point)
        points.append(point)
    restore()
    if entry.group != FLOOR and model.knob is not None:  # the floor is a loss, not a speed
        text = held_out[:8, :preset.window_len]
        settings = sorted({p["setting"] for p in points if p["setting"] is not None})
        timed = speeds(model, settings, text, calibration, preset, device, backbone)
        for point in points:
            point["speed"] = timed.get(point["setting"], {})
        restore()
    result = {"entry": entry.name, "knob": model.knob.name if model.knob else None,
              "trained_setting": trained, "trained_range": model.trained_range(),
              "depth_unit": model.depth_unit, "most_depth": model.most_token_depth(),
              "passage": [loaded.tokenizer.decode([t]) for t in held_out[0, :-1].tolist()],
              "points": sorted(points, key=lambda p: (p["setting"] is None, p["setting"] or 0))}
    ck.write_json_atomic(done, result)
    return result


def dense_row(backbone: Path, preset: Preset, device: torch.device) -> dict[str, Any]:
    """The dense backbone's own loss on the same held-out text, fed the same way (the preset's
    corpus, or the backbone's own data); under `preset.agreement` its greedy next token at
    every position too, and its loss on the out-of-domain corpora."""
    loaded = load_model(str(backbone), str(device))
    d = loaded.meta["data"] if preset.corpus is None else {}
    _, held_out = text_of(preset.corpus or d["corpus"], d, loaded.tokenizer, preset)
    got = decode_eval(loaded.model, held_out.to(device), predict=preset.agreement)
    row: dict[str, Any] = {"entry": "dense", "val_loss": got.loss, "flops_fraction": 1.0,
                           "flops_fraction_stack": 1.0}
    if preset.out_of_domain:
        row["out_of_domain"] = out_of_domain(loaded.model, loaded.tokenizer, preset, device)
    if got.predictions is not None:
        row["predictions"] = got.predictions.tolist()
    return row
