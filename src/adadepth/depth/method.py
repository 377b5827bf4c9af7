"""What every adaptive-depth method offers the rest of the tool, and how it is registered.

A method is a module over a backbone with the layer-stack interface (`model/stack.py`): ours or
a Hugging Face adapter. It subclasses `Method`, lives in one module under `depth/` and registers a
`MethodSpec` there once (docs/adding-a-method.md walks through one):

    register("method", "mod")(MethodSpec(name="mod", config=MoDConfig, build=..., kind="mod"))

From that entry the rest of the tool serves it without naming it: `adadepth fit` trains it
through its training hooks; run folders and `from_pretrained` / `save_pretrained` rebuild it from
its options and load what it added (`method_state`); `adadepth eval` adds its `eval_report`;
`adadepth bench` sweeps its cost knob (`knob`, `knob_setter`) against its `dense_reference` and
reads what really ran from a `measured()` copy of it; `adadepth generate` prints the same
measurement and uses its speculator if it has one (draft and verify over one cache).

Every forward takes a `Call` (`depth/dispatch.py`): how to decide, what to force, where to count.
Nothing is switched on the module around a call; code that only knows `model(idx, cache, start)`
is handed a `Bound` copy with the call fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.depth.dispatch import PLAIN, Bound, Call, Measurement, Tally
from adadepth.model import KVCache, LayerStack, Output
from adadepth.model.state import unique_state


@dataclass(frozen=True)
class Knob:
    """The setting that trades quality for compute, as `bench` and the leaderboard sweep it."""

    name: str  # "budget", "capacity", "threshold", "draft_layers", ...
    values: tuple[float, ...]  # what bench sweeps by default
    low: float = 0.0  # the valid range, for a one-line error on bad input
    high: float = 1.0
    integer: bool = False
    sweep: tuple[float, ...] = ()  # the leaderboard's frontier, when not evenly over the range

    def frontier(self, trained: float | None, count: int = 5) -> list[float]:
        """At least `count` settings from the cheapest end of the range to the one that
        computes as much as the dense model (for a fraction: (0, 1] in `count` equal steps;
        for a whole number: every value, or `count` spread ones), the trained one among them."""
        if self.sweep:
            values = list(self.sweep)
        elif self.integer:
            every = list(range(int(self.low) + 1, int(self.high) + 1))
            step = max(1, len(every) // count)
            values = sorted({float(v) for v in every[::step]} | {float(every[-1])})
        else:
            span = self.high - self.low
            values = [round(self.low + span * (i + 1) / count, 6) for i in range(count)]
        if trained is not None:
            values.append(float(trained))
        return sorted(set(values))


@dataclass(frozen=True)
class Evaluate:
    """`evaluate(lm_loss, split)`: the mean of `lm_loss(x, y)` over a split's evaluation windows,
    with the training job's sizes (what `fit` hands a method's training hooks)."""

    run: Callable[[Callable[[Tensor, Tensor], Tensor], str], float]
    batch_size: int

    def __call__(self, lm_loss: Callable[[Tensor, Tensor], Tensor], split: str) -> float:
        return self.run(lm_loss, split)


@dataclass(frozen=True)
class TrainingPlan:
    """What `adadepth fit` tells a method before training: how long, with which seed, how to
    measure a loss on the job's data (`evaluate`), a few training windows to initialise from
    (`windows`), and whether the backbone is new (`from_scratch`)."""

    total_steps: int
    seed: int
    evaluate: Evaluate | None = None
    windows: Tensor | None = None
    from_scratch: bool = False


@dataclass
class StepLoss:
    """One training step of a method: the loss to minimise, figures to log, and the FLOPs per
    token the step executed when the method knows them better than its static estimate
    (`Method.training_flops_per_token`)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    flops_per_token: float | None = None


