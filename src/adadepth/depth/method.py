"""What every adaptive-depth method offers the rest of the tool, and how it is registered.

A method is a module over a backbone with the layer-stack interface (`model/transformer.py`):
ours or a Hugging Face adapter. It subclasses `Method` and registers a `MethodSpec` once:

    @register("method", "routing")
    def _spec() -> MethodSpec: ...   # or register("method", name)(MethodSpec(...))

From that entry the rest of the tool serves it without naming it: run folders and
`from_pretrained` / `save_pretrained` rebuild it from its config and load what it added
(`method_state`); `adadepth eval` adds its `eval_report`; `adadepth bench` sweeps its cost knob
(`knob`, `knob_setter`) against its dense reference (`dense_reference`) and reads what really
ran from `measure()`; `adadepth generate` prints the same measurement and uses its `speculator`
if it has one (draft and verify over one cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from adadepth.model import KVCache, Output, causal_lm_loss
from adadepth.model.state import unique_state


@dataclass(frozen=True)
class Knob:
    """The setting that trades quality for compute, as `bench` and the leaderboard sweep it."""

    name: str  # "budget", "capacity", "threshold", "draft_layers", ...
    values: tuple[float, ...]  # what bench sweeps by default
    low: float = 0.0  # the valid range, for a one-line error on bad input
    high: float = 1.0
    integer: bool = False


class Measurement:
    """What ran during a `measure()` block: FLOPs per token and a summary for reports.

    Methods fill it from their own records (full fractions, passes, exit layers); `adadepth
    bench` divides the reference's FLOPs by `flops_per_token` for the ideal speedup.
    """

    def __init__(self, flops: Callable[[float], float],
                 summary: Callable[[], dict[str, Any]]) -> None:
        self._flops, self._summary = flops, summary

    def flops_per_token(self, context: float) -> float:
        return self._flops(context)

    def summary(self) -> dict[str, Any]:
        return self._summary()


class Method(nn.Module):
    """Base of every method's model. Subclasses set `name` and `knob` and implement forward,
    `method_config`, `method_modules` and the cost hooks; the rest has defaults."""

    name: ClassVar[str] = ""
    knob: ClassVar[Knob | None] = None
    depth_unit: ClassVar[str] = ""  # what `token_depth` counts, for legends

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.trains_backbone = False  # set by set_trainable, or by loading backbone weights

    @property
    def cfg(self) -> Any:
        return self.backbone.cfg

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """The cache generation and bench use (a looped method asks for one set per pass)."""
        return self.backbone.new_cache(batch, max_len)

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None) -> Output:
        raise NotImplementedError

    # -- saving and loading ---------------------------------------------------------------------
    def method_config(self) -> dict[str, Any]:
        """The options that rebuild this model over the same backbone (JSON-able)."""
        raise NotImplementedError

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
    def begin_training(self, total_steps: int) -> None:
        """Told the planned length of training before it starts (for curricula over steps)."""

    def set_trainable(self, from_scratch: bool) -> None:
        """Which weights train: everything when the backbone is new, else by default only what
        the method added, on a frozen backbone."""
        self.trains_backbone = from_scratch
        self.requires_grad_(from_scratch)
        for module in self.method_modules().values():
            module.requires_grad_(True)

    def training_loss(self, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """The loss one training step minimises, and figures to log; by default the LM loss
        of the method's own training-mode forward."""
        loss = causal_lm_loss(self(x).logits, y)
        return loss, {"lm_loss": loss.item()}

    def training_flops_per_token(self, seq_len: int) -> float:
        """FLOPs per token of one training step, for utilisation and the training-cost figures.
        The default charges the dense forward plus a backward of twice that when the backbone
        trains, once that when it is frozen (gradients cross it, inputs only); methods whose
        steps cost otherwise say so."""
        forward = self.reference_flops_per_token((seq_len + 1) / 2)
        return forward * (3 if self.backbone_trained() else 2)

    def held_back(self, step: int) -> set[str]:
        """Names of parameters that take no optimizer step at `step` (staged training)."""
        return set()

    @property
    def may_skip_parameters(self) -> bool:
        """True when a trainable parameter may get no gradient in a step (DDP must know)."""
        return False

    def after_training(self, calibration: Tensor, held_out: Tensor) -> dict[str, Any]:
        """Calibrate what deployment needs on held-out windows (`calibration`), measure on
        others (`held_out`); returns figures for the run's metrics.json."""
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

    def current_setting(self) -> Callable[[], None]:
        """A call that puts the present knob setting back (bench restores it when done)."""
        return lambda: None

    @contextlib.contextmanager
    def dense_reference(self) -> Iterator[None]:
        """The model this one is measured against, on the same weights, for the duration."""
        raise NotImplementedError(f"method {self.name!r} has no dense reference")
        yield

    def reference_flops_per_token(self, context: float) -> float:
        raise NotImplementedError

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Record what the forwards inside the block really ran."""
        raise NotImplementedError(f"method {self.name!r} does not record its costs")
        yield

    def most_token_depth(self) -> float:
        """The largest `token_depth` one token can receive (the top of the colour scale)."""
        return float(self.backbone.n_layers)

    def token_depth(self) -> Tensor | None:
        """Per token of the last forward call, (B, T): the compute it received, in
        `depth_unit` (full-path layers, passes, layers run before exiting, ...); None when the
        method keeps no record. `generate --show-depth` and the leaderboard colour text by it."""
        return None

    speculator: Any = None  # a draft/verify decoder for `generate` (adadepth.generate.Speculator)


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: the method's name, its config class, its run-folder kind, its builder."""

    name: str
    config: type  # a pydantic model of the method's options
    build: Callable[[nn.Module, Any], Method]  # (backbone, config) -> model
    kind: str  # what run folders of this method say in config.json
    summary: str = ""
    command: str | None = None  # the command that trains it, when not the generic `fit`


@contextlib.contextmanager
def attribute_set(obj: Any, name: str, value: Any) -> Iterator[None]:
    """`obj.name = value` for the duration of the block, then back to what it was (a method's
    `dense_reference` is often one switch of its own)."""
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)
