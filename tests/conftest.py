"""Fixtures shared by every test file: a private cache folder and a tiny pretrained backbone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and on a shared 2-core machine the OpenMP
# threads of several processes contend badly (10x slower steps were seen).
torch.set_num_threads(1)

# Small enough to train in seconds, deep enough (4 layers) that routing has inner layers to control.
TINY_OVERRIDES = [
    "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.d_ff=128",
    "model.max_seq_len=128", "data.block_size=32", "train.batch_size=8",
    "train.eval_interval=40", "train.eval_batches=4", "train.ckpt_interval=40",
    "train.log_interval=10", "optim.warmup_steps=5",
]
TINY_STEPS = 40


@pytest.fixture(scope="session", autouse=True)
def adadepth_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Token and tokenizer caches go to a throwaway folder (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("adadepth-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("ADADEPTH_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory, adadepth_cache: Path) -> Path:
    """A dense run folder (char-level tiny-shakespeare, 4 layers of width 64, 40 steps).

    Treat it as read-only; copy it first to change it.
    """
    from adadepth.config import PretrainConfig, apply_overrides, preset, validate
    from adadepth.jobs.pretrain import pretrain

    out = tmp_path_factory.mktemp("tiny-backbone")
    base = {"preset": "tiny", "model": preset("tiny").model_dump(),
            "data": {"corpus": "tiny-shakespeare", "tokenizer": "char"},
            "train": {"steps": TINY_STEPS}}
    cfg = validate(PretrainConfig, apply_overrides(base, TINY_OVERRIDES))
    pretrain(cfg, out, show_progress=False)
    return out


def corpus_file(tmp_path_factory: pytest.TempPathFactory, chars: int) -> Path:
    """The first `chars` characters of tiny-shakespeare as a local .txt corpus."""
    from adadepth.data.corpora import tiny_shakespeare_text

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(tiny_shakespeare_text()[:chars])
    return path


def tiny_llama():
    """A tiny random transformers Llama (4 layers, width 32, seed 0) and the GPT-2 tokenizer
    (50,257 tokens) it is sized for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adadepth.data import build_tokenizer

    tok = build_tokenizer("gpt2", None).hf
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    return model, tok


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, adadepth_cache: Path) -> Path:
    """A tiny random Llama saved as a transformers directory with the GPT-2 tokenizer.

    Treat it as read-only, as a user's model folder is.
    """
    out = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_llama()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
