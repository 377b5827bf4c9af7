"""The leaderboard: every adaptive-depth method on one backbone, one corpus, one tokenizer, at
matched FLOPs, on quality and on measured speed.

Every method is trained (or calibrated) on the same pretrained backbone by its own command, from
one entry in `ENTRIES` — adding a method is adding an entry. Each run is then set, through its
cost knob, to reach each FLOPs budget (a fraction of the dense backbone's inference FLOPs per
token) *as realised* on held-out text fed as generation feeds it (`eval.decode_eval`), measured
there for validation loss, and timed by the one bench against the dense model. Entries that do
not trade quality for FLOPs (the late-layer ensemble adds compute; speculative decoding keeps the
full model's output) get one row at their own setting. Every finished run and every evaluated
setting is kept on disk, so a re-run resumes and a finished leaderboard re-renders unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adadepth.bench import BenchSpec, run_bench
from adadepth.depth import Method
from adadepth.errors import UserError
from adadepth.eval import decode_eval
from adadepth.runs import load_run
from adadepth.studies.aux_losses import backbone_dir
from adadepth.studies.recipes import RECIPES as BACKBONES
from adadepth.train import checkpoint as ck


@dataclass(frozen=True)
class Entry:
    """One method on the leaderboard: the config `adadepth fit` trains it with on the shared
    backbone (as the YAML of that command would hold it), and how it is set to a budget."""

    name: str
    config: dict[str, Any]
    budgeted: bool = True  # searched to each FLOPs budget; False: one row at its own setting
    timed: bool = True  # benched for speed (the loss floor is not)
    steps: int | None = None  # training steps; None: the preset's
    about: str = ""
    speed_reference: str = ""  # what its speedups are measured against, if not the backbone


def routing(gate: str, aux: list[str]) -> dict[str, Any]:
    return {"method": "routing", "routing": {"gate": gate, "aux": aux}}


ENTRIES: list[Entry] = [
    Entry("routing-g1", routing("g1", ["util", "rank"]),
          about="conditional depth routing, MLP gate, the paper's util + rank recipe"),
    Entry("routing-g3", routing("g3", ["util", "rank", "jepa"]),
          about="conditional depth routing, JEPA-guided gate, util + rank + jepa"),
    Entry("random-routing", routing("random", []),
          about="routing with random decisions at the same budget (its cheap paths train)"),
    Entry("mod", {"method": "mod", "mod": {"capacity": 0.5}},
          about="Mixture-of-Depths: every other block runs on the top-C tokens (trained at C "
          "0.5, backbone and routers jointly), causal predictor"),
    Entry("static-skip", {"method": "static-skip"},
          about="static layer skipping: the layers of least influence dropped for every token"),
    Entry("calm", {"method": "calm"},
          about="CALM early exit: per-layer weighted loss, softmax confidence, states copied "
          "upward; the knob is the confidence threshold"),
    Entry("layerskip-exit", {"method": "layerskip",
                                    "layerskip": {"decoding": "early_exit"}},
          about="LayerSkip trained with layer dropout and early-exit loss, decoding from the "
          "first E blocks (the knob is E)"),
    Entry("layerskip-spec", {"method": "layerskip"}, budgeted=False,
          about="LayerSkip's self-speculative decoding: the full model's output, drafted by "
          "the first quarter of the blocks (speed only; FLOPs at or above dense)"),
    Entry("ponder", {"method": "ponder",
                            "ponder": {"tau": 0.05, "ce_steps": 40, "k_warmup_steps": 60,
                                       "gates_only_steps": 30},
                            "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 30}},
          budgeted=False,
          about="AdaPonderLM: 4 passes of the backbone, learned gates, token-wise halting at "
          "tau 0.05 (adds compute: more than dense FLOPs by design)",
          speed_reference="PonderLM, the same weights running all 4 passes (the bench's dense "
          "reference for a looped model); against the one-pass backbone it is slower"),
    Entry("ensemble", {"method": "ensemble",
                              "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 25}},
          budgeted=False, steps=250,
          about="the last layers as an ensemble (tuning; adds head compute)"),
]
# The floor of the loss gap: every controlled layer on its (trained) cheap path.
FLOOR = Entry("all-cheap", routing("all-cheap", []), budgeted=False, timed=False,
              about="every controlled layer cheap: the floor of the loss gap")


@dataclass
class Preset:
    """Sizes of one leaderboard: the backbone (the aux-loss study's), method training, and the
    held-out text and timing sizes."""

    backbone: str  # a preset of the aux-loss study's backbone recipes
    steps: int  # training steps per method
    batch_size: int
    windows: int  # held-out windows for the knob search and the evaluation (prefill times 8)
    window_len: int
    decode_tokens: int
    reps: int
    budgets: tuple[float, ...] = (0.5, 0.75)
    overrides: list[str] = field(default_factory=list)


PRESETS = {
    "tiny": Preset("tiny", steps=160, batch_size=12, windows=16, window_len=128,
                   decode_tokens=64, reps=2),
    "small": Preset("small", steps=400, batch_size=16, windows=32, window_len=256,
                    decode_tokens=128, reps=3),
    "paper": Preset("paper", steps=20000, batch_size=16, windows=64, window_len=512,
                    decode_tokens=256, reps=3),
}


def entries_named(names: list[str] | None) -> list[Entry]:
    known = {e.name: e for e in ENTRIES}
    if names is None:
        return list(ENTRIES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} in --methods; known: {', '.join(known)}")
    return [known[n] for n in names]


def check_budgets(budgets: list[float]) -> None:
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise UserError(f"budgets must lie in (0, 1], got {bad[0]:g}")


# -- training ---------------------------------------------------------------------------------
def train_entry(entry: Entry, backbone: Path, run_dir: Path, preset: Preset, seed: int,
                device: str) -> dict[str, Any]:
    """Train one entry with its job (resumable); returns its metrics.json."""
    from adadepth.config import apply_overrides, merge
    from adadepth.jobs.fit import fit, fit_config, fit_defaults

    if not (run_dir / "metrics.json").is_file():
        steps = entry.steps or preset.steps
        train = {"steps": steps, "seed": seed, "batch_size": preset.batch_size,
                 "device": device, "eval_interval": 10**9, "log_interval": 10,
                 "ckpt_interval": max(20, steps // 4)}
        resume = (run_dir / "config.json").is_file()
        method = entry.config["method"]
        data = merge(fit_defaults(method), {**entry.config, "backbone": str(backbone),
                                            "train": train})
        options = apply_overrides(data, overrides_for(entry, preset.overrides))
        fit(fit_config(options), run_dir, resume=resume, show_progress=False)
    return json.loads((run_dir / "metrics.json").read_text())


def overrides_for(entry: Entry, overrides: list[str]) -> list[str]:
    """The preset's overrides that concern this entry: shared sections (train, optim, data)
    and its own method's options, not another method's."""
    from adadepth.depth import method_names

    own = entry.config["method"]
    other = set(method_names()) - {own}
    return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] not in other]


# -- setting a knob to a budget -------------------------------------------------------------------
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


# -- the study ----------------------------------------------------------------------------------
def heldout(data, windows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows (even) and evaluation windows (odd) from the validation split."""
    calibration, held_out = data.halves("val", length + 1, windows)
    if len(held_out) < windows:
        raise UserError(f"the validation split holds {len(data.split('val')) // (length + 1)} "
                        f"windows of {length + 1} tokens; the leaderboard needs {2 * windows}")
    return calibration[:, :length], held_out


def evaluate_entry(entry: Entry, run_dir: Path, preset: Preset, budgets: list[float],
                   device: torch.device, cache: Path) -> list[dict[str, Any]]:
    """Rows for one trained entry: one per budget (or one at its own setting), cached."""
    from adadepth.data import load_corpus, prepare_tokens

    rows = []
    todo = budgets if entry.budgeted else [None]
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
        if entry.timed:
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


def run_study(preset_name: str, seeds: int, out: Path, methods: list[str] | None = None,
              budgets: list[float] | None = None, device: str = "auto",
              show_progress: bool = True) -> dict[str, Any]:
    from adadepth.studies import leaderboard_report as report
    from adadepth.train.loop import resolve_device

    if preset_name not in PRESETS:
        raise UserError(f"the leaderboard has no recipe for preset {preset_name!r}; "
                        f"known: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    budgets = list(budgets or preset.budgets)
    check_budgets(budgets)
    entries = entries_named(methods)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evals").mkdir(exist_ok=True)
    backbone = backbone_dir(out, BACKBONES[preset.backbone], preset.backbone, str(dev),
                            show_progress)
    plan = [(e, s) for s in range(seeds) for e in [*entries, FLOOR]]
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    bar = tqdm(plan, desc="leaderboard", disable=not show_progress, dynamic_ncols=True)
    for entry, seed in bar:
        run_dir = out / "runs" / f"{entry.name}-seed{seed}"
        bar.set_postfix(run=run_dir.name)
        metrics = train_entry(entry, backbone, run_dir, preset, seed, str(dev))
        runs[run_dir.name] = {k: metrics.get(k) for k in (
            "training_flops", "wall_s", "trainable_parameters", "steps")}
        for row in evaluate_entry(entry, run_dir, preset, budgets, dev, out / "evals"):
            rows.append({**row, "seed": seed, "run": run_dir.name, **runs[run_dir.name]})
    dense_path = out / "evals" / "dense.json"
    if not dense_path.is_file():
        ck.write_json_atomic(dense_path, dense_row(backbone, preset, dev))
    backbone_eval = json.loads((backbone / "eval.json").read_text())
    results = {"preset": preset_name, "seeds": seeds, "budgets": budgets,
               "backbone": {"preset": preset.backbone,
                            "steps": BACKBONES[preset.backbone].backbone_steps,
                            "corpus": BACKBONES[preset.backbone].corpus,
                            "tokenizer": BACKBONES[preset.backbone].tokenizer,
                            "val_loss": backbone_eval.get("val_loss")},
               "entries": {e.name: e.about for e in [*entries, FLOOR]},
               "speed_references": {e.name: e.speed_reference for e in entries
                                    if e.speed_reference},
               "dense": json.loads(dense_path.read_text()), "rows": rows}
    ck.write_json_atomic(out / "results.json", results)
    report.write(results, out)
    return results
