"""Tuning a pretrained backbone as a whole (`full`) or through LoRA adapters (`lora`).

These are the reference regimes of the late-layer ensemble (`depth/ensemble.py`), which builds on
`TunedModel`. LoRA comes from the `peft` library, injected in place into the backbone's own
modules by target-module names (`peft.inject_adapter_in_model`): our `Transformer` (whose
attention projections are named as Llama's, `q_proj` ... `o_proj`) and the transformers model
inside a Hugging Face adapter alike. The LoRA options are peft's `LoraConfig` fields under their
own names (`r`, `lora_alpha`, `lora_dropout`, `target_modules`, and any other, passed on as
given), so peft judges them; what it rejects is a one-line error.

What a tuned model adds is saved twice over: in the run folder's checkpoint with the rest of
`method_state` (LoRA tensors under `lora.`, in peft's key names), and by `save_pretrained` as
peft's own adapter folder (`adapter/adapter_config.json`, `adapter_model.safetensors`), which
`peft.PeftModel.from_pretrained` also reads.

The bench's reference for every tuned model is the pretrained model it started from: adapters
switched off, the backbone's own head. Full fine-tuning costs what the base costs (speedup 1);
LoRA adds its low-rank products (unmerged, as trained).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from adadepth import flops as fl
from adadepth.config import Strict
from adadepth.data.corpora import one_line
from adadepth.depth.dispatch import PLAIN, Call, Tally
from adadepth.depth.method import Knob, Method, MethodSpec
from adadepth.depth.registry import register
from adadepth.errors import UserError
from adadepth.model import KVCache, LayerStack, Output

ADAPTER_DIR = "adapter"  # peft's adapter folder inside a save_pretrained directory
PEFT_PREFIX = "base_model.model."  # how a PeftModel names the wrapped model's weights
LORA_KEY = "lora."  # method_state prefix of the LoRA tensors
# Our Transformer names its attention projections as Llama does; peft's own table gives the
# targets of transformers models.
OWN_TARGETS = ["q_proj", "v_proj"]


class LoraOptions(BaseModel):
    """peft's `LoraConfig` fields, by their own names; fields not listed go to peft unchanged.
    Defaults: rank 8, alpha 16 (scale 2), no dropout, and target_modules None = the attention
    query and value projections (peft's table for transformers models; q_proj, v_proj on ours),
    the placement of the LoRA paper (Hu et al. 2021)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None


class FullConfig(Strict):
    """Full fine-tuning has no options of its own (the learning rate is `optim.lr`)."""


def lora_root(backbone: nn.Module) -> nn.Module:
    """Where adapters go: the transformers model inside a Hugging Face adapter (so saved
    adapters are peft's for that model), else the backbone itself."""
    return getattr(backbone, "hf", backbone)


def inject_lora(backbone: nn.Module, options: LoraOptions) -> Any:
    """Inject LoRA layers into the backbone in place; returns peft's `LoraConfig`."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise UserError("LoRA comes from the peft library: pip install 'adadepth[hf]'") from err

    kwargs = options.model_dump()
    root = lora_root(backbone)
    if kwargs["target_modules"] is None and getattr(root, "config", None) is None:
        kwargs["target_modules"] = OWN_TARGETS
    try:
        config = LoraConfig(**kwargs)
        inject_adapter_in_model(config, root)
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"peft rejected the LoRA options: {one_line(err)}") from err
    return config


def lora_layers(backbone: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in lora_root(backbone).modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def without_lora(backbone: nn.Module) -> Iterator[None]:
    """The backbone's own layers back in place of the LoRA layers wrapping them, for the
    duration (to fingerprint or save the backbone as it was loaded)."""
    from peft.tuners.lora import LoraLayer

    root = lora_root(backbone)
    swapped = []
    for name, module in list(root.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = root.get_submodule(parent_name)
            setattr(parent, attr, module.get_base_layer())
            swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


@contextlib.contextmanager
def adapters_off(adapters: Sequence[nn.Module]) -> Iterator[None]:
    """peft's LoRA layers switched off for the block (the pretrained model), then back on."""
    for layer in adapters:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in adapters:
            layer.enable_adapters(True)


class TunedModel(Method):
    """A backbone tuned in full, or through LoRA adapters (peft); read through its own head."""

    name = "full"
    knob = Knob("late_layers", (1.0,), low=0.0, high=1.0, integer=True)
    depth_unit = ""

    def __init__(self, backbone: LayerStack, cfg: BaseModel, lora: LoraOptions | None = None,
                 full: bool = False) -> None:
        super().__init__(backbone, cfg)
        self.full = full
        self.lora_config = inject_lora(backbone, lora) if lora is not None else None
        self.adapters = lora_layers(backbone) if lora is not None else []

    # -- running ----------------------------------------------------------------------------
    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        """Forced (`Call(force=True)`, the bench's reference): the pretrained model, adapters
        off and the backbone's own head."""
        if call.force is True:
            with adapters_off(self.adapters):
                return self.backbone(idx, cache, start, positions=positions)
        out = self.backbone(idx, cache, start, positions=positions)
        self.count(call, idx.numel(), heads=1.0, mixed=0.0)
        return out

    @staticmethod
    def count(call: Call, tokens: int, heads: float, mixed: float) -> None:
        """Count a forward: its tokens, head evaluations and states mixed per token."""
        call.count("tokens", tokens)
        call.count("heads", heads * tokens)
        call.count("mixed", mixed * tokens)

    # -- which parameters train; what is saved -------------------------------------------------
    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.adapters for n, p in m.named_parameters() if "lora_" in n]

    def set_trainable(self, from_scratch: bool) -> None:
        """Everything when tuning in full (or from scratch); else the adapters and whatever the
        method added, on a frozen backbone."""
        self.trains_backbone = from_scratch or self.full
        self.requires_grad_(self.trains_backbone)
        for p in self.lora_parameters():
            p.requires_grad_(True)
        for module in self.method_modules().values():
            module.requires_grad_(True)

    def backbone_trained(self) -> bool:
        return self.full or self.trains_backbone

    @contextlib.contextmanager
    def original_backbone(self) -> Iterator[nn.Module]:
        with without_lora(self.backbone) if self.adapters else contextlib.nullcontext():
            yield self.backbone

    def lora_state(self) -> dict[str, Tensor]:
        """The adapters' tensors under peft's key names (adapter name left out)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(lora_root(self.backbone), save_embedding_layers=False)
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_lora_state(self, state: dict[str, Tensor], where: str) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(lora_root(self.backbone), state)
        expected = set(self.lora_state())
        if result.unexpected_keys or expected - set(state):
            raise UserError(f"the LoRA weights in {where} do not fit this model's adapters")

    def method_state(self) -> dict[str, Tensor]:
        state = super().method_state()
        if self.adapters:
            state.update({LORA_KEY + k: v for k, v in self.lora_state().items()})
        return state

    def load_method_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_method_state(tensors)
        lora = {k[len(LORA_KEY):]: v for k, v in tensors.items() if k.startswith(LORA_KEY)}
        if lora:  # absent when save_pretrained kept them in peft's own folder (load_files)
            self.load_lora_state(lora, "the checkpoint")

    def save_files(self, folder: Path) -> list[str]:
        """The adapters as peft saves them, readable by `peft.PeftModel.from_pretrained`."""
        if not self.adapters:
            return []
        from safetensors.torch import save_file

        out = folder / ADAPTER_DIR
        out.mkdir(parents=True, exist_ok=True)
        self.lora_config.save_pretrained(str(out))
        save_file({PEFT_PREFIX + k: v for k, v in self.lora_state().items()},
                  str(out / "adapter_model.safetensors"))
        return [LORA_KEY]

    def load_files(self, folder: Path) -> None:
        if not self.adapters:
            return
        from safetensors.torch import load_file

        path = folder / ADAPTER_DIR / "adapter_model.safetensors"
        if not path.is_file():
            raise UserError(f"{folder} lacks its LoRA adapters ({ADAPTER_DIR}/)")
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
        self.load_lora_state(state, str(path))

    # -- cost ---------------------------------------------------------------------------------
    def lora_flops(self) -> float:
        """Forward FLOPs per token of the adapters: x A^T then (.) B^T, 2 per weight."""
        return sum(2.0 * p.numel() for p in self.lora_parameters())

    def extra_flops(self, heads: float, mixed: float) -> float:
        """Forward FLOPs per token the method adds to the backbone's own, with `heads` head
        evaluations and `mixed` vectors combined per token (none here)."""
        return 0.0

    def inference_flops_per_token(self, context: float, heads: float = 1.0,
                                  mixed: float = 0.0) -> float:
        f = fl.forward_per_token(self.cfg, context)
        body = f["attn_proj"] + f["attn_scores"] + f["ffn"]
        return body + self.lora_flops() + heads * f["lm_head"] + self.extra_flops(heads, mixed)

    def reference_flops_per_token(self, context: float) -> float:
        return sum(fl.forward_per_token(self.cfg, context).values())

    def training_heads(self) -> int:
        """Head evaluations per token of a training step (also the vectors it mixes)."""
        return 1

    def training_flops_per_token(self, seq_len: int) -> float:
        """Forward, then a backward that crosses only what lies above the lowest trainable
        module: full tuning trains everything (3x forward); LoRA (on every layer by default)
        sends gradients through every frozen layer (1x their weights, 2x the attention scores)
        and trains its own weights (2x); every regime crosses its heads (inputs only)."""
        context = fl.causal_context(seq_len)
        heads = self.training_heads()
        mixed = heads if heads > 1 else 0
        forward = self.inference_flops_per_token(context, heads, mixed)
        if self.backbone_trained():
            return 3 * forward
        f = fl.forward_per_token(self.cfg, context)
        backward = heads * f["lm_head"] + 2 * self.extra_flops(heads, mixed)
        if self.adapters:
            backward += f["attn_proj"] + f["ffn"] + 2 * f["attn_scores"] + 2 * self.lora_flops()
        return forward + backward

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        return lambda: None  # one setting: the tuned model as it is

    def current_knob_value(self) -> float | None:
        return 1.0

    def tally_flops(self, tally: Tally, context: float) -> float:
        tokens = max(tally.tokens, 1.0)
        return self.inference_flops_per_token(context, tally.get("heads") / tokens,
                                              tally.get("mixed") / tokens)

    def tally_breakdown(self, tally: Tally, context: float) -> dict[str, float]:
        """Adapters, head reads beyond one per token, and the ensemble's mixing (router,
        weighted sums)."""
        tokens = max(tally.tokens, 1.0)
        heads, mixed = tally.get("heads") / tokens, tally.get("mixed") / tokens
        head = fl.forward_per_token(self.cfg, context)["lm_head"]
        return {"LoRA adapters": self.lora_flops(), "extra head reads": (heads - 1) * head,
                "mixing": self.extra_flops(heads, mixed)}

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        return self.summary(tally.get("heads") / max(tally.tokens, 1.0), tally.tokens)

    def summary(self, heads: float, tokens: float) -> dict[str, Any]:
        return {"head_evaluations": heads, "lora_parameters": sum(
            p.numel() for p in self.lora_parameters()), "tokens": tokens}

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_report(self, data: Any, block_size: int, batch_size: int,
                    max_batches: int | None) -> dict[str, Any]:
        """Next-token accuracy on the validation split, and the FLOPs ratio to the base."""
        correct = total = 0
        device = next(self.parameters()).device
        for x, y in data.eval_batches("val", batch_size, block_size, max_batches):
            logits = self(x.to(device)).logits
            correct += int((logits.argmax(-1) == y.to(device)).sum())
            total += y.numel()
        context = fl.causal_context(block_size)
        return {"val_accuracy": correct / max(total, 1),
                "flops_ratio": self.inference_flops_per_token(context)
                / self.reference_flops_per_token(context)}


class LoraTuned(TunedModel):
    name = "lora"

    def __init__(self, backbone: nn.Module, cfg: LoraOptions) -> None:
        super().__init__(backbone, cfg, lora=cfg)


def _full(backbone: nn.Module, cfg: FullConfig) -> TunedModel:
    return TunedModel(backbone, cfg, full=True)


register("method", "lora")(MethodSpec(
    name="lora", config=LoraOptions, build=LoraTuned, kind="lora",
    summary="LoRA adapters (peft) on a frozen backbone; options are peft's LoraConfig fields"))
register("method", "full")(MethodSpec(
    name="full", config=FullConfig, build=_full, kind="full",
    summary="full fine-tuning of a pretrained backbone (the reference of the tuning study)"))