class Method(nn.Module):
    """Base of every method's model. Subclasses set `name` and `knob` and implement `forward`,
    the cost hooks (`tally_flops`, `reference_flops_per_token`) and what they add
    (`method_modules`); the rest has defaults. Their options are `self.options`."""

    name: ClassVar[str] = ""
    knob: ClassVar[Knob | None] = None
    depth_unit: ClassVar[str] = ""  # what a token's depth (`Call.depth`) counts, for legends

    def __init__(self, backbone: LayerStack, options: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.options = options
        self.trains_backbone = False  # set by set_trainable, or by loading backbone weights

    @property
    def cfg(self) -> Any:
        return self.backbone.cfg

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """The cache generation and bench use (a looped method asks for one set per pass)."""
        return self.backbone.new_cache(batch, max_len)

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        """Logits of `idx`, deciding and recording as `call` says (`depth/dispatch.py`)."""
        raise NotImplementedError

    # -- the same weights under other instructions ----------------------------------------------
    def bound(self, call: Call) -> Bound:
        return Bound(self, call)

    def dense_reference(self) -> nn.Module:
        """The model this one is measured against, on the same weights: by default every token
        takes every computation the method could save (`Call(force=True)`)."""
        return Bound(self, Call(force=True))

    def measured(self, call: Call | None = None) -> tuple[Bound, Measurement]:
        """The model counting what its forwards run (under `call`'s other instructions), and
        the measurement that reads the count."""
        tally = Tally()
        call = (call or Call()).but(tally=tally)
        return Bound(self, call), Measurement(tally, self.tally_flops, self.tally_summary,
                                              self.tally_breakdown)

    @torch.no_grad()
    def measured_over(self, batches: Iterable[Tensor], call: Call | None = None) -> Measurement:
        """What forwards over batches of token ids ran (under `call`'s instructions)."""
        runner, m = self.measured(call)
        for x in batches:
            runner(x)
        return m

    def flops_ratios(self, measured: Measurement, context: float) -> dict[str, float]:
        """The FLOPs per token a measurement counted, over the dense reference's
        (`flops_ratio`) and over the backbone's alone (`flops_ratio_to_backbone`)."""
        flops = measured.flops_per_token(context)
        return {"flops_ratio": flops / self.reference_flops_per_token(context),
                "flops_ratio_to_backbone": flops / sum(
                    fl.forward_per_token(self.cfg, context).values())}

    def tally_flops(self, tally: Tally, context: float) -> float:
        """Forward FLOPs per token of the work counted in `tally`, attention at `context`."""
        raise NotImplementedError(f"method {self.name!r} does not count its costs")

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        """`tally_flops` by component, signed against the dense backbone's forward FLOPs per
        token (they sum to `tally_flops` minus those): what the method removed (< 0) and what
        it added (> 0). Methods name their components; by default one net figure."""
        return {"net": self.tally_flops(tally, context) - self.dense_flops_per_token(context)}

    def dense_flops_per_token(self, context: float) -> float:
        """The dense backbone's forward FLOPs per token (the layer stack and the head)."""
        return sum(fl.forward_per_token(self.cfg, context).values())

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        """What ran, in the method's own terms (full fractions, passes, exit layers, ...)."""
        return {"tokens": int(tally.tokens)}

    def speculator_for(self, call: Call) -> Any:
        """A draft/verify decoder for generation under `call` (`adadepth.generate.Speculator`),
        or None: decode token by token."""
        return None

    @property
    def speculator(self) -> Any:
        """The speculator of a plain call (what `generate` looks for on any model)."""
        return self.speculator_for(PLAIN)

    # -- saving and loading ---------------------------------------------------------------------
    def method_config(self) -> dict[str, Any]:
        """The options that rebuild this model over the same backbone (JSON-able)."""
        return self.options.model_dump()

    def method_modules(self) -> dict[str, nn.Module]:
        """Everything the method added to the backbone, by name (what `method_state` saves)."""
        return {}

    def method_buffers(self) -> dict[str, Tensor]:
        """Tensors outside those modules that belong to the method (calibrated thresholds)."""
        return {}

    def backbone_trained(self) -> bool:
        """True when training changed the backbone's weights, so they are saved too."""
        return self.trains_backbone

    @contextlib.contextmanager
    def original_backbone(self) -> Iterator[nn.Module]:
        """The backbone with everything the method installed inside it taken out."""
        yield self.backbone

    def method_state(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for prefix, module in self.method_modules().items():
            for key, value in module.state_dict().items():
                state[f"{prefix}.{key}"] = value.detach().contiguous().cpu()
        for key, value in self.method_buffers().items():
            state[key] = value.detach().reshape(-1).contiguous().cpu()
        if self.backbone_trained():
            with self.original_backbone() as backbone:
                state.update({f"backbone.{k}": v for k, v in unique_state(backbone).items()})
        return state

    def load_method_state(self, tensors: dict[str, Tensor]) -> None:
        for prefix, module in self.method_modules().items():
            sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            module.load_state_dict(sub)
        for key, buffer in self.method_buffers().items():
            with torch.no_grad():
                buffer.copy_(tensors[key].reshape(buffer.shape))
        backbone = {k[len("backbone."):]: v for k, v in tensors.items()
                    if k.startswith("backbone.")}
        if backbone:
            with self.original_backbone() as module:
                missing, unexpected = module.load_state_dict(backbone, strict=False)
            if unexpected:
                raise ValueError(f"backbone weights that fit no module: {unexpected[:3]}")
            self.trains_backbone = True

    def save_files(self, folder: Path) -> list[str]:
        """Write what the method keeps in another library's own format into `folder` (LoRA
        adapters in peft's), for `save_pretrained`; returns the `method_state` key prefixes those
        files hold, which controller.safetensors then leaves out."""
        return []

    def load_files(self, folder: Path) -> None:
        """Read back what `save_files` wrote into `folder`."""

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- training (`adadepth fit` and the commands built on it) ---------------------------------
    def begin_training(self, plan: TrainingPlan) -> dict[str, Any]:
        """Told the plan before training starts (curricula over steps, seeded label draws);
        returns figures of the starting point for metrics.json."""
        return {}

    def set_trainable(self, from_scratch: bool) -> None:
        """Which weights train: everything when the backbone is new, else by default only what
        the method added, on a frozen backbone."""
        self.trains_backbone = from_scratch
        self.requires_grad_(from_scratch)
        for module in self.method_modules().values():
            module.requires_grad_(True)

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> StepLoss:
        """The loss one training step minimises, and figures to log; by default the LM loss
        of the method's own training-mode forward."""
        loss = self(x).loss(y)
        return StepLoss(loss, {"lm_loss": loss.item()})

    def training_flops_per_token(self, seq_len: int) -> float:
        """FLOPs per token of one training step, for utilisation and the training-cost figures.
        The default charges the dense forward plus a backward of twice that when the backbone
        trains, once that when it is frozen (gradients cross it, inputs only); methods whose
        steps cost otherwise say so, here or per step (`StepLoss.flops_per_token`)."""
        forward = self.reference_flops_per_token((seq_len + 1) / 2)
        return forward * (3 if self.backbone_trained() else 2)

    def run_figures(self, history: list[dict[str, Any]], figures: dict[str, Any],
                    evaluate: Evaluate) -> dict[str, Any]:
        """Figures of the whole run for metrics.json, once it is trained, calibrated and
        validated: from the logged `history`, the figures already gathered (`begin_training`'s,
        `after_training`'s, `val_loss`) and further validation through `evaluate`."""
        return {}

    def held_back(self, step: int) -> set[str]:
        """Names of parameters that take no optimizer step at `step` (staged training)."""
        return set()

    @property
    def may_skip_parameters(self) -> bool:
        """True when a trainable parameter may get no gradient in a step (DDP must know)."""
        return False

    def calibration_windows(self, default: int) -> int:
        """How many held-out windows `after_training` is given to calibrate on (and as many,
        other ones, to measure on)."""
        return default

    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        """Calibrate what deployment needs on held-out windows (`calibration`), measure on
        others (`held_out`, or the validation split through `evaluate`); returns figures for
        the run's metrics.json."""
        return {}

    # -- evaluation -----------------------------------------------------------------------------
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        """Figures `adadepth eval` adds for this method (its realised compute, FLOPs ratio)."""
        return {}

    # -- the bench ------------------------------------------------------------------------------
    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        """Prepare the setting `value` of the knob now (calibrating on held-out windows if the
        method needs to); the returned call switches the model to it, cheaply and repeatably."""
        raise NotImplementedError(f"method {self.name!r} has no cost knob")

    def current_knob_value(self) -> float | None:
        """The knob's present value (for a run benched at the setting it was left in)."""
        return None

    def trained_range(self) -> tuple[float, float] | None:
        """The knob values the method was trained for, where training depends on the value
        (a budget, a capacity); None when any value is as trained as another (a threshold
        calibrated after training, a static choice)."""
        return None

    def current_setting(self) -> Callable[[], None]:
        """A call that puts the present knob setting back (bench restores it when done)."""
        return lambda: None

    def reference_flops_per_token(self, context: float) -> float:
        raise NotImplementedError

    def depth_fraction(self, depth: float) -> float:
        """The layer-stack compute a token of this depth received, as a fraction of the dense
        stack's (one colour scale for every method); by default depth counts layers run."""
        return depth / self.backbone.n_layers

    def most_token_depth(self) -> float:
        """The largest `token_depth` one token can receive (the top of the colour scale)."""
        return float(self.backbone.n_layers)


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: the method's name, its options class, its run-folder kind, its builder,
    and the training settings it starts from unless told otherwise (`optim`, `train` sections
    of `adadepth fit`'s config, e.g. routing's larger learning rate)."""

    name: str
    config: type  # a pydantic model of the method's options
    build: Callable[[LayerStack, Any], Method]  # (backbone, options) -> model
    kind: str  # what run folders of this method say in config.json
    summary: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
