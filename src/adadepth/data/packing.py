"""Token streams cached on disk as flat binaries, and batches cut from them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adadepth.data.corpora import Corpus, cache_dir
from adadepth.data.tokenizers import Tokenizer
from adadepth.errors import UserError

SPLITS = ("train", "val")
CHUNK_DOCS = 1000  # documents encoded per call: parallel in Rust, bounded in memory
PROGRESS_DOCS = 2000  # below this many documents a progress bar is noise


@dataclass
class TokenData:
    """Train and validation token streams (memory-mapped) of one corpus and tokenizer.

    Every window cut from them starts as the tokenizer starts a document: with its
    beginning-of-sequence token `bos` when it adds one (then a window holds one token less of
    the stream, and its first target is the stream token the BOS precedes), else with no
    special token at all."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    bos: int | None = None

    def cut(self, data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
        """Windows of `length` tokens from the stream offsets `starts`, (n, length)."""
        if self.bos is None:
            rows = data[starts[:, None] + np.arange(length)]
        else:
            body = data[starts[:, None] + np.arange(length - 1)]
            rows = np.concatenate([np.full((len(starts), 1), self.bos, body.dtype), body], 1)
        return torch.from_numpy(rows.astype(np.int64))

    def split(self, name: str) -> np.ndarray:
        """The token stream of split `name` ("train" or "val")."""
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}: use train or val")
        return self.train if name == "train" else self.val

    def check_block(self, block_size: int) -> None:
        """Refuse a context longer than either split can fill (inputs plus shifted targets)."""
        for name in SPLITS:
            self._long_enough(name, block_size)

    def _long_enough(self, split: str, block_size: int, batch_size: int = 1) -> np.ndarray:
        if block_size < 1 or batch_size < 1:
            raise UserError(
                f"block and batch sizes must be positive, got {block_size}, {batch_size}"
            )
        data = self.split(split)
        if len(data) < block_size + 1:
            raise UserError(
                f"corpus too short: the {split} split has {len(data)} tokens, "
                f"block size {block_size} needs at least {block_size + 1}"
            )
        return data

    def get_batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows `x` and next-token targets `y`, shape (batch_size, block_size)."""
        data = self._long_enough(split, block_size, batch_size)
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        windows = self.cut(data, starts.numpy(), block_size + 1)
        return windows[:, :-1], windows[:, 1:]

    def eval_batches(
        self, split: str, batch_size: int, block_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows covering the split, the last partial one dropped."""
        data = self._long_enough(split, block_size, batch_size)
        n_windows = (len(data) - 1) // block_size
        n_batches = -(-n_windows // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            first = b * batch_size
            starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
            windows = self.cut(data, starts, block_size + 1)
            yield windows[:, :-1], windows[:, 1:]


    def windows(self, split: str, length: int, count: int | None = None) -> torch.Tensor:
        """The first `count` (default: every) consecutive non-overlapping windows of `length`
        tokens of a split, (n, length); a window to score holds its targets: ask for block + 1.
        Only the tokens asked for are read from the memory-mapped stream."""
        data = self.split(split)
        stride = length if self.bos is None else length - 1
        n = len(data) // stride if stride > 0 else 0
        if count is not None:
            n = min(n, count)
        return self.cut(data, np.arange(n) * stride, length)

    def halves(self, split: str, length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two disjoint sets of up to `count` windows: the even ones (to calibrate on) and the
        odd ones (to measure on): different text from the same distribution."""
        windows = self.windows(split, length, 2 * count)
        return windows[0::2], windows[1::2]


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer) -> TokenData:
    """Tokenize the corpus once per tokenizer and cache it; later calls map the cache."""
    key = hashlib.sha256(f"{corpus.fingerprint}:{tokenizer.name}:{tokenizer.fingerprint}".encode())
    folder = cache_dir() / "tokens" / key.hexdigest()[:16]
    data = _load(folder)
    if data is not None:
        data.bos = tokenizer.bos_id
        return data
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    counts = {
        name: _write_split(folder / f"{name}.bin", docs, tokenizer, dtype, name)
        for name, docs in (("train", corpus.train), ("val", corpus.val))
    }
    meta = {
        "corpus": corpus.name,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "tokens": counts,
    }
    # meta.json goes last: its presence says both binaries are complete.
    _atomic_write(folder / "meta.json", json.dumps(meta, indent=2).encode())
    data = _load(folder)
    assert data is not None, "a freshly written token cache must load"
    data.bos = tokenizer.bos_id
    return data


def _load(folder: Path) -> TokenData | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for name in SPLITS:
            path = folder / f"{name}.bin"
            if path.stat().st_size != meta["tokens"][name] * dtype.itemsize:
                return None  # a cache from another writer or a damaged disk: rebuild it
            # numpy cannot map an empty file; an empty split is legal until batches are cut
            empty = meta["tokens"][name] == 0
            arrays[name] = np.zeros(0, dtype) if empty else np.memmap(path, dtype, mode="r")
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return TokenData(arrays["train"], arrays["val"], int(meta["vocab_size"]))


def _write_split(path: Path, docs: list[str], tokenizer: Tokenizer, dtype: type, name: str) -> int:
    """Encode documents chunk by chunk into `path` (atomically); returns the token count."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    total = 0
    bar = tqdm(
        total=len(docs), desc=f"tokenizing {name}", unit="doc", disable=len(docs) < PROGRESS_DOCS
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for start in range(0, len(docs), CHUNK_DOCS):
                chunk = docs[start : start + CHUNK_DOCS]
                for ids in tokenizer.encode_batch(chunk):
                    array = np.asarray(ids + eos, dtype=dtype)
                    out.write(array.tobytes())
                    total += len(array)
                bar.update(len(chunk))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return total


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
