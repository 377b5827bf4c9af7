"""`adadepth fit`: train any registered method, over a pretrained backbone or from scratch.

The method supplies its model (`MethodSpec.build`), which weights train (`set_trainable`), its
loss (`training_loss`), any staging (`held_back`), what it measures before and after training
(`begin_training`, `run_figures`) and what deployment needs calibrated after training
(`after_training`); this job supplies everything else once: the backbone or a fresh model of a
preset, the data, the training loop, the run folder, resume checks and metrics. Commands such
as `adadepth route`, `adadepth ponder` and `adadepth tune` are this job with the method fixed.

The method's options come from a section named after it: `routing.budget=0.25`, `mod.capacity=
0.25` on the command line, or a `routing:` mapping in the YAML config. Its `MethodSpec.defaults`
(routing's larger learning rate, say) sit under whatever the config gives.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth import runs
from adadepth.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    Strict,
    TrainConfig,
    dump_yaml,
    merge,
    preset,
    validate,
)
from adadepth.data import build_tokenizer, load_corpus, prepare_tokens
from adadepth.depth import Method, method_spec
from adadepth.depth.method import Evaluate, TrainingPlan
from adadepth.errors import UserError
from adadepth.model import Transformer
from adadepth.train import checkpoint as ck
from adadepth.train.loop import StepOutput, evaluate, resolve_device, seed_everything, train
from adadepth.train.parallel import is_main


class FitConfig(Strict):
    method: str
    backbone: str | None = Field(None, description="a pretrained backbone; None = from scratch")
    preset: str = Field("tiny", description="the model shape when training from scratch")
    model: ModelConfig | None = Field(None, description="from scratch: the preset's shape "
                                      "with these changes")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="the method's own options (its section)")
    data: DataConfig | None = Field(None, description="None = the backbone's data settings")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        steps=300, eval_interval=100, ckpt_interval=100, log_interval=10))


def fit_defaults(method: str) -> dict[str, Any]:
    """The `optim` and `train` sections a method's fit starts from: the job's defaults with the
    method's own (`MethodSpec.defaults`) on top."""
    base = FitConfig(method=method).model_dump(include={"optim", "train"})
    return merge(base, method_spec(method).defaults)


def fit_config(data: dict[str, Any]) -> FitConfig:
    """A FitConfig from a nested dict whose method options sit under the method's name; the
    method's default training settings fill what the dict leaves out."""
    data = dict(data)
    name = data.get("method")
    if not isinstance(name, str) or not name:
        raise UserError("fit needs --method (a registered method name)")
    spec = method_spec(name)  # a one-line error naming the known methods
    data = merge(spec.defaults, data)
    options = {**(data.pop("options", None) or {}), **(data.pop(name, None) or {})}
    cfg = validate(FitConfig, {**data, "options": options})
    cfg.options = validate(spec.config, options).model_dump()  # typos fail here, in one line
    return cfg


class MethodObjective(nn.Module):
    """A method as the training loop sees it: loss, FLOPs, checkpoint contents, staging."""

    def __init__(self, model: Method) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor, step: int) -> StepOutput:
        out = self.model.training_loss(x, y, step)
        per_token = out.flops_per_token
        if per_token is None:
            per_token = self.model.training_flops_per_token(x.shape[1])
        return StepOutput(loss=out.loss, metrics=out.metrics, flops=per_token * y.numel())

    def lm_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model(x).loss(y)

    def checkpoint_state(self) -> dict[str, Tensor]:
        return self.model.method_state()

    def load_checkpoint_state(self, tensors: dict[str, Tensor]) -> None:
        self.model.load_method_state(tensors)

    def held_back(self, step: int) -> set[str]:
        return {f"model.{name}" for name in self.model.held_back(step)}

    @property
    def may_skip_parameters(self) -> bool:
        return self.model.may_skip_parameters


def heldout_halves(data, block: int, count: int) -> tuple[Tensor, Tensor]:
    """Disjoint held-out windows: even validation windows to calibrate on, odd ones to measure
    the calibration on (different text from the same distribution)."""
    even, odd = data.halves("val", block, count)
    return even, (odd if len(odd) else even)


def backbone_for(cfg: FitConfig, device: torch.device):
    """(backbone, tokenizer, data settings, what config.json records of the backbone)."""
    if cfg.backbone is not None:
        loaded = runs.load_backbone(cfg.backbone, str(device))
        ref = loaded.meta.get("ref", str(Path(cfg.backbone).resolve()))
        return (loaded.model, loaded.tokenizer, loaded.meta.get("data", {}),
                {"backbone": ref, "backbone_checksum": runs.fingerprint(loaded.model)})
    data_cfg = cfg.data or DataConfig()
    corpus = load_corpus(data_cfg.corpus, val_fraction=data_cfg.val_fraction,
                         max_docs=data_cfg.max_docs, text_field=data_cfg.text_field)
    tokenizer = build_tokenizer(data_cfg.tokenizer, corpus)
    shape = {**preset(cfg.preset).model_dump(),
             **(cfg.model.model_dump(exclude_unset=True) if cfg.model else {})}
    model_cfg = validate(ModelConfig, {**shape, "vocab_size": tokenizer.vocab_size})
    model_cfg.max_seq_len = max(model_cfg.max_seq_len, data_cfg.block_size)
    model_cfg.check()
    seed_everything(cfg.train.seed)
    return (Transformer(model_cfg).to(device), tokenizer, {},
            {"backbone": None, "preset": cfg.preset})


