"""The one config system: pydantic models, the preset registry, YAML and key=value overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from adadepth.errors import UserError


class Strict(BaseModel):
    """Unknown keys are errors, so a typo in an override never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    vocab_size: int = Field(0, ge=0, description="0 = taken from the tokenizer")
    d_model: PositiveInt = 128
    n_layers: PositiveInt = 4
    n_heads: PositiveInt = 4
    n_kv_heads: PositiveInt | None = None
    d_ff: PositiveInt = 384
    max_seq_len: PositiveInt = 1024
    rope_base: PositiveFloat = 10000.0
    norm_eps: PositiveFloat = 1e-6
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices of one FFN: SwiGLU has three."""
        return 3

    def check(self) -> None:
        if self.d_model % self.n_heads or self.head_dim % 2:
            raise UserError(
                f"d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.n_heads % self.kv_heads:
            raise UserError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")


# Named model shapes. Sizes are non-embedding parameters; `paper` with the GPT-2 vocabulary and
# untied embeddings is about 158M in all, the size of the published routing study's backbone.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=512),  # ~0.85M
    "small": dict(d_model=320, n_layers=8, n_heads=5, d_ff=864, max_seq_len=1024),  # ~10M
    "paper": dict(d_model=768, n_layers=12, n_heads=12, d_ff=1920, max_seq_len=1024,
                  tie_embeddings=False),  # ~81M + 2 x 38.6M embeddings
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


class DataConfig(Strict):
    corpus: str = "tiny-shakespeare"
    tokenizer: str = "char"
    block_size: PositiveInt = 64
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_docs: PositiveInt | None = None
    text_field: str = "text"


class OptimConfig(Strict):
    lr: PositiveFloat = 1e-3
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 = no clipping")


class TrainConfig(Strict):
    steps: int = Field(2000, ge=0, description="optimizer steps; 0 (fit only) = nothing "
                       "trains: the method over its backbone as built, calibrated only")
    batch_size: PositiveInt = 12
    grad_accum: PositiveInt = 1
    eval_interval: PositiveInt = 250
    eval_batches: PositiveInt = 20
    log_interval: PositiveInt = 10
    ckpt_interval: PositiveInt = 250
    seed: int = 1337
    device: str = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU")
    compile: bool = Field(False, description="torch.compile the training step (inductor); "
                          "the first steps pay for compiling")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    activation_checkpointing: bool = False


class PretrainConfig(Strict):
    preset: str = "tiny"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value else ""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` on top, section by section (nested dicts merge, other values replace)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys (`optim.lr=3e-4`) in a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # an optional section left unset (None) starts empty
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping")
    return data


C = TypeVar("C", bound=BaseModel)


def validate(cls: type[C], data: dict[str, Any]) -> C:
    """Build a config, turning pydantic's report into one line."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise UserError(f"config {where}: {problem}") from e


def dump_yaml(cfg: BaseModel, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