def fit(cfg: FitConfig, out: Path, resume: bool = False,
        show_progress: bool = True) -> dict[str, Any]:
    """Train the method, calibrate it, measure it, and write OUT/metrics.json."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    spec = method_spec(cfg.method)
    options = validate(spec.config, cfg.options)
    device = resolve_device(cfg.train.device)
    backbone, tokenizer, backbone_data, backbone_meta = backbone_for(cfg, device)
    given = cfg.data.model_dump(exclude_unset=True) if cfg.data else {}
    data_cfg = DataConfig(**{**backbone_data, **given})
    block = min(data_cfg.block_size, backbone.cfg.max_seq_len)
    corpus = load_corpus(data_cfg.corpus, val_fraction=data_cfg.val_fraction,
                         max_docs=data_cfg.max_docs, text_field=data_cfg.text_field)
    data = prepare_tokens(corpus, tokenizer)
    data.check_block(block)
    seed_everything(cfg.train.seed)
    model = spec.build(backbone, options)
    model.set_trainable(from_scratch=cfg.backbone is None)
    meta = {"method": spec.name, "method_config": options.model_dump(), **backbone_meta,
            "data": data_cfg.model_dump()}
    if resume and (out / runs.CONFIG).is_file():
        runs.check_compatible(out, {"kind": spec.kind, "model": backbone.cfg.model_dump(),
                                    **meta})
    if is_main():  # under torchrun, one process writes the run folder
        runs.write_run_config(out, spec.kind, backbone.cfg, tokenizer, extra=meta)
        dump_yaml(cfg.model_copy(update={"data": data_cfg}), out / "config.yaml")
    objective = MethodObjective(model)

    def loss_on(lm_loss, split: str) -> float:
        return evaluate(lm_loss, data, split, cfg.train.batch_size, block, device,
                        cfg.train.eval_batches, cfg.train.amp)[0]

    measure = Evaluate(loss_on, cfg.train.batch_size)
    init_windows = data.halves("train", block, cfg.train.eval_batches * cfg.train.batch_size)[0]
    started = time.perf_counter()
    before = model.begin_training(TrainingPlan(cfg.train.steps, cfg.train.seed, measure,
                                               init_windows.to(device), cfg.backbone is None))
    setup_s = time.perf_counter() - started
    history: list[dict[str, Any]] = []
    steps, wall = 0, 0.0
    # train.steps 0: nothing trains (an early exit or a confidence read from the backbone as
    # it is), and the method is only calibrated
    if cfg.train.steps > 0 and any(p.requires_grad for p in model.parameters()):
        result = train(objective, data, cfg.train, cfg.optim, block, out, resume=resume,
                       desc=f"fit {spec.name}", show_progress=show_progress)
        history, steps, wall = result.history, result.step, result.wall_s
    model.eval()  # a method with nothing to train (static layer skipping) only calibrates
    count = model.calibration_windows(cfg.train.eval_batches * cfg.train.batch_size)
    calibration, held_out = heldout_halves(data, block, count)
    started = time.perf_counter()
    with torch.no_grad():
        calibrated = model.after_training(calibration.to(device), held_out.to(device), measure)
    calibration_s = time.perf_counter() - started
    val = loss_on(objective.lm_loss, "val")
    figures = {**before, **calibrated, "val_loss": val}
    with torch.no_grad():
        figures.update(model.run_figures(history, figures, measure))
    report = model.eval_report(data, block, cfg.train.batch_size, cfg.train.eval_batches)
    latest = ck.latest_checkpoint(out)
    if is_main():  # again: calibration changed what the method keeps
        ck.save_checkpoint(out, steps, objective.checkpoint_state(),
                           ck.load_train_state(latest) if latest else None)
    if not model.backbone_trained() and "backbone_checksum" in backbone_meta:
        with model.original_backbone() as original:
            if not runs.same_fingerprint(runs.fingerprint(original),
                                         backbone_meta["backbone_checksum"]):
                raise RuntimeError(f"training {spec.name} changed the frozen backbone's weights")
    context = fl.causal_context(block)
    lm = [row.get("lm_loss", row["loss"]) for row in history]
    metrics = {
        "method": spec.name, "method_config": options.model_dump(), "steps": steps,
        "seed": cfg.train.seed, "val_loss": val, "train_loss_last": lm[-1] if lm else None,
        "trainable_parameters": model.trainable_parameters(),
        "training_flops": sum(row["flops"] for row in history),
        "reference_flops_per_token": model.reference_flops_per_token(context),
        "dense_flops_per_token": sum(fl.forward_per_token(model.cfg, context).values()),
        "wall_s": wall,
        # the adaptation budget: tokens trained on, and the seconds spent measuring or
        # searching before training (setup_s) and calibrating after it (calibration_s)
        "training_tokens": steps * cfg.train.batch_size * cfg.train.grad_accum * block,
        "setup_s": setup_s, "calibration_s": calibration_s, **figures, **report,
    }
    if math.isnan(val):
        raise RuntimeError("training diverged: the validation loss is NaN")
    if is_main():
        ck.write_json_atomic(out / "metrics.json", metrics)
    return metrics
